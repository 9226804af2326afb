"""A run with the default checkpoint settings, killed outright (SIGKILL) at random moments, the first before
its first checkpoint, and continued each time with `grpo train --resume RUN_DIR`, ends exactly as a run
never interrupted: the same metrics, samples and final weights. Real `grpo train` processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from cli_args import base_args
from safetensors.torch import load_file
from typer.testing import CliRunner

from grpo.cli.main import app

STEPS = 6
# The default save_steps (10) exceeds a tiny run; every 2 steps, a kill can still land between checkpoints.
# save_minutes keeps its default.
SAVE_STEPS = 2
NO_CHECKPOINT_YET = (
    "has no checkpoint yet: starting from step 0 (the run is seeded, so the result is the same)"
)


def quiet_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def first_command(tiny_model: Path, dataset: Path, output: Path, reward_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "grpo",
        "train",
        *base_args(tiny_model, dataset, output, reward_file),
        "--max-steps",
        str(STEPS),
        "--save-steps",
        str(SAVE_STEPS),
        "--num-threads",
        "1",
    ]


def resume_command(output: Path) -> list[str]:
    return [sys.executable, "-m", "grpo", "train", "--resume", str(output)]


def logged_steps(output: Path) -> list[int]:
    """The steps in metrics.jsonl, which never holds a torn line."""
    path = output / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    assert text == "" or text.endswith("\n"), "a torn last line"
    return [int(json.loads(line)["step"]) for line in text.splitlines()]


def varies_with_the_machine(key: str) -> bool:
    """A metric that depends on the machine's speed and load: timings, throughput, memory."""
    return key.endswith("_time") or key == "tokens_per_second" or "memory" in key


def comparable(output: Path) -> list[dict]:
    """metrics.jsonl without what varies with the machine."""
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if not varies_with_the_machine(key)} for line in lines]


def kill_after(command: list[str], output: Path, new_steps: int, delay: float) -> tuple[int, str]:
    """Start ``command``, wait until it has logged ``new_steps`` steps more than metrics.jsonl holds now
    (0: not at all) and ``delay`` more seconds, then SIGKILL it; its exit code and what it printed."""
    wait_for = len(logged_steps(output)) + new_steps
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=quiet_env())
    deadline = time.monotonic() + 240
    while new_steps and process.poll() is None and time.monotonic() < deadline:
        if len(logged_steps(output)) >= wait_for:
            break
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=240)
    return process.returncode, stderr.decode()


def test_killed_at_random_moments_and_resumed_with_the_resume_flag_the_run_ends_as_if_never_killed(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    reference = tmp_path / "reference"
    uninterrupted = subprocess.Popen(  # alongside the interrupted one: the test's time is mostly start-ups
        first_command(tiny_model, tiny_dataset, reference, reward_file),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=quiet_env(),
    )
    seed = random.randrange(10**6)
    chance = random.Random(seed)
    output = tmp_path / "killed"
    first = first_command(tiny_model, tiny_dataset, output, reward_file)
    # Right after step 1 (before the first checkpoint), during a start-up, then after a step or two.
    moments = [(1, 0.0), (0, chance.uniform(0, 3)), (chance.randint(1, 2), chance.uniform(0, 0.3))]
    moments.append((chance.randint(1, 2), chance.uniform(0, 0.3)))
    killed_before_a_checkpoint = False
    for number, (new_steps, delay) in enumerate(moments):
        # A run killed before it recorded its settings left nothing to resume: it is started again.
        started = (output / "config.yaml").is_file()
        no_checkpoint = not list(output.glob("checkpoint-*"))
        code, stderr = kill_after(resume_command(output) if started else first, output, new_steps, delay)
        where = f"seed {seed}, kill {number}"
        assert code in (-signal.SIGKILL, 0), f"{where}: {stderr}"
        steps = logged_steps(output)
        assert steps == list(range(1, len(steps) + 1)), where
        if started and no_checkpoint and new_steps:  # (it was killed once training had begun)
            assert NO_CHECKPOINT_YET in stderr, where
        killed_before_a_checkpoint |= bool(steps) and not list(output.glob("checkpoint-*"))
        if code == 0:
            break
    assert killed_before_a_checkpoint, f"seed {seed}: no kill landed before the first checkpoint"
    finish = subprocess.run(
        resume_command(output), capture_output=True, text=True, timeout=240, env=quiet_env()
    )
    assert finish.returncode == 0, finish.stderr
    _, reference_errors = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, reference_errors.decode()

    assert comparable(output) == comparable(reference), f"seed {seed}"
    assert logged_steps(output) == list(range(1, STEPS + 1))
    assert (output / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text(), f"seed {seed}"
    expected = load_file(reference / "final_model" / "model.safetensors")
    resumed = load_file(output / "final_model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), f"{name} differs (seed {seed})"


def test_save_minutes_checkpoints_a_run_by_wall_time(tiny_model, tiny_dataset, tmp_path, reward_file):
    output = tmp_path / "run"
    args = [*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "3"]
    # save_steps off; a few milliseconds of save_minutes pass during every step.
    result = CliRunner().invoke(app, ["train", *args, "--save-steps", "0", "--save-minutes", "0.00001"])
    assert result.exit_code == 0, result.output
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and (output / "checkpoint-3").is_dir()
