"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): policies too big for one device.

Each decoder layer is its own unit and the model the root: a rank holds 1/world of every weight, gradient
and AdamW moment, gathers a layer's weights just before that layer runs, and frees them after; gradients are
reduce-scattered, averaged over the ranks, as each backward pass finishes. LoRA's adapters are sharded with
the frozen base weights they sit beside. The trainer is otherwise unchanged: sampling runs through the
transformers forward in lockstep across ranks (every forward of a sharded model is a collective), and the
files a run writes are the same as without sharding (full weights, gathered on the first rank), so a
checkpoint resumes with or without FSDP and on any number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grpo.train.distributed import Ranks


def shard(model: nn.Module, ranks: Ranks) -> None:
    """Shard ``model`` in place over all ranks: each decoder layer, then the rest (embeddings, final norm,
    LM head) as the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM (through a PEFT wrapper)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard")
    return layers


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered on the first rank (empty elsewhere). Collective: every rank
    calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state on the first rank, in ``optimizer.state_dict()``'s own layout (states
    keyed by the parameter's position), so that checkpoints look the same with or without sharding.
    Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    names = _parameter_names(model, optimizer)
    state = {i: by_name["state"][n] for i, n in enumerate(names) if n in by_name.get("state", {})}
    groups, start = [], 0
    for group, named in zip(optimizer.param_groups, by_name.get("param_groups", [])):
        count = len(group["params"])
        groups.append(
            {**{k: v for k, v in named.items() if k != "params"}, "params": list(range(start, start + count))}
        )
        start += count
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Shard a whole optimizer state (``optimizer.state_dict()`` layout, as a checkpoint holds it, read by
    every rank) into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: entries for i, entries in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]} for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in its order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
