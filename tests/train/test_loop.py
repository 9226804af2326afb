"""When the loop checkpoints: every save_steps steps, after save_minutes of wall time, and at the end; the
same decision on every rank. A stand-in trainer and clock, so that minutes pass without waiting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from grpo.config.grpo import GRPOConfig
from grpo.train.distributed import Ranks
from grpo.train.loop import Checkpoints, StopSignals, checkpoint_due, run_loop


class Clock:
    """Seconds that pass only when a step says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Log:
    """What the loop needs of a RunLog, writing nothing."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.logged: list[dict[str, float]] = []

    def start_fresh(self) -> None:
        pass

    def write(self, step: int, metrics: dict[str, float], batch: object) -> None:
        pass

    @contextlib.contextmanager
    def trackers_open(self, step: int) -> Iterator[None]:
        yield


class StepsThatTakeMinutes:
    """A trainer whose steps each take ``minutes`` on ``clock``; it remembers the steps it saved."""

    def __init__(self, output_dir: Path, clock: Clock, minutes: list[float]):
        self.step, self.updated_this_step, self.last_batch = 0, False, None
        self.log = Log(output_dir)
        self.signals = StopSignals(notify=print)
        self.checkpoints = Checkpoints(output_dir, save_total_limit=2, ranks=Ranks())
        self.clock, self.minutes = clock, minutes
        self.saved: list[int] = []

    def train_step(self) -> dict[str, float]:
        self.clock.now += 60 * self.minutes[self.step]
        self.step += 1
        return {"step": self.step}

    def save(self, rng_state: dict | None = None, wait: bool = True) -> Path:
        self.saved.append(self.step)
        self.checkpoints.saved_step = self.step
        return self.checkpoints.directory(self.step)

    def close(self) -> None:
        pass


def saved_steps(tmp_path: Path, minutes: list[float], **settings: float) -> list[int]:
    config = GRPOConfig(max_steps=len(minutes), **settings)
    clock = Clock()
    trainer = StepsThatTakeMinutes(tmp_path, clock, minutes)
    run_loop(trainer, config, Ranks(), clock=clock)
    return trainer.saved


def test_the_defaults_checkpoint_every_10_steps_and_every_10_minutes():
    defaults = GRPOConfig()
    assert (defaults.save_steps, defaults.save_minutes) == (10, 10.0)


def test_every_save_steps_steps_and_at_the_end(tmp_path):
    assert saved_steps(tmp_path, [0.1] * 8, save_steps=3, save_minutes=0) == [3, 6, 8]


def test_after_save_minutes_of_steps_counted_from_the_last_checkpoint(tmp_path):
    # 4-minute steps: 12 minutes after the start at step 3, 12 after that checkpoint at step 6.
    assert saved_steps(tmp_path, [4.0] * 8, save_steps=0, save_minutes=10) == [3, 6, 8]


def test_a_slow_step_is_saved_at_once_and_the_minutes_count_again_from_there(tmp_path):
    minutes = [1.0, 11.0, 1.0, 1.0, 9.0, 1.0]
    assert saved_steps(tmp_path, minutes, save_steps=0, save_minutes=10) == [2, 5, 6]


def test_steps_and_minutes_together_whichever_comes_first(tmp_path):
    minutes = [1.0, 1.0, 1.0, 12.0, 1.0, 1.0, 1.0]
    assert saved_steps(tmp_path, minutes, save_steps=3, save_minutes=10) == [3, 4, 6, 7]


def test_with_both_off_only_the_end_is_saved(tmp_path):
    assert saved_steps(tmp_path, [30.0] * 4, save_steps=0, save_minutes=0) == [4]


class AnotherRankPassedTheMark(Ranks):
    """Two ranks, the other of which says yes to every question put to all of them."""

    def any(self, flag: bool) -> bool:
        return True


@pytest.mark.parametrize("ranks, due", [(Ranks(), False), (AnotherRankPassedTheMark(0, 2), True)])
def test_every_rank_saves_when_any_rank_has_reached_save_minutes(ranks, due):
    config = GRPOConfig(max_steps=10, save_steps=0, save_minutes=10)
    assert checkpoint_due(config, step=1, minutes_since_saved=9.9, ranks=ranks) is due


def test_the_last_step_is_left_to_the_end_of_the_loop():
    config = GRPOConfig(max_steps=10, save_steps=5, save_minutes=10)
    assert checkpoint_due(config, step=5, minutes_since_saved=0.0, ranks=Ranks())
    assert not checkpoint_due(config, step=10, minutes_since_saved=60.0, ranks=Ranks())
