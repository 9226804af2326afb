"""Linear layers through oneDNN on a CPU, for training.

PyTorch runs float32 ``F.linear`` on a CPU through its BLAS (MKL in the PyPI wheels). oneDNN's kernels,
which PyTorch also ships, can be much faster on the model's thin products, with results equal to float
rounding (benchmarks/RESULTS.md has the figures for the machines measured). :func:`route_linears` sends a
model's linear layers (LoRA's included) through :class:`OneDNNLinear`, whose backward pass uses oneDNN too.
It patches each layer's ``forward``, not a global mode, so that gradient checkpointing's recomputation runs
the same code as the forward pass; a routed LM head's chunked products
(:func:`grpo.accel.chunked_head.head_token_logps`) go through :func:`linear` as well.

oneDNN reads a transposed operand in place, so the backward products take ``weight.t()`` and ``x.t()`` as
views rather than copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grpo.models.structure import is_sharded


def _dense(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` itself when it is laid out row- or column-major (what oneDNN reads), else a copy."""
    return matrix if matrix.is_contiguous() or matrix.t().is_contiguous() else matrix.contiguous()


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ (+ bias) for 2-D x and weight, through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(weight), bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with the forward and backward products through oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = _product(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad @ weight
            grad_x = _product(rows, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:  # gradᵀ @ x
            grad_weight = _product(rows.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _applies(x, module.weight):
        return OneDNNLinear.apply(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ for 2-D tensors outside autograd: through oneDNN where :class:`OneDNNLinear` would be
    (``weight`` may be a transposed view), else ``F.linear``."""
    return _product(x, weight) if _applies(x, weight) else F.linear(x, weight)


def is_routed(module: nn.Module) -> bool:
    """Whether :func:`route_linears` has routed this layer."""
    return getattr(module.forward, "__func__", None) is _forward


def available() -> bool:
    return torch.backends.mkldnn.is_available()


def route_linears(model: nn.Module) -> int:
    """Send every ``nn.Linear`` of ``model`` through :class:`OneDNNLinear` (float32 on a CPU; anything else
    keeps ``F.linear``). Returns how many layers it routed: none of a model sharded by FSDP, whose weights
    are gathered by its own hooks."""
    if not available() or is_sharded(model):
        return 0
    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = _forward.__get__(module)
            routed += 1
    return routed
