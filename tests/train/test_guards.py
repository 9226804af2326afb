"""Numerical guards and memory errors: a non-finite update is skipped, too many in a row stop the run with
a message; running out of memory while sampling halves the batch and retries once."""

from __future__ import annotations

import json
import math

import torch
from cli_args import base_args
from safetensors.torch import load_file
from typer.testing import CliRunner

import grpo.train.grpo
import grpo.train.rollouts
from grpo.cli.main import app


def cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def poison_losses(monkeypatch, calls_to_poison: set[int]) -> None:
    """Make the policy loss NaN on the given calls (0-based, one call per micro-batch)."""
    original = grpo.train.grpo.policy_loss
    calls = [0]

    def policy_loss(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        poisoned = calls[0] in calls_to_poison
        calls[0] += 1
        return (loss * math.nan if poisoned else loss), metrics

    monkeypatch.setattr(grpo.train.grpo, "policy_loss", policy_loss)


def test_a_nan_update_is_skipped_and_the_run_goes_on(
    monkeypatch, tiny_model, tiny_dataset, tmp_path, reward_file
):
    output = tmp_path / "run"
    poison_losses(monkeypatch, {2})  # step 2's first micro-batch (two micro-batches per step)
    code, log = cli(
        [*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "3", "--save-steps", "1",
         "--save-total-limit", "0"]
    )  # fmt: skip
    assert code == 0, log
    assert "step 2: skipped an update with loss nan" in log
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_updates"] for m in lines] == [0, 1, 0]
    before, after = (load_file(output / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (1, 2))
    assert all(torch.equal(before[name], after[name]) for name in before), "a skipped update changes nothing"
    last = load_file(output / "checkpoint-3" / "adapter_model.safetensors")
    assert any(not torch.equal(after[name], last[name]) for name in after), "step 3 updates again"
    assert all(math.isfinite(t.abs().sum()) for t in last.values())


def test_too_many_nan_updates_in_a_row_stop_the_run_with_one_line(
    monkeypatch, tiny_model, tiny_dataset, tmp_path, reward_file
):
    output = tmp_path / "run"
    poison_losses(monkeypatch, set(range(2, 100)))
    code, log = cli(
        [*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "6",
         "--max-nonfinite-updates", "2"]
    )  # fmt: skip
    assert code == 1
    assert log.strip().splitlines()[-1] == (
        "error: step 3: the loss or gradient was NaN or infinite in 2 updates in a row (all skipped), so the "
        "run stopped; lower learning_rate or check the reward functions"
    )
    assert "Traceback" not in log


def fail_to_allocate_above(monkeypatch, limit: int) -> list[int | None]:
    """Sampling more than ``limit`` completions at once fails as the CPU allocator does."""
    original = grpo.train.rollouts.generate
    sizes: list[int | None] = []

    def generate(*args, batch_size=None, **kwargs):
        sizes.append(batch_size)
        at_once = batch_size or len(args[2]) * kwargs["num_generations"]
        if at_once > limit:
            message = f"you tried to allocate {at_once * 10**9} bytes"
            raise RuntimeError(f"[alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: {message}")
        return original(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(grpo.train.rollouts, "generate", generate)
    return sizes


def test_running_out_of_memory_while_sampling_halves_the_batch_and_retries(
    monkeypatch, tiny_model, tiny_dataset, tmp_path, reward_file
):
    sizes = fail_to_allocate_above(monkeypatch, 4)
    code, log = cli([*base_args(tiny_model, tiny_dataset, tmp_path / "run", reward_file), "--max-steps", "2"])
    assert code == 0, log
    assert (
        "step 1: out of memory while sampling 8 completions at once; retrying with generation_batch_size = 4"
        in (" ".join(log.split()))
    )
    assert sizes == [None, 4, 4], "the smaller batch is kept for the rest of the run"


def test_running_out_of_memory_again_stops_with_one_line_and_keeps_the_finished_steps(
    monkeypatch, tiny_model, tiny_dataset, tmp_path, reward_file
):
    output = tmp_path / "run"
    assert cli([*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "1"])[0] == 0
    fail_to_allocate_above(monkeypatch, 2)
    code, log = cli([*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "3"])
    assert code == 1
    assert "error: step 2: out of memory while sampling 4 completions at once" in log
    assert (output / "checkpoint-1").is_dir() and not (output / "checkpoint-2").exists()
