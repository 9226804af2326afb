"""Checkpoints in safetensors and JSON only: nothing in a run directory is ever unpickled.

A checkpoint directory holds the trainable weights (a peft adapter under LoRA, loadable with
``PeftModel.from_pretrained``; the whole model otherwise), ``optimizer.safetensors`` with ``optimizer.json``,
``rng.safetensors`` and ``trainer_state.json`` (step, scheduler, Python RNG).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PREFIX = "checkpoint-"


def optimizer_to_safetensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (for safetensors) and the rest (for JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> Path:
    """Write a checkpoint to a temporary name, then rename it into place."""
    staging = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tensors, meta = optimizer_to_safetensors(optimizer)
    save_file(tensors, staging / "optimizer.safetensors")
    _write_json(staging / "optimizer.json", meta)
    save_file({"torch": torch.get_rng_state()}, staging / "rng.safetensors")
    python_rng = random.getstate()
    state = {
        **trainer_state,
        "scheduler": scheduler.state_dict(),
        "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
    }
    _write_json(staging / "trainer_state.json", state)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states from a checkpoint; returns its trainer state."""
    meta = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(
        optimizer_from_safetensors(load_file(directory / "optimizer.safetensors"), meta)
    )
    state = json.loads((directory / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(directory / "rng.safetensors")["torch"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [
        p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
