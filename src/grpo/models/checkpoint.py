"""Checkpoints in safetensors and JSON only: nothing in a run directory is ever unpickled.

A checkpoint directory holds the trainable weights (a peft adapter under LoRA, loadable with
``PeftModel.from_pretrained``; the whole model otherwise), ``optimizer.safetensors`` with ``optimizer.json``,
``rng.safetensors`` with ``rng.json`` (every random generator a step draws from) and ``trainer_state.json``
(step, scheduler, config). It is written to a staging directory and renamed into place, so a directory
named ``checkpoint-N`` is always complete.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from grpo.errors import CheckpointError
from grpo.files import write_directory_atomic
from grpo.models.loading import PICKLE_SUFFIXES, weight_dtypes
from grpo.models.policy import REFERENCE_ADAPTER, PolicyAndReference

CHECKPOINT_PREFIX = "checkpoint-"


TRAINER_STATE = "trainer_state.json"


REQUIRED_FILES = (
    "trainer_state.json",
    "optimizer.safetensors",
    "optimizer.json",
    "rng.safetensors",
    "rng.json",
)


ADAPTER_WEIGHTS = "adapter_model.safetensors"


# --- random generators -------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The state of every generator a training step draws from: torch (CPU and each GPU), Python, NumPy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    version, internal, gauss = state["python"]
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    tensors = {"torch": state["torch"], "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    for index, cuda_state in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{index}"] = cuda_state
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, int(position), int(has_gauss), float(cached_gauss)],
        "cuda_devices": len(state.get("cuda", [])),
    }
    return tensors, meta


def _rng_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = meta["python"]
    kind, position, has_gauss, cached_gauss = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    state: dict[str, Any] = {
        "torch": tensors["torch"],
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, keys, position, has_gauss, cached_gauss),
    }
    if meta["cuda_devices"]:
        state["cuda"] = [tensors[f"cuda.{i}"] for i in range(meta["cuda_devices"])]
    return state


# --- optimizer ---------------------------------------------------------------------------------------------
def optimizer_to_safetensors(
    optimizer: torch.optim.Optimizer, state: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict (or ``state``, in its layout) into tensors (for safetensors) and the
    rest (for JSON)."""
    state = optimizer.state_dict() if state is None else state
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


# --- whole checkpoints -------------------------------------------------------------------------------------
def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    rng_state: dict[str, Any] | None = None,
    extra_models: dict[str, nn.Module] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    extra_states: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint atomically. ``rng_state`` defaults to the generators' state now; ``extra_models``
    (e.g. a reference model that has become a copy of the policy) go into subdirectories by name. The
    ``*_state`` arguments stand in for the models' and optimizer's own state dicts (a sharded model's,
    gathered)."""

    def given(state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        return {} if state is None else {"state_dict": state}

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True, **given(model_state))
        for name, extra in (extra_models or {}).items():
            state = (extra_states or {}).get(name)
            extra.save_pretrained(staging / name, safe_serialization=True, **given(state))
        tensors, meta = optimizer_to_safetensors(optimizer, optimizer_state)
        save_file(tensors, staging / "optimizer.safetensors")
        _write_json(staging / "optimizer.json", meta)
        rng_tensors, rng_meta = _rng_to_files(rng_state or capture_rng())
        save_file(rng_tensors, staging / "rng.safetensors")
        _write_json(staging / "rng.json", rng_meta)
        _write_json(staging / TRAINER_STATE, {**trainer_state, "scheduler": scheduler.state_dict()})

    return write_directory_atomic(directory, fill)


def check_checkpoint(directory: Path) -> None:
    """Fail with one line when ``directory`` is not a complete grpo checkpoint."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint not found")
    weights = [p for p in directory.glob("*.safetensors") if p.name.startswith(("model", "adapter_model"))]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights and pickles:
        raise CheckpointError(
            f"{directory}: holds pickled weights ({', '.join(pickles)}); grpo reads only safetensors and "
            "JSON from a run directory and never unpickles it"
        )
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if not weights:
        missing.insert(0, "model or adapter weights (.safetensors)")
    if missing:
        raise CheckpointError(f"{directory}: not a complete grpo checkpoint (missing {', '.join(missing)})")


def read_trainer_state(directory: Path) -> dict[str, Any]:
    check_checkpoint(directory)
    state = _read_json(directory / TRAINER_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{directory / TRAINER_STATE}: damaged (no step number)")
    return state


def check_weight_dtypes(directory: Path, model: nn.Module) -> None:
    """Refuse to continue a checkpoint whose run held its weights in other dtypes than ``model`` holds them
    (``dtype: auto`` resolves by machine): it would not continue exactly. Older checkpoints do not say."""
    recorded, now = read_trainer_state(directory).get("weights"), weight_dtypes(model)
    if recorded is not None and recorded != now:
        raise CheckpointError(
            f"{directory}: its run held the weights in {recorded}, this one would in {now}; continue it "
            f"exactly with --dtype {recorded.split(',')[0]}"
        )


def load_weights(directory: Path, model: nn.Module) -> None:
    """Put a checkpoint's trainable weights into ``model`` (a peft model's adapters, or a whole model)."""
    adapter = directory / ADAPTER_WEIGHTS
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        if not adapter.is_file():
            raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}: not a checkpoint of a LoRA run")
        result = set_peft_model_state_dict(model, _load_tensors(adapter))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{adapter}: weights that this model's adapters do not have")
        return
    if adapter.is_file():
        raise CheckpointError(f"{directory}: holds LoRA adapters, but this run trains the whole model")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        state.update(_load_tensors(shard))
    own = model.state_dict()
    wrong = [name for name, value in state.items() if name in own and own[name].shape != value.shape]
    unexpected = [name for name in state if name not in own]
    if wrong or unexpected:
        raise CheckpointError(
            f"{directory}: weights that do not fit this model ({', '.join((wrong + unexpected)[:3])})"
        )
    missing = set(own) - set(state)
    loaded_storage = {own[name].data_ptr() for name in state}
    # save_pretrained leaves out tied weights (an LM head that is the embedding matrix): they come along.
    untied_missing = [name for name in missing if own[name].data_ptr() not in loaded_storage]
    if untied_missing:
        raise CheckpointError(f"{directory}: missing weights ({', '.join(sorted(untied_missing)[:3])})")
    model.load_state_dict(state, strict=False)


def load_reference(directory: Path, models: PolicyAndReference) -> None:
    """Restore a reference model that a run had made a copy of its policy (see ``sync_reference``)."""
    saved = directory / REFERENCE_ADAPTER
    models.sync_reference()  # builds the reference adapter under LoRA; overwritten below either way
    if models.uses_adapters:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(
            models.policy, _load_tensors(saved / ADAPTER_WEIGHTS), adapter_name=REFERENCE_ADAPTER
        )
        for name, parameter in models.policy.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                parameter.requires_grad_(False)
    else:
        load_weights(saved, models.reference_model)


def load_training_state(
    directory: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore optimizer and scheduler from a checkpoint; return its trainer state and its RNG state (which
    the caller restores when it is about to draw from the generators). ``load_optimizer`` puts the saved
    optimizer state in place instead of ``optimizer.load_state_dict`` (a sharded optimizer)."""
    state = read_trainer_state(directory)
    meta = _read_json(directory / "optimizer.json")
    try:
        saved = optimizer_from_safetensors(_load_tensors(directory / "optimizer.safetensors"), meta)
        (load_optimizer or optimizer.load_state_dict)(saved)
        scheduler.load_state_dict(state["scheduler"])
        rng = _rng_from_files(
            _load_tensors(directory / "rng.safetensors"), _read_json(directory / "rng.json")
        )
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{directory}: does not fit this run's optimizer or is damaged ({error})"
        ) from None
    return state, rng


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [
        p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` itself when it is a checkpoint, else the newest checkpoint in the run directory ``path``."""
    if path.name.startswith(CHECKPOINT_PREFIX) and (path / TRAINER_STATE).exists():
        return path
    found = list_checkpoints(path) if path.is_dir() else []
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: damaged safetensors file ({error})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: damaged (not valid JSON)") from None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
