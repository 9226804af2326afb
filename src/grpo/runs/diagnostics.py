"""Signs that a run is going wrong, read from its metrics: reward hacking, runaway completion length,
truncated completions, an exploding KL, entropy collapse, and groups that carry no learning signal.

Each check is a pure function of the logged metrics (the lines of metrics.jsonl, oldest first) and, for
reward hacking, of the held-out scores; it judges the latest steps and returns a :class:`Finding` — one
sentence with the step and the numbers — or None. The trainer prints each finding once, when it appears,
and again only after it has cleared (:class:`Watch`); report.html lists every episode at its top
(:func:`scan`). :func:`held_out_scores` reads the held-out scores a run has written so far.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.runs.layout import EVAL_AFTER_FILE, EVAL_BEFORE_FILE, EVAL_STEP_GLOB, EVAL_STEP_PREFIX

Metrics = Sequence[dict[str, Any]]  # logged lines, oldest first, each with its "step"


HeldOut = Sequence[tuple[int, float]]  # (step, held-out solved rate), oldest first; step 0 = before training


# Logged steps averaged into "now" and "at the start": one step's figures come from a few prompts and are
# noisy; five smooth that out and still react within a few logged steps.
WINDOW = 5


# Reward hacking: the held-out solved rate fell this much (absolute) from its best while the training
# reward rose at least REWARD_RISE. Five points is more than a greedy score on a couple of hundred
# questions moves between neighbouring checkpoints of a healthy run; a rise of 0.05 (a twentieth of one
# reward function's full mark) is more than the noise of a five-step mean.
HELD_OUT_DROP = 0.05


REWARD_RISE = 0.05


# Runaway length: the mean completion length at least doubled since the start, and by at least this many
# tokens (so that 3 → 6 tokens on a short-answer task does not count).
LENGTH_GROWTH = 2.0


LENGTH_GROWTH_MIN_TOKENS = 16


# Truncation: most completions stop at max_completion_length, so their rewards judge unfinished answers.
TRUNCATED_SHARE = 0.5


# KL (per completion token, to the reference): a stable run stays around 0.001–0.1. Half a nat per token
# means the policy's choices differ from the reference's on most tokens. A tenfold jump between two
# consecutive windows is an explosion too, once it matters (above KL_JUMP_FLOOR) and from a KL that had
# settled (at least KL_JUMP_BASE): the KL starts at 0, so its first climb grows by large factors in a healthy
# run (from about 0.005 over its first five steps to 0.1 over the next five, say).
KL_HIGH = 0.5


KL_JUMP = 10.0


KL_JUMP_FLOOR = 0.1


KL_JUMP_BASE = 0.01


# Entropy (nats per completion token; logged when top_entropy_quantile < 1): below the floor the policy
# samples nearly the same tokens every time; a fall to a tenth of its start is a collapse in progress.
ENTROPY_FLOOR = 0.05


ENTROPY_DROP = 0.1


# Groups whose completions all got the same reward have zero advantages: no learning signal. A healthy run
# that nearly solves its task has a third to a half of such groups; three in four means the step is mostly
# wasted.
ZERO_STD_SHARE = 0.75


@dataclass(frozen=True)
class Finding:
    """One warning: its kind (one per check), the logged step it was seen at, and a sentence for people.
    ``cleared_at`` is the first logged step at which it no longer held (set by :func:`scan`)."""

    kind: str
    step: int
    message: str
    cleared_at: int | None = None


def _values(lines: Metrics, key: str) -> list[float]:
    out = []
    for line in lines:
        value = line.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append(float(value))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _recent(history: Metrics, key: str) -> float | None:
    return _mean(_values(history[-WINDOW:], key))


def _early(history: Metrics, key: str) -> float | None:
    """The first window's mean, when the history is long enough for it not to overlap the recent one."""
    return _mean(_values(history[:WINDOW], key)) if len(history) >= 2 * WINDOW else None


def _step(history: Metrics) -> int:
    return int(history[-1]["step"])


def _latest(history: Metrics) -> str:
    """What "recent" covers, in words: the last logged step, or the last few."""
    n = min(WINDOW, len(history))
    return "the last logged step" if n == 1 else f"the last {n} logged steps"


def _reward_at(history: Metrics, step: int) -> float | None:
    """The mean training reward of the logged steps up to ``step`` (the first ones for step 0)."""
    end = bisect.bisect_right(history, step, key=lambda m: m["step"])  # the history is in step order
    return _mean(_values(history[max(0, end - WINDOW) : end] or history[:WINDOW], "reward"))


def reward_hacking(history: Metrics, held_out: HeldOut) -> Finding | None:
    """The training reward rose while the held-out solved rate fell from its best: the policy may be
    learning to please the reward functions rather than to do the task."""
    if not history or len(held_out) < 2:
        return None
    *earlier, (step, score) = held_out
    best_step, best = max(earlier, key=lambda point: (point[1], -point[0]))  # the best, earliest on ties
    if best - score < HELD_OUT_DROP:
        return None
    then, now = _reward_at(history, best_step), _reward_at(history, step)
    if then is None or now is None or now - then < REWARD_RISE:
        return None
    return Finding(
        "reward_hacking",
        _step(history),
        f"step {step}: the held-out solved rate fell from {best:.1%} (step {best_step}) to {score:.1%} while "
        f"the training reward rose from {then:.2f} to {now:.2f}: the policy may be exploiting the reward "
        "functions rather than learning the task (reward hacking).",
    )


def length_runaway(history: Metrics) -> Finding | None:
    """The mean completion length at least doubled since the start."""
    early, recent = _early(history, "completions/mean_length"), _recent(history, "completions/mean_length")
    if early is None or recent is None:
        return None
    if recent < LENGTH_GROWTH * early or recent - early < LENGTH_GROWTH_MIN_TOKENS:
        return None
    return Finding(
        "length_runaway",
        _step(history),
        f"step {_step(history)}: completions grew from {early:.0f} to {recent:.0f} tokens on average "
        f"({recent / max(early, 1e-9):.1f}×) since the start: check that no reward favours length itself.",
    )


def truncation(history: Metrics) -> Finding | None:
    """Most completions were cut at max_completion_length."""
    recent = _recent(history, "completions/truncated_ratio")
    if recent is None or recent < TRUNCATED_SHARE:
        return None
    return Finding(
        "truncation",
        _step(history),
        f"step {_step(history)}: {recent:.0%} of the completions of {_latest(history)} were cut at "
        "max_completion_length, so their rewards judge unfinished answers: raise max_completion_length or "
        "reward shorter answers.",
    )


def kl_explosion(history: Metrics) -> Finding | None:
    """The KL to the reference is high, or jumped tenfold from the previous window."""
    recent = _recent(history, "kl")
    if recent is None:
        return None
    step = _step(history)
    if recent >= KL_HIGH:
        return Finding(
            "kl_explosion",
            step,
            f"step {step}: the KL to the reference averaged {recent:.3f} per token over {_latest(history)} "
            f"(above {KL_HIGH}): the policy has moved far from the reference; raise beta or lower "
            "learning_rate.",
        )
    previous = _mean(_values(history[-2 * WINDOW : -WINDOW], "kl")) if len(history) > WINDOW else None
    if previous is not None and previous >= KL_JUMP_BASE and recent >= max(KL_JUMP_FLOOR, KL_JUMP * previous):
        return Finding(
            "kl_explosion",
            step,
            f"step {step}: the KL to the reference jumped from {previous:.4f} to {recent:.4f} per token "
            f"({recent / previous:.0f}×) between the last two windows of {WINDOW} logged steps: the updates "
            "are too large; lower learning_rate or raise beta.",
        )
    return None


def entropy_collapse(history: Metrics) -> Finding | None:
    """The policy's entropy per token is near zero, or fell to a tenth of its start."""
    recent, early = _recent(history, "entropy/mean"), _early(history, "entropy/mean")
    if recent is None:
        return None
    step = _step(history)
    if recent < ENTROPY_FLOOR:
        return Finding(
            "entropy_collapse",
            step,
            f"step {step}: the policy's entropy averaged {recent:.3f} nats per token over "
            f"{_latest(history)} (below {ENTROPY_FLOOR}): it samples nearly the same completion every time, "
            "so groups stop differing; lower learning_rate or raise temperature.",
        )
    if early is not None and early > 0 and recent < ENTROPY_DROP * early:
        return Finding(
            "entropy_collapse",
            step,
            f"step {step}: the policy's entropy fell from {early:.3f} to {recent:.3f} nats per token "
            f"({recent / early:.0%} of its start): it is collapsing onto a few completions; lower "
            "learning_rate or raise temperature.",
        )
    return None


def no_signal(history: Metrics) -> Finding | None:
    """Most groups had all their completions rewarded alike, so their advantages are zero."""
    recent = _recent(history, "frac_reward_zero_std")
    if recent is None or recent < ZERO_STD_SHARE:
        return None
    reward = _recent(history, "reward")
    at = f" (mean reward {reward:.2f})" if reward is not None else ""
    return Finding(
        "no_signal",
        _step(history),
        f"step {_step(history)}: in {recent:.0%} of the groups of {_latest(history)} every completion got "
        f"the same reward{at}, so they carry no learning signal: the task is too easy or too hard for the "
        "model as it is now.",
    )


CHECKS = (length_runaway, truncation, kl_explosion, entropy_collapse, no_signal)
"""The checks of the metrics alone; :func:`reward_hacking` also needs the held-out scores."""


def diagnose(history: Metrics, held_out: HeldOut = ()) -> list[Finding]:
    """Every check's finding about the latest logged step."""
    if not history:
        return []
    found = [reward_hacking(history, held_out), *(check(history) for check in CHECKS)]
    return [finding for finding in found if finding is not None]


class Watch:
    """Findings as a run goes on: :meth:`check` returns the new ones only, so that each kind of warning is
    shown once and again only after it has cleared."""

    def __init__(self) -> None:
        self.active: set[str] = set()

    def check(self, history: Metrics, held_out: HeldOut = ()) -> list[Finding]:
        found = diagnose(history, held_out)
        new = [finding for finding in found if finding.kind not in self.active]
        self.active = {finding.kind for finding in found}
        return new


def scan(history: Metrics, held_out: HeldOut = ()) -> list[Finding]:
    """Every episode of every warning over a whole run, as the trainer would have shown them step by step:
    the finding when it first appeared, with the step at which it cleared (None: it still held at the end).
    A held-out score counts from the logged step it was taken at."""
    watch = Watch()
    episodes: list[Finding] = []
    open_at: dict[str, int] = {}  # kind → index in episodes
    for end in range(1, len(history) + 1):
        prefix = history[:end]
        step = _step(prefix)
        for finding in watch.check(prefix, [point for point in held_out if point[0] <= step]):
            open_at[finding.kind] = len(episodes)
            episodes.append(finding)
        for kind in [kind for kind in open_at if kind not in watch.active]:
            index = open_at.pop(kind)
            episodes[index] = dataclasses.replace(episodes[index], cleared_at=step)
    return episodes


def held_out_scores(
    run_dir: Path, up_to: int, after_at: int | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """The held-out summaries a run has written for steps up to ``up_to``, as (step, summary), oldest
    first: eval_before.json at step 0, eval_stepN.json at N, and eval_after.json at ``after_at`` when given
    (the step the run ended at; during training that file is absent or a previous attempt's).
    Unreadable files are left out."""
    points: list[tuple[int, Path]] = [(0, run_dir / EVAL_BEFORE_FILE)]
    for path in run_dir.glob(EVAL_STEP_GLOB):
        number = path.stem.removeprefix(EVAL_STEP_PREFIX)
        if number.isdigit() and int(number) <= up_to:
            points.append((int(number), path))
    if after_at is not None:
        points.append((after_at, run_dir / EVAL_AFTER_FILE))
    scores = []
    for step, path in sorted(points, key=lambda point: point[0]):
        try:
            stat = path.stat()
        except OSError:
            continue
        summary = _eval_summary(str(path), stat.st_mtime_ns, stat.st_size)
        if summary is not None:
            scores.append((step, summary))
    return scores


@functools.lru_cache(maxsize=256)
def _eval_summary(path: str, mtime_ns: int, size: int) -> dict[str, Any] | None:
    """An evaluation file's summary, read once per version of the file (the trainer asks at every logged
    step, and the files hold every completion)."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("solved"), (int, float)):
        return None
    return summary
