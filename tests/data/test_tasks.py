"""The arithmetic task: a curriculum of training questions and held-out subsets that measure addition on
unseen questions and in unseen words; as `grpo sft` demonstrations and as preference pairs, right answers
in the asked format that the built-in rewards give full marks, rejected answers that never get them, and
the loaders that return them."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from grpo.config.loading import load_config
from grpo.data.preferences import check_pair, load_pairs
from grpo.data.prompts import load_rows
from grpo.data.sft import check_sft_row, load_sft_rows
from grpo.data.tasks import (
    ARITHMETIC_EXAMPLE,
    ARITHMETIC_FIRST_ROWS,
    DEMONSTRATIONS,
    HELD_OUT_PHRASINGS,
    PAIRS,
    SMALL_SUMS,
    TRAIN_PHRASINGS,
    TWO_DIGIT_NEW_WORDS,
    arithmetic,
    arithmetic_demonstrations,
    arithmetic_pairs,
)
from grpo.errors import DataError
from grpo.rewards import build_rewards
from grpo.rewards.core import score_groups

SPLITS = ["train", "test"]


def pattern(phrasing: str) -> re.Pattern:
    return re.compile(re.escape(phrasing).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)"))


PHRASINGS = {phrasing: pattern(phrasing) for phrasing in TRAIN_PHRASINGS + HELD_OUT_PHRASINGS}


def parse(row: dict) -> tuple[str, int, int]:
    """(the phrasing, a, b) of a row's question; exactly one phrasing reads it."""
    question = row["prompt"][-1]["content"]
    found = [
        (phrasing, match) for phrasing, regex in PHRASINGS.items() if (match := regex.fullmatch(question))
    ]
    assert len(found) == 1, question
    phrasing, match = found[0]
    return phrasing, int(match["a"]), int(match["b"])


def terms(row: dict) -> tuple[int, int]:
    return parse(row)[1:]


def is_small(a: int, b: int) -> bool:
    return 0 <= a < 100 and 0 <= b < 10


def is_two_digit(a: int, b: int) -> bool:
    return 10 <= a < 100 and 10 <= b < 100


# --- the questions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_every_row_asks_a_sum_of_either_kind_and_its_answer_is_that_sum(split):
    rows = load_rows("arithmetic", split)
    assert len(rows) == {"train": 2000, "test": 400}[split]
    for row in rows:
        assert row["prompt"][-1]["role"] == "user"
        a, b = terms(row)
        assert is_small(a, b) or is_two_digit(a, b)
        assert row["answer"] == str(a + b)


def test_held_out_subsets_alternate_small_sums_and_two_digit_sums_in_words_training_never_uses():
    rows = arithmetic("test")
    assert [row["subset"] for row in rows[:4]] == [SMALL_SUMS, TWO_DIGIT_NEW_WORDS] * 2
    small = [parse(row) for row in rows if row["subset"] == SMALL_SUMS]
    two_digit = [parse(row) for row in rows if row["subset"] == TWO_DIGIT_NEW_WORDS]
    assert len(small) == len(two_digit) == 200
    assert all(phrasing == "What is {a} + {b}?" and is_small(a, b) for phrasing, a, b in small)
    assert all(phrasing in HELD_OUT_PHRASINGS and is_two_digit(a, b) for phrasing, a, b in two_digit)
    assert {phrasing for phrasing, _, _ in two_digit} == set(HELD_OUT_PHRASINGS)
    # The first 200 rows (what a run scores by default, eval_max_samples) hold 100 of each.
    assert sum(row["subset"] == SMALL_SUMS for row in rows[:200]) == 100


def test_training_is_a_curriculum_small_sums_in_one_phrasing_then_both_kinds_in_all_training_phrasings():
    rows = [parse(row) for row in arithmetic("train")]
    first, rest = rows[:ARITHMETIC_FIRST_ROWS], rows[ARITHMETIC_FIRST_ROWS:]
    assert all(phrasing == TRAIN_PHRASINGS[0] and is_small(a, b) for phrasing, a, b in first)
    assert {phrasing for phrasing, _, _ in rest} == set(TRAIN_PHRASINGS)
    two_digit_share = sum(is_two_digit(a, b) for _, a, b in rest) / len(rest)
    assert 0.45 < two_digit_share < 0.55


def unordered(rows: list[dict]) -> set[tuple[int, int]]:
    """Each row's question, a + b and b + a alike."""
    return {tuple(sorted(terms(row))) for row in rows}


def test_no_held_out_question_is_trained_on_in_either_order():
    test = unordered(arithmetic("test"))
    assert len(test) > 390  # (a held-out a + b and b + a would count once)
    assert not unordered(arithmetic("train")) & test


# Digests of each split as generated when the task was designed: the rows must not change between runs,
# machines or Python versions (a changed split makes old figures incomparable; change these on purpose).
DIGESTS = {
    "train": "d116c2088ab4b55bc228ba89f9b519fd3caa41bdc00b0e5700219c9aaaa27623",
    "test": "b10d32780758b2971e0629272f2c1587b1fb3d14602df974a5b364b08734d13e",
}


@pytest.mark.parametrize("split", SPLITS)
def test_the_splits_are_the_same_rows_everywhere(split):
    text = json.dumps(arithmetic(split), sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == DIGESTS[split]


def test_train_is_the_default_split_and_the_loader_returns_the_task_rows():
    assert load_rows("arithmetic", "test") == arithmetic("test")
    assert load_rows("arithmetic") == load_rows("arithmetic", "train") == arithmetic("train")


def test_the_worked_example_is_neither_held_out_nor_trained_on():
    example = re.findall(r"\d+", ARITHMETIC_EXAMPLE[0])
    assert tuple(map(int, example)) == (27, 45)
    for split in SPLITS:
        assert (27, 45) not in unordered(arithmetic(split))


def test_an_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match=r"arithmetic: no split 'validation' \(train, test\)"):
        load_rows("arithmetic", "validation")


def test_the_task_reads_its_curriculum_in_order_unless_the_user_asks_for_shuffling():
    assert load_config().shuffle_dataset is False  # the default dataset is the arithmetic task
    assert load_config(overrides={"shuffle_dataset": True}).shuffle_dataset is True
    assert load_config(overrides={"dataset": "gsm8k"}).shuffle_dataset is True


# --- demonstrations and pairs ----------------------------------------------------------------------------


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
        first, second = re.findall(r"\d+", row["prompt"][-1]["content"])  # in the order asked
        total = int(first) + int(second)
        assert re.findall(r"<answer>(.*?)</answer>", row["completion"]) == [str(total)]
        assert row["completion"].startswith(f"{first} + {second} = {total}\n"), "the worked example's shape"


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
    assert len(rows) == len(pairs) == {"train": 2000, "test": 400}[split]
    for number, row in enumerate(rows, start=1):
        check_sft_row(row, "arithmetic", number)
    assert [check_pair(pair, "arithmetic", number) for number, pair in enumerate(pairs, start=1)] == pairs


@pytest.mark.parametrize(
    "rows", [arithmetic_demonstrations, arithmetic_pairs], ids=["demonstrations", "pairs"]
)
def test_train_and_test_splits_share_no_question(rows):
    train, test = (unordered(rows(split)) for split in SPLITS)
    assert len(test) > 390
    assert not train & test
