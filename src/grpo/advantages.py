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
