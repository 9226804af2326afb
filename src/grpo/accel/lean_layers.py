"""Leaner training layers for Llama-family models on a CPU: the same results, less kept for the backward pass.

- :func:`lean_gated_mlps`: the gated MLP keeps silu(gate)'s two inputs, not its output as well.
- :func:`grouped_sdpa_attention`: grouped-query attention reads each key/value head in place (transformers
  repeats them for every query head under a mask).

:func:`make_lean` applies both to a loaded model; tests hold them to transformers' own layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _GatedSiLU(torch.autograd.Function):
    """silu(gate) · up, keeping its two inputs for the backward pass but not silu(gate): autograd's own
    version keeps all three. The backward pass recomputes silu(gate) and applies the same formulas as
    autograd, so the gradients are identical."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _gated_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(_GatedSiLU.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def lean_gated_mlps(model: nn.Module) -> int:
    """Run the SiLU-gated MLPs of Llama-family models (``down(silu(gate(x)) · up(x))``) through
    :class:`_GatedSiLU`: a training pass then keeps one activation of the MLP's width less per layer.
    Returns how many MLPs it changed."""
    changed = 0
    for module in model.modules():
        activation = type(getattr(module, "act_fn", None)).__name__
        if type(module).__name__ in GATED_MLPS and activation in ("SiLU", "SiLUActivation"):
            module.forward = _gated_mlp_forward.__get__(module)
            changed += 1
    return changed


GROUPED_SDPA = "grpo_grouped_sdpa"


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention, except for grouped key/value heads under a mask on a CPU.

    There transformers repeats each key/value head for every query head that shares it (its GPU kernels want
    that), and a training pass saves those copies for the backward pass. PyTorch's CPU kernel reads the
    groups in place (``enable_gqa``): less is kept for the backward pass and fewer temporaries are made,
    with the same results (benchmarks/RESULTS.md has the measured figures).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if not (
        grouped and plain and attention_mask is not None and query.device.type == "cpu" and query.shape[2] > 1
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return attended.transpose(1, 2).contiguous(), None


def register_grouped_attention() -> None:
    """Make :func:`grouped_sdpa_attention` known to transformers as ``GROUPED_SDPA`` (masks as for "sdpa")."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def make_lean(model: nn.Module) -> nn.Module:
    """``model`` with :func:`grouped_sdpa_attention` (where it runs transformers' "sdpa") and
    :func:`lean_gated_mlps`; returned for chaining."""
    if model.config._attn_implementation == "sdpa" and model._supports_attention_backend:
        register_grouped_attention()
        model.set_attn_implementation(GROUPED_SDPA)
    lean_gated_mlps(model)
    return model
