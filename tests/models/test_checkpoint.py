"""Checkpoints hold safetensors and JSON only, restore every state exactly, and refuse what they cannot
trust; writes are atomic."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import get_scheduler

from grpo.errors import CheckpointError
from grpo.files import remove_leftovers, write_directory_atomic, write_text_atomic
from grpo.models.checkpoint import (
    check_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)


class TinyModel(torch.nn.Linear):
    def save_pretrained(self, directory, safe_serialization=True):
        save_file(self.state_dict(), directory / "model.safetensors")


def make(seed: int):
    torch.manual_seed(seed)
    model = TinyModel(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def take_steps(model, optimizer, scheduler, count: int) -> None:
    for _ in range(count):
        noise = torch.randn(2, 4) + float(np.random.rand()) + random.random()
        model(noise).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_restored_state_continues_exactly_like_the_original(tmp_path):
    model, optimizer, scheduler = make(0)
    random.seed(5)
    np.random.seed(6)
    take_steps(model, optimizer, scheduler, 3)
    save_checkpoint(tmp_path / "checkpoint-3", model, optimizer, scheduler, {"step": 3})
    take_steps(model, optimizer, scheduler, 2)  # draws from torch, NumPy and Python generators
    expected_weights = model.weight.detach().clone()

    fresh, fresh_optimizer, fresh_scheduler = make(1)
    random.seed(0)
    np.random.seed(0)
    load_weights(tmp_path / "checkpoint-3", fresh)
    state, rng = load_training_state(tmp_path / "checkpoint-3", fresh_optimizer, fresh_scheduler)
    restore_rng(rng)
    assert state["step"] == 3
    take_steps(fresh, fresh_optimizer, fresh_scheduler, 2)
    assert torch.equal(fresh.weight, expected_weights)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    model, optimizer, scheduler = make(0)
    take_steps(model, optimizer, scheduler, 1)
    directory = save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, {"step": 1})
    assert {p.suffix for p in directory.iterdir()} <= {".safetensors", ".json"}
    assert not list(tmp_path.glob(".tmp-*")), "the staging directory is renamed into place"
    check_checkpoint(directory)


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    model, optimizer, scheduler = make(0)
    save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, {"step": 1, "tag": "a"})
    save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, {"step": 1, "tag": "b"})
    assert json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["tag"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_pruning_keeps_the_newest(tmp_path):
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]


def test_latest_checkpoint_of_a_run_directory_or_a_checkpoint_itself(tmp_path):
    model, optimizer, scheduler = make(0)
    for step in (2, 10):
        save_checkpoint(tmp_path / f"checkpoint-{step}", model, optimizer, scheduler, {"step": step})
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert latest_checkpoint(tmp_path / "checkpoint-2") == tmp_path / "checkpoint-2"
    assert latest_checkpoint(tmp_path / "elsewhere") is None


@pytest.fixture()
def checkpoint(tmp_path):
    model, optimizer, scheduler = make(0)
    take_steps(model, optimizer, scheduler, 1)
    return save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, {"step": 1})


def test_a_pickled_checkpoint_is_refused_without_being_read(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(
        CheckpointError, match=r"holds pickled weights \(pytorch_model.bin\).*never unpickles"
    ):
        check_checkpoint(checkpoint)


@pytest.mark.parametrize("missing", ["optimizer.safetensors", "rng.json", "trainer_state.json"])
def test_an_incomplete_checkpoint_names_the_missing_file(checkpoint, missing):
    (checkpoint / missing).unlink()
    with pytest.raises(CheckpointError, match=f"not a complete grpo checkpoint \\(missing {missing}\\)"):
        check_checkpoint(checkpoint)


def test_a_damaged_safetensors_file_is_named(checkpoint):
    (checkpoint / "optimizer.safetensors").write_bytes(b"garbage")
    _, optimizer, scheduler = make(0)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: damaged safetensors file"):
        load_training_state(checkpoint, optimizer, scheduler)


def test_a_damaged_json_file_is_named(checkpoint):
    (checkpoint / "trainer_state.json").write_text("{ half")
    _, optimizer, scheduler = make(0)
    with pytest.raises(CheckpointError, match=r"trainer_state.json: damaged \(not valid JSON\)"):
        load_training_state(checkpoint, optimizer, scheduler)


def test_weights_of_another_shape_are_refused(checkpoint):
    other = TinyModel(5, 3)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_weights(checkpoint, other)


def test_an_optimizer_of_another_run_is_refused(checkpoint):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    with pytest.raises(CheckpointError, match="does not fit this run's optimizer"):
        load_training_state(checkpoint, optimizer, scheduler)


def test_atomic_text_write_leaves_no_staging_file(tmp_path):
    write_text_atomic(tmp_path / "metrics.jsonl", "a\n")
    write_text_atomic(tmp_path / "metrics.jsonl", "a\nb\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "a\nb\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_directory_write_that_fails_leaves_the_previous_version(tmp_path):
    write_directory_atomic(tmp_path / "final_model", lambda d: (d / "w.txt").write_text("old"))

    def fail(directory):
        (directory / "w.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_directory_atomic(tmp_path / "final_model", fail)
    assert (tmp_path / "final_model" / "w.txt").read_text() == "old"
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["final_model"]


def test_leftovers_of_a_kill_between_the_two_renames_are_resolved(tmp_path):
    # Killed after the old directory was moved aside and before the new one arrived: the old one returns.
    (tmp_path / ".old-checkpoint-3").mkdir()
    (tmp_path / ".old-checkpoint-3" / "w").write_text("old")
    (tmp_path / ".tmp-checkpoint-3").mkdir()
    # Killed after the new one arrived and before the old one was deleted: the old one goes.
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / ".old-checkpoint-4").mkdir()
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert (tmp_path / "checkpoint-3" / "w").read_text() == "old"
