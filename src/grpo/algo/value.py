"""PPO's critic math: generalised advantage estimation, whitening, the clipped value loss, and how much of
the returns' variance the values explain. Pure functions of (B, T) tensors and a loss mask."""

from __future__ import annotations

import math

import torch

from grpo.algo.logprobs import masked_mean


# --- the math, as pure functions ---------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over completion tokens; returns ``(advantages, returns)``, (B, T).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with rewards, values and advantages taken as 0
    past a row's last real token: the completion ends there, so its last token bootstraps from nothing.
    Returns are A + V, the critic's regression target. ``mask`` must be right-padded (ones, then zeros),
    as a rollout's completion mask is; a row of zeros gets zeros.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = next_value = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0 and variance 1 over the real tokens; padding stays 0."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """½·max((V − R)², (clip(V, V_old ± cliprange) − R)²), averaged over the real tokens of ``mask``.

    The max makes the clip pessimistic: moving a value further than ``cliprange`` from the value that
    produced the advantages earns no credit, so one batch cannot drag the critic far. ``num_items_in_batch``
    divides the masked sum instead of the mask's own token count (the whole step's tokens, so that
    splitting the step into micro-batches does not change the objective).
    """
    clipped = old_values + (values - old_values).clamp(-cliprange, cliprange)
    per_token = torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask.to(values.dtype)
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return 0.5 * per_token.sum() / torch.as_tensor(denominator, dtype=values.dtype).clamp(min=1.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over real tokens: 1 when the critic predicts the returns exactly, 0 when it
    does no better than their mean, negative when worse; NaN when the returns do not vary."""
    returns_variance = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    error = returns - values
    error_variance = masked_mean((error - masked_mean(error, mask)) ** 2, mask)
    return (1 - error_variance / returns_variance).item() if returns_variance > 0 else math.nan
