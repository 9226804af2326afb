"""Reward functions with TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``.

Built-ins are found by name; users' own by ``module:function`` or ``path/to/file.py:function``. Completions
reach a function the way TRL passes them: strings for string prompts, ``[{"role": "assistant", "content":
text}]`` for chat prompts. ``None`` means "not applicable to this row" and adds nothing to the sum.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch

from grpo.data import Row, reward_columns
from grpo.errors import RewardError

RewardFunc = Callable[..., Sequence[float | None]]

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Free text (the working), then exactly one answer block, then nothing but whitespace.
ANSWER_FORMAT = re.compile(r"(?:(?!<answer>).)*<answer>(?:(?!</?answer>).)+</answer>\s*", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# "1,200" and "-12,345.5" are numbers with thousands separators; "1,2" is not.
THOUSANDS_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise RewardError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


def extract_answer(text: str) -> str | None:
    """The content of the last ``<answer>…</answer>`` block, stripped; None when there is none."""
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def answers_match(predicted: str, reference: str) -> bool:
    """Numbers compare exactly by value ("12" = "12.0", "1,200" = "1200"); other text after normalising."""
    predicted, reference = predicted.strip(), str(reference).strip()
    as_number = [p.replace(",", "") if THOUSANDS_NUMBER.fullmatch(p) else p for p in (predicted, reference)]
    if all(NUMBER.fullmatch(p) for p in as_number):
        return Decimal(as_number[0]) == Decimal(as_number[1])
    return " ".join(predicted.lower().split()) == " ".join(reference.lower().split())


def accuracy_reward(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
    """1.0 when the last ``<answer>`` block holds the row's ``answer``, else 0.0."""
    scores = []
    for completion, reference in zip(completions, answer):
        predicted = extract_answer(completion_text(completion))
        scores.append(float(predicted is not None and answers_match(predicted, reference)))
    return scores


def format_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """1.0 when the completion is working followed by exactly one non-empty ``<answer>…</answer>`` and
    nothing after it, else 0.0."""
    texts = [completion_text(c).strip() for c in completions]
    return [float(ANSWER_FORMAT.fullmatch(t) is not None and bool(extract_answer(t))) for t in texts]


BUILTIN_REWARDS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward}


def load_reward_func(spec: str) -> RewardFunc:
    """A built-in by name, ``package.module:function``, or ``path/to/file.py:function``."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise RewardError(
            f"unknown reward function {spec!r}: use a built-in ({', '.join(BUILTIN_REWARDS)}), "
            "'module:function' or 'path/to/file.py:function'"
        )
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward function {spec!r}: file {path} not found")
        module_name = f"grpo_user_reward_{abs(hash(path.resolve()))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise RewardError(f"reward function {spec!r}: importing {path} failed: {error}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as error:  # a missing module, or one whose own code fails on import
            raise RewardError(f"reward function {spec!r}: cannot import {target} ({error})") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise RewardError(f"reward function {spec!r}: {target} has no function {name!r}")
    return func


@dataclass
class Reward:
    """A named reward function and its weight in the sum."""

    name: str
    func: RewardFunc
    weight: float = 1.0


def build_rewards(specs: Sequence[str], weights: Sequence[float] | None = None) -> list[Reward]:
    weights = list(weights) if weights is not None else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise RewardError(f"{len(weights)} reward weights for {len(specs)} reward functions")
    return [Reward(spec.rsplit(":", 1)[-1], load_reward_func(spec), w) for spec, w in zip(specs, weights)]


def score(
    rewards: Sequence[Reward], prompts: list, completions: list, columns: dict[str, list[Any]], **extra: Any
) -> torch.Tensor:
    """Scores of every function, shape (N, F); NaN where a function returned None. Fails on bad output."""
    per_func = []
    for reward in rewards:
        try:
            values = reward.func(prompts=prompts, completions=completions, **columns, **extra)
        except RewardError:
            raise
        except Exception as error:
            raise RewardError(
                f"reward function {reward.name!r} raised {type(error).__name__}: {error}"
            ) from None
        per_func.append(_check_output(reward.name, values, len(completions)))
    return torch.tensor(per_func, dtype=torch.float32).T.reshape(len(completions), len(rewards))


def score_groups(
    rewards: Sequence[Reward], rows: Sequence[Row], texts: list[str], **extra: Any
) -> torch.Tensor:
    """Scores (N, F) of ``len(texts) // len(rows)`` consecutive completions per row: each row's prompt and
    columns repeated for its completions, and completions shaped as TRL passes them — chat messages for
    chat prompts, strings for string prompts."""
    per_row = len(texts) // len(rows)
    completions = [
        [{"role": "assistant", "content": text}] if isinstance(rows[i // per_row]["prompt"], list) else text
        for i, text in enumerate(texts)
    ]
    prompts = [row["prompt"] for row in rows for _ in range(per_row)]
    return score(rewards, prompts, completions, reward_columns(rows, per_row), **extra)


def _check_output(name: str, values: Any, expected: int) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}, not a list") from None
    if len(values) != expected:
        raise RewardError(
            f"reward function {name!r} returned {len(values)} values for {expected} completions"
        )
    checked = []
    for row, value in enumerate(values):
        if value is None:
            checked.append(math.nan)
            continue
        # numbers.Real admits NumPy scalars, which TRL users' functions often return.
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward function {name!r} returned {value!r} for completion {row}")
        checked.append(float(value))
    return checked


def weighted_sum(scores: torch.Tensor, rewards: Sequence[Reward]) -> torch.Tensor:
    """The total reward per completion; a None (NaN) score adds nothing."""
    weights = torch.tensor([r.weight for r in rewards], dtype=scores.dtype)
    return torch.nansum(scores * weights, dim=1)
