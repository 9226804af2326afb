"""PPO with a learned critic (``algorithm: ppo``): the baseline that GRPO replaces by a group's mean reward.

GRPO judges a completion against its siblings; PPO judges every token against a value function V(s_t), the
reward the critic expects from the state before that token. Here the critic is a linear value head on the
policy's final hidden states, trained alongside the policy, as in TRL's former value-head PPO. One step:

1. sample and score completions exactly as GRPO does (:class:`grpo.train.rollouts.GroupRollouts`);
2. one pass without gradients gives the old log-probs and old values, and the reference model its
   log-probs (when ``beta`` > 0);
3. per-token rewards: −β·(log π_old − log π_ref) at every token (k1), plus the sequence reward at the
   completion's last token (the reward functions' weighted sum, of their z-scores within the group under
   ``multi_objective_aggregation: normalize_then_sum``);
4. GAE(γ, λ) turns rewards and values into per-token advantages and returns;
5. ``num_iterations`` optimizer updates over the batch, each on the clipped policy surrogate of
   :func:`grpo.algo.losses.policy_loss` (over the ``top_entropy_quantile`` of tokens by entropy) plus
   ``vf_coef`` × the clipped value loss (over every token);
6. every ``ref_model_sync_steps`` steps the reference becomes the policy (iterative RL), as under GRPO.

The critic shares the policy's backbone: the value loss's gradient flows through the final hidden states
into the LoRA adapters (into every weight under full fine-tuning), so ``vf_coef`` bounds how far the critic
may bend the features the policy uses. The reference model (adapters off, or a frozen copy) never sees it.
What PPO costs over GRPO: one (H + 1)-parameter head with its optimizer state, and a forward pass per step
for the old values; a separate value model, the classical setup, would instead hold a second copy of the
network.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from grpo.algo.advantages import normalize_per_function
from grpo.algo.logprobs import high_entropy_tokens, masked_mean, surprisal_sum
from grpo.algo.losses import policy_loss
from grpo.algo.value import explained_variance, gae, value_loss, whiten
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import to_dict
from grpo.data.prompts import Row
from grpo.errors import CheckpointError
from grpo.models.checkpoint import load_reference
from grpo.models.loading import trainable_parameters, weight_dtypes
from grpo.models.policy import PolicyAndReference
from grpo.rewards import Reward, weighted_sum
from grpo.rollout.backend_base import GenerationBackend
from grpo.rollout.batch import ScoredBatch, TrajectoryBatch
from grpo.rollout.scoring import shared_prompt_forward
from grpo.train.distributed import Ranks
from grpo.train.loop import StopNow, resume_logs, run_loop
from grpo.train.parts import logps_without_gradients, trainer_parts
from grpo.train.step_metrics import sampled_entropy, step_metrics

VALUE_HEAD_FILE = "value_head.safetensors"


# --- log-probs and values in one pass ----------------------------------------------------------------------
def completion_logps_and_values(
    model: nn.Module,
    value_head: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, C) of completions, the values (B, C) of the states they were drawn in, and
    with ``with_entropy`` the entropy (B, C) of the distribution each token was drawn from (else None).

    The log-probs are :func:`grpo.rollout.scoring.completion_logps`' (each distinct prompt run once, its
    key/value cache gathered for its completions); the same forward passes also return the final hidden
    states, and the value of token t is the value head applied to the hidden state that predicts token t,
    the state before it (the prompt's last position for the first token), as in TRL. So the critic costs no
    extra forward pass, and its gradient reaches the backbone through those hidden states.
    """
    out = shared_prompt_forward(
        model,
        prompt_ids,
        prompt_mask,
        prompt_index,
        completion_ids,
        completion_mask,
        output_hidden_states=True,
    )
    values = value_head(out.hidden_states.to(value_head.weight.dtype)).squeeze(-1)
    if with_entropy:
        logps, entropy = out.token_logps(completion_ids, temperature, with_entropy=True)
        return logps, values, entropy
    return out.token_logps(completion_ids, temperature), values, None


def sequence_rewards(
    batch: ScoredBatch, rewards: Sequence[Reward], aggregation: str, group_size: int
) -> torch.Tensor:
    """The reward (N,) PPO credits each completion with at its last token: the reward functions' weighted
    sum, or under ``aggregation`` "normalize_then_sum" the weighted sum of each function's scores z-scored
    within their group (see :func:`grpo.algo.advantages.normalize_per_function`), so that the functions'
    scales do not decide their weight."""
    if aggregation == "normalize_then_sum":
        return weighted_sum(normalize_per_function(batch.scores, group_size), rewards)
    return batch.rewards


@dataclass(frozen=True)
class UpdateTargets:
    """What a step's updates fit, fixed before the first of them: the sampling policy's log-probs and the
    critic's values, GAE's advantages and returns (each (N, C)), and the loss tokens of the whole batch."""

    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    tokens_in_batch: torch.Tensor


def make_value_head(hidden_size: int, init_std: float, seed: int) -> nn.Linear:
    """``nn.Linear(hidden_size, 1)`` in float32 (a regression target needs its precision whatever the
    policy's dtype), initialised from its own generator so that it neither depends on nor moves the
    random stream that sampling draws from."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    with torch.no_grad():
        head.weight.normal_(0.0, init_std, generator=torch.Generator().manual_seed(seed))
        head.bias.zero_()
    return head


class _PolicyAndValueHead:
    """What :func:`grpo.models.checkpoint.save_checkpoint` writes as "the model": the policy's own files
    (adapter or whole model) and the value head beside them, so that both enter the checkpoint in its one
    atomic rename (a checkpoint with weights but no critic would resume into a different run)."""

    def __init__(self, policy: nn.Module, value_head: nn.Module):
        self.policy, self.value_head = policy, value_head

    def save_pretrained(self, directory: Path, **kwargs: Any) -> None:
        self.policy.save_pretrained(directory, **kwargs)
        save_file(self.value_head.state_dict(), Path(directory) / VALUE_HEAD_FILE)


# --- the trainer -------------------------------------------------------------------------------------------
class PPOTrainer:
    """PPO on the pieces GRPO uses: its sampling and rewards (:class:`GroupRollouts`), guarded updates, loop,
    logs and checkpoints; a critic instead of the group's mean reward for a baseline.

    The value head's parameters share the policy's AdamW (same learning rate and schedule) and are saved
    as ``value_head.safetensors`` in every checkpoint. They are training state only: the final model is the
    policy alone. One optimizer update per iteration over the whole batch (gradients accumulated over
    micro-batches), rather than PPO's usual shuffled minibatches.
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
        self.device = next(self.policy.parameters()).device
        self.step = 0
        self.updated_this_step = False
        self.last_batch: ScoredBatch | None = None
        hidden_size = self.policy.config.get_text_config().hidden_size
        self.value_head = make_value_head(hidden_size, config.value_head_init_std, config.seed).to(
            self.device
        )
        trained = [*trainable_parameters(self.policy).values(), *self.value_head.parameters()]
        parts = trainer_parts(
            config, models, tokenizer, rewards, train_rows, output_dir, self.ranks, self.notify, trained
        )
        self.speed, self.rollouts, self.update = parts.speed, parts.rollouts, parts.update
        self.signals, self.checkpoints, self.log = parts.signals, parts.checkpoints, parts.log

    @property
    def value_head_parameters(self) -> int:
        """The critic's size: H + 1 numbers, against a second copy of the network for a value model."""
        return sum(p.numel() for p in self.value_head.parameters())

    def train_step(self) -> dict[str, float]:
        """Sample groups → score → old log-probs and values → per-token rewards → GAE → μ passes of
        micro-batched clipped policy and value updates → sync the reference when due → log."""
        c = self.config
        started = time.perf_counter()
        self.updated_this_step = False
        self.speed.between_phases()
        batch = self.rollouts.sample_batch(self.step)
        generation_time = time.perf_counter() - started
        if self.ranks.any(self.signals.asked):
            raise StopNow  # nothing has changed yet: the step is redone on resume

        trajectories = TrajectoryBatch.of(
            batch, self.device, c.per_device_train_batch_size, c.temperature, c.mask_truncated_completions
        )
        loss_mask, parts = trajectories.loss_mask, trajectories.micro_batches
        old_logps, old_values, kl = self.old_logps_values_and_kl(trajectories)
        advantages, returns = self.advantages_and_returns(batch, old_values, kl, loss_mask)
        targets = UpdateTargets(old_logps, old_values, advantages, returns, tokens_in_batch=loss_mask.sum())

        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        self.policy.train()
        for _ in range(c.num_iterations):
            for part in parts:
                surrogate, critic, metrics = self.micro_batch_losses(trajectories, part, targets)
                loss = surrogate + c.vf_coef * critic
                loss.backward()
                sums["loss"] += loss.item() / c.num_iterations
                sums["policy_loss"] += surrogate.item() / c.num_iterations
                sums["value_loss"] += critic.item() / c.num_iterations
                for key, value in metrics.items():
                    sums[key] += value / (len(parts) * c.num_iterations)
            grad_norms.append(self.apply_update(sums["loss"]))
            sums["skipped_updates"] += 0 if math.isfinite(grad_norms[-1]) else 1
        self.step += 1
        sums["reference_synced"] = float(self.models.sync_reference_every(c.ref_model_sync_steps, self.step))
        step_time = time.perf_counter() - started
        self.last_batch = batch = replace(batch, advantages=advantages.cpu())  # the advantages used
        names = [r.name for r in self.rewards]
        graded = [r.graded for r in self.rewards]
        learning_rate = self.update.learning_rate
        m = step_metrics(
            self.step, batch, names, sums, grad_norms, learning_rate, generation_time, step_time, graded
        )
        m["kl"] = masked_mean(kl, loss_mask).item()  # k1 of the rewards' penalty; policy_loss's has β = 0
        m["entropy"] = sampled_entropy(surprisal_sum(old_logps, loss_mask).item(), loss_mask)
        m["value/mean"] = masked_mean(old_values, loss_mask).item()
        m["returns/mean"] = masked_mean(returns, loss_mask).item()
        m["explained_variance"] = explained_variance(old_values, returns, loss_mask)
        m["value_head/parameters"] = float(self.value_head_parameters)
        return m

    @torch.no_grad()
    def advantages_and_returns(
        self, batch: ScoredBatch, old_values: torch.Tensor, kl: torch.Tensor, loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards, −β·KL at every token plus the completion's reward (:func:`sequence_rewards`)
        at its last, turned by GAE(γ, λ) into advantages (whitened under ``whiten_advantages``) and returns,
        each (N, C)."""
        c = self.config
        token_rewards = -c.beta * kl
        lengths = loss_mask.sum(dim=1)
        ended = (lengths > 0).nonzero().squeeze(1)
        rewards = sequence_rewards(batch, self.rewards, c.multi_objective_aggregation, c.num_generations)
        token_rewards[ended, lengths[ended] - 1] += rewards.to(self.device)[ended]
        advantages, returns = gae(token_rewards, old_values, loss_mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = whiten(advantages, loss_mask)
        return advantages, returns

    def micro_batch_losses(
        self, trajectories: TrajectoryBatch, part: slice, targets: UpdateTargets
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Micro-batch ``part``'s clipped policy loss and clipped value loss, with gradients, each its share
        of the whole batch's; and the policy loss's statistics. Under ``top_entropy_quantile`` < 1 only the
        tokens whose entropy is in that top quantile of the micro-batch enter the policy loss, as under GRPO;
        the critic still fits every token's return."""
        c = self.config
        with_entropy = c.top_entropy_quantile < 1.0
        logps, values, entropy = trajectories.logps(self.logps_and_values, part, with_entropy=with_entropy)
        loss_mask = trajectories.loss_mask[part]
        policy_mask, metrics = loss_mask, {}
        if entropy is not None:
            policy_mask = loss_mask * high_entropy_tokens(entropy, loss_mask, c.top_entropy_quantile)
            metrics["entropy/mean"] = masked_mean(entropy, loss_mask).item()
        surrogate, stats = policy_loss(
            logps,
            targets.old_logps[part],
            None,
            targets.advantages[part],
            policy_mask,
            epsilon_low=c.epsilon,
            epsilon_high=c.epsilon_high,
            beta=0.0,  # the KL penalty is in the rewards
            loss_type=c.loss_type,
            max_completion_length=c.max_completion_length,
            importance_sampling_level=c.importance_sampling_level,
            num_items_in_batch=targets.tokens_in_batch,
        )
        if c.loss_type != "dapo":  # "dapo" already divides by the whole batch's token count
            surrogate = surrogate / len(trajectories.micro_batches)
        critic = value_loss(
            values,
            targets.old_values[part],
            targets.returns[part],
            loss_mask,
            c.cliprange_value,
            num_items_in_batch=targets.tokens_in_batch,
        )
        return surrogate, critic, {**metrics, **stats}

    def logps_and_values(
        self, *args: Any, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:func:`completion_logps_and_values` of the policy and its value head (the scorer's signature)."""
        return completion_logps_and_values(self.policy, self.value_head, *args, with_entropy=with_entropy)

    @torch.no_grad()
    def old_logps_values_and_kl(
        self, trajectories: TrajectoryBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass without gradients: the sampling policy's log-probs and values (N, C), and the k1 KL to
        the reference at each loss token (zeros without a reference)."""
        self.policy.eval()
        old = [trajectories.logps(self.logps_and_values, part) for part in trajectories.micro_batches]
        old_logps = torch.cat([logps for logps, _, _ in old])
        old_values = torch.cat([values for _, values, _ in old])
        kl = torch.zeros_like(old_logps)
        if self.models.needs_reference:
            kl = torch.where(
                trajectories.loss_mask.bool(), old_logps - self.reference_logps(trajectories), 0.0
            )
        return old_logps, old_values, kl

    def reference_logps(self, trajectories: TrajectoryBatch) -> torch.Tensor:
        """The reference model's log-probs of the batch's completions, without gradients."""
        hint = self.config.per_device_train_batch_size * self.config.max_completion_length
        self.speed.between_phases()
        self.policy.eval()
        with self.models.reference() as reference:
            release = self.models.release_reference
            logps = logps_without_gradients(self.speed, reference, trajectories, hint, release)
        self.speed.between_phases()
        return logps

    def apply_update(self, loss: float) -> float:
        """The accumulated gradient applied (see :class:`grpo.train.update.GuardedUpdate`); its norm."""
        self.speed.between_phases()
        norm = self.update.apply(loss, self.step + 1)
        if math.isfinite(norm):
            self.updated_this_step = True
            self.rollouts.backend_is_stale = True
        self.speed.between_phases()
        return norm

    # --- the run -----------------------------------------------------------------------------------------
    def train(
        self, progress: Callable[[int, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Run until ``max_steps`` (see :func:`grpo.train.loop.run_loop`); the logged metrics of the run."""
        return run_loop(self, self.config, self.ranks, progress, self.on_step)

    @property
    def backend(self) -> GenerationBackend | None:
        return self.rollouts.backend

    def close(self) -> None:
        self.rollouts.close()

    def save(self, rng_state: dict | None = None, wait: bool = True) -> Path:
        """A checkpoint with ``value_head.safetensors`` beside the weights, written in the same atomic
        rename, and a reference that iterative RL has made a copy of the policy."""
        synced, extra = self.models.reference_to_save()
        state = {"step": self.step, "config": to_dict(self.config), "reference_synced": synced,
                 "weights": weight_dtypes(self.policy)}  # fmt: skip
        model = _PolicyAndValueHead(self.policy, self.value_head)
        optimizer, scheduler = self.update.optimizer, self.update.scheduler
        return self.checkpoints.write(
            self.step, model, optimizer, scheduler, state, rng_state, extra, wait=wait
        )

    def resume(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` exactly, value head and a synced reference included; a checkpoint
        without a value head (a GRPO run's) is refused before anything is restored."""
        path = checkpoint / VALUE_HEAD_FILE
        if not path.is_file():
            raise CheckpointError(f"{checkpoint}: no {VALUE_HEAD_FILE}: not a checkpoint of a PPO run")
        try:
            self.value_head.load_state_dict(load_file(path))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{path}: damaged or of another model ({error})") from None
        optimizer, scheduler = self.update.optimizer, self.update.scheduler
        state, rng = self.checkpoints.read(checkpoint, self.policy, optimizer, scheduler, sharded=False)
        if state.get("reference_synced"):
            load_reference(checkpoint, self.models)
        self.step = resume_logs(self.log, state, rng, self.ranks)
