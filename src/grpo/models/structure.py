"""What a model is made of, read the same way whatever wraps it: PEFT's LoRA layers, FSDP's shards."""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers still in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model: nn.Module) -> bool:
    """Whether any part of ``model`` is sharded by FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def adapter_factors(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The active LoRA adapters of a linear layer, each as (A, scaling × B): the update it adds to the layer's
    output is x Aᵀ (scaling × B)ᵀ. None for a plain layer, or one whose adapters are off or merged."""
    if not hasattr(module, "base_layer") or module.disable_adapters or module.merged:
        return []
    return [
        (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach() * module.scaling[name])
        for name in module.active_adapters
        if name in module.lora_A
    ]


def effective_linear(
    module: nn.Module, fold_adapters: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a (possibly LoRA-wrapped) linear layer applies now: adapters folded in, or the
    base layer's alone (``fold_adapters=False``)."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach()
    if fold_adapters and base is not module and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    bias = base.bias.detach() if base.bias is not None else None
    return weight, bias
