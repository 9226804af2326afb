"""The LM head a chunk of rows at a time in training: no (rows × vocabulary) logits are ever whole.

:func:`chunked_completion_logps` computes what :func:`grpo.rollout.scoring.completion_logps` computes,
stopping the forward passes before the LM head and taking each token's log-prob through
:class:`_HeadLogSoftmax`. :func:`in_place_weight_gradients` lets the head and the embedding add their
gradients straight into ``.grad`` (the embedding's sparse), and the prompt pass run on stand-ins that share
the weights' ``.grad``, so that no weight-sized gradient waits in the autograd graph.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grpo.accel import onednn
from grpo.models.structure import is_sharded, unwrap
from grpo.rollout.scoring import completion_logps, shared_prompt_forward


class _HeadLogSoftmax(torch.autograd.Function):
    """log_softmax(hidden @ weightᵀ / temperature)[token] for rows of final hidden states, a chunk of rows
    at a time: the (rows, vocab) logits never exist whole, in the forward pass or the backward, which
    recomputes each chunk's logits instead of keeping them (one more LM-head product per token, in exchange
    for the largest tensor of a training micro-batch: 8 completions × 127 tokens × 49,152 logits are 200 MB
    in float32). The gradient reaches the hidden states and, when it is trained, the weight.

    When only the hidden states need a gradient (a frozen head, as under LoRA), the forward pass also keeps
    each row's expected output embedding, softmax @ weight: the gradient of log p[token] with respect to the
    row is then (weight[token] − expected) / temperature, and the backward pass needs no product at all —
    two LM-head products per token instead of three."""

    # A chunk's logits and their gradient are alive together at the peak: smaller chunks lower it, and below
    # a few hundred rows the products are no faster per row (benchmarks/RESULTS.md).
    ROWS_PER_CHUNK = 128

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = len(hidden)
        logps = hidden.new_empty(rows, dtype=torch.float32)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if with_entropy else logps.new_empty(0)
        # A frozen head: keep softmax @ weight per row (H values) instead of recomputing logits later.
        expected = None
        if ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]:
            expected = torch.empty_like(hidden)
        for part in _row_chunks(rows, _HeadLogSoftmax.ROWS_PER_CHUNK):
            logits = _chunk_logits(product, hidden[part], weight, temperature)
            chosen = logits.gather(-1, tokens[part].unsqueeze(-1)).squeeze(-1)
            peak = logits.amax(dim=-1, keepdim=True)
            # The exponentials overwrite the logits unless the entropy still needs them: a new chunk-sized
            # tensor costs more in page faults than the subtraction itself.
            shifted = (logits - peak if with_entropy else logits.sub_(peak)).exp_()
            total = shifted.sum(dim=-1)
            lse[part] = total.log().add_(peak.squeeze(-1))
            logps[part] = chosen - lse[part]
            if with_entropy:
                entropy[part] = lse[part] - torch.linalg.vecdot(shifted, logits) / total
            if expected is not None:
                expected[part] = product(shifted.to(weight.dtype), weight.t())
                expected[part] /= total.unsqueeze(-1).to(weight.dtype)
        if expected is not None:
            ctx.save_for_backward(weight, tokens, expected)
        else:
            ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.product = temperature, product
        ctx.frozen_head = expected is not None
        # Inside in_place_weight_gradients, the weight's gradient goes straight into its .grad.
        in_place = ctx.needs_input_grad[1] and _GRADIENTS_IN_PLACE.get() and _plain_leaf(weight)
        ctx.grad_into = weight if in_place else None
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[Any, ...]:
        if ctx.frozen_head:
            weight, tokens, expected = ctx.saved_tensors
            scale = (grad / ctx.temperature).unsqueeze(-1).to(expected.dtype)
            return (weight[tokens] - expected).mul_(scale), None, None, None, None, None
        hidden, weight, tokens, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        if ctx.grad_into is not None:
            grad_weight = _dense_grad(ctx.grad_into)
        elif want_weight:
            grad_weight = torch.zeros_like(weight)
        for part in _row_chunks(len(hidden), _HeadLogSoftmax.ROWS_PER_CHUNK):
            logits = _chunk_logits(ctx.product, hidden[part], weight, ctx.temperature)
            # d log p[token] / d logits = one-hot(token) − softmax, times the incoming gradient.
            grad_logits = logits.sub_(lse[part].unsqueeze(-1)).exp_().mul_(-grad[part].unsqueeze(-1))
            grad_logits.scatter_add_(-1, tokens[part].unsqueeze(-1), grad[part].unsqueeze(-1))
            grad_logits = grad_logits.div_(ctx.temperature).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = ctx.product(grad_logits, weight.t())
            if grad_weight is not None:
                # Accumulating in place, BLAS beats oneDNN's product plus an addition.
                grad_weight.addmm_(grad_logits.T, hidden[part])
        if ctx.grad_into is not None:
            grad_weight = None  # already in .grad
        return grad_hidden, grad_weight, None, None, None, None


_GRADIENTS_IN_PLACE = contextvars.ContextVar("gradients_in_place", default=False)


def _dense_grad(parameter: torch.Tensor) -> torch.Tensor:
    if parameter.grad is None:
        parameter.grad = torch.zeros_like(parameter)
    return parameter.grad


@contextlib.contextmanager
def in_place_weight_gradients(model: nn.Module) -> Iterator[None]:
    """Forward and backward passes run inside this put the (trained) LM head's and input embedding's weight
    gradients straight into their ``.grad`` (made zero first when missing), as a training loop that calls
    ``loss.backward()`` would have them. Autograd would otherwise hold each whole-vocabulary gradient until
    the last use of the weight is differentiated: with tied weights, three 113 MB tensors for the default
    model (the head's, the prompts' and the completions' embeddings), summed at the end of the backward
    pass. Here the head adds its gradient itself and the embedding's gradients are sparse (only the rows of
    tokens that occur), added into the dense ``.grad``; and the prompt pass of :func:`shared_prompt_forward`
    runs on stand-ins that share the weights' ``.grad`` (see :func:`_stand_ins_sharing_gradients`). Not for
    ``torch.autograd.grad``, which would not see them; nothing changes for frozen weights or weights with
    hooks."""
    base = unwrap(model)
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    sparse = type(embedding) is nn.Embedding and _plain_leaf(embedding.weight) and not embedding.sparse
    if sparse:
        _dense_grad(embedding.weight)  # so that sparse gradients are added into it, never become it
        embedding.sparse = True
    token = _GRADIENTS_IN_PLACE.set(True)
    try:
        yield
    finally:
        _GRADIENTS_IN_PLACE.reset(token)
        if sparse:
            embedding.sparse = False


def _stand_ins_sharing_gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    """Inside :func:`in_place_weight_gradients`, for the prompt pass of :func:`shared_prompt_forward`: a
    stand-in for each trained weight, sharing its values and its ``.grad`` tensor.

    Both passes use every weight, and autograd sums a weight's gradients from all its uses before adding
    them to ``.grad``: the completion pass's gradients (as large as the trained weights) would wait for the
    prompt pass's, which come last in the backward pass. With the prompt pass on stand-ins, each pass adds
    its gradients to the same ``.grad`` as soon as they are computed."""
    if not _GRADIENTS_IN_PLACE.get():
        return {}
    stand_ins = {}
    for name, parameter in module.named_parameters():
        if _plain_leaf(parameter) and parameter.grad is not None and not parameter.grad.is_sparse:
            stand_in = parameter.detach().requires_grad_()
            stand_in.grad = parameter.grad
            stand_ins[name] = stand_in
    return stand_ins


def _plain_leaf(weight: torch.Tensor) -> bool:
    """A trained parameter whose gradient nothing else watches (no hooks)."""
    hooks = weight._backward_hooks or getattr(weight, "_post_accumulate_grad_hooks", None)
    return weight.requires_grad and weight.is_leaf and not hooks


def _row_chunks(rows: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, rows, size)]


def _chunk_logits(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """A chunk's logits in float32 (as token_logps casts them), divided by the sampling temperature."""
    logits = product(hidden, weight).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def head_token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logps` of the logits that the (bias-free) linear ``head`` would make of ``hidden``
    (…, H), computed a chunk of rows at a time (see :class:`_HeadLogSoftmax`); its products go through
    oneDNN when the head's own forward does (:func:`grpo.accel.onednn.route_linears`)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    product = onednn.linear if onednn.is_routed(head) else F.linear
    logps, entropy = _HeadLogSoftmax.apply(
        flat, head.weight, tokens.reshape(-1), temperature, with_entropy, product
    )
    if with_entropy:
        return logps.view(tokens.shape), entropy.view(tokens.shape)
    return logps.view(tokens.shape)


def plain_output_head(model: nn.Module) -> nn.Module | None:
    """The model's LM head when :func:`head_token_logps` can stand in for it (a plain linear layer without
    bias, not adapted, not sharded), else None."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or not hasattr(base, "get_decoder"):
        return None
    return None if is_sharded(model) else head


def chunked_completion_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`grpo.rollout.scoring.completion_logps` with the LM head applied a chunk of rows at a time
    (:func:`head_token_logps`) where :func:`plain_output_head` allows it: no (rows × vocabulary) logits are
    kept. Inside :func:`in_place_weight_gradients` the prompt pass runs on stand-ins that share the
    weights' ``.grad``. Models whose head it cannot stand in for get the plain computation."""
    head = plain_output_head(model)
    if head is None:
        return completion_logps(
            model, prompt_ids, prompt_mask, prompt_index, completion_ids, completion_mask, temperature,
            with_entropy,
        )  # fmt: skip
    out = shared_prompt_forward(
        model,
        prompt_ids,
        prompt_mask,
        prompt_index,
        completion_ids,
        completion_mask,
        head_free=True,
        run_prompts=_prompt_pass,
    )
    return head_token_logps(out.head_hidden, head, completion_ids, temperature, with_entropy)


def _prompt_pass(runner: nn.Module, **kwargs: Any) -> Any:
    """The prompt pass of :func:`shared_prompt_forward`, on stand-ins sharing the weights' ``.grad`` inside
    :func:`in_place_weight_gradients`."""
    stand_ins = _stand_ins_sharing_gradients(runner)
    if stand_ins:
        return torch.func.functional_call(runner, stand_ins, (), kwargs, strict=False)
    return runner(**kwargs)
