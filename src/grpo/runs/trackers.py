"""Where a run's logged metrics also go (``report_to``): TensorBoard, trackio, Weights & Biases.

Each tracker opens when the training loop starts and closes when it ends; metrics.jsonl is written either
way. TensorBoard writes event files to ``output_dir/tensorboard/``. trackio is local-first: a SQLite file
under ``$TRACKIO_DIR`` (default ``~/.cache/huggingface/trackio``), shown by ``trackio show``. Weights &
Biases runs offline unless ``WANDB_MODE`` says otherwise (no account, no network): its files go to
``output_dir/wandb/``, for ``wandb sync`` later. The project is ``grpo`` (``TRACKIO_PROJECT``,
``WANDB_PROJECT`` to change it) and the run is named after its output directory (with a hash of its path);
a resumed run continues the same tracker run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from grpo.config.grpo import report_targets
from grpo.runs.layout import TENSORBOARD_DIR

PROJECT = "grpo"


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


def path_hash(output_dir: Path) -> str:
    return hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]


def run_name(output_dir: Path) -> str:
    """The tracker run's name: the output directory's, made unique by a hash of its whole path (a pipeline's
    stages are all called ``grpo``), and the same again when the run resumes."""
    return f"{output_dir.name}-{path_hash(output_dir)[:8]}"


class TensorBoard:
    def __init__(self, output_dir: Path, step: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # (imports tensorboard: only when asked for)

        # Steps after ``step`` were logged by an attempt cut short: TensorBoard drops them.
        self.writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=step + 1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class Trackio:
    def __init__(self, output_dir: Path, step: int, config: dict[str, Any]):
        import trackio

        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", PROJECT),
            name=run_name(output_dir),
            config=config,
            resume="allow",
            embed=False,
            auto_log_cpu=False,  # (a thread sampling the machine: not asked for)
            auto_log_gpu=False,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()


class WandB:
    def __init__(self, output_dir: Path, step: int, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=output_dir.name,
            id=path_hash(output_dir),  # (so that a resumed run continues the same W&B run)
            resume="allow",
            dir=os.environ.get("WANDB_DIR", str(output_dir)),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(console="off"),  # (the run's own output stays the terminal's)
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": WandB}


@contextlib.contextmanager
def trackers_open(
    report_to: str, output_dir: Path, step: int, config: dict[str, Any], notify: Callable[[str], None]
) -> Iterator[list[Tracker]]:
    """The trackers ``report_to`` names, open for a loop that continues after ``step``; each is closed
    (marked failed if the loop raised), a tracker that fails to close said so without hiding why."""
    trackers: list[Tracker] = []
    failed = False
    try:
        for name in dict.fromkeys(report_targets(report_to)):
            trackers.append(TRACKERS[name](output_dir, step, config))
        yield trackers
    except BaseException:
        failed = True
        raise
    finally:
        for tracker in trackers:
            try:
                tracker.close(failed)
            except Exception as error:  # (closing is best effort: the run's own files are written)
                notify(f"warning: {type(tracker).__name__} did not close cleanly: {error}")
