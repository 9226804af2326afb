"""The GRPO training loop: sample groups, score them, and take clipped policy-gradient steps.

One step: take ``prompts_per_step`` prompts, sample ``num_generations`` completions for each, score them with
the reward functions, turn the rewards into group-relative advantages, then make ``num_iterations`` optimizer
updates over the batch in micro-batches. The math lives in :mod:`grpo.advantages` and :mod:`grpo.losses`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from grpo import fused, onednn, sharding
from grpo.advantages import (
    group_advantages,
    leave_one_out_advantages,
    normalize_per_function,
    process_advantages,
    softmax_group_weights,
    zero_std_group_fraction,
)
from grpo.checkpoint import (
    CHECKPOINT_PREFIX,
    capture_rng,
    load_reference,
    load_training_state,
    load_weights,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from grpo.config import GRPOConfig, to_dict
from grpo.data import PromptSampler, Row, render_prompt
from grpo.diagnostics import Watch, held_out_scores
from grpo.distributed import Ranks, group_seeds, sum_gradients_
from grpo.errors import RewardError, RunFailed, RunInterrupted
from grpo.files import write_text_atomic
from grpo.generation import GenerationBackend, make_backend
from grpo.losses import policy_loss, softmax_weighted_loss
from grpo.memory import gradients_in_one_block, map_blocks_from, release_free_memory
from grpo.models import (
    REFERENCE_ADAPTER,
    PolicyAndReference,
    release_layers_after_use,
    trainable_parameters,
)
from grpo.rewards import Reward, score_groups, weighted_sum
from grpo.rewards.process import score_steps, split_steps, token_steps
from grpo.rollout import Rollout, completion_logps, generate, in_place_weight_gradients


@dataclass
class ScoredBatch:
    """A step's rollout with its rewards and advantages."""

    rollout: Rollout
    rewards: torch.Tensor  # (N,) weighted sum
    scores: torch.Tensor  # (N, F) per function, NaN = not applicable
    advantages: torch.Tensor  # (N,), or (N, T) per token under process supervision
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
        g = self.rollout.num_generations
        rows = [group * g + i for group in groups for i in range(g)]
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
class TrainingTensors:
    """A scored batch's tokens on the training device, cut into micro-batches for the loss."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_index: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor  # the completion tokens that enter the loss
    slices: list[slice]  # the micro-batches
    temperature: float

    def run(self, compute: Callable[..., Any], part: slice) -> Any:
        """``compute`` (a completion_logps-like function) on the completions of micro-batch ``part``."""
        args = (self.prompt_ids, self.prompt_mask, self.prompt_index[part])
        return compute(*args, self.completion_ids[part], self.completion_mask[part], self.temperature)


class GRPOTrainer:
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
        self.config = config
        self.ranks = ranks or Ranks()  # this process's share of a data-parallel run (grpo.distributed)
        self.sharded = sharding.is_sharded(models.policy)  # FSDP (grpo.sharding)
        self.models = models
        self.policy = models.policy
        self.tokenizer = tokenizer
        self.rewards = list(rewards)
        self.output_dir = output_dir
        self.on_step = on_step
        self.notify = notify or (lambda message: print(message, file=sys.stderr))
        # As in TRL, the batch settings are per process: a step takes prompts_per_step prompts per rank.
        prompts = config.prompts_per_step * self.ranks.world_size
        self.sampler = PromptSampler(train_rows, prompts, config.seed, config.shuffle_dataset)
        self.step = 0
        self.build_optimizer(list(trainable_parameters(self.policy).values()))
        self.device = next(self.policy.parameters()).device
        self.generation_batch_size = config.generation_batch_size
        self.logged: list[dict[str, float]] = []  # the lines of metrics.jsonl
        self.nonfinite_in_a_row = 0
        self.saved_step: int | None = None
        self.stop_signal: int | None = None
        self.updated_this_step = False
        self.reference_synced = False  # the reference has been made a copy of the policy (iterative RL)
        self.last_batch: ScoredBatch | None = None  # the batch behind the latest metrics, for samples.jsonl
        self.tensorboard: Any = None  # a SummaryWriter while train() runs, under report_to "tensorboard"
        self.watch = Watch()  # the diagnostic warnings shown so far (each once, until it clears)
        if config.release_memory:
            map_blocks_from(MAPPED_BLOCK_MB)
        if config.onednn_linear:
            onednn.route_linears(self.policy)
        if config.offload_reference:
            output_dir.mkdir(parents=True, exist_ok=True)
            if models.offload_reference(output_dir) and models.uses_adapters:
                # The base weights are the policy's too: training holds about a layer of them at a time.
                release_layers_after_use(self.policy, models.release_reference)
        self.backend: GenerationBackend | None = None  # what samples (grpo.generation), built when first used
        self.backend_is_stale = False  # the policy changed since the backend last saw its weights

    def build_optimizer(self, params: list[torch.Tensor]) -> None:
        """AdamW over ``params`` and its learning-rate schedule, one scheduler step per optimizer update."""
        c = self.config
        self.optimizer = torch.optim.AdamW(
            params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay
        )
        self.scheduler = get_scheduler(
            c.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=c.warmup_steps,
            num_training_steps=c.max_steps * c.num_iterations,
        )

    # --- one step ----------------------------------------------------------------------------------------
    def sample_and_score(self, rows: list[Row], seeds: list[int] | None = None) -> ScoredBatch:
        """Sample a group for each row (group i from ``seeds[i]`` when given) and score it."""
        c = self.config
        prompts = [render_prompt(row["prompt"], self.tokenizer) for row in rows]
        rollout = self._generate_within_memory(prompts, seeds)
        g = c.num_generations
        completion_ids = [
            ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)
        ]
        try:
            if c.supervision == "process":
                return self._score_steps(rows, rollout)
            scores = score_groups(
                self.rewards,
                rows,
                rollout.texts,
                on_failure=c.reward_failure,
                timeout=c.reward_timeout or None,
                completion_ids=completion_ids,
            )
        except RewardError as error:
            raise RewardError(f"step {self.step + 1}: {error}") from None
        values = scores.values
        if c.multi_objective_aggregation == "normalize_then_sum":
            values = normalize_per_function(values, g)
        advantages = self._advantages(weighted_sum(values, self.rewards))
        skipped = (
            scores.skip_rows
            if scores.skip_rows is not None
            else torch.zeros(len(advantages), dtype=torch.bool)
        )
        advantages[skipped] = 0.0
        total = weighted_sum(scores.values, self.rewards)
        return ScoredBatch(rollout, total, scores.values, advantages, skipped, scores.failures)

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """The per-completion signal the loss multiplies: group-relative advantages (GRPO, with
        ``scale_rewards``), leave-one-out (RLOO), reward minus the group's mean (REINFORCE), or the weights
        softmax(r/τ) of the softmax-weighted group log-likelihood."""
        c, g = self.config, self.config.num_generations
        if c.algorithm == "rloo":
            return leave_one_out_advantages(rewards, g)
        if c.algorithm == "reinforce":
            return group_advantages(rewards, g, "none")
        if c.algorithm == "softmax_weighted":
            return softmax_group_weights(rewards, g, c.softmax_temperature)
        return group_advantages(rewards, g, c.scale_rewards)

    def sample_batch(self) -> ScoredBatch:
        """This step's scored batch. Under ``dynamic_sampling`` (DAPO) groups whose rewards are all equal
        are dropped and more prompts sampled, up to ``max_sampling_rounds`` batches, until the step has
        ``prompts_per_step`` groups that carry a signal; if none does, the first batch is kept as it is (its
        advantages are zero: only the KL term acts)."""
        c = self.config
        first = self._sample_share(draw=0)
        if not c.dynamic_sampling:
            return first
        wanted = c.prompts_per_step  # per rank
        kept = first.select_groups(first.informative_groups())
        draws = 1
        while kept.rollout.num_groups < wanted and draws < c.max_sampling_rounds:
            more = self._sample_share(draw=draws)
            kept = ScoredBatch.join([kept, more.select_groups(more.informative_groups())])
            draws += 1
        if kept.rollout.num_groups == 0:
            first.sampling_rounds = draws
            return first
        kept = kept.select_groups(list(range(min(kept.rollout.num_groups, wanted))))
        kept.sampling_rounds = draws
        return kept

    def _sample_share(self, draw: int) -> ScoredBatch:
        """This rank's share of the step's prompts (all of them in one process), sampled and scored. Each
        group draws from its own seed, set by its place in the whole step, so the completions are the same
        however many processes share the step."""
        rows = self.sampler.batch(self.step, draw=draw)
        mine = self.ranks.share(rows)
        first = self.ranks.first_index(len(rows))
        return self.sample_and_score(mine, group_seeds(self.config.seed, self.step, draw, first, len(mine)))

    def _score_steps(self, rows: list[Row], rollout: Rollout) -> ScoredBatch:
        """Process supervision: step rewards, and from them per-token advantages (N, T)."""
        c = self.config
        spans = [split_steps(text, c.step_delimiter, c.step_regex) for text in rollout.texts]
        scored = score_steps(
            self.rewards,
            rows,
            rollout.texts,
            spans,
            on_failure=c.reward_failure,
            timeout=c.reward_timeout or None,
        )
        steps = torch.stack(
            [
                token_steps(self.tokenizer, ids, mask, spans_i)
                for ids, mask, spans_i in zip(rollout.completion_ids, rollout.completion_mask, spans)
            ]
        )
        advantages = process_advantages(scored.step_rewards, steps, c.num_generations)
        skipped = (
            scored.skip_rows if scored.skip_rows is not None else torch.zeros(len(spans), dtype=torch.bool)
        )
        advantages[skipped] = 0.0
        # The logged reward of a completion is the mean of its steps' rewards.
        total = torch.tensor([sum(r) / len(r) for r in scored.step_rewards])
        return ScoredBatch(rollout, total, scored.per_function, advantages, skipped, scored.failures)

    def generation_backend(self) -> GenerationBackend:
        """The backend that samples (``generation_backend``), built at first use and given the policy's
        weights when they changed since it last sampled: once per step, however many updates it made."""
        c = self.config
        if self.backend is None:
            self.backend = make_backend(
                c.generation_backend,
                self.policy,
                fused=c.fused_inference,
                seed=c.seed,
                vllm_gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                max_model_len=c.max_prompt_length + c.max_completion_length,
                keep_going=self.ranks.any if self.sharded else None,
                release=self.models.release_reference,  # a no-op unless offloaded
            )
        elif self.backend_is_stale:
            self.backend.sync_weights(self.policy)
        self.backend_is_stale = False
        return self.backend

    def _generate_within_memory(self, prompts: list[str], seeds: list[int] | None) -> Rollout:
        """Sample (group i from ``seeds[i]`` when given); when memory runs out, halve the completions
        decoded at once (for the rest of the run) and retry once, from the same random state."""
        c = self.config
        backend = self.generation_backend()
        rng = capture_rng()
        for attempt in range(2):
            try:
                return generate(
                    self.policy,
                    self.tokenizer,
                    prompts,
                    num_generations=c.num_generations,
                    max_completion_length=c.max_completion_length,
                    max_prompt_length=c.max_prompt_length,
                    temperature=c.temperature,
                    top_p=c.top_p,
                    top_k=c.top_k,
                    batch_size=self.generation_batch_size,
                    seeds=seeds,
                    backend=backend,
                )
            except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(error):
                    raise
                at_once = self.generation_batch_size or len(prompts) * c.num_generations
                if attempt == 1 or at_once <= c.num_generations:
                    raise RunFailed(
                        f"step {self.step + 1}: out of memory while sampling {at_once} completions at once; "
                        "lower generation_batch_size, per_device_train_batch_size or max_completion_length"
                    ) from None
                self.generation_batch_size = max(c.num_generations, at_once // 2)
                self.notify(
                    f"step {self.step + 1}: out of memory while sampling {at_once} completions at once; "
                    f"retrying with generation_batch_size = {self.generation_batch_size}"
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                restore_rng(rng)
        raise AssertionError("unreachable")

    def train_step(self) -> dict[str, float]:
        c = self.config
        started = time.perf_counter()
        self.updated_this_step = False
        self._release_memory()
        batch = self.sample_batch()
        generation_time = time.perf_counter() - started
        if self.ranks.any(self.stop_signal is not None):
            raise _StopNow  # nothing has changed yet: the step is redone on resume

        rollout = batch.rollout
        tensors = self.training_tensors(batch)
        loss_mask, slices = tensors.loss_mask, tensors.slices
        advantages = batch.advantages.to(self.device)
        self._release_memory()
        ref_logps = self.reference_logps(tensors) if self.models.needs_reference else None
        self._release_memory()
        # With one pass the sampling policy is the current one: its log-probs are the current ones, detached.
        # With several, they are the log-probs the sampler already computed for each token it drew, or, from a
        # backend that could not give them, the policy's before this step's updates.
        old_logps = None
        if c.num_iterations > 1:
            sampled = rollout.sampling_logps
            old_logps = self.policy_logps(tensors) if sampled is None else sampled.to(self.device)

        tokens_in_batch = loss_mask.sum()
        groups_in_batch = len(rollout.completion_ids) // c.num_generations
        # "dapo" and the softmax-weighted loss divide by the whole batch's tokens (and groups): count every
        # rank's, and sum the ranks' gradients; the other losses are means per rank, so the ranks' mean.
        sums_over_ranks = c.loss_type == "dapo" or c.algorithm == "softmax_weighted"
        if self.ranks.distributed and sums_over_ranks:
            tokens_in_batch = self.ranks.sum_(tokens_in_batch.clone())
            groups_in_batch *= self.ranks.world_size
        gradient_scale = 1.0 if sums_over_ranks else 1.0 / self.ranks.world_size
        clip = math.inf if c.algorithm == "reinforce" else c.epsilon
        clip_high = math.inf if c.algorithm == "reinforce" else c.epsilon_high
        with_entropy = c.top_entropy_quantile < 1.0
        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        self.policy.train()
        for _ in range(c.num_iterations):
            if not self.sharded:
                gradients_in_one_block(self.policy.parameters())
            for s in slices:
                policy_logps = functools.partial(completion_logps, self.policy, with_entropy=with_entropy)
                # (A sharded model's gradients are FSDP's to reduce.)
                plain = contextlib.nullcontext()
                with plain if self.sharded else in_place_weight_gradients(self.policy):
                    logps = tensors.run(policy_logps, s)
                mask = loss_mask[s]
                if with_entropy:
                    logps, entropy = logps
                    mask = mask * high_entropy_tokens(entropy, mask, c.top_entropy_quantile)
                    sums["entropy/mean"] += masked_mean(entropy, loss_mask[s]) / (
                        len(slices) * c.num_iterations
                    )
                if c.algorithm == "softmax_weighted":
                    loss, metrics = softmax_weighted_loss(
                        logps,
                        None if ref_logps is None else ref_logps[s],
                        advantages[s],
                        mask,
                        num_groups=groups_in_batch,
                        beta=c.beta,
                        num_tokens=tokens_in_batch,
                    )
                else:
                    loss, metrics = policy_loss(
                        logps,
                        logps.detach() if old_logps is None else old_logps[s],
                        None if ref_logps is None else ref_logps[s],
                        advantages[s],
                        mask,
                        epsilon_low=clip,
                        epsilon_high=clip_high,
                        beta=c.beta,
                        loss_type=c.loss_type,
                        max_completion_length=c.max_completion_length,
                        importance_sampling_level=c.importance_sampling_level,
                        num_items_in_batch=tokens_in_batch,
                    )
                    if c.loss_type != "dapo":  # "dapo" already divides by the whole batch's token count
                        loss = loss / len(slices)
                # Sharded, the gradients arrive averaged over the ranks: undo that where they must be summed.
                (loss * self.ranks.world_size * gradient_scale if self.sharded else loss).backward()
                sums["loss"] += loss.item() / c.num_iterations
                for key, value in metrics.items():
                    sums[key] += value / (len(slices) * c.num_iterations)
                # The spent graph holds the prompt pass's stand-ins, which hold the gradients: let it go now,
                # not when the next micro-batch (or update) replaces it.
                del logps, loss
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            if not self.sharded:  # (FSDP has already reduced them)
                sum_gradients_(params, self.ranks, gradient_scale)
            loss_so_far = self.ranks.mean_of({"loss": sums["loss"]})["loss"]  # every rank skips, or none
            self._release_memory()  # the activations' heap, before AdamW's temporaries
            grad_norms.append(self._optimizer_step(loss_so_far))
            self._release_memory()
            sums["skipped_updates"] += 0 if math.isfinite(grad_norms[-1]) else 1
        self.step += 1
        sync = bool(c.ref_model_sync_steps) and self.step % c.ref_model_sync_steps == 0
        if sync and self.models.needs_reference:
            self.models.sync_reference()
            self.reference_synced = True
        sums["reference_synced"] = float(sync and self.models.needs_reference)
        step_time = time.perf_counter() - started
        if self.ranks.distributed:  # the logs describe the whole step: every rank's groups and losses
            sums = defaultdict(float, self.ranks.mean_of(dict(sums)))
            if sums_over_ranks:  # each rank's loss is its part of the whole batch's
                sums["loss"] *= self.ranks.world_size
            batch = ScoredBatch.join(self.ranks.gather(batch))
        return self._step_metrics(batch, sums, grad_norms, generation_time, step_time)

    def _release_memory(self) -> None:
        """Between phases of a step (see grpo.memory): what one phase freed is not kept for the next."""
        if self.config.release_memory:
            release_free_memory()

    def training_tensors(self, batch: ScoredBatch) -> TrainingTensors:
        """The batch's tokens on the training device, the mask of the tokens that enter the loss, and its
        micro-batches."""
        rollout, c = batch.rollout, self.config
        loss_mask = rollout.completion_mask.clone()
        if c.mask_truncated_completions:
            loss_mask[rollout.truncated] = 0
        loss_mask[batch.skipped] = 0
        micro = c.per_device_train_batch_size
        return TrainingTensors(
            prompt_ids=rollout.prompt_ids.to(self.device),
            prompt_mask=rollout.prompt_mask.to(self.device),
            prompt_index=rollout.prompt_index.to(self.device),
            completion_ids=rollout.completion_ids.to(self.device),
            completion_mask=rollout.completion_mask.to(self.device),
            loss_mask=loss_mask.to(self.device),
            slices=[slice(i, i + micro) for i in range(0, len(rollout.completion_ids), micro)],
            temperature=c.temperature,
        )

    def reference_logps(self, tensors: TrainingTensors) -> torch.Tensor:
        """The reference model's log-probs of the batch's completions (see :meth:`inference_logps`)."""
        self.policy.eval()
        with self.models.reference() as reference:
            return self.inference_logps(reference, tensors, release=self.models.release_reference)

    def policy_logps(self, tensors: TrainingTensors) -> torch.Tensor:
        """The policy's log-probs of the batch's completions as it is now (see :meth:`inference_logps`)."""
        self.policy.eval()
        return self.inference_logps(self.policy, tensors)

    def inference_logps(
        self,
        model: nn.Module,
        tensors: TrainingTensors,
        release: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> torch.Tensor:
        """``model``'s log-probs of the batch's completions, in inference mode, through the fused decoder
        where it applies (``release`` is given an offloaded model's weights as soon as it has copied them)."""
        c = self.config
        # A sharded model's forward gathers weights into tensors that inference mode would not let it reuse.
        with torch.no_grad() if self.sharded else torch.inference_mode():
            if c.fused_inference and fused.supports(model):
                batch_hint = c.per_device_train_batch_size * c.max_completion_length
                score = fused.FusedDecoder(model, batch_hint, release=release).completion_logps
            else:
                score = functools.partial(completion_logps, model)
            logps = torch.cat([tensors.run(score, s) for s in tensors.slices])
        return logps.clone()  # a normal tensor, usable in the autograd graph

    def _optimizer_step(self, loss: float) -> float:
        """Clip and apply the accumulated gradient; skip the update (optimizer and schedule) when the loss or
        the gradient is not finite, and stop the run after ``max_nonfinite_updates`` such in a row.
        Returns the gradient norm (NaN for a skipped update)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.max_grad_norm or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # (a DTensor, sharded)
        if math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
            self.updated_this_step = True
            self.backend_is_stale = True  # synced before the next sampling (generation_backend)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            limit = self.config.max_nonfinite_updates
            self.notify(
                f"step {self.step + 1}: skipped an update with loss {loss} and gradient norm {norm} "
                f"({self.nonfinite_in_a_row} in a row; the run stops at {limit})"
            )
            if self.nonfinite_in_a_row >= limit:
                raise RunFailed(
                    f"step {self.step + 1}: the loss or gradient was NaN or infinite in {limit} updates in a "
                    "row (all skipped), so the run stopped; lower learning_rate or check the reward functions"
                )
            norm = math.nan
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _step_metrics(
        self,
        batch: ScoredBatch,
        sums: dict[str, float],
        grad_norms: list[float],
        generation_time: float,
        step_time: float,
    ) -> dict[str, float]:
        self.last_batch = batch
        rollout = batch.rollout
        lengths = rollout.completion_mask.sum(dim=1).float()
        m: dict[str, float] = {"step": float(self.step)}
        m["reward"] = batch.rewards.mean().item()
        m["reward_std"] = batch.rewards.std().item() if len(batch.rewards) > 1 else 0.0
        for f, reward in enumerate(self.rewards):
            column = batch.scores[:, f]
            present = column[~column.isnan()]
            m[f"rewards/{reward.name}/mean"] = present.mean().item() if len(present) else math.nan
            m[f"rewards/{reward.name}/std"] = present.std().item() if len(present) > 1 else 0.0
            m[f"rewards/{reward.name}/failures"] = float(batch.failures.get(reward.name, 0))
        per_token = batch.advantages.dim() == 2
        advantages = batch.advantages[rollout.completion_mask.bool()] if per_token else batch.advantages
        m["advantage/mean"] = advantages.mean().item()
        m["advantage/std"] = advantages.std().item() if advantages.numel() > 1 else 0.0
        m["advantage/abs_max"] = advantages.abs().max().item() if advantages.numel() else 0.0
        m["frac_reward_zero_std"] = zero_std_group_fraction(batch.rewards, self.config.num_generations)
        m["skipped_groups"] = batch.skipped.sum().item() / self.config.num_generations
        m["sampling_rounds"] = float(batch.sampling_rounds)
        m["completions/mean_length"] = lengths.mean().item()
        m["completions/min_length"] = lengths.min().item()
        m["completions/max_length"] = lengths.max().item()
        m["completions/truncated_ratio"] = rollout.truncated.float().mean().item()
        m.update(sums)
        finite = [n for n in grad_norms if math.isfinite(n)]
        m["grad_norm"] = sum(finite) / len(finite) if finite else math.nan
        m["learning_rate"] = self.scheduler.get_last_lr()[0]
        m["generation_time"] = generation_time
        m["step_time"] = step_time
        m["tokens_per_second"] = lengths.sum().item() / step_time
        return m

    # --- the loop ----------------------------------------------------------------------------------------
    def train(
        self, progress: Callable[[int, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Run until ``max_steps``, writing metrics.jsonl and checkpoints; return the logged metrics (of the
        whole run, a resumed one included).

        SIGINT or SIGTERM stops the run at the next safe point with a checkpoint (a second signal stops it at
        once). A step that fails before it has changed the weights (a reward function raising, a signal while
        sampling) leaves a checkpoint of the previous step, so that no finished step is lost.
        """
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run: drop what an earlier attempt that never reached a checkpoint logged.
        if self.step == 0 and self.ranks.is_main:
            (self.output_dir / SAMPLES_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.output_dir / TENSORBOARD_DIR, ignore_errors=True)
        with self._signals_stop_the_run(), self._tensorboard():
            while self.step < c.max_steps:
                rng_at_start = capture_rng()
                try:
                    metrics = self.train_step()
                except _StopNow:
                    self._save_unless_saved(rng_at_start)
                    raise self._interrupted() from None
                except BaseException:
                    if not self.updated_this_step:  # (not waiting: the other ranks may never get here)
                        self._save_unless_saved(rng_at_start, wait=False)
                    raise
                if self.step % c.logging_steps == 0 or self.step == c.max_steps:
                    self.logged.append(metrics)
                    if self.ranks.is_main:
                        self._write_metrics()
                        self._log_samples()
                        self._log_tensorboard(metrics)
                        self._warn()
                if progress is not None:
                    progress(self.step, metrics)
                if self.on_step is not None:
                    self.on_step(self.step, metrics)
                if self.ranks.any(self.stop_signal is not None):
                    self.stop_signal = self.stop_signal or signal.SIGTERM  # another rank was signalled
                    self.save()
                    raise self._interrupted()
                if c.save_steps and self.step % c.save_steps == 0 and self.step < c.max_steps:
                    self.save()
            self._save_unless_saved()
        self.close_backend()
        return self.logged

    def close_backend(self) -> None:
        """Free the generation backend (a vLLM engine's GPU memory); a later step builds a new one."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def save(self, rng_state: dict | None = None, wait: bool = True) -> Path:
        synced = self.models.needs_reference and (self.models.has_reference_adapter or self.reference_synced)
        state = {"step": self.step, "config": to_dict(self.config), "reference_synced": synced}
        # Under LoRA the reference adapter is saved with the policy's adapters (peft writes every adapter).
        extra = (
            {REFERENCE_ADAPTER: self.models.reference_model}
            if synced and not self.models.uses_adapters
            else None
        )
        directory = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        gathered: dict[str, Any] = {}
        if self.sharded:  # the whole weights and optimizer state, gathered on the first rank
            if not wait:  # (a rank that failed alone cannot gather: the others are not listening)
                self.notify(f"step {self.step}: no checkpoint written after the failure (sharded model)")
                return directory
            gathered["model_state"] = sharding.full_state(self.policy)
            gathered["optimizer_state"] = sharding.full_optimizer_state(self.policy, self.optimizer)
            gathered["extra_states"] = {name: sharding.full_state(m) for name, m in (extra or {}).items()}
        # Every rank holds the same weights and optimizer state: one writes them, the others wait for it.
        if self.ranks.is_main:
            save_checkpoint(
                directory, self.policy, self.optimizer, self.scheduler, state, rng_state, extra, **gathered
            )
            prune_checkpoints(self.output_dir, self.config.save_total_limit)
        if wait:
            self.ranks.barrier()
        self.saved_step = self.step
        return directory

    def _save_unless_saved(self, rng_state: dict | None = None, wait: bool = True) -> None:
        if self.step > 0 and self.saved_step != self.step:
            self.save(rng_state, wait)

    def resume(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` exactly: weights, optimizer, scheduler, step, random generators, and
        the metrics and samples logged up to its step (later lines, from the run that was cut short, are
        dropped; TensorBoard is told to drop them too)."""
        # Sharded, the weights went in before sharding (grpo.run); the optimizer's state is sharded here.
        if self.sharded:
            state, rng = load_training_state(
                checkpoint,
                self.optimizer,
                self.scheduler,
                lambda whole: sharding.load_full_optimizer_state(self.policy, self.optimizer, whole),
            )
        else:
            load_weights(checkpoint, self.policy)
            state, rng = load_training_state(checkpoint, self.optimizer, self.scheduler)
        if state.get("reference_synced"):
            load_reference(checkpoint, self.models)
            self.reference_synced = True
        restore_rng(rng)
        self.step = self.saved_step = state["step"]
        self.logged = [m for m in read_jsonl(self.output_dir / METRICS_FILE) if m["step"] <= self.step]
        self.ranks.barrier()  # every rank has read the files before the main one rewrites them
        if not self.ranks.is_main:
            return
        self._write_metrics()
        samples_file = self.output_dir / SAMPLES_FILE
        if samples_file.is_file():
            samples = [s for s in read_jsonl(samples_file) if s["step"] <= self.step]
            write_text_atomic(samples_file, "".join(json.dumps(s) + "\n" for s in samples))

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(m) + "\n" for m in self.logged)
        write_text_atomic(self.output_dir / METRICS_FILE, text)

    # --- what a logged step leaves besides metrics.jsonl -------------------------------------------------
    def _log_samples(self) -> None:
        """Append a line of this step's sampled completions to samples.jsonl (log_completions of them)."""
        count = self.config.log_completions
        if count and self.last_batch is not None:
            records = sample_records(self.last_batch, [r.name for r in self.rewards], self.tokenizer, count)
            append_line(self.output_dir / SAMPLES_FILE, json.dumps({"step": self.step, "samples": records}))

    @contextlib.contextmanager
    def _tensorboard(self) -> Iterator[None]:
        """A SummaryWriter for the run's scalars while the loop runs (report_to "tensorboard"). Resumed,
        it tells TensorBoard to drop the steps after the checkpoint that a cut-short attempt had logged."""
        if self.config.report_to != "tensorboard" or self.step >= self.config.max_steps:
            yield
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR), purge_step=self.step + 1)
        try:
            yield
        finally:
            self.tensorboard.close()
            self.tensorboard = None

    def _log_tensorboard(self, metrics: dict[str, float]) -> None:
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, self.step)
            self.tensorboard.flush()

    def _warn(self) -> None:
        """Show the diagnostic warnings (grpo.diagnostics) that are new at this logged step: each kind once,
        and again only after it has cleared."""
        scores = held_out_scores(self.output_dir, up_to=self.step)
        held_out = [(step, summary["solved"]) for step, summary in scores]
        for finding in self.watch.check(self.logged, held_out):
            self.notify(f"warning: {finding.message}")

    def _interrupted(self) -> RunInterrupted:
        name = signal.Signals(self.stop_signal).name
        where = self.output_dir / f"{CHECKPOINT_PREFIX}{self.saved_step}"
        return RunInterrupted(
            self.stop_signal,
            f"stopped by {name} after step {self.step}; checkpoint {where}; "
            f"continue with: grpo train --resume {self.output_dir}",
        )

    @contextlib.contextmanager
    def _signals_stop_the_run(self) -> Iterator[None]:
        """The first SIGINT/SIGTERM asks the loop to stop at the next safe point; a second one stops now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(number: int, frame: Any) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = number
            self.notify(
                f"{signal.Signals(number).name}: saving a checkpoint at the end of this step "
                "(send it again to stop at once)"
            )

        previous = {number: signal.signal(number, ask_to_stop) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


class _StopNow(Exception):
    """Raised inside a step, before it changes anything, when a signal asked the run to stop."""


METRICS_FILE = "metrics.jsonl"
# release_memory: allocations this large are mapped on their own (grpo.memory). 8 MB keeps a micro-batch's
# MLP activations (8 × 127 × 1536 floats = 6.2 MB here) on the heap: mapping them too (4 MB) lowered the
# peak by a further 0.3 GB but cost 25% more time per step, in page faults on fresh memory.
MAPPED_BLOCK_MB = 8
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of metrics.jsonl or samples.jsonl (a torn last line is dropped: grpo never writes
    one to metrics.jsonl, and only a crash of the machine could leave one in samples.jsonl)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return lines


def append_line(path: Path, line: str) -> None:
    """Append a line to a file in one write, flushed to disk: a killed process leaves whole lines."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def sample_records(batch: ScoredBatch, reward_names: list[str], tokenizer: Any, count: int) -> list[dict]:
    """``count`` of the batch's completions, evenly spaced over it (so over its groups), each with its group,
    its prompt as the model saw it (chat template included), its text, each reward function's score (None
    where it did not apply), the total reward, the advantage (per-token advantages: their mean over the
    completion), its length in tokens, and whether it was truncated or its group skipped."""
    rollout = batch.rollout
    n = len(rollout.texts)
    count = min(count, n)
    picks = [i * n // count for i in range(count)]
    prompts: dict[int, str] = {}
    records = []
    for i in picks:
        group = i // rollout.num_generations
        if group not in prompts:
            ids = rollout.prompt_ids[group][rollout.prompt_mask[group].bool()]
            prompts[group] = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        present = rollout.completion_mask[i].bool()
        advantage = batch.advantages[i]
        if advantage.dim() == 1:
            advantage = advantage[present].mean() if present.any() else advantage.new_zeros(())
        scores = {name: batch.scores[i, f].item() for f, name in enumerate(reward_names)}
        records.append(
            {
                "group": group,
                "prompt": prompts[group],
                "completion": rollout.texts[i],
                "rewards": {name: None if math.isnan(v) else v for name, v in scores.items()},
                "reward": batch.rewards[i].item(),
                "advantage": advantage.item(),
                "length": int(present.sum().item()),
                "truncated": bool(rollout.truncated[i].item()),
                "skipped": bool(batch.skipped[i].item()),
            }
        )
    return records


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, CUDA's "out of memory", or the CPU allocator's message."""
    message = str(error).lower()
    return isinstance(error, MemoryError) or "out of memory" in message or "can't allocate memory" in message


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return ((values * mask).sum() / mask.sum().clamp(min=1)).item()


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """1 for the completion tokens whose entropy is in the top ``quantile`` of this micro-batch's, else 0:
    the forking tokens where the policy is unsure, which carry most of the learning signal ("Beyond the
    80/20 rule", Wang et al. 2025; TRL's top_entropy_quantile)."""
    present = mask.bool()
    if not present.any():
        return torch.zeros_like(mask)
    threshold = torch.quantile(entropy[present].float(), 1.0 - quantile)
    return (present & (entropy >= threshold)).to(mask.dtype)
