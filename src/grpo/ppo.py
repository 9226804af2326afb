"""PPO with a learned critic (``algorithm: ppo``): the baseline that GRPO replaces by a group's mean reward.

GRPO judges a completion against its siblings; PPO judges every token against a value function V(s_t), the
reward the critic expects from the state before that token. Here the critic is a linear value head on the
policy's final hidden states, trained alongside the policy, as in TRL's former value-head PPO. One step:

1. sample and score completions exactly as :class:`grpo.trainer.GRPOTrainer` does;
2. one pass without gradients gives the old log-probs and old values, and the reference model its
   log-probs (when ``beta`` > 0);
3. per-token rewards: −β·(log π_old − log π_ref) at every token (k1), plus the sequence reward at the
   completion's last token;
4. GAE(γ, λ) turns rewards and values into per-token advantages and returns;
5. ``num_iterations`` optimizer updates over the batch, each on the clipped policy surrogate of
   :func:`grpo.losses.policy_loss` plus ``vf_coef`` × the clipped value loss.

The critic shares the policy's backbone: the value loss's gradient flows through the final hidden states
into the LoRA adapters (into every weight under full fine-tuning), so ``vf_coef`` bounds how far the critic
may bend the features the policy uses. The reference model (adapters off, or a frozen copy) never sees it.
What PPO costs over GRPO: one (H + 1)-parameter head with its optimizer state, and a forward pass per step
for the old values; a separate value model, the classical setup, would instead hold a second copy of the
network.
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from grpo.checkpoint import CHECKPOINT_PREFIX, prune_checkpoints, save_checkpoint
from grpo.config import GRPOConfig, to_dict
from grpo.data import Row
from grpo.distributed import Ranks
from grpo.errors import CheckpointError
from grpo.losses import policy_loss
from grpo.models import PolicyAndReference, trainable_parameters
from grpo.rewards import Reward
from grpo.rollout import shared_prompt_forward
from grpo.trainer import GRPOTrainer, _StopNow

VALUE_HEAD_FILE = "value_head.safetensors"


# --- the math, as pure functions ---------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over completion tokens; returns ``(advantages, returns)``, (B, T).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with rewards, values and advantages taken as 0
    past a row's last real token: the completion ends there, so its last token bootstraps from nothing.
    Returns are A + V, the critic's regression target. ``mask`` must be right-padded (ones, then zeros),
    as a rollout's completion mask is; a row of zeros gets zeros.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = next_value = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0 and variance 1 over the real tokens; padding stays 0."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """½·max((V − R)², (clip(V, V_old ± cliprange) − R)²), averaged over the real tokens of ``mask``.

    The max makes the clip pessimistic: moving a value further than ``cliprange`` from the value that
    produced the advantages earns no credit, so one batch cannot drag the critic far. ``num_items_in_batch``
    divides the masked sum instead of the mask's own token count (the whole step's tokens, so that
    splitting the step into micro-batches does not change the objective).
    """
    clipped = old_values + (values - old_values).clamp(-cliprange, cliprange)
    per_token = torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask.to(values.dtype)
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return 0.5 * per_token.sum() / torch.as_tensor(denominator, dtype=values.dtype).clamp(min=1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over real tokens: 1 when the critic predicts the returns exactly, 0 when it
    does no better than their mean, negative when worse; NaN when the returns do not vary."""
    returns_variance = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    error = returns - values
    error_variance = masked_mean((error - masked_mean(error, mask)) ** 2, mask)
    return (1 - error_variance / returns_variance).item() if returns_variance > 0 else math.nan


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, C) of completions and the values (B, C) of the states they were drawn in.

    The log-probs are :func:`grpo.rollout.completion_logps`' (each distinct prompt run once, its key/value
    cache gathered for its completions); the same forward passes also return the final hidden states, and
    the value of token t is the value head applied to the hidden state that predicts token t, the state
    before it (the prompt's last position for the first token), as in TRL. So the critic costs no extra
    forward pass, and its gradient reaches the backbone through those hidden states.
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
    return out.token_logps(completion_ids, temperature), values


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
    """What :func:`grpo.checkpoint.save_checkpoint` writes as "the model": the policy's own files (adapter
    or whole model) and the value head beside them, so that both enter the checkpoint in its one atomic
    rename (a checkpoint with weights but no critic would resume into a different run)."""

    def __init__(self, policy: nn.Module, value_head: nn.Module):
        self.policy, self.value_head = policy, value_head

    def save_pretrained(self, directory: Path, **kwargs: Any) -> None:
        self.policy.save_pretrained(directory, **kwargs)
        save_file(self.value_head.state_dict(), Path(directory) / VALUE_HEAD_FILE)


# --- the trainer -------------------------------------------------------------------------------------------
class PPOTrainer(GRPOTrainer):
    """GRPOTrainer's loop, sampling, rewards, optimizer step and checkpoints, with a critic for a baseline.

    The value head's parameters share the policy's AdamW (same learning rate and schedule) and are saved
    as ``value_head.safetensors`` in every checkpoint. They are training state only: the final model is the
    policy alone. One optimizer update per iteration over the whole batch, as in GRPOTrainer (gradients
    accumulated over micro-batches), rather than PPO's usual shuffled minibatches.
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
        super().__init__(config, models, tokenizer, rewards, train_rows, output_dir, on_step, notify, ranks)
        hidden_size = self.policy.config.get_text_config().hidden_size
        self.value_head = make_value_head(hidden_size, config.value_head_init_std, config.seed).to(
            self.device
        )
        # GRPOTrainer's optimizer and schedule cover the policy only: both are rebuilt with the head.
        self.build_optimizer([*trainable_parameters(self.policy).values(), *self.value_head.parameters()])

    @property
    def value_head_parameters(self) -> int:
        """The critic's size: H + 1 numbers, against a second copy of the network for a value model."""
        return sum(p.numel() for p in self.value_head.parameters())

    def train_step(self) -> dict[str, float]:
        c = self.config
        started = time.perf_counter()
        self.updated_this_step = False
        batch = self.sample_batch()
        generation_time = time.perf_counter() - started
        if self.stop_signal is not None:
            raise _StopNow  # nothing has changed yet: the step is redone on resume

        tensors = self.training_tensors(batch)
        loss_mask, slices, run = tensors.loss_mask, tensors.slices, tensors.run
        forward = functools.partial(completion_logps_and_values, self.policy, self.value_head)
        self.policy.eval()
        with torch.no_grad():
            old = [run(forward, part) for part in slices]
            old_logps = torch.cat([logps for logps, _ in old])
            old_values = torch.cat([values for _, values in old])
            kl = torch.zeros_like(old_logps)
            if self.models.needs_reference:
                kl = torch.where(loss_mask.bool(), old_logps - self.reference_logps(tensors), 0.0)
            token_rewards = -c.beta * kl
            lengths = loss_mask.sum(dim=1)
            ended = (lengths > 0).nonzero().squeeze(1)
            token_rewards[ended, lengths[ended] - 1] += batch.rewards.to(self.device)[ended]
            advantages, returns = gae(token_rewards, old_values, loss_mask, c.gamma, c.lam)
            if c.whiten_advantages:
                advantages = whiten(advantages, loss_mask)

        tokens_in_batch = loss_mask.sum()
        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        self.policy.train()
        for _ in range(c.num_iterations):
            for part in slices:
                logps, values = run(forward, part)
                surrogate, metrics = policy_loss(
                    logps,
                    old_logps[part],
                    None,
                    advantages[part],
                    loss_mask[part],
                    epsilon_low=c.epsilon,
                    epsilon_high=c.epsilon_high,
                    beta=0.0,  # the KL penalty is in the rewards
                    loss_type=c.loss_type,
                    max_completion_length=c.max_completion_length,
                    importance_sampling_level=c.importance_sampling_level,
                    num_items_in_batch=tokens_in_batch,
                )
                if c.loss_type != "dapo":  # "dapo" already divides by the whole batch's token count
                    surrogate = surrogate / len(slices)
                critic = value_loss(
                    values,
                    old_values[part],
                    returns[part],
                    loss_mask[part],
                    c.cliprange_value,
                    num_items_in_batch=tokens_in_batch,
                )
                loss = surrogate + c.vf_coef * critic
                loss.backward()
                sums["loss"] += loss.item() / c.num_iterations
                sums["policy_loss"] += surrogate.item() / c.num_iterations
                sums["value_loss"] += critic.item() / c.num_iterations
                for key, value in metrics.items():
                    sums[key] += value / (len(slices) * c.num_iterations)
            grad_norms.append(self._optimizer_step(sums["loss"]))
            sums["skipped_updates"] += 0 if math.isfinite(grad_norms[-1]) else 1
        self.step += 1
        step_time = time.perf_counter() - started
        batch = replace(batch, advantages=advantages.cpu())  # "advantage/…" report the advantages used
        m = self._step_metrics(batch, sums, grad_norms, generation_time, step_time)
        m["kl"] = masked_mean(kl, loss_mask).item()  # k1 of the rewards' penalty; policy_loss's has β = 0
        m["value/mean"] = masked_mean(old_values, loss_mask).item()
        m["returns/mean"] = masked_mean(returns, loss_mask).item()
        m["explained_variance"] = explained_variance(old_values, returns, loss_mask)
        m["value_head/parameters"] = float(self.value_head_parameters)
        return m

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self, rng_state: dict | None = None, wait: bool = True) -> Path:
        """GRPOTrainer's checkpoint with ``value_head.safetensors`` beside the weights, written atomically
        (PPO runs in one process, so there is no one to wait for)."""
        state = {"step": self.step, "config": to_dict(self.config)}
        directory = save_checkpoint(
            self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}",
            _PolicyAndValueHead(self.policy, self.value_head),
            self.optimizer,
            self.scheduler,
            state,
            rng_state,
        )
        self.saved_step = self.step
        prune_checkpoints(self.output_dir, self.config.save_total_limit)
        return directory

    def resume(self, checkpoint: Path) -> None:
        """GRPOTrainer's resume, and the value head; a checkpoint without one (a GRPO run's) is refused
        before anything is restored."""
        path = checkpoint / VALUE_HEAD_FILE
        if not path.is_file():
            raise CheckpointError(f"{checkpoint}: no {VALUE_HEAD_FILE}: not a checkpoint of a PPO run")
        try:
            self.value_head.load_state_dict(load_file(path))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{path}: damaged or of another model ({error})") from None
        super().resume(checkpoint)
