"""What `grpo doctor` measures: one training step's phases, run on the trainer a run builds but without an
optimizer step, and the step's time, peak memory and learning signal estimated from them.

Measured: sampling and scoring the step's groups (``trainer.sample_batch()``), the log-probs without
gradients (the reference's, and the sampling policy's when ``num_iterations`` > 1 needs them), a
micro-batch's forward and backward pass of the loss once warm (after a first one; the gradients dropped
after them), and a batch of held-out
scoring, as a run's checks and final scoring come after training. Extrapolated: a step takes sampling +
those log-probs + ``num_iterations`` × (micro-batches × one forward and backward pass + one AdamW update),
the update timed on stand-ins shaped like the trainable parameters. The peak memory is the process's peak
resident memory over those phases plus AdamW's two moments per trainable number, which a run holds from its
first update on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from grpo.agents.rollout import Agent
from grpo.algo.advantages import zero_std_group_fraction
from grpo.config.grpo import GRPOConfig
from grpo.data.prompts import Row
from grpo.rewards import Reward
from grpo.rollout.batch import ScoredBatch, TrajectoryBatch
from grpo.runs.eval import evaluate
from grpo.train.common import peak_memory_mb
from grpo.train.grpo import GRPOTrainer
from grpo.train.ppo import PPOTrainer, UpdateTargets

T = TypeVar("T")

# An AdamW update costs the same per number: timing this many of them is steady enough to scale from.
UPDATE_SAMPLE_NUMBERS = 4_000_000
HELD_OUT_SAMPLE = 64  # held-out rows timed: one batch of grpo.runs.eval.evaluate, as a run decodes them
ADAM_MOMENTS = 2  # AdamW keeps two running moments of every trainable number


@dataclass(frozen=True)
class StepEstimate:
    """One step's measured phases and what a whole step costs by them (seconds; MiB)."""

    batch: ScoredBatch  # the step's groups, sampled and scored
    sampling: float  # sampling and scoring the groups
    log_probs: float  # the log-probs without gradients: the reference's, and the old policy's if needed
    micro_batch: float  # one micro-batch's forward and backward pass of the loss
    micro_batches: int
    num_iterations: int
    update: float  # one optimizer update
    update_method: str  # how ``update`` was found
    held_out_per_row: float | None  # seconds of held-out scoring per row (None: no held-out rows)
    trainable_numbers: int
    measured_peak_mb: float  # the process's peak resident memory over the phases above and held-out scoring
    optimizer_state_mb: float  # AdamW's moments, which the phases above did not hold yet

    @property
    def step_seconds(self) -> float:
        updates = self.micro_batches * self.micro_batch + self.update
        return self.sampling + self.log_probs + self.num_iterations * updates

    @property
    def peak_mb(self) -> float:
        return self.measured_peak_mb + self.optimizer_state_mb


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """``work()`` and the seconds it took (a GPU's queued work included)."""
    started = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


@dataclass(frozen=True)
class Phases:
    """The measured phases of a step (see :class:`StepEstimate`)."""

    batch: ScoredBatch
    sampling: float
    log_probs: float
    micro_batch: float
    micro_batches: int


def estimate_step(trainer: GRPOTrainer | PPOTrainer, held_out_rows: list[Row] | None = None) -> StepEstimate:
    """Run the next step's phases on ``trainer`` (see the module's docstring), then score a batch of
    ``held_out_rows`` as the run's checks and final scoring do, after training: no weight changes, and the
    gradients are dropped after the backward pass."""
    phases = ppo_phases(trainer) if isinstance(trainer, PPOTrainer) else grpo_phases(trainer)
    trainer.update.optimizer.zero_grad(set_to_none=True)  # as after an update: none while a run scores
    held_out = None
    if held_out_rows:
        held_out = held_out_seconds(
            trainer.config, trainer.policy, trainer.tokenizer, held_out_rows, trainer.rewards
        )
    measured_peak = peak_memory_mb()  # before the update's stand-ins add their own
    parameters = trainer.update.parameters
    update, method = update_seconds(parameters)
    state_bytes = ADAM_MOMENTS * sum(p.numel() * p.element_size() for p in parameters)
    return StepEstimate(
        **vars(phases),
        num_iterations=trainer.config.num_iterations,
        update=update,
        update_method=method,
        held_out_per_row=held_out,
        trainable_numbers=sum(p.numel() for p in parameters),
        measured_peak_mb=measured_peak,
        optimizer_state_mb=state_bytes / 2**20,
    )


def grpo_phases(trainer: GRPOTrainer) -> Phases:
    """The phases of :meth:`GRPOTrainer.train_step`, through its own methods, up to a warm
    micro-batch's backward pass."""
    batch, sampling = timed(trainer.sample_batch)
    trajectories = trainer.training_tensors(batch)

    def without_gradients() -> tuple[torch.Tensor | None, torch.Tensor | None]:
        reference = trainer.reference_logps(trajectories) if trainer.models.needs_reference else None
        return reference, trainer.old_logps(batch, trajectories)

    (ref_logps, old_logps), log_probs = timed(without_gradients)
    loss_of = trainer.objective(trajectories)

    def forward_and_backward(part: slice) -> None:
        trainer.policy.train()
        trainer.speed.before_update(trainer.policy.parameters())
        logps, entropy = trainer.policy_logps_and_entropy(trajectories, part)
        loss, _ = loss_of(part, logps, old_logps, ref_logps, entropy)
        trainer.backward(loss, loss_of.gradient_scale)

    micro_batch = warm_seconds(forward_and_backward, trajectories.micro_batches)
    return Phases(batch, sampling, log_probs, micro_batch, len(trajectories.micro_batches))


def warm_seconds(work: Callable[[slice], None], parts: list[slice]) -> float:
    """The seconds ``work`` takes on a micro-batch once warm: the first pass pays one-time costs (packed
    weights, the allocator's growth) that the run's later passes do not, so a second one is timed."""
    work(parts[0])
    return timed(lambda: work(parts[-1]))[1]


def ppo_phases(trainer: PPOTrainer) -> Phases:
    """The phases of :meth:`PPOTrainer.train_step`, through its own methods, up to a warm
    micro-batch's backward pass."""
    c = trainer.config

    def sample() -> ScoredBatch:
        trainer.speed.between_phases()
        return trainer.rollouts.sample_batch(trainer.step)

    batch, sampling = timed(sample)
    trajectories = TrajectoryBatch.of(
        batch, trainer.device, c.per_device_train_batch_size, c.temperature, c.mask_truncated_completions
    )
    loss_mask = trajectories.loss_mask
    (old_logps, old_values, kl), log_probs = timed(lambda: trainer.old_logps_values_and_kl(trajectories))
    advantages, returns = trainer.advantages_and_returns(batch, old_values, kl, loss_mask)
    targets = UpdateTargets(old_logps, old_values, advantages, returns, tokens_in_batch=loss_mask.sum())

    def forward_and_backward(part: slice) -> None:
        trainer.policy.train()
        surrogate, critic, _ = trainer.micro_batch_losses(trajectories, part, targets)
        (surrogate + c.vf_coef * critic).backward()

    micro_batch = warm_seconds(forward_and_backward, trajectories.micro_batches)
    return Phases(batch, sampling, log_probs, micro_batch, len(trajectories.micro_batches))


def held_out_seconds(
    config: GRPOConfig, model: torch.nn.Module, tokenizer: Any, rows: list[Row], rewards: list[Reward]
) -> float:
    """Seconds per row of held-out scoring as a run scores (greedy, grpo.runs.eval.evaluate), timed on its
    first batch of ``rows``; the batch's memory enters the process's peak, as the run's scoring does."""
    sample = rows[:HELD_OUT_SAMPLE]
    lengths = {"max_completion_length": config.max_completion_length}
    lengths["max_prompt_length"] = config.max_prompt_length
    agent = Agent.of_run(config, tokenizer)
    _, seconds = timed(lambda: evaluate(model, tokenizer, sample, rewards, agent=agent, **lengths))
    return seconds / len(sample)


def update_seconds(parameters: list[torch.Tensor]) -> tuple[float, str]:
    """Seconds of one AdamW update (gradient clipping included) of ``parameters``, timed on zero-filled
    stand-ins of their shapes, dtype and device (of the first UPDATE_SAMPLE_NUMBERS numbers and scaled up
    to all of them when there are more), and a phrase saying how."""
    total = sum(p.numel() for p in parameters)
    stand_ins: list[torch.Tensor] = []
    for parameter in parameters:
        if sum(s.numel() for s in stand_ins) >= UPDATE_SAMPLE_NUMBERS:
            break
        stand_in = torch.zeros_like(parameter, requires_grad=True)
        stand_in.grad = torch.full_like(parameter, 1e-3)
        stand_ins.append(stand_in)
    timed_numbers = sum(s.numel() for s in stand_ins)
    optimizer = torch.optim.AdamW(stand_ins)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(stand_ins, 1.0)
        optimizer.step()

    update()  # the first update allocates the moments; a run pays that once
    _, seconds = timed(update)
    if timed_numbers == total:
        return seconds, f"one AdamW update timed on stand-ins of the {millions(total)} trainable numbers"
    scaled = seconds * total / timed_numbers
    return scaled, (
        f"one AdamW update timed on stand-ins of {millions(timed_numbers)} of the {millions(total)} "
        "trainable numbers, scaled up"
    )


@dataclass(frozen=True)
class RewardRange:
    """One reward function's scores over the sampled completions (NaN = not applicable, left out)."""

    name: str
    min: float
    max: float
    mean: float
    failures: int

    @property
    def constant(self) -> bool:
        return self.min == self.max


@dataclass(frozen=True)
class LearningSignal:
    """What a step's groups give GRPO to learn from."""

    rewards: list[RewardRange]  # each function's, then "total" (the weighted sum the advantages use)
    groups: int
    alike: int  # groups in which every completion has the same total reward: no learning signal
    completions: int
    truncated: int  # completions cut at max_completion_length


def learning_signal(batch: ScoredBatch, names: list[str]) -> LearningSignal:
    """The spread of each reward function over ``batch`` (functions ``names``, in its score columns' order),
    the groups whose completions all score alike, and the completions cut short."""
    ranges = [
        score_range(name, batch.scores[:, f], batch.failures.get(name, 0)) for f, name in enumerate(names)
    ]
    ranges.append(score_range("total", batch.rewards, 0))
    groups = batch.rollout.num_groups
    alike = round(zero_std_group_fraction(batch.rewards, batch.rollout.num_generations) * groups)
    truncated = int(batch.rollout.truncated.sum())
    return LearningSignal(ranges, groups, alike, len(batch.rewards), truncated)


def score_range(name: str, scores: torch.Tensor, failures: int) -> RewardRange:
    """The min, max and mean of a reward's ``scores`` over the completions it scored (NaN: not scored)."""
    present = scores[~scores.isnan()]
    if not len(present):
        return RewardRange(name, math.nan, math.nan, math.nan, failures)
    return RewardRange(name, present.min().item(), present.max().item(), present.mean().item(), failures)


def millions(count: int) -> str:
    """A count for people: 4.9M from a hundred thousand on, else with thousands separators."""
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count:,}"
