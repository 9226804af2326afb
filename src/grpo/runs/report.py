"""report.html: a run's evidence on one page that needs nothing but a browser.

:func:`write_report` reads what a run left in its directory — config.yaml, metrics.jsonl, the held-out
evaluations (eval_before.json, eval_stepN.json, eval_after.json), samples.jsonl and summary.json — and
writes ``report.html`` beside them: the warnings of :mod:`grpo.runs.diagnostics` at the top, the headline
figures, plots of the metrics over the steps (reward per function, held-out score, KL, entropy, clipping,
completion length, episodes' turns and tool calls, step time), the sampled completions (multi-turn
trajectories) of each logged step with their rewards and advantages (with a search box,
:mod:`grpo.runs.report_samples`), and the settings. `grpo train` writes it at the end of a run; `grpo report
RUN_DIR` rebuilds it at any time, from a run still going or one cut short too.

The page is self-contained (:mod:`grpo.runs.page`): CSS and JavaScript inline, plots as inline SVG drawn by
matplotlib (:mod:`grpo.runs.plots`: text as paths, so no fonts either), and a Content-Security-Policy that
forbids loading anything and runs only the page's own script. Every piece of text from the run — prompts
and completions are model output — is escaped, so nothing in them can become markup. A missing or
unreadable file leaves its sections out.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo.config.loading import without_secrets
from grpo.errors import RunFilesError
from grpo.files import write_text_atomic
from grpo.runs.diagnostics import WINDOW, Finding, held_out_scores, scan
from grpo.runs.layout import (
    CONFIG_FILE,
    EVAL_AFTER_FILE,
    EVAL_GLOB,
    METRICS_FILE,
    REPORT_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
)
from grpo.runs.page import esc, fmt, html_page, html_table, is_number, pct
from grpo.runs.plots import Series, plot_svg
from grpo.runs.report_samples import SAMPLE_STEPS_SHOWN, samples_section

# (SAMPLE_STEPS_SHOWN lives with the samples section; it is still read from here.)
__all__ = ["SAMPLE_STEPS_SHOWN", "RunFiles", "report_line", "write_report"]

# The episodes' numbers (multi-turn runs) that the held-out table shows, with how each is written.
EPISODE_COLUMNS = (
    ("episodes/turns_mean", "turns (mean)", lambda v: fmt(v, 3)),
    ("episodes/tool_calls", "tool calls per episode", lambda v: fmt(v, 3)),
    ("episodes/well_formed_calls", "well-formed calls", lambda v: pct(v)),
    ("episodes/tool_errors", "tool errors", lambda v: fmt(v)),
    ("episodes/stopped_at_max_turns", "stopped at max_turns", lambda v: pct(v)),
)


@dataclass
class RunFiles:
    """What a run directory holds, each part empty or None when its file is missing or unreadable."""

    directory: Path
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] | None = None  # None: no samples.jsonl
    held_out: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (step, summary)
    summary: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # files that could not be read, and why

    @property
    def finished_at(self) -> int | None:
        """The step the run ended at, when summary.json says so (with eval_after.json, written with it;
        a run resumed to go further keeps both of its earlier end until its new one)."""
        steps = (self.summary or {}).get("steps")
        return steps if isinstance(steps, int) and not isinstance(steps, bool) else None

    @property
    def last_step(self) -> int:
        logged = int(self.metrics[-1]["step"]) if self.metrics else 0
        return max(logged, self.finished_at or 0)


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from the run's files and return its path. A run directory that is
    missing, holds nothing readable, or where the page cannot be written is a RunFilesError naming it;
    damaged files that leave something to show are listed on the page instead."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RunFilesError(f"{run_dir}: is a file, not a run directory")
    if not run_dir.is_dir():
        raise RunFilesError(f"{run_dir}: no such run directory")
    run = read_run(run_dir)
    if run.config is None and not run.metrics and run.summary is None:
        if run.problems:
            raise RunFilesError(f"{run_dir}: nothing to report: {'; '.join(run.problems)}")
        raise RunFilesError(
            f"{run_dir}: not a run directory (no readable {CONFIG_FILE}, {METRICS_FILE} or {SUMMARY_FILE})"
        )
    path = run_dir / REPORT_FILE
    if path.is_dir():
        raise RunFilesError(f"{path}: is a directory; remove it to write the report there")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunFilesError(f"{run_dir}: is not writable by this user, so {REPORT_FILE} cannot be written")
    try:
        write_text_atomic(path, render(run))
    except OSError as error:
        raise RunFilesError(f"{path}: cannot be written ({error.strerror or error})") from None
    return path


def report_line(run_dir: Path) -> str:
    """Write the report at the end of a run and return the line that says where it is. The run's results
    are saved by then, so a report that fails says so and how to retry, rather than failing the run."""
    try:
        return f"report: {write_report(run_dir)}"
    except Exception as error:
        return (
            f"{REPORT_FILE} not written ({type(error).__name__}: {error}); retry with: grpo report {run_dir}"
        )


# --- reading ---------------------------------------------------------------------------------------------
def read_run(run_dir: Path) -> RunFiles:
    run = RunFiles(run_dir)
    config = _read(run, CONFIG_FILE, yaml.safe_load)
    run.config = config if isinstance(config, dict) else None
    summary = _read(run, SUMMARY_FILE, json.loads)
    run.summary = summary if isinstance(summary, dict) else None
    by_step = {int(m["step"]): m for m in _read_lines(run, METRICS_FILE) or []}
    run.metrics = [by_step[step] for step in sorted(by_step)]
    run.samples = _read_lines(run, SAMPLES_FILE)
    for path in sorted(run_dir.glob(EVAL_GLOB)):
        evaluation = _read(run, path.name, json.loads)  # (the held-out scores leave out what fails here)
        summary_of = evaluation.get("summary") if isinstance(evaluation, dict) else None
        if evaluation is not None and not isinstance(summary_of, dict):
            run.problems.append(f"{path.name}: not a held-out evaluation (no summary)")
    after_at = run.finished_at if run.finished_at is not None else run.last_step
    run.held_out = held_out_scores(run_dir, up_to=run.last_step, after_at=after_at)
    return run


def _read(run: RunFiles, name: str, parse: Callable[[str], Any]) -> Any:
    path = run.directory / name
    if not path.is_file():
        return None
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError) as error:
        run.problems.append(f"{name}: could not be read ({type(error).__name__})")
        return None


def _read_lines(run: RunFiles, name: str) -> list[dict[str, Any]] | None:
    """A JSON-lines file's lines that are objects with a numeric step; the others are counted as problems."""
    text = _read(run, name, lambda text: text)
    if text is None:
        return None
    lines, bad = [], 0
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(value, dict) and is_number(value.get("step")) and math.isfinite(value["step"]):
            lines.append(value)
        else:
            bad += 1
    if bad:
        run.problems.append(f"{name}: {bad} unreadable line(s) left out")
    return lines


# --- the page --------------------------------------------------------------------------------------------
def render(run: RunFiles) -> str:
    sections = [
        ("diagnostics", "Diagnostics", _diagnostics_section(run)),
        ("summary", "Summary", _summary_section(run)),
        ("plots", "Metrics", _plots_section(run)),
        ("samples", "Samples", samples_section(run.samples)),
        ("config", "Settings", _config_section(run)),
        ("files", "Files", _files_section(run)),
    ]
    config = run.config or {}
    subtitle = " · ".join(
        str(part)
        for part in (
            config.get("model_name_or_path"),
            config.get("dataset"),
            f"{config.get('algorithm', 'grpo')}" if config else None,
            f"{run.last_step} steps" if run.metrics or run.summary else None,
        )
        if part
    )
    return html_page(f"grpo run · {run.directory.name}", "grpo run", run.directory.name, subtitle, sections)


def _diagnostics_section(run: RunFiles) -> str:
    if not run.metrics:
        return ""
    held_out = [(step, summary["solved"]) for step, summary in run.held_out]
    findings = scan(run.metrics, held_out)
    items = [_finding(finding) for finding in findings]
    checked = (
        "reward against held-out score, completion length, truncation, KL to the reference, entropy, "
        f"groups without learning signal (each over windows of {WINDOW} logged steps)"
    )
    notes = []
    if len(held_out) < 2:
        notes.append("reward hacking needs at least two held-out scores (eval_on_start, eval_steps)")
    if not any("entropy" in m or "entropy/mean" in m for m in run.metrics):
        notes.append(
            "entropy, not in this run's metrics (older runs logged it only under top_entropy_quantile < 1)"
        )
    note = f" Not checked: {'; '.join(notes)}." if notes else ""
    if not items:
        head = '<p class="ok">No warning signs.</p>'
    else:
        still = sum(1 for f in findings if f.cleared_at is None)
        head = f"<p>{len(findings)} warning(s), {still} still holding at the last logged step.</p>"
    return head + "\n" + "\n".join(items) + f'\n<p class="muted">Checked: {esc(checked)}.{esc(note)}</p>'


def _finding(finding: Finding) -> str:
    cleared = "" if finding.cleared_at is None else f" (cleared at step {finding.cleared_at})"
    cls = "finding" if finding.cleared_at is None else "finding cleared"
    return (
        f'<div class="{cls}" data-kind="{esc(finding.kind)}"><strong>{esc(finding.kind.replace("_", " "))}'
        f"</strong>: {esc(finding.message)}{esc(cleared)}</div>"
    )


def _summary_section(run: RunFiles) -> str:
    s = run.summary or {}
    rows: list[list[str]] = []

    def row(label: str, value: str) -> None:
        rows.append([esc(label), value])

    if s:
        before, after = s.get("held_out_solved_before"), s.get("held_out_solved_after")
        if before is not None or after is not None:
            row("held-out solved (right answer in the asked format)", f"{pct(before)} → <b>{pct(after)}</b>")
        subsets = s.get("held_out_subsets")
        for subset, (subset_before, subset_after) in (subsets if isinstance(subsets, dict) else {}).items():
            row(f"… {subset}", f"{pct(subset_before)} → <b>{pct(subset_after)}</b>")
        if s.get("reward_first_steps") is not None:
            row(
                "mean training reward, first / last steps",
                f"{fmt(s.get('reward_first_steps'), 3)} → <b>{fmt(s.get('reward_last_steps'), 3)}</b>",
            )
        row("steps", fmt(s.get("steps")))
        if s.get("seconds_per_step_median") is not None:
            row("seconds per step (median)", fmt(s.get("seconds_per_step_median"), 3))
        if s.get("peak_memory_mb") is not None:
            row("peak resident memory", f"{fmt(s.get('peak_memory_mb'))} MB")
        if s.get("wall_seconds") is not None:
            row("wall time", f"{fmt(s.get('wall_seconds'))} s")
    elif run.metrics:
        row("steps logged", fmt(run.last_step))
        row("note", esc(f"no readable {SUMMARY_FILE}: the run has not finished, or was cut short"))
    if run.held_out:
        rewards = sorted({k for _, summary in run.held_out for k in summary if k.startswith("reward/")})
        # each subset's solved share beside the whole's (a "subset" column in the held-out rows)
        subset_keys = list(
            dict.fromkeys(k for _, summary in run.held_out for k in summary if k.startswith("solved/"))
        )
        episodes = [c for c in EPISODE_COLUMNS if any(c[0] in summary for _, summary in run.held_out)]
        table = html_table(
            [
                "held-out at",
                "solved",
                *(f"… {k.removeprefix('solved/')}" for k in subset_keys),
                *rewards,
                *(label for _, label, _ in episodes),
            ],
            (
                [_held_out_label(step, i, len(run.held_out), run), pct(summary.get("solved"))]
                + [pct(summary.get(k)) for k in subset_keys]
                + [fmt(summary.get(k), 3) for k in rewards]
                + [show(summary.get(key)) for key, _, show in episodes]
                for i, (step, summary) in enumerate(run.held_out)
            ),
            "numbers",
        )
    else:
        table = ""
    if not rows and not table:
        return ""
    return html_table(None, rows, "summary") + ("\n<h3>Held-out scores</h3>\n" + table if table else "")


def _held_out_label(step: int, index: int, count: int, run: RunFiles) -> str:
    if step == 0:
        return "before training"
    if index == count - 1 and (run.directory / EVAL_AFTER_FILE).is_file() and step == run.finished_at:
        return f"after training (step {step})"
    return f"step {step}"


# --- plots -----------------------------------------------------------------------------------------------


def _series(metrics: list[dict[str, Any]], key: str, label: str) -> Series | None:
    xs = [float(m["step"]) for m in metrics]
    ys = [float(m[key]) if is_number(m.get(key)) else math.nan for m in metrics]
    return (label, xs, ys) if any(math.isfinite(y) for y in ys) else None


def _plots_section(run: RunFiles) -> str:
    m = run.metrics
    names = []  # reward functions, in the order they were logged
    for line in m:
        for key in line:
            if key.startswith("rewards/") and key.endswith("/mean") and key[8:-5] not in names:
                names.append(key[8:-5])
    plots: list[tuple[str, str, str, list[Series | None]]] = [
        (
            "reward",
            "Reward per step (mean over the sampled completions)",
            "reward",
            [_series(m, "reward", "total (weighted)")] + [_series(m, f"rewards/{n}/mean", n) for n in names],
        ),
        ("held-out", "Held-out score", "score", _held_out_series(run)),
        ("kl", "KL to the reference (per token)", "KL", [_series(m, "kl", "KL")]),
        (
            "entropy",
            "Policy entropy (nats per token)",
            "entropy",
            [
                _series(m, "entropy", "estimate: −log π of the sampled tokens"),
                _series(m, "entropy/mean", "exact"),
            ],
        ),
        (
            "clipping",
            "Clipped tokens (fraction)",
            "fraction",
            [
                _series(m, "clip_ratio/region_mean", "clipped"),
                _series(m, "clip_ratio/low_mean", "below 1 − ε"),
                _series(m, "clip_ratio/high_mean", "above 1 + ε"),
            ],
        ),
        (
            "length",
            "Completion length (tokens)",
            "tokens",
            [
                _series(m, "completions/mean_length", "mean"),
                _series(m, "completions/min_length", "min"),
                _series(m, "completions/max_length", "max"),
            ],
        ),
        (
            "signal",
            "Truncated completions, groups without signal (fraction)",
            "fraction",
            [
                _series(m, "completions/truncated_ratio", "completions truncated"),
                _series(m, "frac_reward_zero_std", "groups with equal rewards"),
            ],
        ),
        (
            "episodes",
            "Episodes (multi-turn): turns, tool calls, shares of well-formed calls and max_turns stops",
            "per episode / share",
            [
                _series(m, "episodes/turns_mean", "turns (mean)"),
                _series(m, "episodes/turns_max", "turns (max)"),
                _series(m, "episodes/tool_calls", "tool calls per episode"),
                _series(m, "episodes/well_formed_calls", "well-formed calls (share)"),
                _series(m, "episodes/stopped_at_max_turns", "stopped at max_turns (share)"),
            ],
        ),
        ("loss", "Loss", "loss", [_series(m, "loss", "loss")]),
        ("grad-norm", "Gradient norm (before clipping)", "norm", [_series(m, "grad_norm", "gradient norm")]),
        (
            "time",
            "Time per step (seconds)",
            "seconds",
            [_series(m, "step_time", "whole step"), _series(m, "generation_time", "sampling and scoring")],
        ),
    ]
    figures = []
    for key, title, ylabel, series in plots:
        present = [s for s in series if s is not None]
        if present:
            svg = plot_svg(key, present, ylabel, markers=key == "held-out")
            figures.append(
                f'<figure class="plot" id="plot-{key}"><figcaption>{esc(title)}</figcaption>{svg}</figure>'
            )
    return f'<div class="plots">\n{"".join(figures)}\n</div>' if figures else ""


def _held_out_series(run: RunFiles) -> list[Series | None]:
    if not run.held_out:
        return []
    steps = [float(step) for step, _ in run.held_out]
    series: list[Series | None] = [
        ("solved (right answer, asked format)", steps, [float(s["solved"]) for _, s in run.held_out])
    ]
    rewards = sorted({k for _, summary in run.held_out for k in summary if k.startswith("reward/")})
    for key in rewards:
        values = [float(s[key]) if is_number(s.get(key)) else math.nan for _, s in run.held_out]
        if any(math.isfinite(v) for v in values):
            series.append((f"mean {key.removeprefix('reward/')} reward", steps, values))
    return series


# --- settings and files ----------------------------------------------------------------------------------
def _config_section(run: RunFiles) -> str:
    if run.config is None:
        return ""

    def value(v: Any) -> str:
        if isinstance(v, (dict, list, bool)) or v is None:  # as JSON: [...], {...}, true, null
            return f"<code>{esc(json.dumps(v, ensure_ascii=False))}</code>"
        return f"<code>{esc(v)}</code>"

    rows = [[esc(key), value(v)] for key, v in without_secrets(run.config).items()]
    return f'<p class="muted">From {CONFIG_FILE}.</p>\n' + html_table(["setting", "value"], rows, "config")


def _files_section(run: RunFiles) -> str:
    names = [CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, SUMMARY_FILE]
    names += sorted(p.name for p in run.directory.glob(EVAL_GLOB))
    present = [name for name in names if (run.directory / name).is_file()]
    items = [f'<li><a href="{esc(name)}">{esc(name)}</a></li>' for name in present]
    if (run.directory / TENSORBOARD_DIR).is_dir():
        items.append(
            f"<li><code>{esc(TENSORBOARD_DIR)}/</code>: the same metrics for TensorBoard "
            f"(<code>tensorboard --logdir {esc(run.directory / TENSORBOARD_DIR)}</code>)</li>"
        )
    problems = "".join(f'<p class="finding">{esc(problem)}</p>' for problem in run.problems)
    return (problems + f"<ul>{''.join(items)}</ul>") if items or problems else ""
