"""Checkpoints hold safetensors and JSON only, and restore optimizer, scheduler and RNG states exactly."""

from __future__ import annotations

import random

import torch
from transformers import get_scheduler

from grpo.checkpoint import list_checkpoints, load_training_state, prune_checkpoints, save_checkpoint


class TinyModel(torch.nn.Linear):
    def save_pretrained(self, directory, safe_serialization=True):
        from safetensors.torch import save_file

        save_file(self.state_dict(), directory / "model.safetensors")


def make(seed: int):
    torch.manual_seed(seed)
    model = TinyModel(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def take_steps(model, optimizer, scheduler, count: int) -> None:
    for _ in range(count):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_restored_state_continues_exactly_like_the_original(tmp_path):
    model, optimizer, scheduler = make(0)
    take_steps(model, optimizer, scheduler, 3)
    random.seed(5)
    save_checkpoint(tmp_path / "checkpoint-3", model, optimizer, scheduler, {"step": 3})
    expected_python = random.random()
    take_steps(model, optimizer, scheduler, 2)
    expected_weights = model.weight.detach().clone()

    fresh, fresh_optimizer, fresh_scheduler = make(1)
    fresh.load_state_dict(model.state_dict())  # weights are the model's own business; reset them below
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(tmp_path / "checkpoint-3" / "model.safetensors"))
    state = load_training_state(tmp_path / "checkpoint-3", fresh_optimizer, fresh_scheduler)
    assert state["step"] == 3
    assert random.random() == expected_python
    take_steps(fresh, fresh_optimizer, fresh_scheduler, 2)
    assert torch.equal(fresh.weight, expected_weights)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    model, optimizer, scheduler = make(0)
    take_steps(model, optimizer, scheduler, 1)
    directory = save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, {"step": 1})
    suffixes = {p.suffix for p in directory.iterdir()}
    assert suffixes <= {".safetensors", ".json"}
    assert not list(tmp_path.glob(".tmp-*")), "the staging directory is renamed into place"


def test_pruning_keeps_the_newest(tmp_path):
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
