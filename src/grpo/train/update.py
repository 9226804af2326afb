"""Optimizer updates guarded against non-finite losses and gradients.

:class:`GuardedUpdate` is the RL trainers' (GRPO, PPO): AdamW and its schedule; a NaN or infinite loss or
gradient skips the update, and ``max_nonfinite_updates`` such updates in a row stop the run.
:func:`apply_update` is the supervised stages' (SFT, reward model, DPO): a non-finite update stops the run
at once, since their data does not change between attempts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import get_scheduler

from grpo.errors import RunFailed


class GuardedUpdate:
    """AdamW over ``params`` with its learning-rate schedule (one scheduler step per optimizer update),
    applied by :meth:`apply`."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        learning_rate: float,
        betas: tuple[float, float],
        weight_decay: float,
        scheduler: str,
        warmup_steps: int,
        total_updates: int,
        max_grad_norm: float,
        max_nonfinite_updates: int,
        notify: Callable[[str], None],
    ):
        self.optimizer = torch.optim.AdamW(
            list(params), lr=learning_rate, betas=betas, weight_decay=weight_decay
        )
        self.scheduler = get_scheduler(
            scheduler, self.optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_updates
        )
        self.max_grad_norm, self.max_nonfinite_updates = max_grad_norm, max_nonfinite_updates
        self.notify = notify
        self.nonfinite_in_a_row = 0

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def apply(self, loss: float, step: int) -> float:
        """Clip and apply the accumulated gradient (for step ``step``, counted from 1); skip the update
        (optimizer and schedule) when the loss or the gradient is not finite, and stop the run after
        ``max_nonfinite_updates`` such in a row. Returns the gradient norm, NaN for a skipped update."""
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm or math.inf)
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # (a DTensor, sharded)
        if math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            limit = self.max_nonfinite_updates
            self.notify(
                f"step {step}: skipped an update with loss {loss} and gradient norm {norm} "
                f"({self.nonfinite_in_a_row} in a row; the run stops at {limit})"
            )
            if self.nonfinite_in_a_row >= limit:
                raise RunFailed(
                    f"step {step}: the loss or gradient was NaN or infinite in {limit} updates in a "
                    "row (all skipped), so the run stopped; lower learning_rate or check the reward functions"
                )
            norm = math.nan
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def guarded_update(
    config: Any, params: Iterable[torch.Tensor], notify: Callable[[str], None]
) -> GuardedUpdate:
    """A :class:`GuardedUpdate` with a GRPO config's optimizer settings: ``num_iterations`` updates a step."""
    return GuardedUpdate(
        params,
        learning_rate=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        scheduler=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        total_updates=config.max_steps * config.num_iterations,
        max_grad_norm=config.max_grad_norm,
        max_nonfinite_updates=config.max_nonfinite_updates,
        notify=notify,
    )


def apply_update(
    optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float, loss: float, step: int
) -> tuple[float, float]:
    """The supervised stages' optimizer update (SFT, reward model, DPO): clip the accumulated gradient, stop
    the run on a non-finite loss or gradient, step the optimizer and the schedule. Returns the gradient norm
    and the learning rate the update used."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise RunFailed(
            f"step {step}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; "
            "lower learning_rate"
        )
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, learning_rate
