"""Token log-probabilities and the masked statistics of them, in plain torch.

:func:`token_logps` takes log softmax(logits / T)[token] without building the (…, vocabulary) log-softmax:
its autograd function (:class:`_SelectiveLogSoftmax`) works a chunk of rows at a time and can write its
gradient into the logits' own memory. :func:`masked_mean` and :func:`high_entropy_tokens` are the
per-token reductions the losses and their statistics use; :func:`surprisal_sum` the one behind the logged
``entropy``.
"""

from __future__ import annotations

from typing import Any

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` where ``mask`` is 1 (0 where it is nowhere 1)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def surprisal_sum(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ −log π(token) over the tokens where ``mask`` is 1, without gradient.

    Divided by the number of those tokens, it estimates the policy's entropy per token by Monte Carlo: the
    tokens were drawn from the policy, so E[−log π(token)] is its entropy, here at the sampling temperature
    and from log-probs the loss computes anyway, with no pass over the vocabulary. Under top_p or top_k it
    is the cross-entropy of the truncated sampler against the policy (a little above the sampler's own
    entropy); sampled by a policy that has since been updated, it is the same kind of cross-entropy.
    """
    return -(logps.detach().float() * mask.to(torch.float32)).sum()


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """1 for the completion tokens whose entropy is in the top ``quantile`` of this micro-batch's, else 0:
    the forking tokens where the policy is unsure, which carry most of the learning signal ("Beyond the
    80/20 rule", Wang et al. 2025; TRL's top_entropy_quantile)."""
    present = mask.bool()
    if not present.any():
        return torch.zeros_like(mask)
    threshold = torch.quantile(entropy[present].float(), 1.0 - quantile)
    return (present & (entropy >= threshold)).to(mask.dtype)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[token] = logit[token] − logsumexp(logits), without (…, vocab) temporaries.

    A (rows, vocab) tensor is hundreds of megabytes here, and each new one costs page faults as well as
    memory. The forward takes the logsumexp a chunk of rows at a time through one reused buffer. The
    backward builds the gradient, softmax minus one-hot, in one new tensor, or, with ``reuse_logits``, in
    the saved logits' own memory: for logits nothing else reads (a model's fresh output); autograd's
    version check then refuses a second backward through the same graph.
    """

    ROWS_PER_CHUNK = 256

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, reuse_logits: bool, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.reuse_logits = reuse_logits
        flat = logits.reshape(-1, logits.shape[-1])
        lse = flat.new_empty(len(flat))
        # The entropy, −Σ p log p = logsumexp − Σ p·x, comes from the same pass (empty when not asked for).
        entropy = flat.new_empty(len(flat) if with_entropy else 0)
        buffer = flat.new_empty((min(len(flat), _SelectiveLogSoftmax.ROWS_PER_CHUNK), flat.shape[-1]))
        for start in range(0, len(flat), _SelectiveLogSoftmax.ROWS_PER_CHUNK):
            rows = slice(start, start + _SelectiveLogSoftmax.ROWS_PER_CHUNK)
            chunk = flat[rows]
            peak = chunk.amax(dim=-1, keepdim=True)
            shifted = torch.sub(chunk, peak, out=buffer[: len(chunk)]).exp_()
            total = shifted.sum(dim=-1)
            lse[rows] = total.log().add_(peak.squeeze(-1))
            if with_entropy:
                entropy[rows] = lse[rows] - torch.linalg.vecdot(shifted, chunk) / total
        lse = lse.view(tokens.shape)
        ctx.save_for_backward(logits, tokens, lse)
        entropy = entropy.view(tokens.shape) if with_entropy else entropy
        ctx.mark_non_differentiable(entropy)
        logps = logits.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1) - lse
        return logps, entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        shifted = logits.sub_(lse.unsqueeze(-1)) if ctx.reuse_logits else logits - lse.unsqueeze(-1)
        grad_logits = shifted.exp_()  # softmax
        grad_logits.mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits, None, None, None


def selective_log_softmax(
    logits: torch.Tensor, tokens: torch.Tensor, reuse_logits: bool = False
) -> torch.Tensor:
    """log_softmax(logits)[..., tokens] without materialising the full (…, vocab) log-softmax.

    ``reuse_logits`` lets the backward overwrite ``logits`` with its gradient: only for a tensor that
    nothing else reads afterwards.
    """
    return _SelectiveLogSoftmax.apply(logits, tokens, reuse_logits, False)[0]


def selective_log_softmax_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, reuse_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`selective_log_softmax`, and the entropy of each row's distribution (no gradient)."""
    return _SelectiveLogSoftmax.apply(logits, tokens, reuse_logits, True)


def token_logps(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    reuse_logits: bool = False,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` under softmax(logits / temperature), in float32 (``reuse_logits``: see
    :func:`selective_log_softmax`); with ``with_entropy``, also each position's entropy."""
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    # A tensor made here (by the cast or the division) is ours to reuse, whatever the caller said.
    reuse = reuse_logits or scaled is not logits
    if with_entropy:
        return selective_log_softmax_and_entropy(scaled, tokens, reuse_logits=reuse)
    return selective_log_softmax(scaled, tokens, reuse_logits=reuse)


@torch.no_grad()
def token_logps_in_place(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`token_logps` without autograd, worked out in the memory of ``logits``, which it overwrites:
    for a model's fresh output that nothing else reads. A second tensor of their size would cost more in
    page faults than the arithmetic."""
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled.div_(temperature)
    chosen = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    peak = scaled.amax(dim=-1, keepdim=True)
    lse = scaled.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
    return chosen - lse
