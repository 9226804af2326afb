"""The GRPO objective as a pure function of per-token log-probabilities."""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


ImportanceSamplingLevel = Literal["token", "sequence"]


LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(πθ‖πref): ρ − log ρ − 1 with ρ = πref/πθ; unbiased and never negative."""
    log_rho = ref_logps - logps
    return torch.exp(log_rho) - log_rho - 1


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    importance_sampling_level: ImportanceSamplingLevel = "token",
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus β·KL, reduced as ``loss_type`` says. Returns ``(loss, metrics)``.

    Shapes: ``logps``, ``old_logps``, ``ref_logps`` and ``mask`` are (B, T), the log-probs of the sampled
    completion tokens and a 0/1 mask of real completion tokens; ``advantages`` is (B,), one per completion,
    or (B, T), one per token (process supervision).
    Per token: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β·k3(πθ, πref), with ρ = exp(logp − old_logp).

    ``loss_type``: "grpo" averages each sequence over its own length, then over sequences;
    "bnpo" divides the masked sum by the number of completion tokens in this batch; "dapo" by
    ``num_items_in_batch``, the completion tokens of the whole generation batch (all micro-batches and
    processes), so that gradient accumulation does not change the objective; "dr_grpo" by
    B × ``max_completion_length``, a constant that removes the length bias.
    ``importance_sampling_level="sequence"`` (GSPO) uses one ratio per sequence: the exp of the masked mean
    of its token log-ratios. ``ref_logps`` may be None when ``beta`` is 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta != 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    # Padding positions may hold anything (even -inf); replace them before any exp so that 0 · inf never
    # turns into NaN in the loss or its gradient.
    present = mask.bool()
    logps = torch.where(present, logps, 0.0)
    old_logps = torch.where(present, old_logps, 0.0)
    if ref_logps is not None:
        ref_logps = torch.where(present, ref_logps, 0.0)
    mask = mask.to(logps.dtype)
    token_counts = mask.sum(dim=1).clamp(min=1.0)

    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(dim=1) / token_counts).unsqueeze(1)
    elif importance_sampling_level != "token":
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}"
        )
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B,) or per token (B, T)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    if importance_sampling_level == "sequence":
        per_token = per_token.expand_as(logps)

    kl = None
    if beta != 0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl

    masked_sum = (per_token * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / token_counts).mean()
    elif loss_type == "bnpo":
        loss = masked_sum / mask.sum().clamp(min=1.0)
    elif loss_type == "dapo":
        denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = masked_sum / torch.as_tensor(denominator, dtype=logps.dtype).clamp(min=1.0)
    else:  # dr_grpo
        loss = masked_sum / (logps.shape[0] * (max_completion_length or logps.shape[1]))

    metrics = _clip_metrics(ratio.detach(), adv, mask, epsilon_low, epsilon_high)
    total_tokens = mask.sum().clamp(min=1.0)
    metrics["kl"] = 0.0 if kl is None else ((kl.detach() * mask).sum() / total_tokens).item()
    return loss, metrics


def _clip_metrics(
    ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, float]:
    """Where the clip took the gradient away: below 1−ε for negative advantages, above 1+ε for positive."""
    ratio = ratio.expand_as(mask)
    total = mask.sum().clamp(min=1.0)
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype) * mask
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype) * mask
    present = mask.bool()
    ratios = ratio[present] if present.any() else ratio.new_ones(1)
    return {
        "clip_ratio/low_mean": (low.sum() / total).item(),
        "clip_ratio/high_mean": (high.sum() / total).item(),
        "clip_ratio/region_mean": ((low + high).sum() / total).item(),
        "ratio/mean": ratios.mean().item(),
        "ratio/min": ratios.min().item(),
        "ratio/max": ratios.max().item(),
    }


def softmax_weighted_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_groups: int,
    beta: float = 0.0,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Softmax-weighted group log-likelihood: −(1/num_groups) Σ_i w_i log πθ(completion_i | prompt), with
    the weights w = softmax(r/τ) of each group (:func:`grpo.algo.advantages.softmax_group_weights`), plus β·KL
    (k3, averaged over ``num_tokens`` completion tokens, default this micro-batch's).

    The sum decomposes over completions, so micro-batches that split a group add up to the whole-batch
    loss as long as ``num_groups`` and ``num_tokens`` count the whole batch.
    """
    present = mask.bool()
    mask = mask.to(logps.dtype)
    sequence_logps = (torch.where(present, logps, 0.0) * mask).sum(dim=1)
    loss = -(weights * sequence_logps).sum() / num_groups
    metrics = {"sequence_logp/mean": sequence_logps.detach().mean().item()}
    if beta != 0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta != 0")
        kl = k3_kl(torch.where(present, logps, 0.0), torch.where(present, ref_logps, 0.0))
        tokens = mask.sum() if num_tokens is None else num_tokens
        loss = loss + beta * (kl * mask).sum() / torch.as_tensor(tokens, dtype=logps.dtype).clamp(min=1.0)
        metrics["kl"] = ((kl.detach() * mask).sum() / mask.sum().clamp(min=1.0)).item()
    else:
        metrics["kl"] = 0.0
    return loss, metrics
