"""The pieces a GRPO or PPO trainer is built from, made in one place: each trainer composes them and
writes only its own step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.accel.install import Speedups, install
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import to_dict
from grpo.data.prompts import Row
from grpo.models.policy import PolicyAndReference
from grpo.models.structure import is_sharded
from grpo.rewards import Reward
from grpo.rollout.batch import TrajectoryBatch
from grpo.train.distributed import Ranks
from grpo.train.loop import Checkpoints, RunLog, StopSignals
from grpo.train.rollouts import GroupRollouts
from grpo.train.update import GuardedUpdate, guarded_update


@dataclass
class TrainerParts:
    speed: Speedups  # where grpo.accel stands in for the plain path (the plain path under accel: false)
    rollouts: GroupRollouts  # the step's groups: sampled, scored, their advantages
    update: GuardedUpdate  # AdamW, its schedule, and the guard against non-finite updates
    signals: StopSignals  # SIGINT/SIGTERM: stop at the next safe point
    checkpoints: Checkpoints  # checkpoint-N/ written and read back
    log: RunLog  # metrics.jsonl, samples.jsonl, TensorBoard, warnings


def trainer_parts(
    config: GRPOConfig,
    models: PolicyAndReference,
    tokenizer: Any,
    rewards: Sequence[Reward],
    train_rows: list[Row],
    output_dir: Path,
    ranks: Ranks,
    notify: Callable[[str], None],
    trained: Iterable[torch.Tensor],
) -> TrainerParts:
    """The parts of a trainer of ``models`` whose optimizer updates the tensors ``trained``."""
    update = guarded_update(config, trained, notify)
    speed = install(models, config, output_dir)
    rollouts = GroupRollouts(
        config, models, tokenizer, rewards, train_rows, ranks, notify,
        decoder=speed.decoder(models.policy, release=models.release_reference),
        keep_going=ranks.any if is_sharded(models.policy) else None,  # a sharded policy decodes in lockstep
    )  # fmt: skip
    names = [reward.name for reward in rewards]
    return TrainerParts(
        speed=speed,
        rollouts=rollouts,
        update=update,
        signals=StopSignals(notify),
        checkpoints=Checkpoints(output_dir, config.save_total_limit, ranks),
        log=RunLog(
            output_dir, names, tokenizer, config.log_completions, config.report_to, notify, to_dict(config)
        ),
    )


def logps_without_gradients(
    speed: Speedups,
    model: torch.nn.Module,
    trajectories: TrajectoryBatch,
    batch_hint: int,
    release: Callable[[list[torch.Tensor]], None] | None = None,
    sharded: bool = False,
) -> torch.Tensor:
    """``model``'s log-probs (N, C) of the batch's completions, micro-batch by micro-batch, without gradients
    (``release`` is given an offloaded model's weights as soon as a fused decoder has copied them)."""
    # A sharded model's forward gathers weights into tensors that inference mode would not let it reuse.
    with torch.no_grad() if sharded else torch.inference_mode():
        score = speed.scorer(model, batch_hint, release)
        logps = torch.cat([trajectories.logps(score, part) for part in trajectories.micro_batches])
    return logps.clone()  # a normal tensor, usable in the autograd graph
