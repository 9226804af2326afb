"""The loop around a trainer's steps, shared by GRPO and PPO: logs, checkpoints, signals.

:func:`run_loop` calls ``trainer.train_step()`` until ``max_steps``; after each logged step it writes
metrics.jsonl, samples.jsonl and TensorBoard (:class:`RunLog`) and shows new diagnostic warnings. It saves a
checkpoint at the end, after every ``save_steps``-th step, and after the first step that ends
``save_minutes`` or more after the last checkpoint (or the loop's start), so that a run killed outright
(SIGKILL, a lost machine) loses at most that many steps or minutes: `grpo train --resume` goes on from the
checkpoint exactly. SIGINT or SIGTERM (:class:`StopSignals`) stops the run at the next safe point with a
checkpoint (a second signal stops it at once). A step that fails before it has changed the weights (a
reward function raising, a signal while sampling) leaves a checkpoint of the previous step, so that no
finished step is lost.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from grpo.config.grpo import GRPOConfig
from grpo.errors import RunInterrupted
from grpo.files import write_text_atomic
from grpo.models.checkpoint import (
    CHECKPOINT_PREFIX,
    capture_rng,
    check_weight_dtypes,
    load_training_state,
    load_weights,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from grpo.rollout.batch import ScoredBatch
from grpo.runs.diagnostics import Watch, held_out_scores
from grpo.runs.layout import METRICS_FILE, SAMPLES_FILE, TENSORBOARD_DIR, append_line, read_jsonl
from grpo.runs.samples import sample_records
from grpo.runs.trackers import Tracker, trackers_open
from grpo.train import sharding
from grpo.train.distributed import Ranks


class StopNow(Exception):
    """Raised inside a step, before it changes anything, when a signal asked the run to stop."""


class StopSignals:
    """SIGINT and SIGTERM while :meth:`installed`: the first asks the run to stop at the next safe point,
    a second one stops it at once."""

    def __init__(self, notify: Callable[[str], None]):
        self.notify = notify
        self.number: int | None = None  # the signal that asked, if one did

    @property
    def asked(self) -> bool:
        return self.number is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(number: int, frame: Any) -> None:
            if self.number is not None:
                raise KeyboardInterrupt
            self.number = number
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


class Checkpoints:
    """Writes a run's checkpoints (``checkpoint-N/``, the oldest pruned) and remembers the last step saved.
    Every rank holds the same weights and optimizer state: the first writes them, the others wait for it."""

    def __init__(self, output_dir: Path, save_total_limit: int, ranks: Ranks):
        self.output_dir, self.save_total_limit, self.ranks = output_dir, save_total_limit, ranks
        self.saved_step: int | None = None

    def directory(self, step: int) -> Path:
        return self.output_dir / f"{CHECKPOINT_PREFIX}{step}"

    def write(self, step: int, *args: Any, wait: bool = True, **kwargs: Any) -> Path:
        """:func:`grpo.models.checkpoint.save_checkpoint` of step ``step`` (its arguments after the
        directory), then prune; with ``wait``, every rank returns once it is written."""
        directory = self.directory(step)
        if self.ranks.is_main:
            save_checkpoint(directory, *args, **kwargs)
            prune_checkpoints(self.output_dir, self.save_total_limit)
        if wait:
            self.ranks.barrier()
        self.saved_step = step
        return directory

    def read(
        self, checkpoint: Path, model: nn.Module, optimizer: Any, scheduler: Any, sharded: bool
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the weights, optimizer and scheduler of ``checkpoint``; its trainer state and the random
        generators' states to restore once everything else is loaded. A sharded model's weights went in
        before sharding (grpo.cli.recipes); its optimizer's state is sharded here."""
        check_weight_dtypes(checkpoint, model)
        if sharded:
            state, rng = load_training_state(
                checkpoint,
                optimizer,
                scheduler,
                lambda whole: sharding.load_full_optimizer_state(model, optimizer, whole),
            )
        else:
            load_weights(checkpoint, model)
            state, rng = load_training_state(checkpoint, optimizer, scheduler)
        self.saved_step = state["step"]
        return state, rng


class RunLog:
    """What a run logs besides checkpoints: metrics.jsonl (a line per logged step), samples.jsonl (a few
    completions per logged step), TensorBoard events (``report_to: tensorboard``), diagnostic warnings."""

    def __init__(
        self,
        output_dir: Path,
        reward_names: list[str],
        tokenizer: Any,
        log_completions: int,
        report_to: str,
        notify: Callable[[str], None],
        settings: dict[str, Any] | None = None,
    ):
        self.output_dir, self.reward_names, self.tokenizer = output_dir, reward_names, tokenizer
        self.log_completions, self.report_to, self.notify = log_completions, report_to, notify
        self.settings = settings or {}  # the run's settings, for the trackers that keep them
        self.logged: list[dict[str, float]] = []  # the lines of metrics.jsonl
        self.watch = Watch()  # the diagnostic warnings shown so far (each once, until it clears)
        self.trackers: list[Tracker] = []  # open while the loop runs (report_to)

    def start_fresh(self) -> None:
        """A run from step 0: drop what an earlier attempt that never reached a checkpoint logged."""
        (self.output_dir / SAMPLES_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.output_dir / TENSORBOARD_DIR, ignore_errors=True)

    def write(self, step: int, metrics: dict[str, float], batch: ScoredBatch | None) -> None:
        """A logged step's lines in every file, and the warnings new at this step."""
        self.write_metrics()
        if self.log_completions and batch is not None:
            records = sample_records(batch, self.reward_names, self.tokenizer, self.log_completions)
            append_line(self.output_dir / SAMPLES_FILE, json.dumps({"step": step, "samples": records}))
        scalars = {key: value for key, value in metrics.items() if key != "step"}
        for tracker in self.trackers:
            tracker.log(scalars, step)
        scores = held_out_scores(self.output_dir, up_to=step)
        held_out = [(at, summary["solved"]) for at, summary in scores]
        for finding in self.watch.check(self.logged, held_out):
            self.notify(f"warning: {finding.message}")

    def write_metrics(self) -> None:
        text = "".join(json.dumps(m) + "\n" for m in self.logged)
        write_text_atomic(self.output_dir / METRICS_FILE, text)

    def read_back(self, step: int) -> None:
        """Resuming at ``step``: the metrics logged up to it."""
        self.logged = [m for m in read_jsonl(self.output_dir / METRICS_FILE) if m["step"] <= step]

    def drop_after(self, step: int) -> None:
        """Resuming at ``step``: the files lose the lines a cut-short attempt logged after it (TensorBoard is
        told when the loop opens it)."""
        self.write_metrics()
        samples_file = self.output_dir / SAMPLES_FILE
        if samples_file.is_file():
            samples = [s for s in read_jsonl(samples_file) if s["step"] <= step]
            write_text_atomic(samples_file, "".join(json.dumps(s) + "\n" for s in samples))

    @contextlib.contextmanager
    def trackers_open(self, step: int) -> Iterator[None]:
        """The trackers ``report_to`` names, open for the loop that continues after ``step`` (TensorBoard
        drops the steps after it that a cut-short attempt had logged)."""
        with trackers_open(self.report_to, self.output_dir, step, self.settings, self.notify) as trackers:
            self.trackers = trackers
            try:
                yield
            finally:
                self.trackers = []


def resume_logs(log: RunLog, state: dict[str, Any], rng: dict[str, Any], ranks: Ranks) -> int:
    """The end of a trainer's resume, once its weights and state are back: the random generators, and the
    logs up to the checkpoint's step (later lines, from the run that was cut short, are dropped). Returns
    the step."""
    restore_rng(rng)
    step = state["step"]
    log.read_back(step)
    ranks.barrier()  # every rank has read the files before the main one rewrites them
    if ranks.is_main:
        log.drop_after(step)
    return step


class Trainer(Protocol):
    """What :func:`run_loop` drives: a GRPO or PPO trainer."""

    step: int
    updated_this_step: bool  # an optimizer update of the current step has changed the weights
    last_batch: ScoredBatch | None  # the batch behind the latest metrics, for samples.jsonl
    log: RunLog
    signals: StopSignals
    checkpoints: Checkpoints

    def train_step(self) -> dict[str, float]: ...

    def save(self, rng_state: dict | None = None, wait: bool = True) -> Path: ...

    def close(self) -> None: ...


def checkpoint_due(config: GRPOConfig, step: int, minutes_since_saved: float, ranks: Ranks) -> bool:
    """Whether to checkpoint after ``step``, before the last (which always saves): save_steps divides it,
    or save_minutes have passed since the last checkpoint (or the loop's start). Every rank gets the same
    answer, though one rank's clock may pass the mark a moment before another's."""
    by_steps = bool(config.save_steps) and step % config.save_steps == 0
    by_time = bool(config.save_minutes) and ranks.any(minutes_since_saved >= config.save_minutes)
    return (by_steps or by_time) and step < config.max_steps


def run_loop(
    trainer: Trainer,
    config: GRPOConfig,
    ranks: Ranks,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, float]]:
    """Run ``trainer`` until ``config.max_steps`` (see the module's docstring); return the logged metrics of
    the whole run, a resumed one included. ``clock`` (seconds) times ``save_minutes``."""
    max_steps, logging_steps = config.max_steps, config.logging_steps
    log, signals, checkpoints = trainer.log, trainer.signals, trainer.checkpoints
    log.output_dir.mkdir(parents=True, exist_ok=True)
    if trainer.step == 0 and ranks.is_main:
        log.start_fresh()

    last_saved_at = clock()

    def save_unless_saved(rng_state: dict | None = None, wait: bool = True) -> None:
        if trainer.step > 0 and checkpoints.saved_step != trainer.step:
            trainer.save(rng_state, wait)

    def interrupted() -> RunInterrupted:
        name = signal.Signals(signals.number).name
        where = checkpoints.directory(checkpoints.saved_step)
        return RunInterrupted(
            signals.number,
            f"stopped by {name} after step {trainer.step}; checkpoint {where}; "
            f"continue with: grpo train --resume {log.output_dir}",
        )

    # (the first rank writes the logs: only it opens the trackers)
    opened = trainer.step < max_steps and ranks.is_main
    trackers = log.trackers_open(trainer.step) if opened else contextlib.nullcontext()
    with signals.installed(), trackers:
        while trainer.step < max_steps:
            rng_at_start = capture_rng()
            try:
                metrics = trainer.train_step()
            except StopNow:
                save_unless_saved(rng_at_start)
                raise interrupted() from None
            except BaseException:
                if not trainer.updated_this_step:  # (not waiting: the other ranks may never get here)
                    save_unless_saved(rng_at_start, wait=False)
                raise
            if trainer.step % logging_steps == 0 or trainer.step == max_steps:
                log.logged.append(metrics)
                if ranks.is_main:
                    log.write(trainer.step, metrics, trainer.last_batch)
            if progress is not None:
                progress(trainer.step, metrics)
            if on_step is not None:
                on_step(trainer.step, metrics)
            if ranks.any(signals.asked):
                signals.number = signals.number or signal.SIGTERM  # another rank was signalled
                trainer.save()
                raise interrupted()
            if checkpoint_due(config, trainer.step, (clock() - last_saved_at) / 60, ranks):
                trainer.save()
                last_saved_at = clock()
        save_unless_saved()
    trainer.close()
    return log.logged
