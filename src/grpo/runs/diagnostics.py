"""Signs that a run is going wrong, read from its metrics: reward hacking, runaway completion length,
truncated completions, an exploding KL, entropy collapse, and groups that carry no learning signal.

Each check is a pure function of the logged metrics (the lines of metrics.jsonl, oldest first) and, for
reward hacking, of the held-out scores; it judges the latest steps and returns a :class:`Finding` — one
sentence with the step and the numbers — or None. The trainer prints each finding once, when it appears,
and again only after it has cleared (:class:`Watch`); report.html lists every episode at its top
(:func:`scan`). :func:`held_out_scores` reads the held-out scores a run has written so far, each over the
same held-out rows.
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

from grpo.agents.episode import EpisodeRecord, episode_metrics
from grpo.runs.layout import EVAL_AFTER_FILE, EVAL_BEFORE_FILE, EVAL_STEP_GLOB, EVAL_STEP_PREFIX

Metrics = Sequence[dict[str, Any]]  # logged lines, oldest first, each with its "step"


HeldOut = Sequence[tuple[int, float]]  # (step, held-out solved rate), oldest first; step 0 = before training


# Logged steps averaged into "now" and "at the start": one step's figures come from a few prompts and are
# noisy; five smooth that out and still react within a few logged steps.
WINDOW = 5


# Reward hacking: the held-out solved rate fell this much (absolute) from its best while the training
# reward rose at least REWARD_RISE. The checks during training score few rows (eval_check_samples, 50 by
# default), and every point of the series is taken on the same rows (held_out_scores), so two points differ
# by the rows whose greedy answer flipped between them. They flip both ways in a healthy run: in the default
# run, 7 of the first 50 were lost and 8 gained between the checks at steps 10 and 20. With k flips the net
# change has a standard deviation of √k rows when nothing changed on the whole, √15 ≈ 4 of 50 (8 points)
# here, so a fall counts from 15 points (8 rows of 50), about twice that; hacking, once it sets in, costs
# far more (the answers stop being answers). A rise of 0.05 (a twentieth of one reward function's full
# mark) of the training reward at the same time is then no longer noise.
HELD_OUT_DROP = 0.15


REWARD_RISE = 0.05


# Runaway length: the mean completion length at least doubled since the start, and by at least this many
# tokens (so that 3 → 6 tokens on a short-answer task does not count).
LENGTH_GROWTH = 2.0


LENGTH_GROWTH_MIN_TOKENS = 16


# Truncation: most completions stop at max_completion_length, so their rewards judge unfinished answers.
TRUNCATED_SHARE = 0.5


# KL (per completion token, to the reference): a stable run stays around 0.001–0.3 (the default run
# plateaus near 0.2). Half a nat per token means the policy's choices differ from the reference's on most
# tokens. A tenfold jump between two consecutive windows is an explosion too, once it matters (to at least
# KL_JUMP_FLOOR), from a KL that is not negligible (at least KL_JUMP_BASE) and that had settled: the window
# before the jump grew at most KL_SETTLED-fold over the one before it. The KL starts at exactly 0 and its
# first climb multiplies it by ten or more per window in a healthy run (the default run: 0.011 over steps
# 1–5, 0.12 over 6–10, then about 0.2 to the end), so a jump counts only as a departure from a plateau;
# an explosion during the first climb shows as a KL above KL_HIGH.
KL_HIGH = 0.5


KL_JUMP = 10.0


KL_JUMP_FLOOR = 0.1


KL_JUMP_BASE = 0.01


KL_SETTLED = 2.0


# Entropy (nats per completion token): SAMPLED_ENTROPY, logged at every step, is the mean −log π of the
# sampled tokens, a Monte-Carlo estimate whose expectation is the entropy of the sampling distribution (at
# its temperature; under top_p/top_k a cross-entropy a little above it: step_metrics.sampled_entropy),
# averaged here over a window of thousands of tokens; EXACT_ENTROPY, logged when top_entropy_quantile < 1,
# is read instead where present. The same thresholds hold for both: below the floor the policy samples
# nearly the same tokens every time (near zero the estimate is exact, as every sampled token has π ≈ 1);
# a fall to a tenth of its start is a collapse in progress. Neither counts once the run has learned (below).
SAMPLED_ENTROPY = "entropy"


EXACT_ENTROPY = "entropy/mean"


ENTROPY_FLOOR = 0.05


ENTROPY_DROP = 0.1


# Groups whose completions all got the same reward have zero advantages: no learning signal. A healthy run
# that nearly solves its task has a third to a half of such groups; three in four means the step is mostly
# wasted.
ZERO_STD_SHARE = 0.75


# A run that has learned its task ends with groups that score alike and a near-deterministic policy, because
# it solves its prompts the same way every time: the default run ends with 75–100% of its groups alike and
# 0.02–0.06 nats per token (from 0.65 at the start), most of its completions solved, as its held-out score
# goes from 19.5% to 88.5%. That is success, not the failure no_signal and entropy_collapse warn of, which
# leaves groups alike before the prompts are solved. A run has *learned* when its reward rose at least
# LEARNED_RISE since the start (a quarter of one reward function's full mark: far above the noise of the
# reward once most groups score alike) and at least SOLVED_SHARE of its recent completions are solved (the
# logged ``solved``: full marks from every reward; runs from before it was logged are judged on the rise).
LEARNED_RISE = 0.25


SOLVED_SHARE = 0.5


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
    if round(best - score, 9) < HELD_OUT_DROP:  # (rounded: 0.6 − 0.5 is 0.0999… in floating point)
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
    """The KL to the reference is high, or jumped tenfold from the previous window after it had settled."""
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
    if len(history) < 3 * WINDOW:
        return None
    before = _mean(_values(history[-3 * WINDOW : -2 * WINDOW], "kl"))
    previous = _mean(_values(history[-2 * WINDOW : -WINDOW], "kl"))
    if before is None or previous is None or previous < KL_JUMP_BASE or previous > KL_SETTLED * before:
        return None  # negligible, or still in its first climb
    if recent >= max(KL_JUMP_FLOOR, KL_JUMP * previous):
        return Finding(
            "kl_explosion",
            step,
            f"step {step}: the KL to the reference jumped from {previous:.4f} to {recent:.4f} per token "
            f"({recent / previous:.0f}×) between the last two windows of {WINDOW} logged steps: the updates "
            "are too large; lower learning_rate or raise beta.",
        )
    return None


def _learned(history: Metrics) -> bool:
    """Whether the run has learned its task (see LEARNED_RISE): its reward rose since the start, and most
    of its recent completions are solved where the run logs that share."""
    reward, start = _recent(history, "reward"), _early(history, "reward")
    if reward is None or start is None or reward - start < LEARNED_RISE:
        return False
    solved = _recent(history, "solved")
    return solved is None or solved >= SOLVED_SHARE


def _entropy_key(history: Metrics) -> str:
    """The exact entropy where the run logs it (top_entropy_quantile < 1), else the estimate from the
    sampled tokens that every step logs."""
    return EXACT_ENTROPY if any(EXACT_ENTROPY in line for line in history) else SAMPLED_ENTROPY


def entropy_collapse(history: Metrics) -> Finding | None:
    """The policy's entropy per token is near zero, or fell to a tenth of its start, before the run has
    learned its prompts (see :func:`_learned`)."""
    key = _entropy_key(history)
    recent, early = _recent(history, key), _early(history, key)
    if recent is None or _learned(history):
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
    """Most groups had all their completions rewarded alike, so their advantages are zero, before the run
    has learned its prompts (see :func:`_learned`)."""
    recent = _recent(history, "frac_reward_zero_std")
    if recent is None or recent < ZERO_STD_SHARE:
        return None
    if _learned(history):
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

    Every summary is over the same rows, so that the series compares like with like: the checks during
    training score the first eval_check_samples held-out rows, before and after the first eval_max_samples,
    and a file that scored more rows than the fewest any of them did is summarised again over its first
    rows from its per-row records (``rows``, ``solved`` and each ``reward/<name>``). Unreadable files are
    left out."""
    points: list[tuple[int, Path]] = [(0, run_dir / EVAL_BEFORE_FILE)]
    for path in run_dir.glob(EVAL_STEP_GLOB):
        number = path.stem.removeprefix(EVAL_STEP_PREFIX)
        if number.isdigit() and int(number) <= up_to:
            points.append((int(number), path))
    if after_at is not None:
        points.append((after_at, run_dir / EVAL_AFTER_FILE))
    evaluations = []
    for step, path in sorted(points, key=lambda point: point[0]):
        try:
            stat = path.stat()
        except OSError:
            continue
        evaluation = _eval_file(str(path), stat.st_mtime_ns, stat.st_size)
        if evaluation is not None:
            evaluations.append((step, evaluation))
    counts = [_rows_scored(summary, records) for _, (summary, records) in evaluations]
    shared_rows = min((count for count in counts if count), default=0)  # (0: a file that does not say)
    return [
        (step, _over_first_rows(summary, records, shared_rows)) for step, (summary, records) in evaluations
    ]


def _rows_scored(summary: dict[str, Any], records: tuple[dict, ...]) -> int:
    """The held-out rows an evaluation file scored: its summary's count, else its per-row records'."""
    rows = summary.get("rows")
    return int(rows) if _is_score(rows) else len(records)


def _over_first_rows(summary: dict[str, Any], records: tuple[dict, ...], rows: int) -> dict[str, Any]:
    """An evaluation's summary over its first ``rows`` records: as written when it scored no more (or
    holds no records to summarise again)."""
    if not 0 < rows < len(records):  # (a summary without records stays as written)
        return summary
    first = records[:rows]
    solved = [float(flag) for record in first for flag in record["solved"]]
    restricted: dict[str, Any] = {
        "rows": float(rows),
        "samples_per_row": summary.get("samples_per_row", 1.0),
        "solved": sum(solved) / len(solved),
    }
    for name in first[0]["scores"]:
        scores = [v for record in first for v in record["scores"].get(name, ()) if _is_score(v)]
        restricted[f"reward/{name}"] = sum(scores) / len(scores) if scores else math.nan
    if all(isinstance(record.get("trajectories"), list) for record in first):  # multi-turn episodes
        try:
            episodes = [EpisodeRecord(**fields) for record in first for fields in record["trajectories"]]
            restricted.update(episode_metrics(episodes))
        except (TypeError, ValueError):  # (a damaged file: its episodes are not summarised)
            pass
    return restricted


def _is_score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.lru_cache(maxsize=32)
def _eval_file(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], tuple[dict, ...]] | None:
    """An evaluation file's summary and per-row records, read once per version of the file (the trainer
    asks at every logged step, and the files hold every completion). Records that do not hold a list of
    solved flags and a mapping of scores are not kept (nor, then, used to summarise the file again)."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        summary, records = content["summary"], content.get("rows", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("solved"), (int, float)):
        return None
    if not (isinstance(records, list) and all(_is_record(record) for record in records)):
        records = []
    return summary, tuple(records)


def _is_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("solved"), list)
        and len(record["solved"]) > 0
        and isinstance(record.get("scores"), dict)
        and all(isinstance(values, list) for values in record["scores"].values())
    )
