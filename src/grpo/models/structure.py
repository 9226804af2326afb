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


def effective_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a (possibly LoRA-wrapped) linear layer applies now, adapters folded in."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach()
    if base is not module and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    bias = base.bias.detach() if base.bias is not None else None
    return weight, bias
