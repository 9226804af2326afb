"""What `grpo train` leaves besides its model, from a real run on the tiny model through the CLI: the sampled
completions (samples.jsonl), TensorBoard event files, the diagnostic warnings, and report.html."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from tiny_run import HOSTILE, train_tiny_run
from typer.testing import CliRunner

from grpo.cli.main import app
from grpo.rollout.batch import Rollout, ScoredBatch
from grpo.runs.samples import sample_records


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return train_tiny_run(tiny_model, tmp_path_factory.mktemp("logs"))


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_hold_each_logged_step_with_prompt_completion_scores_reward_and_advantage(run):
    output, _ = run
    lines, metrics = jsonl(output / "samples.jsonl"), jsonl(output / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line, m in zip(lines, metrics):
        samples = line["samples"]
        assert len(samples) == 8, "log_completions = 8 of the step's 2 groups × 4 completions: all of them"
        assert [s["group"] for s in samples] == [0, 0, 0, 0, 1, 1, 1, 1]
        for s in samples:
            assert s["prompt"].startswith("<|im_start|>user\nWhat is ")
            assert s["prompt"].endswith("<|im_start|>assistant\n"), "the prompt as the model saw it"
            assert HOSTILE in s["prompt"]
            assert set(s["rewards"]) == {"accuracy", "format", "length_reward"}
            assert s["rewards"]["length_reward"] == pytest.approx(min(len(s["completion"]), 40) / 40)
            assert s["reward"] == pytest.approx(sum(s["rewards"].values()))  # weights 1, 1, 1
            assert 1 <= s["length"] <= 12 and s["skipped"] is False
            assert s["length"] == 12 or not s["truncated"], "truncated: stopped by max_completion_length"
        # All of the step's completions are here, so they give back its logged figures.
        assert sum(s["reward"] for s in samples) / 8 == pytest.approx(m["reward"], abs=1e-6)
        for group in (0, 1):
            advantages = [s["advantage"] for s in samples if s["group"] == group]
            rewards = [s["reward"] for s in samples if s["group"] == group]
            assert sum(advantages) == pytest.approx(0.0, abs=1e-5), "group-relative: they centre on zero"
            best = max(range(4), key=lambda i: rewards[i])
            assert advantages[best] == max(advantages)


def test_sample_records_spread_over_the_groups():
    g, n = 4, 12
    rollout = Rollout(
        prompt_ids=torch.tensor([[5, 6], [0, 7], [8, 9]]),
        prompt_mask=torch.tensor([[1, 1], [0, 1], [1, 1]]),
        completion_ids=torch.arange(n * 3).view(n, 3),
        completion_mask=torch.tensor([[1, 1, 0]] * n),
        truncated=torch.zeros(n, dtype=torch.bool),
        texts=[f"completion {i}" for i in range(n)],
        num_generations=g,
        sampling_logps=torch.zeros(n, 3),
    )
    scores = torch.stack([torch.arange(n, dtype=torch.float), torch.full((n,), math.nan)], dim=1)
    per_token = torch.arange(n * 3, dtype=torch.float).view(n, 3)  # per-token advantages (PPO, process)
    batch = ScoredBatch(rollout, scores[:, 0], scores, per_token, torch.zeros(n, dtype=torch.bool), {})

    class Tokenizer:
        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids))

    records = sample_records(batch, ["count", "unscored"], Tokenizer(), 3)
    assert [(r["group"], r["completion"]) for r in records] == [
        (0, "completion 0"),
        (1, "completion 4"),
        (2, "completion 8"),
    ]
    assert [r["prompt"] for r in records] == ["5 6", "7", "8 9"], "left padding is not part of the prompt"
    assert records[1]["rewards"] == {"count": 4.0, "unscored": None}
    assert records[1]["advantage"] == 12.5, "per-token advantages: their mean over the completion's tokens"
    assert len(sample_records(batch, ["count", "unscored"], Tokenizer(), 50)) == n


def test_tensorboard_gets_every_logged_scalar(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = run
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    metrics = jsonl(output / "metrics.jsonl")
    tags = set(events.Tags()["scalars"])
    assert {"reward", "kl", "loss", "rewards/length_reward/mean", "completions/mean_length"} <= tags
    assert tags == set(metrics[0]) - {"step"}
    for tag in ("reward", "rewards/length_reward/mean", "grad_norm"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([m[tag] for m in metrics], rel=1e-6)


def test_a_warning_is_printed_once_while_it_holds(run):
    _, log = run
    # The tiny model rarely ends a completion before the limit: truncation holds at every step.
    warnings = [line for line in log.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert re.fullmatch(
        r"warning: step 1: \d+% of the completions of the last logged step were cut at "
        r"max_completion_length, so their rewards judge unfinished answers: raise max_completion_length "
        r"or reward shorter answers\.",
        warnings[0],
    )


def test_train_writes_the_report_and_grpo_report_rebuilds_it(run):
    output, log = run
    report = output / "report.html"
    assert f"report: {report}" in log
    written = report.read_text()
    for section in ("diagnostics", "summary", "plots", "samples", "config", "files"):
        assert f'<section id="{section}">' in written
    assert 'data-kind="truncation"' in written
    report.unlink()
    result = CliRunner().invoke(app, ["report", str(output)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(report)
    assert report.read_text() == written, "the same files make the same page"


def test_report_to_none_and_no_completions_leave_out_tensorboard_and_samples(tiny_model, tmp_path):
    output, _ = train_tiny_run(tiny_model, tmp_path, "--report-to", "none", "--log-completions", "0", steps=1)
    assert not (output / "tensorboard").exists() and not (output / "samples.jsonl").exists()
    assert '<section id="samples">' not in (output / "report.html").read_text()


def test_held_out_subsets_are_reported_before_and_after(tiny_model, tmp_path):
    output, printed = train_tiny_run(tiny_model, tmp_path, steps=1, subsets=True)
    summary = json.loads((output / "summary.json").read_text())
    after = json.loads((output / "eval_after.json").read_text())["summary"]
    before = json.loads((output / "eval_before.json").read_text())["summary"]
    assert list(summary["held_out_subsets"]) == ["even", "odd"]
    for name, (was, now) in summary["held_out_subsets"].items():
        assert (was, now) == (before[f"solved/{name}"], after[f"solved/{name}"])
        assert f"  {name}: {was:.1%} → {now:.1%}" in printed
        assert f"… {name}" in (output / "report.html").read_text()
    # The held-out table gives each subset's curve: a column of it at every scoring.
    held_out_table = (
        (output / "report.html").read_text().split("<h3>Held-out scores</h3>")[1].split("</table>")[0]
    )
    assert "<th>solved</th><th>… even</th><th>… odd</th>" in held_out_table
    assert f"<td>{before['solved/even']:.1%}</td>" in held_out_table.split("</tr>")[1]


def test_ppo_logs_the_mean_of_its_per_token_advantages(tiny_model, tmp_path):
    output, _ = train_tiny_run(tiny_model, tmp_path, "--algorithm", "ppo", "--log-completions", "2", steps=1)
    (line,) = jsonl(output / "samples.jsonl")
    assert [s["group"] for s in line["samples"]] == [0, 1]
    assert all(math.isfinite(s["advantage"]) and s["advantage"] != 0 for s in line["samples"])


def test_the_logging_settings_are_checked():
    from grpo.config.loading import load_config
    from grpo.errors import ConfigError

    assert load_config(overrides={"report_to": "none", "log_completions": "0"}).log_completions == 0
    with pytest.raises(ConfigError, match="report_to must be none or some of tensorboard, trackio, wandb"):
        load_config(overrides={"report_to": "mlflow"})
    with pytest.raises(ConfigError, match="log_completions must not be negative, got -1"):
        load_config(overrides={"log_completions": "-1"})
