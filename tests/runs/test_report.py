"""report.html from hand-made run directories: its sections, plots, settings and samples; every piece of the
run's text escaped; nothing loaded from anywhere; missing or damaged files leave sections out, never crash;
`grpo report` errors as one line."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grpo.cli.main import app
from grpo.errors import RunFilesError
from grpo.runs.page import SCRIPT
from grpo.runs.report import SAMPLE_STEPS_SHOWN, write_report

EVIL_COMPLETION = '<script>alert("x")</script></pre><img src=x onerror=alert(1)> & done'
EVIL_PROMPT = "<|im_start|>user\nWhat is 2 + 2? <style>body{display:none}</style><|im_end|>\n"


class Page(HTMLParser):
    """The elements of a page: (tag, attributes) in order, and the text inside each <script>."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data

    def ids(self) -> list[str]:
        return [a["id"] for _, a in self.elements if a.get("id")]

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [a for tag, a in self.elements if tag == name]


def metrics_line(step: int, reward: float) -> dict:
    return {
        "step": float(step),
        "reward": reward,
        "reward_std": 0.3,
        "rewards/accuracy/mean": reward / 2,
        "rewards/format/mean": reward / 2,
        "kl": 0.001 * step,
        "entropy/mean": 1.0 - 0.01 * step,
        "clip_ratio/low_mean": 0.01,
        "clip_ratio/high_mean": 0.02,
        "clip_ratio/region_mean": 0.03,
        "completions/mean_length": 20.0,
        "completions/min_length": 10.0,
        "completions/max_length": 32.0,
        "completions/truncated_ratio": 0.1,
        "frac_reward_zero_std": 0.2,
        "loss": 0.01,
        "grad_norm": float("nan") if step == 3 else 0.5,
        "step_time": 10.0 + step % 2,
        "generation_time": 6.0,
    }


def write_lines(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_eval(path: Path, solved: float) -> None:
    summary = {"rows": 200.0, "solved": solved, "reward/accuracy": solved, "reward/format": 0.9}
    path.write_text(json.dumps({"summary": summary, "rows": []}))


def sample(group: int, completion: str, reward: float, advantage: float) -> dict:
    return {
        "group": group,
        "prompt": EVIL_PROMPT,
        "completion": completion,
        "rewards": {"accuracy": reward, "format": None},
        "reward": reward,
        "advantage": advantage,
        "length": 12,
        "truncated": group == 1,
        "skipped": False,
    }


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A finished 12-step run whose reward rises while its held-out score falls (reward hacking)."""
    run = tmp_path / "my-run"
    run.mkdir()
    config = {
        "model_name_or_path": "smollm2-135m-instruct",
        "dataset": "data/<b>sums</b>.jsonl",
        "learning_rate": 0.000123,
        "reward_funcs": ["accuracy", {"name": "format", "tags": ["answer"]}],
        "eval_dataset": None,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_lines(run / "metrics.jsonl", [metrics_line(step, 0.5 + 0.1 * step) for step in range(1, 13)])
    write_eval(run / "eval_before.json", 0.30)
    write_eval(run / "eval_step6.json", 0.50)
    write_eval(run / "eval_after.json", 0.20)
    samples = [
        {"step": step, "samples": [sample(0, f"answer {step} <answer>4</answer>", 2.0, 0.9)]}
        for step in range(1, 13)
    ]
    samples[4]["samples"].append(sample(1, EVIL_COMPLETION, 0.0, -1.2))
    write_lines(run / "samples.jsonl", samples)
    summary = {
        "steps": 12,
        "held_out_solved_before": 0.3,
        "held_out_solved_after": 0.2,
        "peak_memory_mb": 3456,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_the_report_has_every_section_and_plot_in_reading_order(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    page = Page(text)
    sections = [a["id"] for a in page.tags("section")]
    assert sections == ["diagnostics", "summary", "plots", "samples", "config", "files"]
    figures = [a["id"] for a in page.tags("figure")]
    assert figures == [
        "plot-reward",
        "plot-held-out",
        "plot-kl",
        "plot-entropy",
        "plot-clipping",
        "plot-length",
        "plot-signal",
        "plot-loss",
        "plot-grad-norm",
        "plot-time",
    ]
    assert len(page.tags("svg")) == len(figures)
    assert not [i for i, n in Counter(page.ids()).items() if n > 1], "ids are unique across the plots"
    assert "Reward per step" in text and "Held-out score" in text and "KL to the reference" in text


def test_the_diagnostics_come_first_and_name_the_step_and_numbers(run_dir):
    text = write_report(run_dir).read_text()
    diagnostics = text[text.index('<section id="diagnostics">') : text.index('<section id="summary">')]
    assert 'data-kind="reward_hacking"' in diagnostics
    assert "step 12: the held-out solved rate fell from 50.0% (step 6) to 20.0%" in diagnostics
    assert "still holding at the last logged step" in diagnostics


def test_the_settings_and_headline_figures_are_shown(run_dir):
    text = write_report(run_dir).read_text()
    config = text[text.index('<section id="config">') :]
    assert "<td>learning_rate</td><td><code>0.000123</code></td>" in config
    assert "<code>[&quot;accuracy&quot;, {&quot;name&quot;: &quot;format&quot;" in config
    assert "<td>eval_dataset</td><td><code>null</code></td>" in config
    assert "data/&lt;b&gt;sums&lt;/b&gt;.jsonl" in text and "<b>sums</b>" not in text
    assert "30.0% → <b>20.0%</b>" in text and "3456 MB" in text
    assert "after training (step 12)" in text and "before training" in text


def test_model_output_cannot_become_markup(run_dir):
    text = write_report(run_dir).read_text()
    page = Page(text)
    assert page.scripts == [SCRIPT], "the page's own script is the only one"
    assert not page.tags("img") and len(page.tags("style")) == 1 + len(page.tags("svg"))
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;/pre&gt;&lt;img src=x" in text
    assert "&lt;style&gt;body{display:none}&lt;/style&gt;" in text
    assert "&amp; done" in text
    # Even if something slipped through, the page runs no script but its own and loads nothing.
    (policy,) = [a["content"] for a in page.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    assert policy.startswith("default-src 'none';") and f"script-src 'sha256-{digest}'" in policy


def test_nothing_is_loaded_from_anywhere(run_dir):
    page = Page(write_report(run_dir).read_text())
    for tag, attrs in page.elements:
        assert "src" not in attrs, tag
        for name in ("href", "xlink:href"):
            link = attrs.get(name) or ""
            assert not link.startswith(("http:", "https:", "//")), (tag, link)
    assert [a["href"] for a in page.tags("link")] == ["data:,"]


def test_samples_show_per_step_with_rewards_advantages_and_a_search_box(run_dir):
    text = write_report(run_dir).read_text()
    page = Page(text)
    steps = [a for a in page.tags("details") if "step" in (a.get("class") or "")]
    assert [a["data-step"] for a in steps] == [str(step) for step in range(1, 13)]
    assert sum(1 for a in page.tags("tr") if a.get("class") == "sample") == 13
    assert [a["id"] for a in page.tags("input")] == ["sample-search"]
    assert '<span class="num neg">-1.200</span>' in text and '<span class="num pos">0.900</span>' in text
    assert "<th>accuracy</th><th>format</th><th>reward</th><th>advantage</th>" in text


def test_a_long_run_shows_samples_of_a_spread_of_steps(run_dir):
    lines = [{"step": step, "samples": [sample(0, f"c{step}", 1.0, 0.0)]} for step in range(1, 201)]
    write_lines(run_dir / "samples.jsonl", lines)
    page = Page(write_report(run_dir).read_text())
    shown = [int(a["data-step"]) for a in page.tags("details") if "step" in (a.get("class") or "")]
    assert len(shown) == SAMPLE_STEPS_SHOWN and shown[0] == 1 and shown[-1] == 200


@pytest.mark.parametrize(
    ("keep", "sections"),
    [
        (["metrics.jsonl"], ["diagnostics", "summary", "plots", "files"]),
        (["config.yaml"], ["config", "files"]),
        (["summary.json"], ["summary", "files"]),
        (["metrics.jsonl", "samples.jsonl"], ["diagnostics", "summary", "plots", "samples", "files"]),
    ],
)
def test_missing_files_leave_their_sections_out(run_dir, keep, sections):
    for path in run_dir.iterdir():
        if path.name not in keep:
            path.unlink()
    page = Page(write_report(run_dir).read_text())
    assert [a["id"] for a in page.tags("section")] == sections


def test_damaged_files_are_named_and_the_rest_still_shown(run_dir):
    (run_dir / "config.yaml").write_text("learning_rate: [unclosed\n")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 13, "rew')  # a torn last line
    (run_dir / "samples.jsonl").write_bytes(b"\xff\xfe not text")
    (run_dir / "eval_step6.json").write_text("{")
    (run_dir / "eval_after.json").write_text("[0.2]")
    text = write_report(run_dir).read_text()
    page = Page(text)
    assert [a["id"] for a in page.tags("section")] == ["diagnostics", "summary", "plots", "files"]
    assert "config.yaml: could not be read (ParserError)" in text
    assert "metrics.jsonl: 1 unreadable line(s) left out" in text
    assert "samples.jsonl: could not be read (UnicodeDecodeError)" in text
    assert "eval_step6.json: could not be read (JSONDecodeError)" in text
    assert "eval_after.json: not a held-out evaluation (no summary)" in text


def test_a_key_in_the_settings_is_never_shown(run_dir):
    """A config.yaml written by hand, or by an older grpo, may hold a judge's api_key: the page leaves it
    out."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["reward_funcs"].append({"name": "judge", "api_model": "m", "api_key": "sk-SECRET123"})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    text = write_report(run_dir).read_text()
    assert "sk-SECRET123" not in text and "&quot;api_model&quot;: &quot;m&quot;" in text


def test_an_empty_or_missing_directory_is_refused(tmp_path):
    with pytest.raises(RunFilesError, match="no such run directory"):
        write_report(tmp_path / "nowhere")
    with pytest.raises(RunFilesError, match="not a run directory"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("not a run")
    return tmp_path / "notes.txt"


def only_damaged_metrics(tmp_path: Path) -> Path:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "rew')
    (tmp_path / "eval_before.json").write_text("{")
    return tmp_path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "nowhere", "error: {path}: no such run directory"),
        (
            lambda tmp: tmp,
            "error: {path}: not a run directory (no readable config.yaml, metrics.jsonl or summary.json)",
        ),
        (a_file, "error: {path}: is a file, not a run directory"),
        (
            only_damaged_metrics,
            "error: {path}: nothing to report: metrics.jsonl: 1 unreadable line(s) left out; "
            "eval_before.json: could not be read (JSONDecodeError)",
        ),
    ],
)
def test_grpo_report_bad_input_is_one_line_and_exit_code_2(tmp_path, make, message):
    path = make(tmp_path)
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [message.format(path=path)]
    assert not (tmp_path / "report.html").exists()


def test_a_report_that_cannot_be_written_is_one_line_and_changes_nothing(run_dir):
    (run_dir / "report.html").mkdir()
    before = sorted(run_dir.rglob("*"))
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {run_dir / 'report.html'}: is a directory; remove it to write the report there"
    ]
    assert sorted(run_dir.rglob("*")) == before


def test_grpo_report_prints_the_path_it_wrote(run_dir):
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run_dir / "report.html")
