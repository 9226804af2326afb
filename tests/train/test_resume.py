"""A run killed at any moment and resumed ends exactly as a run never interrupted: same metrics, same
weights. The runs are real `grpo train` processes, killed with SIGKILL, SIGTERM and SIGINT mid-flight."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_args import base_args
from safetensors.torch import load_file
from typer.testing import CliRunner

from grpo.cli.main import app

STEPS = 8
# Timings differ between any two runs; everything else in a metrics line must be identical.
TIMING_KEYS = {"step_time", "generation_time", "tokens_per_second"}


def train_command(tiny_model: Path, dataset: Path, output: Path, reward_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "grpo",
        "train",
        *base_args(tiny_model, dataset, output, reward_file),
        "--max-steps",
        str(STEPS),
        "--save-steps",
        "1",
        "--save-total-limit",
        "2",
        "--beta",
        "0.04",
        "--num-iterations",
        "2",
        "--num-threads",
        "1",
    ]


def run_to_the_end(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=quiet_env())
    assert done.returncode == 0, done.stderr
    return done


def quiet_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def metrics_lines(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    assert text == "" or text.endswith("\n"), "a torn last line"
    return [json.loads(line) for line in text.splitlines()]


def samples_text(output: Path) -> str:
    """samples.jsonl as written: nothing in it depends on timing, so resumed and uninterrupted runs match."""
    return (output / "samples.jsonl").read_text()


def tensorboard_rewards(output: Path) -> list[tuple[int, float]]:
    """The reward scalars TensorBoard shows: a resumed run's files, with the steps after each checkpoint
    that a cut-short attempt had logged purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("reward")]


def without_timings(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "final_model" / "model.safetensors")


def interrupt_after(command: list[str], output: Path, lines: int, delay: float, how: signal.Signals) -> int:
    """Start a run, wait until it has logged ``lines`` steps and ``delay`` more seconds, send ``how``."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=quiet_env())
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        path = output / "metrics.jsonl"
        if path.exists() and path.read_text().count("\n") >= lines:
            break
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=240)
    if how != signal.SIGKILL:
        assert f"stopped by {how.name}" in stderr.decode() and "grpo train --resume" in stderr.decode()
    return process.returncode


def test_killed_at_random_moments_and_resumed_the_run_ends_as_if_never_interrupted(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    reference = tmp_path / "reference"
    run_to_the_end(train_command(tiny_model, tiny_dataset, reference, reward_file))
    expected_lines = metrics_lines(reference)
    assert [m["step"] for m in expected_lines] == list(range(1, STEPS + 1))

    seed = random.randrange(10**6)
    chance = random.Random(seed)
    output = tmp_path / "interrupted"
    command = train_command(tiny_model, tiny_dataset, output, reward_file)
    interruptions = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL]
    for number, how in enumerate(interruptions):
        logged = len(metrics_lines(output))
        if logged >= STEPS - 1:
            break
        # A graceful signal is sent once this process has logged a step (its handlers are in place); a kill
        # may land anywhere, start-up and resume included.
        wait_for = logged + 1 if how != signal.SIGKILL else logged + chance.randint(0, 1)
        code = interrupt_after(command, output, wait_for, chance.uniform(0, 0.15), how)
        lines = metrics_lines(output)  # also asserts that no line is torn
        assert [m["step"] for m in lines] == list(range(1, len(lines) + 1)), f"seed {seed}, kill {number}"
        if how != signal.SIGKILL:
            assert code == 128 + how, f"seed {seed}, kill {number}"
            assert (output / f"checkpoint-{len(lines)}").is_dir(), "a graceful stop saves its last step"
    run_to_the_end(command)  # the same command again continues from the newest checkpoint

    assert without_timings(metrics_lines(output)) == without_timings(expected_lines), f"seed {seed}"
    assert samples_text(output) == samples_text(reference), f"seed {seed}"
    assert tensorboard_rewards(output) == tensorboard_rewards(reference), f"seed {seed}"
    expected, resumed = final_weights(reference), final_weights(output)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), f"{name} differs (seed {seed})"
    assert not list(output.glob(".tmp-*")) and not list(output.glob(".old-*"))
    assert len(list(output.glob("checkpoint-*"))) <= 2, "save_total_limit holds across restarts"


def cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_resume_flag_continues_with_more_steps_like_a_longer_run(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    args = [*base_args(tiny_model, tiny_dataset, tmp_path / "long", reward_file), "--max-steps", "4"]
    assert cli(args)[0] == 0
    short = [*base_args(tiny_model, tiny_dataset, tmp_path / "short", reward_file), "--max-steps", "2"]
    assert cli(short)[0] == 0
    code, log = cli(["--resume", str(tmp_path / "short"), "--max-steps", "4"])
    assert code == 0, log
    assert without_timings(metrics_lines(tmp_path / "short")) == without_timings(
        metrics_lines(tmp_path / "long")
    )
    assert samples_text(tmp_path / "short") == samples_text(tmp_path / "long")
    long_weights, resumed = final_weights(tmp_path / "long"), final_weights(tmp_path / "short")
    assert all(torch.equal(long_weights[name], resumed[name]) for name in long_weights)
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert summary["steps"] == 4


def test_a_different_run_in_the_output_directory_is_refused_and_left_alone(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    output = tmp_path / "run"
    assert cli([*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "1"])[0] == 0
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    code, log = cli(
        [
            *base_args(tiny_model, tiny_dataset, output, reward_file),
            "--max-steps",
            "2",
            "--learning-rate",
            "0.5",
        ]
    )
    assert code == 2
    assert "holds checkpoint-1 of a run with other settings (learning_rate: 0.01 there, 0.5 now)" in log
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before


def test_a_run_continues_only_in_the_dtype_its_weights_were_held_in(
    tiny_model, tiny_dataset, tmp_path, reward_file, monkeypatch
):
    """dtype "auto" resolves by machine: a LoRA run started where it is float32 and continued where it is
    bfloat16 would not continue exactly, so it stops and says how to continue."""
    output = tmp_path / "run"
    args = base_args(tiny_model, tiny_dataset, output, reward_file)
    monkeypatch.setenv("GRPO_CPU_BF16", "0")
    assert cli([*args, "--max-steps", "1"])[0] == 0
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    monkeypatch.setenv("GRPO_CPU_BF16", "1")  # (now as on a CPU with native bfloat16)
    code, log = cli([*args, "--max-steps", "2"])
    assert code == 2, log
    assert "held the weights in float32, this one would in bfloat16, trained float32" in log
    assert "--dtype float32" in log
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before
    code, log = cli([*args, "--max-steps", "2", "--dtype", "float32"])
    assert code == 0, log


def test_a_checkpoint_from_before_a_setting_existed_continues_with_its_default(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    """A run saved by an older grpo (its settings lack later fields) continues in the same directory."""
    output = tmp_path / "run"
    assert cli([*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "1"])[0] == 0
    state_file = output / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["fsdp"], state["config"]["release_memory"]
    state_file.write_text(json.dumps(state))
    code, log = cli([*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "2"])
    assert code == 0, log
    assert json.loads((output / "summary.json").read_text())["steps"] == 2


def test_resuming_from_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    code, log = cli(["--resume", str(tmp_path / "nothing-here")])
    assert code == 2
    assert "resume_from_checkpoint: no such directory" in log


@pytest.mark.parametrize("damage", ["optimizer.safetensors", "trainer_state.json"])
def test_a_damaged_checkpoint_is_named_and_nothing_is_overwritten(
    tiny_model, tiny_dataset, tmp_path, reward_file, damage
):
    output = tmp_path / "run"
    assert cli([*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "1"])[0] == 0
    (output / "checkpoint-1" / damage).write_bytes(b"\x00garbage")
    code, log = cli(["--resume", str(output), "--max-steps", "2"])
    assert code == 2
    assert f"checkpoint-1/{damage}: damaged" in log
    assert (output / "checkpoint-1" / damage).read_bytes() == b"\x00garbage"
