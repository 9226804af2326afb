"""A step's groups: prompts sampled G completions each, scored, and turned into advantages.

:class:`GroupRollouts` is what GRPO and PPO share before their losses differ: it takes the step's prompts
(this rank's share of them), samples each group from its own seed through the generation backend, scores
the completions with the reward functions, and computes the per-completion signal the loss multiplies
(group-relative advantages and their variants, or per-token advantages under process supervision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from grpo.agents.episode import reward_arguments
from grpo.agents.rollout import Agent
from grpo.algo.advantages import (
    group_advantages,
    leave_one_out_advantages,
    normalize_per_function,
    process_advantages,
    softmax_group_weights,
)
from grpo.config.grpo import GRPOConfig
from grpo.data.prompts import PromptSampler, Row, render_prompt
from grpo.errors import RewardError, RunFailed
from grpo.models.checkpoint import capture_rng, restore_rng
from grpo.models.policy import PolicyAndReference
from grpo.rewards import Reward, score_groups, weighted_sum
from grpo.rewards.process import score_steps, split_steps, token_steps
from grpo.rollout.backend_base import GenerationBackend
from grpo.rollout.backends import DecoderFactory, make_backend
from grpo.rollout.batch import Rollout, ScoredBatch
from grpo.rollout.generate import generate, stop_token_ids
from grpo.train.common import is_out_of_memory
from grpo.train.distributed import Ranks, group_seeds


class GroupRollouts:
    """Samples and scores a step's groups for ``models.policy``. ``decoder`` is the default backend's fast
    decoding (grpo.accel), ``keep_going`` a sharded policy's lockstep (see grpo.rollout.sampling)."""

    def __init__(
        self,
        config: GRPOConfig,
        models: PolicyAndReference,
        tokenizer: Any,
        rewards: Sequence[Reward],
        train_rows: list[Row],
        ranks: Ranks,
        notify: Callable[[str], None],
        decoder: DecoderFactory | None = None,
        keep_going: Callable[[bool], bool] | None = None,
    ):
        self.config, self.policy, self.tokenizer = config, models.policy, tokenizer
        self.rewards, self.ranks, self.notify = list(rewards), ranks, notify
        # As in TRL, the batch settings are per process: a step takes prompts_per_step prompts per rank.
        prompts = config.prompts_per_step * ranks.world_size
        self.sampler = PromptSampler(train_rows, prompts, config.seed, config.shuffle_dataset)
        self.decoder, self.keep_going = decoder, keep_going
        self.generation_batch_size = config.generation_batch_size  # halved when sampling runs out of memory
        self.backend: GenerationBackend | None = None  # what samples, built when first used
        self.agent = Agent.of_run(config, tokenizer)  # tools or an environment: multi-turn episodes
        self.backend_is_stale = False  # the policy changed since the backend last saw its weights

    def sample_batch(self, step: int) -> ScoredBatch:
        """Step ``step``'s scored batch (steps count from 0). Under ``dynamic_sampling`` (DAPO) groups whose
        rewards are all equal are dropped and more prompts sampled, up to ``max_sampling_rounds`` batches,
        until the step has ``prompts_per_step`` groups that carry a signal; if none does, the first batch is
        kept as it is (its advantages are zero: only the KL term acts)."""
        c = self.config
        first = self.sample_share(step, draw=0)
        if not c.dynamic_sampling:
            return first
        wanted = c.prompts_per_step  # per rank
        kept = first.select_groups(first.informative_groups())
        draws = 1
        while kept.rollout.num_groups < wanted and draws < c.max_sampling_rounds:
            more = self.sample_share(step, draw=draws)
            kept = ScoredBatch.join([kept, more.select_groups(more.informative_groups())])
            draws += 1
        if kept.rollout.num_groups == 0:
            first.sampling_rounds = draws
            return first
        kept = kept.select_groups(list(range(min(kept.rollout.num_groups, wanted))))
        kept.sampling_rounds = draws
        return kept

    def sample_share(self, step: int, draw: int) -> ScoredBatch:
        """This rank's share of the step's prompts (all of them in one process), sampled and scored. Each
        group draws from its own seed, set by its place in the whole step, so the completions are the same
        however many processes share the step."""
        rows = self.sampler.batch(step, draw=draw)
        mine = self.ranks.share(rows)
        first = self.ranks.first_index(len(rows))
        seeds = group_seeds(self.config.seed, step, draw, first, len(mine))
        return self.sample_and_score(mine, seeds, step)

    def sample_and_score(self, rows: list[Row], seeds: list[int] | None = None, step: int = 0) -> ScoredBatch:
        """Sample a group for each row (group i from ``seeds[i]`` when given) and score it."""
        c = self.config
        rollout = self.generate_within_memory(rows, seeds, step)
        g = c.num_generations
        completion_ids = [
            ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)
        ]
        episodes = {}
        if rollout.episodes is not None:  # rewards read whole trajectories, and environments' final states
            episodes = reward_arguments(rollout.episodes, self.agent.environment is not None)
        try:
            if c.supervision == "process":
                return self.score_steps(rows, rollout)
            scores = score_groups(
                self.rewards,
                rows,
                rollout.texts,
                on_failure=c.reward_failure,
                timeout=c.reward_timeout or None,
                completion_ids=completion_ids,
                **episodes,
            )
        except RewardError as error:
            raise RewardError(f"step {step + 1}: {error}") from None
        finally:
            for record in rollout.episodes or []:
                record.environment = None  # scored: the logs keep the conversation, not the instance
        values = scores.values
        if c.multi_objective_aggregation == "normalize_then_sum":
            values = normalize_per_function(values, g)
        advantages = self.advantages(weighted_sum(values, self.rewards))
        skipped = (
            scores.skip_rows
            if scores.skip_rows is not None
            else torch.zeros(len(advantages), dtype=torch.bool)
        )
        advantages[skipped] = 0.0
        total = weighted_sum(scores.values, self.rewards)
        return ScoredBatch(rollout, total, scores.values, advantages, skipped, scores.failures)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
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

    def score_steps(self, rows: list[Row], rollout: Rollout) -> ScoredBatch:
        """Process supervision: step rewards, and from them per-token advantages (N, C)."""
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
                decoder=self.decoder,
                seed=c.seed,
                vllm_gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                max_model_len=c.max_prompt_length + c.max_completion_length,
                keep_going=self.keep_going,
            )
        elif self.backend_is_stale:
            self.backend.sync_weights(self.policy)
        self.backend_is_stale = False
        return self.backend

    def generate_within_memory(self, rows: list[Row], seeds: list[int] | None, step: int) -> Rollout:
        """Sample the rows' groups (group i from ``seeds[i]`` when given): single turns, or episodes when
        the run has an agent. When memory runs out, halve the completions decoded at once (for the rest of
        the run) and retry once, from the same random state."""
        c = self.config
        backend = self.generation_backend()
        rng = capture_rng()
        settings = dict(
            num_generations=c.num_generations,
            max_completion_length=c.max_completion_length,
            max_prompt_length=c.max_prompt_length,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            seeds=seeds,
        )
        for attempt in range(2):
            try:
                if self.agent is not None:
                    stops = stop_token_ids(self.policy, self.tokenizer)
                    return self.agent.sample(
                        backend, rows, stop_ids=stops, batch_size=self.generation_batch_size, **settings
                    )
                prompts = [render_prompt(row["prompt"], self.tokenizer) for row in rows]
                return generate(
                    self.policy,
                    self.tokenizer,
                    prompts,
                    batch_size=self.generation_batch_size,
                    backend=backend,
                    **settings,
                )
            except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(error):
                    raise
                at_once = self.generation_batch_size or len(rows) * c.num_generations
                if attempt == 1 or at_once <= c.num_generations:
                    raise RunFailed(
                        f"step {step + 1}: out of memory while sampling {at_once} completions at once; "
                        "lower generation_batch_size, per_device_train_batch_size or max_completion_length"
                    ) from None
                self.generation_batch_size = max(c.num_generations, at_once // 2)
                self.notify(
                    f"step {step + 1}: out of memory while sampling {at_once} completions at once; "
                    f"retrying with generation_batch_size = {self.generation_batch_size}"
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                restore_rng(rng)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Free the generation backend (a vLLM engine's GPU memory); a later step builds a new one."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None
