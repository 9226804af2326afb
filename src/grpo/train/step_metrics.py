"""A GRPO or PPO step's line of metrics.jsonl: what was sampled and scored, and what the updates did."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from grpo.agents.episode import episode_metrics
from grpo.algo.advantages import zero_std_group_fraction
from grpo.rewards.core import solved_completions
from grpo.rollout.batch import ScoredBatch


def solved_share(scores: torch.Tensor, graded: Sequence[bool] | None = None) -> float:
    """The share of completions that are solved (:func:`grpo.rewards.core.solved_completions`), as
    grpo.runs.eval counts them on held-out rows."""
    return solved_completions(scores, graded).float().mean().item()


def step_metrics(
    step: int,
    batch: ScoredBatch,
    reward_names: list[str],
    sums: dict[str, float],
    grad_norms: list[float],
    learning_rate: float,
    generation_time: float,
    step_time: float,
    graded: Sequence[bool] | None = None,
) -> dict[str, float]:
    """The rewards (total, and each function's mean, spread and failures), the share of completions solved
    (see :func:`solved_share`; ``graded`` as there, all graded by default), the advantages, the groups
    without signal or taken out, completion lengths and truncation, multi-turn episodes' counts
    (:func:`grpo.agents.episode.episode_metrics`); then ``sums`` (the losses and the loss function's
    statistics, averaged over micro-batches and updates), the mean gradient norm of the applied updates,
    the learning rate, and the step's timing."""
    rollout = batch.rollout
    g = rollout.num_generations
    lengths = rollout.completion_mask.sum(dim=1).float()
    m: dict[str, float] = {"step": float(step)}
    m["reward"] = batch.rewards.mean().item()
    m["reward_std"] = batch.rewards.std().item() if len(batch.rewards) > 1 else 0.0
    for f, name in enumerate(reward_names):
        column = batch.scores[:, f]
        present = column[~column.isnan()]
        m[f"rewards/{name}/mean"] = present.mean().item() if len(present) else math.nan
        m[f"rewards/{name}/std"] = present.std().item() if len(present) > 1 else 0.0
        m[f"rewards/{name}/failures"] = float(batch.failures.get(name, 0))
    m["solved"] = solved_share(batch.scores, graded)
    per_token = batch.advantages.dim() == 2
    advantages = batch.advantages[rollout.completion_mask.bool()] if per_token else batch.advantages
    m["advantage/mean"] = advantages.mean().item()
    m["advantage/std"] = advantages.std().item() if advantages.numel() > 1 else 0.0
    m["advantage/abs_max"] = advantages.abs().max().item() if advantages.numel() else 0.0
    m["frac_reward_zero_std"] = zero_std_group_fraction(batch.rewards, g)
    m["skipped_groups"] = batch.skipped.sum().item() / g
    m["sampling_rounds"] = float(batch.sampling_rounds)
    m["completions/mean_length"] = lengths.mean().item()
    m["completions/min_length"] = lengths.min().item()
    m["completions/max_length"] = lengths.max().item()
    m["completions/truncated_ratio"] = rollout.truncated.float().mean().item()
    if rollout.episodes is not None:
        m.update(episode_metrics(rollout.episodes))
    m.update(sums)
    finite = [n for n in grad_norms if math.isfinite(n)]
    m["grad_norm"] = sum(finite) / len(finite) if finite else math.nan
    m["learning_rate"] = learning_rate
    m["generation_time"] = generation_time
    m["step_time"] = step_time
    m["tokens_per_second"] = lengths.sum().item() / step_time
    return m


def sampled_entropy(surprisal: float, loss_mask: torch.Tensor) -> float:
    """The logged ``entropy``: the mean of −log π(token) over a step's loss tokens (``surprisal`` is their
    sum, see :func:`grpo.algo.logprobs.surprisal_sum`), a Monte-Carlo estimate of the policy's entropy
    per token at the sampling temperature, logged at every step at no cost. Under top_p or top_k it is the
    cross-entropy of the truncated sampler against the policy; the exact entropy of the whole distribution
    is logged as ``entropy/mean`` where top_entropy_quantile < 1 computes it. NaN without loss tokens."""
    tokens = loss_mask.sum().item()
    return surprisal / tokens if tokens else math.nan
