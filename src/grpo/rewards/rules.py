"""Rule-based rewards: the answer (compared with the row's reference) and the format of a completion."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from grpo.rewards.core import RewardFunc, completion_text, requires_columns

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Free text (the working), then exactly one answer block, then nothing but whitespace.
ANSWER_FORMAT = re.compile(r"(?:(?!<answer>).)*<answer>(?:(?!</?answer>).)+</answer>\s*", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# "1,200" and "-12,345.5" are numbers with thousands separators; "1,2" is not.
THOUSANDS_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


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


@requires_columns("answer")
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


def make_accuracy() -> RewardFunc:
    return accuracy_reward


def make_format() -> RewardFunc:
    return format_reward
