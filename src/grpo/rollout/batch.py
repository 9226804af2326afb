"""The typed contract between sampling and the loss.

- :class:`Rollout`: what the sampler returns, completions of G per prompt, each with a per-token
  ``loss_mask`` saying which of its tokens the policy wrote and is trained on.
- :class:`ScoredBatch`: a rollout with its rewards and advantages.
- :class:`TrajectoryBatch`: a scored batch's tensors on the training device, the tokens that enter the
  loss, and its micro-batches: everything the loss reads.

Shapes: P prompts, N = P × G completions, L prompt tokens, C completion tokens (both padded).
A completion is one token sequence. ``completion_mask`` marks the tokens that are in it (the model reads
them); ``loss_mask`` the tokens that carry the policy loss and the KL. For a single assistant message the
two are equal; a multi-turn trajectory keeps tool and environment tokens in the sequence with a 0 in
``loss_mask``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Rollout:
    """A batch of sampled completions; completion i belongs to prompt i // num_generations."""

    prompt_ids: torch.Tensor  # (P, L), left-padded, each prompt once
    prompt_mask: torch.Tensor  # (P, L)
    completion_ids: torch.Tensor  # (N, C), right-padded
    completion_mask: torch.Tensor  # (N, C): 1 up to and including the end-of-sequence token
    truncated: torch.Tensor  # (N,) bool: stopped by max_completion_length, not by the model
    texts: list[str]  # decoded completions, special tokens removed
    num_generations: int
    # (N, C): log-probs of the tokens under the (temperature-scaled) sampler; None when the backend that
    # sampled cannot give them (the trainer then computes them with a forward pass of the policy)
    sampling_logps: torch.Tensor | None
    pad_id: int = 0  # fills completion_ids past each completion's end
    loss_mask: torch.Tensor | None = None  # (N, C): the tokens trained on; default: completion_mask
    # multi-turn trajectories: each completion's episode (grpo.agents.episode.EpisodeRecord: its messages
    # after the prompt, counts, environment); None for single assistant messages
    episodes: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.completion_mask

    @property
    def prompt_index(self) -> torch.Tensor:
        """(N,) the prompt row of each completion."""
        return torch.arange(len(self.completion_ids)) // self.num_generations

    @property
    def num_groups(self) -> int:
        return len(self.prompt_ids)

    def select_groups(self, groups: list[int]) -> Rollout:
        """The rollout of the given groups (prompts), in that order."""
        rows = group_rows(groups, self.num_generations)
        return Rollout(
            self.prompt_ids[groups],
            self.prompt_mask[groups],
            self.completion_ids[rows],
            self.completion_mask[rows],
            self.truncated[rows],
            [self.texts[r] for r in rows],
            self.num_generations,
            None if self.sampling_logps is None else self.sampling_logps[rows],
            self.pad_id,
            self.loss_mask[rows],
            None if self.episodes is None else [self.episodes[r] for r in rows],
        )

    @staticmethod
    def join(parts: list[Rollout]) -> Rollout:
        """One rollout of several, prompts left-padded and completions right-padded to common widths."""
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)
        width = max(p.completion_ids.shape[1] for p in parts)

        def left(t: torch.Tensor, value: int) -> torch.Tensor:
            return nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)

        def right(t: torch.Tensor, value: float) -> torch.Tensor:
            return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        first = parts[0]
        known = all(p.sampling_logps is not None for p in parts)
        return Rollout(
            torch.cat([left(p.prompt_ids, first.pad_id) for p in parts]),
            torch.cat([left(p.prompt_mask, 0) for p in parts]),
            torch.cat([right(p.completion_ids, first.pad_id) for p in parts]),
            torch.cat([right(p.completion_mask, 0) for p in parts]),
            torch.cat([p.truncated for p in parts]),
            [text for p in parts for text in p.texts],
            first.num_generations,
            torch.cat([right(p.sampling_logps, 0.0) for p in parts]) if known else None,
            first.pad_id,
            torch.cat([right(p.loss_mask, 0) for p in parts]),
            [e for p in parts for e in p.episodes] if all(p.episodes is not None for p in parts) else None,
        )


@dataclass
class ScoredBatch:
    """A step's rollout with its rewards and advantages."""

    rollout: Rollout
    rewards: torch.Tensor  # (N,) weighted sum
    scores: torch.Tensor  # (N, F) per function, NaN = not applicable
    advantages: torch.Tensor  # (N,), or (N, C) per token under process supervision
    skipped: torch.Tensor  # (N,) bool: completions of groups a reward failure took out of the update
    failures: dict[str, int]  # per reward function, completions it failed to score
    sampling_rounds: int = 1  # batches sampled for this step (more than 1 under dynamic sampling)

    def informative_groups(self) -> list[int]:
        """Groups whose rewards differ (so they carry a learning signal) and that no failure took out."""
        g = self.rollout.num_generations
        rewards, skipped = self.rewards.view(-1, g), self.skipped.view(-1, g)
        varied = rewards.max(dim=1).values > rewards.min(dim=1).values
        return (varied & ~skipped.any(dim=1)).nonzero().flatten().tolist()

    def select_groups(self, groups: list[int]) -> ScoredBatch:
        rows = group_rows(groups, self.rollout.num_generations)
        return ScoredBatch(
            self.rollout.select_groups(groups),
            self.rewards[rows],
            self.scores[rows],
            self.advantages[rows],
            self.skipped[rows],
            self.failures,
            self.sampling_rounds,
        )

    @staticmethod
    def join(parts: list[ScoredBatch]) -> ScoredBatch:
        rollout = Rollout.join([p.rollout for p in parts])
        width = rollout.completion_ids.shape[1]
        advantages = [
            p.advantages
            if p.advantages.dim() == 1
            else nn.functional.pad(p.advantages, (0, width - p.advantages.shape[1]))
            for p in parts
        ]
        failures: dict[str, int] = defaultdict(int)
        for part in parts:
            for name, count in part.failures.items():
                failures[name] += count
        return ScoredBatch(
            rollout,
            torch.cat([p.rewards for p in parts]),
            torch.cat([p.scores for p in parts]),
            torch.cat(advantages),
            torch.cat([p.skipped for p in parts]),
            dict(failures),
            sum(p.sampling_rounds for p in parts),
        )


@dataclass(frozen=True)
class TrajectoryBatch:
    """A scored batch on the training device: the token sequences, the tokens that enter the loss, the
    advantages, and the micro-batches the loss is taken over."""

    prompt_ids: torch.Tensor  # (P, L)
    prompt_mask: torch.Tensor  # (P, L)
    prompt_index: torch.Tensor  # (N,): the prompt row of each completion
    completion_ids: torch.Tensor  # (N, C)
    completion_mask: torch.Tensor  # (N, C): tokens in the sequence
    loss_mask: torch.Tensor  # (N, C): tokens that carry the loss (the rollout's, less truncated or skipped)
    advantages: torch.Tensor  # (N,), or (N, C) per token
    micro_batches: list[slice]  # row ranges of N
    temperature: float  # the sampling temperature, which the log-probs divide the logits by

    @classmethod
    def of(
        cls,
        batch: ScoredBatch,
        device: torch.device,
        micro_batch_size: int,
        temperature: float,
        mask_truncated: bool = False,
    ) -> TrajectoryBatch:
        """``batch``'s tensors on ``device``, in micro-batches of ``micro_batch_size`` completions. Skipped
        groups, and truncated completions under ``mask_truncated`` (DAPO), leave the loss."""
        rollout = batch.rollout
        loss_mask = rollout.loss_mask.clone()
        if mask_truncated:
            loss_mask[rollout.truncated] = 0
        loss_mask[batch.skipped] = 0
        rows = len(rollout.completion_ids)
        return cls(
            prompt_ids=rollout.prompt_ids.to(device),
            prompt_mask=rollout.prompt_mask.to(device),
            prompt_index=rollout.prompt_index.to(device),
            completion_ids=rollout.completion_ids.to(device),
            completion_mask=rollout.completion_mask.to(device),
            loss_mask=loss_mask.to(device),
            advantages=batch.advantages.to(device),
            micro_batches=[slice(i, i + micro_batch_size) for i in range(0, rows, micro_batch_size)],
            temperature=temperature,
        )

    def logps(self, score: Callable[..., Any], part: slice, **kwargs: Any) -> Any:
        """``score`` (:func:`grpo.rollout.scoring.completion_logps`' signature) on micro-batch ``part``."""
        prompts = (self.prompt_ids, self.prompt_mask, self.prompt_index[part])
        completions = (self.completion_ids[part], self.completion_mask[part])
        return score(*prompts, *completions, self.temperature, **kwargs)


def group_rows(groups: list[int], num_generations: int) -> list[int]:
    """The completion rows of the given groups, in that order."""
    return [g * num_generations + i for g in groups for i in range(num_generations)]
