"""The arithmetic task as `grpo sft` demonstrations and as preference pairs: right answers in the asked format
that the built-in rewards give full marks, rejected answers that never get them, the loaders that return
them, and held-out splits that share no question with training."""

from __future__ import annotations

import re

import pytest

from grpo.data.preferences import check_pair, load_pairs
from grpo.data.sft import check_sft_row, load_sft_rows
from grpo.data.tasks import DEMONSTRATIONS, PAIRS, arithmetic, arithmetic_demonstrations, arithmetic_pairs
from grpo.rewards import build_rewards
from grpo.rewards.core import score_groups

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
SPLITS = ["train", "test"]


def terms(row: dict) -> tuple[int, int]:
    a, b = QUESTION.fullmatch(row["prompt"][-1]["content"]).groups()
    return int(a), int(b)


def scores(rows: list[dict], texts: list[str]) -> list[tuple[float, float]]:
    """(accuracy, format) of each text as the answer to its row's question, scored as `grpo train` scores."""
    questions = [{"prompt": row["prompt"], "answer": str(sum(terms(row)))} for row in rows]
    values = score_groups(build_rewards(["accuracy", "format"]), questions, texts).values
    return [tuple(row) for row in values.tolist()]


@pytest.mark.parametrize("split", SPLITS)
def test_demonstrations_complete_the_task_prompts_with_the_right_sum_in_answer_tags(split):
    rows = arithmetic_demonstrations(split)
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in arithmetic(split)]
    for row in rows:
        a, b = terms(row)
        assert re.findall(r"<answer>(.*?)</answer>", row["completion"]) == [str(a + b)]
        assert row["completion"].startswith(f"{a} + {b} = {a + b}\n"), "the worked example's shape"


@pytest.mark.parametrize("split", SPLITS)
def test_demonstrations_get_full_marks_on_the_accuracy_and_format_rewards(split):
    rows = arithmetic_demonstrations(split)
    assert set(scores(rows, [row["completion"] for row in rows])) == {(1.0, 1.0)}


@pytest.mark.parametrize("split", SPLITS)
def test_pairs_choose_a_full_marks_answer_over_a_mistake_that_never_gets_full_marks(split):
    pairs = arithmetic_pairs(split)
    assert [p["prompt"] for p in pairs] == [row["prompt"] for row in arithmetic(split)]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert set(scores(pairs, [p["chosen"] for p in pairs])) == {(1.0, 1.0)}
    rejected = scores(pairs, [p["rejected"] for p in pairs])
    assert (1.0, 1.0) not in rejected
    # Both kinds of mistake: a wrong number in the right format, and an answer without the tags.
    assert {format_score for _, format_score in rejected} == {0.0, 1.0}


@pytest.mark.parametrize("split", SPLITS)
def test_the_loaders_return_the_task_rows_and_every_row_passes_their_checks(split):
    rows, pairs = load_sft_rows("arithmetic", split), load_pairs("arithmetic", split)
    assert rows == arithmetic_demonstrations(split) == DEMONSTRATIONS["arithmetic"](split)
    assert pairs == arithmetic_pairs(split) == PAIRS["arithmetic"](split)
    assert len(rows) == len(pairs) == {"train": 2000, "test": 200}[split]
    for number, row in enumerate(rows, start=1):
        check_sft_row(row, "arithmetic", number)
    assert [check_pair(pair, "arithmetic", number) for number, pair in enumerate(pairs, start=1)] == pairs


@pytest.mark.parametrize(
    "rows", [arithmetic_demonstrations, arithmetic_pairs], ids=["demonstrations", "pairs"]
)
def test_train_and_test_splits_share_no_question(rows):
    train, test = ({terms(row) for row in rows(split)} for split in SPLITS)
    assert len(test) == 200
    assert not train & test
