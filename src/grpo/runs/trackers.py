"""Where a run's logged metrics also go (``report_to``): TensorBoard, trackio, Weights & Biases.

Each tracker opens when the training loop starts and closes when it ends; metrics.jsonl is written either
way. TensorBoard writes event files to ``output_dir/tensorboard/``. trackio is local-first: a SQLite file
under ``$TRACKIO_DIR`` (default ``~/.cache/huggingface/trackio``), shown by ``trackio show``. Weights &
Biases runs offline unless ``WANDB_MODE`` says otherwise (no account, no network): its files go to
``output_dir/wandb/``, for ``wandb sync`` later. The project is ``grpo`` (``TRACKIO_PROJECT``,
``WANDB_PROJECT`` to change it) and the run is named after its output directory; a resumed run continues
the same tracker run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

from grpo.config.grpo import report_targets
from grpo.runs.layout import TENSORBOARD_DIR

PROJECT = "grpo"


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, output_dir: Path, step: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # (imports tensorboard: only when asked for)

        # Steps after ``step`` were logged by an attempt cut short: TensorBoard drops them.
        self.writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=step + 1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Trackio:
    def __init__(self, output_dir: Path, step: int, config: dict[str, Any]):
        import trackio

        project = os.environ.get("TRACKIO_PROJECT", PROJECT)
        self.run = trackio.init(
            project=project, name=output_dir.name, config=config, resume="allow", embed=False
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class WandB:
    def __init__(self, output_dir: Path, step: int, config: dict[str, Any]):
        import wandb

        # One id per output directory, so that a resumed run continues the same W&B run.
        run_id = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=output_dir.name,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": WandB}


def open_trackers(report_to: str, output_dir: Path, step: int, config: dict[str, Any]) -> list[Tracker]:
    """The trackers ``report_to`` names, open for a loop that continues after ``step``."""
    return [TRACKERS[name](output_dir, step, config) for name in report_targets(report_to)]
