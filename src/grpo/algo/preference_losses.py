"""Losses on preference pairs: DPO's (policy against reference, no reward model) and the Bradley–Terry loss
a reward model is trained with. Pure functions of summed log-probs or scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The sigmoid DPO loss, averaged over pairs, from per-sequence summed log-probs (B,); and its metrics.

    With ``label_smoothing`` ε > 0 each preference is taken to be wrong with probability ε (conservative
    DPO): the loss is (1 − ε) · −log σ(m) + ε · −log σ(−m), whose gradient vanishes at a finite margin m
    instead of driving it to infinity.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracy": (margins > 0).float().mean().item(),
        "rewards/margin": margins.mean().item(),
    }
    return losses.mean(), metrics


# --- the loss --------------------------------------------------------------------------------------------
def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, center_coefficient: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over pairs of −log σ(r_chosen − r_rejected), plus ``center_coefficient`` × the mean of
    (r_chosen + r_rejected)², and the pairs' accuracy (share with r_chosen > r_rejected) and mean margin.

    Bradley-Terry models P(chosen preferred) = σ(r_chosen − r_rejected), so the loss is the pairs' negative
    log-likelihood; it sees only differences, and the centering term (TRL's ``center_rewards_coefficient``)
    keeps the rewards' level from drifting. ``logsigmoid`` stays finite for any margin.
    """
    margin = chosen - rejected
    loss = -nn.functional.logsigmoid(margin).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    metrics = {
        "accuracy": (margin > 0).float().mean().item(),
        "margin": margin.mean().item(),
    }
    return loss, metrics
