"""GRPO: sample groups, score them, and take clipped policy-gradient steps.

One step (:meth:`GRPOTrainer.train_step`): take ``prompts_per_step`` prompts, sample ``num_generations``
completions for each, score them with the reward functions, turn the rewards into group-relative
advantages, then make ``num_iterations`` (μ) optimizer updates over the batch in micro-batches of the
clipped surrogate plus β·KL to the reference. The math lives in :mod:`grpo.algo`; sampling and scoring in
:class:`grpo.train.rollouts.GroupRollouts`; the loop, logs and checkpoints in :mod:`grpo.train.loop`; CPU
speed and memory code behind :class:`grpo.accel.install.Speedups`.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.algo.logprobs import high_entropy_tokens, masked_mean, surprisal_sum
from grpo.algo.losses import policy_loss, softmax_weighted_loss
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import to_dict
from grpo.data.prompts import Row
from grpo.models.checkpoint import load_reference
from grpo.models.loading import trainable_parameters, weight_dtypes
from grpo.models.policy import PolicyAndReference
from grpo.models.structure import is_sharded
from grpo.rewards import Reward
from grpo.rollout.backend_base import GenerationBackend
from grpo.rollout.batch import ScoredBatch, TrajectoryBatch
from grpo.train import sharding
from grpo.train.distributed import Ranks, sum_gradients_
from grpo.train.loop import StopNow, resume_logs, run_loop
from grpo.train.parts import logps_without_gradients, trainer_parts
from grpo.train.step_metrics import sampled_entropy, step_metrics


class GRPOTrainer:
    """GRPO and its baselines (``algorithm``: grpo, rloo, reinforce, softmax_weighted) on ``models``.

    ``ranks`` is this process's share of a data-parallel run (grpo.train.distributed); a policy sharded with
    FSDP (grpo.train.sharding) is trained the same way, FSDP reducing its gradients.
    """

    def __init__(
        self,
        config: GRPOConfig,
        models: PolicyAndReference,
        tokenizer: Any,
        rewards: Sequence[Reward],
        train_rows: list[Row],
        output_dir: Path,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        notify: Callable[[str], None] | None = None,
        ranks: Ranks | None = None,
    ):
        self.config, self.models, self.policy, self.tokenizer = config, models, models.policy, tokenizer
        self.rewards, self.output_dir, self.on_step = list(rewards), output_dir, on_step
        self.notify = notify or (lambda message: print(message, file=sys.stderr))
        self.ranks = ranks or Ranks()
        self.sharded = is_sharded(models.policy)
        self.device = next(self.policy.parameters()).device
        self.step = 0
        self.updated_this_step = False
        self.last_batch: ScoredBatch | None = None
        trained = trainable_parameters(self.policy).values()
        parts = trainer_parts(
            config, models, tokenizer, rewards, train_rows, output_dir, self.ranks, self.notify, trained
        )
        self.speed, self.rollouts, self.update = parts.speed, parts.rollouts, parts.update
        self.signals, self.checkpoints, self.log = parts.signals, parts.checkpoints, parts.log

    # --- one step ----------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Sample groups → score → advantages → μ passes of micro-batched clipped updates → log."""
        c = self.config
        started = time.perf_counter()
        self.updated_this_step = False
        batch = self.sample_batch()
        generation_time = time.perf_counter() - started
        self.stop_if_asked()  # nothing has changed yet: the step is redone on resume
        trajectories = self.training_tensors(batch)
        ref_logps = self.reference_logps(trajectories) if self.models.needs_reference else None
        old_logps = self.old_logps(batch, trajectories)
        loss_of = self.objective(trajectories)
        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        surprisal = 0.0  # Σ −log π(token) over the loss tokens, in the first pass: the logged entropy
        self.policy.train()
        for iteration in range(c.num_iterations):
            self.speed.before_update(self.policy.parameters())
            for part in trajectories.micro_batches:
                logps, entropy = self.policy_logps_and_entropy(trajectories, part)
                loss, metrics = loss_of(part, logps, old_logps, ref_logps, entropy)
                if iteration == 0:  # (later passes score the tokens with a policy that did not sample them)
                    surprisal += surprisal_sum(logps, trajectories.loss_mask[part]).item()
                self.backward(loss, loss_of.gradient_scale)
                sums["loss"] += loss.item() / c.num_iterations
                for key, value in metrics.items():
                    sums[key] += value / (len(trajectories.micro_batches) * c.num_iterations)
                # The spent graph holds the prompt pass's stand-ins, which hold the gradients: let it go now,
                # not when the next micro-batch (or update) replaces it.
                del logps, loss
            grad_norms.append(self.apply_update(sums["loss"], loss_of.gradient_scale))
            sums["skipped_updates"] += 0 if math.isfinite(grad_norms[-1]) else 1
        self.step += 1
        sums["entropy"] = sampled_entropy(surprisal, trajectories.loss_mask)
        sums["reference_synced"] = float(self.models.sync_reference_every(c.ref_model_sync_steps, self.step))
        step_time = time.perf_counter() - started
        batch, sums = self.whole_step(batch, sums, loss_of.sums_over_ranks)
        return self.metrics(batch, sums, grad_norms, generation_time, step_time)

    def sample_batch(self) -> ScoredBatch:
        """This step's groups, sampled, scored and given their advantages (see :class:`GroupRollouts`)."""
        self.speed.between_phases()
        return self.rollouts.sample_batch(self.step)

    def stop_if_asked(self) -> None:
        if self.ranks.any(self.signals.asked):
            raise StopNow

    def training_tensors(self, batch: ScoredBatch) -> TrajectoryBatch:
        """The batch on the training device: its tokens, those that enter the loss, its micro-batches."""
        c = self.config
        return TrajectoryBatch.of(
            batch, self.device, c.per_device_train_batch_size, c.temperature, c.mask_truncated_completions
        )

    def reference_logps(self, trajectories: TrajectoryBatch) -> torch.Tensor:
        """The reference model's log-probs of the batch's completions (see :meth:`inference_logps`)."""
        self.speed.between_phases()
        self.policy.eval()
        with self.models.reference() as reference:
            logps = self.inference_logps(reference, trajectories, release=self.models.release_reference)
        self.speed.between_phases()
        return logps

    def old_logps(self, batch: ScoredBatch, trajectories: TrajectoryBatch) -> torch.Tensor | None:
        """The sampling policy's log-probs for the clipped ratio. With one pass it is the current policy:
        None, and the loss uses the current log-probs, detached. With several, the log-probs the sampler
        computed for each token it drew, or, from a backend that could not give them, the policy's before
        this step's updates."""
        if self.config.num_iterations == 1:
            return None
        sampled = batch.rollout.sampling_logps
        return self.policy_logps(trajectories) if sampled is None else sampled.to(self.device)

    def policy_logps(self, trajectories: TrajectoryBatch) -> torch.Tensor:
        """The policy's log-probs of the batch's completions as it is now, without gradients."""
        self.policy.eval()
        return self.inference_logps(self.policy, trajectories)

    def inference_logps(
        self,
        model: torch.nn.Module,
        trajectories: TrajectoryBatch,
        release: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> torch.Tensor:
        """``model``'s log-probs of the batch's completions without gradients (``release`` is given an
        offloaded model's weights as soon as a fused decoder has copied them)."""
        hint = self.config.per_device_train_batch_size * self.config.max_completion_length
        return logps_without_gradients(self.speed, model, trajectories, hint, release, self.sharded)

    def policy_logps_and_entropy(
        self, trajectories: TrajectoryBatch, part: slice
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's log-probs of micro-batch ``part``, with gradients, and their entropies when
        ``top_entropy_quantile`` masks tokens by them."""
        score = self.speed.training_scorer(self.policy)
        with_entropy = self.config.top_entropy_quantile < 1.0
        with self.speed.training_pass(self.policy):
            out = trajectories.logps(score, part, with_entropy=with_entropy)
        return out if with_entropy else (out, None)

    def objective(self, trajectories: TrajectoryBatch) -> MicroBatchLoss:
        """The loss of a micro-batch, normalised over the whole batch: every rank's, for the losses that sum
        over it ("dapo" and the softmax-weighted loss)."""
        c = self.config
        sums_over_ranks = c.loss_type == "dapo" or c.algorithm == "softmax_weighted"
        tokens_in_batch = trajectories.loss_mask.sum()
        groups_in_batch = len(trajectories.completion_ids) // c.num_generations
        if self.ranks.distributed and sums_over_ranks:
            tokens_in_batch = self.ranks.sum_(tokens_in_batch.clone())
            groups_in_batch *= self.ranks.world_size
        return MicroBatchLoss(c, trajectories, tokens_in_batch, groups_in_batch, sums_over_ranks, self.ranks)

    def backward(self, loss: torch.Tensor, gradient_scale: float) -> None:
        # Sharded, the gradients arrive averaged over the ranks: undo that where they must be summed.
        (loss * self.ranks.world_size * gradient_scale if self.sharded else loss).backward()

    def apply_update(self, loss: float, gradient_scale: float) -> float:
        """Reduce the accumulated gradient over the ranks and apply it (see
        :class:`grpo.train.update.GuardedUpdate`); the gradient norm, NaN for a skipped update."""
        if not self.sharded:  # (FSDP has already reduced them)
            sum_gradients_(self.update.parameters, self.ranks, gradient_scale)
        loss = self.ranks.mean_of({"loss": loss})["loss"]  # every rank skips, or none
        self.speed.between_phases()  # the activations' heap, before AdamW's temporaries
        norm = self.update.apply(loss, self.step + 1)
        if math.isfinite(norm):
            self.updated_this_step = True
            self.rollouts.backend_is_stale = True  # synced before the next sampling
        self.speed.between_phases()
        return norm

    def whole_step(
        self, batch: ScoredBatch, sums: dict[str, float], sums_over_ranks: bool
    ) -> tuple[ScoredBatch, dict[str, float]]:
        """What the logs describe: every rank's groups and losses (this process's alone when it is alone)."""
        if not self.ranks.distributed:
            return batch, sums
        sums = defaultdict(float, self.ranks.mean_of(dict(sums)))
        if sums_over_ranks:  # each rank's loss is its part of the whole batch's
            sums["loss"] *= self.ranks.world_size
        return ScoredBatch.join(self.ranks.gather(batch)), sums

    def metrics(
        self,
        batch: ScoredBatch,
        sums: dict[str, float],
        grad_norms: list[float],
        generation_time: float,
        step_time: float,
    ) -> dict[str, float]:
        self.last_batch = batch
        names = [r.name for r in self.rewards]
        graded = [r.graded for r in self.rewards]
        learning_rate = self.update.learning_rate
        return step_metrics(
            self.step, batch, names, sums, grad_norms, learning_rate, generation_time, step_time, graded
        )

    # --- the run -----------------------------------------------------------------------------------------
    def train(
        self, progress: Callable[[int, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Run until ``max_steps`` (see :func:`grpo.train.loop.run_loop`); the logged metrics of the run."""
        return run_loop(self, self.config, self.ranks, progress, self.on_step)

    @property
    def backend(self) -> GenerationBackend | None:
        return self.rollouts.backend

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.update.optimizer

    def close(self) -> None:
        self.rollouts.close()

    def save(self, rng_state: dict | None = None, wait: bool = True) -> Path:
        """A checkpoint of this step: weights (or adapters), optimizer, schedule, random generators, and a
        reference that iterative RL has made a copy of the policy."""
        synced, extra = self.models.reference_to_save()
        state = {"step": self.step, "config": to_dict(self.config), "reference_synced": synced,
                 "weights": weight_dtypes(self.policy)}  # fmt: skip
        gathered: dict[str, Any] = {}
        if self.sharded:  # the whole weights and optimizer state, gathered on the first rank
            if not wait:  # (a rank that failed alone cannot gather: the others are not listening)
                self.notify(f"step {self.step}: no checkpoint written after the failure (sharded model)")
                return self.checkpoints.directory(self.step)
            gathered["model_state"] = sharding.full_state(self.policy)
            gathered["optimizer_state"] = sharding.full_optimizer_state(self.policy, self.optimizer)
            gathered["extra_states"] = {name: sharding.full_state(m) for name, m in (extra or {}).items()}
        optimizer, scheduler = self.update.optimizer, self.update.scheduler
        return self.checkpoints.write(
            self.step, self.policy, optimizer, scheduler, state, rng_state, extra, wait=wait, **gathered
        )

    def resume(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` exactly: weights, optimizer, scheduler, step, random generators, and
        the metrics and samples logged up to its step (later lines, from the run that was cut short, are
        dropped; TensorBoard is told to drop them too)."""
        optimizer, scheduler = self.update.optimizer, self.update.scheduler
        state, rng = self.checkpoints.read(checkpoint, self.policy, optimizer, scheduler, self.sharded)
        if state.get("reference_synced"):
            load_reference(checkpoint, self.models)
        self.step = resume_logs(self.log, state, rng, self.ranks)


@dataclass(frozen=True)
class MicroBatchLoss:
    """GRPO's loss of one micro-batch (or the softmax-weighted one), with what it needs of the whole batch."""

    config: GRPOConfig
    trajectories: TrajectoryBatch
    tokens_in_batch: torch.Tensor  # loss tokens in the batch (every rank's when the loss sums over them)
    groups_in_batch: int
    sums_over_ranks: bool  # the loss is a sum over the whole batch, so the ranks' gradients are summed
    ranks: Ranks

    @property
    def gradient_scale(self) -> float:
        """How a rank's gradient enters the sum over ranks: whole, or as its share of the ranks' mean."""
        return 1.0 if self.sums_over_ranks else 1.0 / self.ranks.world_size

    def __call__(
        self,
        part: slice,
        logps: torch.Tensor,
        old_logps: torch.Tensor | None,
        ref_logps: torch.Tensor | None,
        entropy: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of micro-batch ``part`` (its log-probs ``logps``, with gradients) and its statistics."""
        c, t = self.config, self.trajectories
        mask, metrics = t.loss_mask[part], {}
        if entropy is not None:  # only the top top_entropy_quantile of tokens by entropy train
            mask = mask * high_entropy_tokens(entropy, mask, c.top_entropy_quantile)
            metrics["entropy/mean"] = masked_mean(entropy, t.loss_mask[part]).item()
        reference = None if ref_logps is None else ref_logps[part]
        if c.algorithm == "softmax_weighted":
            loss, stats = softmax_weighted_loss(
                logps,
                reference,
                t.advantages[part],
                mask,
                num_groups=self.groups_in_batch,
                beta=c.beta,
                num_tokens=self.tokens_in_batch,
            )
            return loss, {**metrics, **stats}
        unclipped = c.algorithm == "reinforce"
        loss, stats = policy_loss(
            logps,
            logps.detach() if old_logps is None else old_logps[part],
            reference,
            t.advantages[part],
            mask,
            epsilon_low=math.inf if unclipped else c.epsilon,
            epsilon_high=math.inf if unclipped else c.epsilon_high,
            beta=c.beta,
            loss_type=c.loss_type,
            max_completion_length=c.max_completion_length,
            importance_sampling_level=c.importance_sampling_level,
            num_items_in_batch=self.tokens_in_batch,
        )
        if c.loss_type != "dapo":  # "dapo" already divides by the whole batch's token count
            loss = loss / len(t.micro_batches)
        return loss, {**metrics, **stats}
