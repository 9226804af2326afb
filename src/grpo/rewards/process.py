"""Process supervision: split completions into steps, score every step, and find each token's step.

A completion's steps end at each ``delimiter`` (default: a newline) or, when a ``pattern`` is given, at each
match of that regex; the text after the last boundary is the last step (a completion always has at least
one). Every reward function scores every step, in one of two ways:

- a function marked with :func:`scores_steps` receives ``steps`` (a list of step texts per completion)
  besides the usual arguments and returns one list of scores per completion, one score per step;
- any other function (a rule, a learned reward model, a user's function) scores each step's *prefix*: the
  completion up to and including that step, as if it were the whole completion — the usual way to use an
  outcome reward model as a process one.

The weighted sum of the functions gives each step's reward; :func:`grpo.algo.advantages.process_advantages`
turns those into per-token advantages (DeepSeekMath §4.1.3).
"""

from __future__ import annotations

import bisect
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grpo.data.prompts import Row, reward_columns
from grpo.errors import RewardError
from grpo.rewards.core import Reward, RewardFunc, call_reward, groups_of, score

# A step is a span [start, end) of the completion's text; consecutive spans cover the whole text.
Span = tuple[int, int]


def scores_steps(func: RewardFunc) -> RewardFunc:
    """Mark a reward function that scores steps itself: ``f(prompts, completions, steps, **columns)``
    returns, per completion, a list with one score per step."""
    func.scores_steps = True
    return func


def split_steps(text: str, delimiter: str = "\n", pattern: str | None = None) -> list[Span]:
    """The steps of ``text`` as character spans; each boundary (delimiter or match) ends its step."""
    ends = (
        [m.end() for m in re.finditer(pattern, text) if m.end() > 0]
        if pattern
        else [m.end() for m in re.finditer(re.escape(delimiter), text)]
    )
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    ends = sorted(set(ends))
    starts = [0, *ends[:-1]]
    # A step of nothing but whitespace (e.g. a blank line) joins the step before it.
    spans: list[Span] = []
    for start, end in zip(starts, ends):
        if spans and not text[start:end].strip():
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def token_steps(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, spans: list[Span]) -> torch.Tensor:
    """The step each completion token belongs to (-1 for padding): the step in which the token's text starts,
    found by decoding the completion's prefixes the way the completion's text was decoded."""
    real = ids[mask.bool()].tolist()
    starts = [
        len(text)
        for text in tokenizer.batch_decode([real[:k] for k in range(len(real))], skip_special_tokens=True)
    ]
    ends = [end for _, end in spans]
    steps = torch.full(ids.shape, -1, dtype=torch.long)
    positions = mask.bool().nonzero().flatten()
    for position, start in zip(positions.tolist(), starts):
        steps[position] = min(bisect.bisect_right(ends, start), len(spans) - 1)
    return steps


@dataclass
class StepScores:
    """Step rewards of a batch: the weighted sum per step, each function's mean over a completion's steps
    (N, F) for the metrics, and the failures per function."""

    step_rewards: list[list[float]]
    per_function: torch.Tensor
    failures: dict[str, int]
    skip_rows: torch.Tensor | None  # (N,) bool: the groups the "skip_group" policy leaves out


def score_steps(
    rewards: Sequence[Reward],
    rows: Sequence[Row],
    texts: list[str],
    spans: list[list[Span]],
    *,
    on_failure: str = "stop",
    timeout: float | None = None,
) -> StepScores:
    """Score every step of ``texts`` (``len(texts) // len(rows)`` consecutive completions per row) with every
    reward function, as the module's docstring says; a None (not applicable) adds nothing to a step."""
    per_row = len(texts) // len(rows)
    chat = [isinstance(rows[i // per_row]["prompt"], list) for i in range(len(texts))]
    prompts = [row["prompt"] for row in rows for _ in range(per_row)]
    columns = reward_columns(rows, per_row)
    step_texts = [[text[a:b] for a, b in spans_i] for text, spans_i in zip(texts, spans)]
    counts = [len(s) for s in spans]
    owner = [i for i, count in enumerate(counts) for _ in range(count)]  # completion of each flat step

    def shaped(i: int, text: str) -> Any:
        return [{"role": "assistant", "content": text}] if chat[i] else text

    prefix_rewards = [r for r in rewards if not getattr(r.func, "scores_steps", False)]
    flat = torch.zeros(len(owner), len(rewards))
    failures: dict[str, int] = {}
    failed = torch.zeros(len(texts), dtype=torch.bool)
    if prefix_rewards:
        prefixes = [
            shaped(i, texts[i][: spans[i][j][1]]) for i in range(len(texts)) for j in range(counts[i])
        ]
        scored = score(
            prefix_rewards,
            [prompts[i] for i in owner],
            prefixes,
            {name: [values[i] for i in owner] for name, values in columns.items()},
            on_failure="zero" if on_failure == "skip_group" else on_failure,
            timeout=timeout,
        )
        failures.update(scored.failures)
        for step in scored.failed_rows.nonzero().flatten().tolist():
            failed[owner[step]] = True
        for column, reward in enumerate(prefix_rewards):
            flat[:, rewards.index(reward)] = scored.values[:, column]
    for reward in rewards:
        if not getattr(reward.func, "scores_steps", False):
            continue
        column = rewards.index(reward)
        values = _step_scores(
            reward,
            prompts,
            [shaped(i, t) for i, t in enumerate(texts)],
            step_texts,
            columns,
            timeout,
            on_failure,
        )
        if values is None:
            failures[reward.name] = len(texts)
            failed[:] = True
            continue
        flat[:, column] = torch.tensor([v for per_completion in values for v in per_completion])
    weights = torch.tensor([r.weight for r in rewards])
    step_sum = torch.nansum(flat * weights, dim=1).tolist()
    step_rewards, per_function, start = [], [], 0
    for count in counts:
        step_rewards.append(step_sum[start : start + count])
        per_function.append(flat[start : start + count].nanmean(dim=0))
        start += count
    skip_rows = groups_of(failed, per_row) if on_failure == "skip_group" else None
    return StepScores(step_rewards, torch.stack(per_function), failures, skip_rows)


def _step_scores(
    reward: Reward,
    prompts: list,
    completions: list,
    steps: list[list[str]],
    columns: dict[str, list[Any]],
    timeout: float | None,
    on_failure: str,
) -> list[list[float]] | None:
    """A step-scoring function's output, checked: one finite number (or None) per step."""
    try:
        values = call_reward(
            reward.func, timeout, prompts=prompts, completions=completions, steps=steps, **columns
        )
        if not isinstance(values, Sequence) or len(values) != len(steps):
            raise RewardError(
                f"reward function {reward.name!r} must return one list of step scores per completion"
            )
        checked = []
        for i, (per_step, expected) in enumerate(zip(values, steps)):
            if not isinstance(per_step, Sequence) or len(per_step) != len(expected):
                raise RewardError(
                    f"reward function {reward.name!r} returned {per_step!r} for completion {i}, which has "
                    f"{len(expected)} steps"
                )
            unusable = [
                v
                for v in per_step
                if v is not None
                and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v))
            ]
            if unusable:
                raise RewardError(
                    f"reward function {reward.name!r} returned {unusable[0]!r} for completion {i}"
                )
            checked.append([math.nan if v is None else float(v) for v in per_step])
        return checked
    except RewardError:
        if on_failure == "stop":
            raise
        return None
    except Exception as error:
        if on_failure == "stop":
            raise RewardError(
                f"reward function {reward.name!r} raised {type(error).__name__}: {error}"
            ) from None
        return None
