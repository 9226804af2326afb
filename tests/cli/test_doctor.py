"""`grpo doctor` through the CLI on the tiny model: train's flags, a report that names what it measured, exit
code 0 for a run that can learn, 1 when the groups carry no signal, 2 for bad input; and no file of a run
written or changed. Then the report's lines and verdicts on their own."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from cli_args import base_args
from tiny_run import train_tiny_run
from typer.testing import CliRunner

from grpo.cli.doctor import (
    ALIKE_WITHIN_PROMPTS,
    data_line,
    held_out_line,
    judge,
    sampling_line,
)
from grpo.cli.main import app
from grpo.config.grpo import GRPOConfig
from grpo.train.preflight import LearningSignal, RewardRange

CONSTANT_REWARD = """
def always_one(prompts, completions, **columns):
    return [1.0] * len(completions)
"""


def doctor(*args: str):
    return CliRunner().invoke(app, ["doctor", *args])


def scores(output: str, name: str) -> tuple[float, float, float]:
    found = re.search(rf"{name}\s+min\s+(\S+)\s+max\s+(\S+)\s+mean\s+(\S+)", output)
    assert found, f"no line for {name}:\n{output}"
    return tuple(float(value) for value in found.groups())


def test_a_run_that_can_learn_gets_a_report_and_exit_0(
    tiny_model, tiny_dataset, reward_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # the launch the run is meant for: 2 processes share each step
    output = tmp_path / "run"
    result = doctor(*base_args(tiny_model, tiny_dataset, output, reward_file))
    assert result.exit_code == 0, result.output
    report = result.stdout
    assert len(report.splitlines()) <= 25
    for name in ("accuracy", "format", "length_reward", "total"):
        low, high, mean = scores(report, name)
        assert low <= mean <= high
    low, high, _ = scores(report, "length_reward")
    assert low < high, "the length reward varies"
    assert re.search(r"alike\s+0 of 2 groups \(0%\)", report)
    assert re.search(r"truncated\s+\d+ of 8 completions \(\d+%\) cut at max_completion_length 12", report)
    assert re.search(r"time\s+≈ [\d.]+ s a step, [\d.]+ min for \d+ steps", report)
    assert re.search(r"= sampling [\d.]+ s .* forward\+backward .* AdamW update\)", report)
    assert re.search(r"memory\s+≈ [\d,]+ MB peak = [\d,]+ MB measured .* AdamW moments", report)
    assert "data       16 rows, 4 prompts a step (2 processes × 2): 4 steps an epoch" in report
    assert re.search(r"verdict\s+2 of 2 groups carry a learning signal", report)
    assert not output.exists(), "doctor creates no output directory"


def test_a_reward_that_never_varies_gets_exit_1_and_is_named(tiny_model, tiny_dataset, reward_file, tmp_path):
    constant = tmp_path / "constant.py"
    constant.write_text(CONSTANT_REWARD)
    flags = ["--reward-funcs", f"{constant}:always_one", "--reward-weights", "1"]
    result = doctor(*base_args(tiny_model, tiny_dataset, tmp_path / "run", reward_file), *flags)
    assert result.exit_code == 1, result.output
    assert scores(result.stdout, "always_one") == (1.0, 1.0, 1.0)
    verdict = result.stdout.splitlines()[-1]
    assert verdict.startswith("✗ verdict    2 of 2 groups score alike: GRPO will learn almost nothing")
    assert "always_one gave 1 to every completion" in verdict


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--num-generations", "3"], "do not divide into groups of num_generations = 3"),
        (["--dataset", "{tmp}/missing.jsonl"], "missing.jsonl"),
        (["--output-dir", "{tmp}/a-file"], "output_dir {tmp}/a-file: it is a file, not a directory"),
        (["--output-dir", "{tmp}/a-file/run"], "output_dir {tmp}/a-file/run: {tmp}/a-file is a file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(flags, says, tiny_model, tiny_dataset, reward_file, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    result = doctor(*base_args(tiny_model, tiny_dataset, tmp_path / "run", reward_file), *flags)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert says.replace("{tmp}", str(tmp_path)) in result.stderr
    assert not (tmp_path / "run").exists()


def files_of(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        str(path.relative_to(directory)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_a_run_to_resume_is_measured_from_its_checkpoint_and_left_as_it_was(tiny_model, tmp_path):
    run, _ = train_tiny_run(tiny_model, tmp_path, steps=3)
    before = files_of(run)
    result = doctor("--resume", str(run), "--max-steps", "6")
    assert result.exit_code in (0, 1), result.output
    assert f"from {run}/checkpoint-3)" in result.stdout.splitlines()[0]
    assert re.search(r"time\s+≈ [\d.]+ s a step, [\d.]+ min for 3 steps", result.stdout)
    assert re.search(r"held-out   4 rows before and after; .* ≈ [\d.]+ min for these \d+ rows", result.stdout)
    assert files_of(run) == before

    reward_file = tmp_path / "my_rewards.py"  # the run's reward code, changed since it trained
    reward_file.write_text(reward_file.read_text() + "\n# changed\n")
    result = doctor("--resume", str(run), "--max-steps", "6")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "my_rewards.py" in result.stderr
    assert files_of(run) == before


# --- the report's lines on their own -----------------------------------------------------------------------
def config(**settings) -> GRPOConfig:
    return GRPOConfig(
        num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=4, **settings
    )


def test_sampling_rounds_follow_whole_groups():
    assert sampling_line(config()).startswith("✓ sampling   all 16 completions at once")
    assert "16 completions in 2 rounds of 8" in sampling_line(config(generation_batch_size=8))
    assert "16 completions in 2 rounds of 12, the last of 4" in sampling_line(
        config(generation_batch_size=12)
    )
    line = sampling_line(config(generation_batch_size=6))
    assert line.startswith("✗") and "not a multiple of num_generations 4: 4 at once" in line


def test_rows_against_the_prompts_a_step_takes():
    assert data_line(config(max_steps=8), 16, 1).startswith("✓ data       16 rows, 4 prompts a step: 4 steps")
    assert data_line(config(), 7, 2).startswith("✗ data       7 rows, fewer than the 8 prompts a step")
    assert data_line(config(), 18, 1).startswith("! data") and "2 rows left out of each epoch" in data_line(
        config(), 18, 1
    )
    unshuffled = data_line(config(shuffle_dataset=False), 18, 1)
    assert unshuffled.startswith("✗") and "the last 2 rows are never trained on" in unshuffled
    # A run that ends within the first epoch reads its rows in order, a tail or not (the arithmetic task).
    in_order = data_line(config(shuffle_dataset=False), 2002, 1)
    assert in_order.startswith("✓ data") and in_order.endswith("read in order: rows 1–120")


def test_the_held_out_line_counts_the_rows_scored_and_their_time():
    rows = [{"prompt": "p"}] * 5
    # max_steps 30, eval_steps 10: checks at steps 10 and 20; 5 rows before, 5 after, 5 at each check.
    line = held_out_line(config(), rows, seconds_per_row=3.0)
    assert line.startswith("✓ held-out   5 rows before and after; the first 5 every 10 steps; ≈ 1.0 min")
    line = held_out_line(config(eval_steps=0, eval_on_start=False), rows, seconds_per_row=3.0)
    assert line.startswith("! held-out   5 rows after (no eval_on_start); no check during training")
    assert line.endswith("≈ 0.2 min for these 5 rows")
    assert held_out_line(config(), None, None).startswith("! held-out   none")


def signal(alike: int, groups: int = 10, truncated: int = 0, **ranges: tuple[float, float]) -> LearningSignal:
    rewards = [RewardRange(name, low, high, (low + high) / 2, 0) for name, (low, high) in ranges.items()]
    return LearningSignal(rewards, groups, alike, completions=groups * 4, truncated=truncated)


ALIKE = "groups score alike: GRPO will learn almost nothing; "


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        (signal(9, accuracy=(0, 1)), 1, f"9 of 10 {ALIKE}{ALIKE_WITHIN_PROMPTS}"),
        (signal(8, accuracy=(0, 1)), 0, "✓ verdict    2 of 10 groups carry a learning signal: GRPO has"),
        (signal(10, accuracy=(0, 0), judge=(1, 1)), 1, f"{ALIKE}judge gave 1 to every completion"),
        (signal(10, truncated=30, accuracy=(0, 0)), 1, f"{ALIKE}most completions are cut at max_comp"),
        (signal(10, accuracy=(0, 0), format=(0, 0)), 1, f"{ALIKE}accuracy, format gave 0 to every"),
        (
            signal(0, accuracy=(0, 0), format=(0, 1)),
            0,
            "! verdict    10 of 10 groups carry a learning signal; but",
        ),
    ],
)
def test_the_verdict_and_its_advice(case, code, says):
    line, exit_code = judge(case, GRPOConfig())
    assert exit_code == code
    assert says in line
