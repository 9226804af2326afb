"""The built-in GSM8K task: shipped with the package (nothing read from elsewhere, nothing downloaded), read
only when asked for, its answers numbers that the default rewards accept in the layout the prompt asks."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from importlib import resources

import pytest

from grpo.data.prompts import check_row, load_rows
from grpo.data.tasks import DEMONSTRATIONS, GSM8K_EXAMPLE, GSM8K_SYSTEM
from grpo.errors import DataError
from grpo.rewards import accuracy_reward, format_reward
from grpo.rewards.rules import answers_match, reference_answer

NUMBER = re.compile(r"-?\d+(\.\d+)?")


def shipped(split: str) -> list[dict]:
    """The vendored file as it is: {"question", "answer": worked solution ending in "#### n"}."""
    raw = resources.files("grpo.data.datasets").joinpath(f"gsm8k/{split}.jsonl.gz").read_bytes()
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines()]


@pytest.mark.parametrize(("split", "count"), [("train", 7473), ("test", 1319)])
def test_rows_are_the_whole_split_with_numeric_answers(split, count):
    rows = load_rows("gsm8k", split)
    assert len(rows) == count
    for number, row in enumerate(rows, start=1):
        check_row(row, "gsm8k", number)
        assert set(row) == {"prompt", "answer"}
        assert NUMBER.fullmatch(row["answer"]), row["answer"]  # no commas, units or words
    raw = shipped(split)
    assert [row["prompt"][-1]["content"] for row in rows] == [r["question"] for r in raw]
    # The same number as after GSM8K's "####", read as the accuracy reward reads a reference.
    assert all(answers_match(row["answer"], reference_answer(r["answer"])) for row, r in zip(rows, raw))


def test_first_rows_by_hand():
    train, test = load_rows("gsm8k", "train")[0], load_rows("gsm8k", "test")[0]
    assert train["answer"] == "72" and train["prompt"][-1]["content"].startswith("Natalia sold clips to 48")
    assert test["answer"] == "18" and test["prompt"][-1]["content"].startswith("Janet’s ducks lay 16 eggs")
    assert [m["role"] for m in train["prompt"]] == ["system", "user", "assistant", "user"]
    assert train["prompt"][0]["content"] == GSM8K_SYSTEM
    assert "step by step" in GSM8K_SYSTEM and "<answer></answer>" in GSM8K_SYSTEM
    assert DEMONSTRATIONS["gsm8k"]("train")[0]["completion"] == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "<answer>72</answer>"
    )  # from "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n…\n#### 72"


def test_thousands_separators_are_removed():
    raw = shipped("train")
    index = next(i for i, r in enumerate(raw) if "," in r["answer"].rpartition("####")[2])
    written = raw[index]["answer"].rpartition("####")[2].strip()
    assert load_rows("gsm8k", "train")[index]["answer"] == written.replace(",", "")


@pytest.mark.parametrize("split", ["train", "test"])
def test_reference_solutions_in_the_asked_layout_get_full_marks(split):
    """Each reference solution, its calculator notes dropped and its final number in <answer> tags (the
    `grpo sft` rows of the task), scores 1 on the default accuracy and format rewards: solved."""
    rows = DEMONSTRATIONS["gsm8k"](split)
    completions = [[{"role": "assistant", "content": row["completion"]}] for row in rows]
    prompts = [row["prompt"] for row in rows]
    assert accuracy_reward(prompts, completions, [row["answer"] for row in rows]) == [1.0] * len(rows)
    assert format_reward(prompts, completions) == [1.0] * len(rows)
    assert "<<" not in "".join(row["completion"] for row in rows)


def test_the_worked_example_gets_full_marks():
    question, worked = GSM8K_EXAMPLE
    completion = [[{"role": "assistant", "content": worked}]]
    assert accuracy_reward([question], completion, ["16"]) == format_reward([question], completion) == [1.0]


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match=r"^gsm8k: no split 'validation' \(train, test\)$"):
        load_rows("gsm8k", "validation")


def test_loaded_only_when_asked_for():
    code = (
        "import grpo.data.prompts; from grpo.data.tasks import gsm8k_problems;"
        "assert gsm8k_problems.cache_info().misses == 0;"
        "grpo.data.prompts.load_rows('gsm8k', 'test'); assert gsm8k_problems.cache_info().misses == 1"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_with_its_licence():
    licence = resources.files("grpo.data.datasets").joinpath("gsm8k/LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2021 OpenAI" in licence
