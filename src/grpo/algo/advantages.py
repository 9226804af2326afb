"""Group-relative advantages: a completion is scored against the other completions of its prompt."""

from __future__ import annotations

import math
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


# Added to the standard deviation so that a group of (nearly) equal rewards cannot blow up.
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group") -> torch.Tensor:
    """Advantages for a flat tensor of N = groups × group_size rewards, grouped consecutively.

    Every reward has its group's mean subtracted. ``scale`` then divides by
    ``"group"``: the group's (unbiased) std + 1e-4, as in the GRPO paper;
    ``"batch"``: the std of the whole batch + 1e-4, which keeps easy and hard prompts on one scale;
    ``"none"``: nothing (Dr. GRPO), so the advantage is in the reward's own units.
    A group whose rewards are all equal gets advantage 0, never NaN.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat tensor, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not divide into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    # Rounding leaves tiny non-zero residues in a constant group (0.1 is not exact in float32), which the
    # division by a near-zero std would blow up: such groups are set to exactly 0.
    constant = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    centred = torch.where(constant, 0.0, grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        return (centred.view(-1, group_size) / (std + STD_EPS)).view(-1)
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return centred / (std + STD_EPS)
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")


def zero_std_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: they carry no learning signal."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item()


def normalize_per_function(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each reward function's scores (columns of ``scores``, (N, F)) z-scored within each group of
    ``group_size`` consecutive rows, so that functions on different scales weigh as their weights say
    ("normalise, then sum"). NaN (not applicable) stays NaN and is left out of the group's statistics; a
    group in which a function's scores are all equal gets 0 from it."""
    grouped = scores.view(-1, group_size, scores.shape[1])
    present = ~grouped.isnan()
    count = present.sum(dim=1, keepdim=True).clamp(min=1)
    filled = torch.where(present, grouped, 0.0)
    mean = filled.sum(dim=1, keepdim=True) / count
    var = (torch.where(present, grouped - mean, 0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    z = (grouped - mean) / (var.sqrt() + STD_EPS)
    return torch.where(present, z, math.nan).view_as(scores)


def process_advantages(
    step_rewards: list[list[float]], token_steps: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Per-token advantages (N, T) from step-level rewards, as DeepSeekMath's process supervision (§4.1.3).

    ``step_rewards[i]`` holds the rewards of completion i's steps in order; ``token_steps`` (N, T) the step
    each completion token belongs to (-1 for padding). Within each group of ``group_size`` consecutive
    completions, every step reward is normalised by the mean and (unbiased) std of all the group's step
    rewards; a token's advantage is then the sum of the normalised rewards of its own step and of every
    step after it. A group whose step rewards are all equal carries no signal: its advantages are 0.
    """
    if len(step_rewards) != token_steps.shape[0] or len(step_rewards) % group_size:
        raise ValueError(f"{len(step_rewards)} completions do not divide into groups of {group_size}")
    advantages = torch.zeros(token_steps.shape, dtype=torch.float32)
    for first in range(0, len(step_rewards), group_size):
        rows = range(first, first + group_size)
        pooled = torch.tensor([r for i in rows for r in step_rewards[i]], dtype=torch.float32)
        if pooled.numel() == 0 or pooled.max() == pooled.min():
            continue
        mean, std = pooled.mean(), pooled.std() if pooled.numel() > 1 else pooled.new_zeros(())
        for i in rows:
            normalised = (torch.tensor(step_rewards[i], dtype=torch.float32) - mean) / (std + STD_EPS)
            from_here_on = normalised.flip(0).cumsum(0).flip(0)  # sum over this step and the later ones
            steps = token_steps[i]
            present = steps >= 0
            advantages[i, present] = from_here_on[steps[present]]
    return advantages


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* rewards of its group, G/(G−1) × (r − group mean);
    an unbiased baseline that does not include the completion's own reward."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not divide into groups of {group_size} (at least 2)")
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view(-1)


def softmax_group_weights(rewards: torch.Tensor, group_size: int, temperature: float) -> torch.Tensor:
    """Weights softmax(r / τ) within each group (they sum to 1 per group): the softmax-weighted group
    log-likelihood pulls the policy towards each group's best completions, more sharply as τ → 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.softmax(rewards.view(-1, group_size) / temperature, dim=1).view(-1)
