"""Small pieces every stage's recipe uses: seeding, the peak-memory figure, the progress display, and telling
an out-of-memory error from others."""

from __future__ import annotations

import random
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from grpo.errors import ConfigError
from grpo.models.checkpoint import latest_checkpoint
from grpo.runs.layout import default_output_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def step_progress(
    console: Console, total: int, completed: int = 0, info: str = ""
) -> Iterator[Callable[..., None]]:
    """A bar of steps on a terminal, a line per logged step in a log file: yields ``show(step, info,
    log_line=True)``, which moves the bar to ``step`` and, in a log file, writes ``info`` as a line."""
    columns = (
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("steps", total=total, completed=completed, info=info)

        def show(step: int, info: str, log_line: bool = True) -> None:
            progress.update(task, completed=step, info=info)
            if log_line and not console.is_terminal:
                console.print(f"step {step}/{total}  {info}")

        yield show


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, CUDA's "out of memory", or the CPU allocator's message."""
    message = str(error).lower()
    return isinstance(error, MemoryError) or "out of memory" in message or "can't allocate memory" in message


def stage_output_dir(output_dir: str | None, stage: str, dataset: str, fallback: str = "run") -> Path:
    """Where `grpo sft`, `reward-model` or `dpo` writes: ``output_dir``, or runs/<stage>-<dataset>-<time>;
    never a `grpo train` run's directory, whose config, metrics and summary it would overwrite."""
    path = Path(output_dir) if output_dir else default_output_dir(stage, dataset, fallback)
    if latest_checkpoint(path) is not None:
        raise ConfigError(f"{path}: holds checkpoints of a `grpo train` run; choose another output_dir")
    return path
