"""Each diagnostic warning, from a real `grpo train` run on the tiny model that really goes wrong: printed as
"warning: …" on stderr while the run goes, and listed in report.html at its end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sft_data import write_jsonl
from typer.testing import CliRunner

from grpo.cli.main import app

# "What is a + b?" with a + b = 7 throughout: a task the tiny model learns by heart under SFT.
ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} + {7 - a}?"}], "answer": "7"} for a in range(8)]

REWARDS = '''
def text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact(prompts, completions, answer, **columns):
    """1 for the bare right answer."""
    return [float(text(c).strip() == str(a)) for c, a in zip(completions, answer)]


def length(prompts, completions, answer, **columns):
    """Pays for length, in multiples of the answer's (full marks for the bare answer, more for more)."""
    return [len(text(c)) / len(str(a)) for c, a in zip(completions, answer)]


def brevity(prompts, completions, **columns):
    """Pays for saying little: 0 at best, for nothing at all."""
    return [-len(text(c)) / 10 for c in completions]


def constant(prompts, completions, **columns):
    return [1.0 for _ in completions]
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prompts (sums.jsonl), their SFT version (answers.jsonl) and the reward functions (rewards.py)."""
    directory = tmp_path_factory.mktemp("warnings")
    write_jsonl(directory / "sums.jsonl", ROWS)
    write_jsonl(
        directory / "answers.jsonl", [{"prompt": r["prompt"], "completion": r["answer"]} for r in ROWS]
    )
    (directory / "rewards.py").write_text(REWARDS)
    return directory


@pytest.fixture(scope="module")
def brief_model(tiny_model: Path, files: Path) -> Path:
    """The tiny model after `grpo sft` on the bare answers: it says "7" and stops, as a chat model answers a
    question briefly, but still samples other short completions now and then."""
    output = files / "sft"
    args = ["sft", "--model-name-or-path", str(tiny_model), "--dataset", str(files / "answers.jsonl")]
    args += ["--output-dir", str(output), "--max-steps", "25", "--learning-rate", "1e-2", "--no-use-lora"]
    result = CliRunner().invoke(app, [*args, "--per-device-train-batch-size", "8", "--seed", "7"])
    assert result.exit_code == 0, result.output
    return output / "final_model"


def train(model: Path, files: Path, output: Path, rewards: str, *flags: str) -> tuple[str, str]:
    """A GRPO run of 2 prompts × 4 completions per step on the sums with the named reward functions of
    rewards.py; its stderr and report.html."""
    reward_funcs = ",".join(f"{files / 'rewards.py'}:{name}" for name in rewards.split(","))
    args = [
        "train",
        "--model",
        str(model),
        "--dataset",
        str(files / "sums.jsonl"),
        "--output-dir",
        str(output),
    ]
    args += ["--reward-funcs", reward_funcs, "--seed", "7", "--num-generations", "4"]
    args += [
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "2",
        "--logging-steps",
        "1",
    ]
    result = CliRunner().invoke(app, [*args, "--report-to", "none", *flags])
    assert result.exit_code == 0, result.output
    return result.stderr, (output / "report.html").read_text()


def warned(stderr: str, kind: str) -> list[str]:
    """The warnings of one kind printed while the run went (each kind's message has its own words)."""
    words = {
        "length_runaway": "tokens on average",
        "truncation": "were cut at max_completion_length",
        "reward_hacking": "(reward hacking)",
        "kl_explosion": "the KL to the reference",
        "entropy_collapse": "the policy's entropy",
        "no_signal": "every completion got the same reward",
    }[kind]
    return [line for line in stderr.splitlines() if line.startswith("warning: ") and words in line]


def reported(report: str, kind: str) -> bool:
    return f'data-kind="{kind}"' in report


@pytest.fixture(scope="module")
def length_paid(brief_model: Path, files: Path) -> tuple[str, str, Path]:
    """A reward that pays for length beside one for the exact answer: the policy learns to ramble. Held-out
    checks (the same sums, greedy; the first 4 during training, all 8 before and after) every 4 steps see
    the bare answer give way to long text."""
    output = files / "length-paid"
    flags = ["--max-steps", "12", "--learning-rate", "3e-3", "--max-completion-length", "32", "--beta", "0"]
    flags += ["--eval-dataset", str(files / "sums.jsonl"), "--eval-steps", "4", "--eval-check-samples", "4"]
    stderr, report = train(brief_model, files, output, "exact,length", *flags)
    return stderr, report, output


def test_a_reward_that_pays_for_length_trips_the_length_warning(length_paid):
    stderr, report, _ = length_paid
    (line,) = warned(stderr, "length_runaway")
    assert "check that no reward favours length itself" in line
    assert reported(report, "length_runaway")


def test_completions_cut_at_the_limit_trip_the_truncation_warning(length_paid):
    stderr, report, _ = length_paid
    assert warned(stderr, "truncation") and reported(report, "truncation")


def test_a_training_reward_that_rises_as_the_held_out_score_falls_trips_the_reward_hacking_warning(
    length_paid,
):
    stderr, report, output = length_paid
    before = json.loads((output / "eval_before.json").read_text())["summary"]["solved"]
    assert before == 1.0, "the model starts out answering every sum"
    (line,) = warned(stderr, "reward_hacking")
    assert "the held-out solved rate fell from 100.0% (step 0) to 0.0%" in line
    assert reported(report, "reward_hacking")
    # Training logs its own solved share: the bare answer, full marks from both rewards, while it lasts.
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["solved"] == metrics[0]["rewards/exact/mean"] > 0
    assert metrics[-1]["solved"] == 0.0


def test_a_huge_learning_rate_trips_the_kl_warning(tiny_model, files, tmp_path):
    flags = ["--max-steps", "6", "--learning-rate", "0.1", "--warmup-steps", "0", "--no-use-lora"]
    flags += ["--beta", "0.04", "--max-completion-length", "12", "--no-eval-on-start", "--eval-steps", "0"]
    stderr, report = train(tiny_model, files, tmp_path / "run", "length", *flags)
    (line,) = warned(stderr, "kl_explosion")
    assert "raise beta or lower learning_rate" in line
    assert reported(report, "kl_explosion")


def test_a_reward_that_drives_the_policy_to_one_token_trips_the_entropy_warning(tiny_model, files, tmp_path):
    # The policy learns to stop at once: every completion is the end-of-text token, at near-zero entropy.
    flags = ["--max-steps", "10", "--learning-rate", "0.1", "--warmup-steps", "0", "--no-use-lora"]
    flags += ["--beta", "0", "--max-completion-length", "12", "--no-eval-on-start", "--eval-steps", "0"]
    stderr, report = train(tiny_model, files, tmp_path / "run", "brevity", *flags)
    (line,) = warned(stderr, "entropy_collapse")
    assert "it samples nearly the same completion every time" in line
    assert reported(report, "entropy_collapse")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["entropy"] > 5.0 and metrics[-1]["entropy"] < 0.05, "logged at every step"


def test_a_constant_reward_trips_the_no_signal_warning(tiny_model, files, tmp_path):
    flags = ["--max-steps", "2", "--max-completion-length", "8", "--no-eval-on-start", "--eval-steps", "0"]
    stderr, report = train(tiny_model, files, tmp_path / "run", "constant", *flags)
    (line,) = warned(stderr, "no_signal")
    assert line.startswith("warning: step 1: in 100% of the groups of the last logged step")
    assert reported(report, "no_signal")
