"""Built-in tasks: verifiable prompt sets with a train split and a disjoint held-out ("test") split.

"arithmetic" is the default task, generated; "gsm8k" is GSM8K's word problems, shipped with the package and
read only when asked for; "calculator" is an agent task (grpo.data.agent_tasks), whose tools and rewards a
run gets from grpo.config.tasks.TASK_SETTINGS.

"arithmetic" asks additions; the answer must come inside ``<answer></answer>`` tags. The prompt shows the
format once, in a worked example turn. Without any example SmolLM2-135M-Instruct never uses the tags (0/64
sampled), so GRPO would see no reward to learn from; with the example it sometimes does and often writes the
sum outside the tags, which leaves room to learn. docs/default-task-design.md has the measurements behind its
design, the README the default run's figures.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

from grpo.data.agent_tasks import calculator
from grpo.errors import DataError

ARITHMETIC_SYSTEM = "Solve the sum, then give the final number inside <answer></answer> tags."


# Two-digit terms with a carry: the default model, greedy, solves more sums of both kinds after this example
# than after a one-digit one (docs/default-task-design.md).
ARITHMETIC_EXAMPLE = ("What is 27 + 45?", "27 + 45 = 72\n<answer>72</answer>")


# Training asks in these words; two-digit sums are also held out in words never used in training.
TRAIN_PHRASINGS = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Compute {a} plus {b}.",
)
HELD_OUT_PHRASINGS = (
    "Find the total of {a} and {b}.",
    "How much is {a} plus {b}?",
    "{a} and {b} added together make what?",
    "If you add {b} to {a}, what do you get?",
)


# The held-out split's two subsets (the `subset` column, scored apart): questions like the first default
# task's (a < 100, b < 10, "What is a + b?"), and two-digit + two-digit sums in the held-out phrasings.
SMALL_SUMS, TWO_DIGIT_NEW_WORDS = "small_sums", "two_digit_new_phrasings"


ARITHMETIC_SIZES = {"train": 2000, "test": 400}


# The training split is a curriculum, read in order (TASK_SETTINGS turns shuffling off): the first 15 steps
# of the default run (4 prompts a step) ask small sums in one phrasing, to learn the answer format on the
# easiest sums; the rest are half small sums, half two-digit sums, in the four training phrasings.
ARITHMETIC_FIRST_ROWS = 60


def small_sums() -> list[tuple[int, int]]:
    """a + b with a in 0..99 and b in 0..9 (1,000 questions)."""
    return [(a, b) for a in range(100) for b in range(10)]


def two_digit_sums() -> list[tuple[int, int]]:
    """a + b with a and b in 10..99, but the worked example's (8,098 questions): most carry."""
    example = {(27, 45), (45, 27)}
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if (a, b) not in example]


Questions = dict[str, tuple[tuple[int, int], ...]]


@functools.lru_cache(maxsize=1)
def arithmetic_questions() -> tuple[Questions, Questions]:
    """(held out, training pool) of each subset: the held-out questions are seeded draws, and the training
    pools hold no held-out question in either order (``b + a`` for a held-out ``a + b`` is not trained on)."""
    rng = random.Random(1234)
    held_out, pools = {}, {}
    for subset, questions in ((SMALL_SUMS, small_sums()), (TWO_DIGIT_NEW_WORDS, two_digit_sums())):
        rng.shuffle(questions)
        held = questions[: ARITHMETIC_SIZES["test"] // 2]
        unseen = set(held) | {(b, a) for a, b in held}
        held_out[subset] = tuple(held)
        pools[subset] = tuple(question for question in questions if question not in unseen)
    return held_out, pools


def arithmetic(split: str) -> list[dict[str, Any]]:
    """Rows {"prompt": chat messages, "answer": "<a+b>"}, and on the held-out split a "subset" column: small
    sums and two-digit sums in new phrasings, alternating. The held-out split shares no question with
    train, and two-digit sums are held out in words train never uses."""
    if split not in ARITHMETIC_SIZES:
        raise DataError(f"arithmetic: no split {split!r} ({', '.join(ARITHMETIC_SIZES)})")
    held_out, pools = arithmetic_questions()
    if split == "test":
        rows = []
        for index, (small, two_digit) in enumerate(zip(held_out[SMALL_SUMS], held_out[TWO_DIGIT_NEW_WORDS])):
            rows.append(arithmetic_row(TRAIN_PHRASINGS[0], *small) | {"subset": SMALL_SUMS})
            phrasing = HELD_OUT_PHRASINGS[index % len(HELD_OUT_PHRASINGS)]
            rows.append(arithmetic_row(phrasing, *two_digit) | {"subset": TWO_DIGIT_NEW_WORDS})
        return rows
    rng = random.Random(5678)
    rows = [
        arithmetic_row(TRAIN_PHRASINGS[0], *rng.choice(pools[SMALL_SUMS]))
        for _ in range(ARITHMETIC_FIRST_ROWS)
    ]
    for _ in range(ARITHMETIC_SIZES["train"] - ARITHMETIC_FIRST_ROWS):
        pool = pools[rng.choice((SMALL_SUMS, TWO_DIGIT_NEW_WORDS))]
        rows.append(arithmetic_row(rng.choice(TRAIN_PHRASINGS), *rng.choice(pool)))
    return rows


def arithmetic_row(phrasing: str, a: int, b: int) -> dict[str, Any]:
    question, worked = ARITHMETIC_EXAMPLE
    prompt = [
        {"role": "system", "content": ARITHMETIC_SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": worked},
        {"role": "user", "content": phrasing.format(a=a, b=b)},
    ]
    return {"prompt": prompt, "answer": str(a + b)}


def worked_answer(a: int, b: int, total: int) -> str:
    """An answer in the worked example's shape, stating ``total`` as the sum (right or not)."""
    return f"{a} + {b} = {total}\n<answer>{total}</answer>"


def arithmetic_demonstrations(split: str) -> list[dict[str, Any]]:
    """The task's rows for `grpo sft`: each prompt with a right answer in the asked format as completion."""
    rows = arithmetic(split)
    for row in rows:
        a, b = question_terms(row)
        row["completion"] = worked_answer(a, b, a + b)
    return rows


def arithmetic_pairs(split: str) -> list[dict[str, Any]]:
    """The task's preference pairs for `grpo reward-model` and `grpo dpo`: a right answer in the asked format
    (chosen) against one of the mistakes the default model makes (rejected, a seeded choice): a sum off by
    a little, the right sum without the tags, or the tags around a wrong number after right working."""
    rng = random.Random(91)
    rows = []
    for row in arithmetic(split):
        a, b = question_terms(row)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = wrong if wrong >= 0 else a + b + 1
        rejected = rng.choice(
            [
                worked_answer(a, b, wrong),
                f"{a} + {b} = {a + b}",
                f"{a} + {b} = {a + b}\n<answer>{wrong}</answer>",
            ]
        )
        rows.append({"prompt": row["prompt"], "chosen": worked_answer(a, b, a + b), "rejected": rejected})
    return rows


def question_terms(row: dict[str, Any]) -> tuple[int, int]:
    """The two numbers of a row's question, in the order it asks them."""
    a, b = re.findall(r"\d+", row["prompt"][-1]["content"])
    return int(a), int(b)


# --- GSM8K -------------------------------------------------------------------------------------------------
GSM8K_FILES = {"train": "gsm8k/train.jsonl.gz", "test": "gsm8k/test.jsonl.gz"}


GSM8K_SYSTEM = (
    "Solve the problem step by step, then give the final number inside <answer></answer> tags, "
    "as a plain number without units."
)


GSM8K_EXAMPLE = (
    "A baker makes 3 trays of 12 muffins and sells 20 of them. How many muffins are left?",
    "The baker makes 3 * 12 = 36 muffins.\nAfter selling 20, 36 - 20 = 16 muffins are left.\n"
    "<answer>16</answer>",
)


CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


@functools.lru_cache(maxsize=2)
def gsm8k_problems(split: str) -> tuple[tuple[str, str, str], ...]:
    """(question, worked solution, final number) for each problem of a GSM8K split, read once from the
    shipped file (about a tenth of a second for train) and kept."""
    if split not in GSM8K_FILES:
        raise DataError(f"gsm8k: no split {split!r} ({', '.join(GSM8K_FILES)})")
    raw = resources.files("grpo.data.datasets").joinpath(GSM8K_FILES[split]).read_bytes()
    problems = []
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        row = json.loads(line)
        working, _, number = row["answer"].rpartition("####")
        problems.append((row["question"], working.strip(), number.strip().replace(",", "")))
    return tuple(problems)


def gsm8k(split: str) -> list[dict[str, Any]]:
    """GSM8K's grade-school word problems (OpenAI, MIT licence, shipped in ``grpo/data/datasets/gsm8k``):
    7,473 train and 1,319 test rows {"prompt": chat messages, "answer": the final number, commas removed}.

    The prompt asks for step-by-step working and the final number inside ``<answer></answer>`` tags, of the
    three places the ``accuracy`` reward reads an answer from (``<answer>``, ``\\boxed{}``, ``#### n``),
    because it is the only one the default ``format`` reward also accepts: with the default rewards a
    completion is *solved* only in that layout, and a prompt asking for ``#### n`` or a box could never be.
    One worked example turn shows the layout, as in the arithmetic task, where the default model never
    used the tags without one; with it, the untrained default model put 27 of 50 greedy test answers in
    the asked layout (none of them right).
    """
    return [
        {"prompt": gsm8k_prompt(question), "answer": number} for question, _, number in gsm8k_problems(split)
    ]


def gsm8k_prompt(question: str) -> list[dict[str, str]]:
    example, worked = GSM8K_EXAMPLE
    return [
        {"role": "system", "content": GSM8K_SYSTEM},
        {"role": "user", "content": example},
        {"role": "assistant", "content": worked},
        {"role": "user", "content": question},
    ]


def gsm8k_demonstrations(split: str) -> list[dict[str, Any]]:
    """GSM8K as `grpo sft` rows: each prompt with its reference solution in the asked layout — the working
    without the dataset's ``<<48/2=24>>`` calculator notes, then the number in ``<answer>`` tags."""
    return [
        {
            "prompt": gsm8k_prompt(question),
            "answer": number,
            "completion": f"{CALCULATOR_NOTE.sub('', working)}\n<answer>{number}</answer>",
        }
        for question, working, number in gsm8k_problems(split)
    ]


Split = Callable[[str], list[dict[str, Any]]]


TASKS: dict[str, Split] = {"arithmetic": arithmetic, "gsm8k": gsm8k, "calculator": calculator}


# The same tasks as `grpo sft` rows (prompt + completion) and as preference pairs (prompt, chosen, rejected).
DEMONSTRATIONS: dict[str, Split] = {"arithmetic": arithmetic_demonstrations, "gsm8k": gsm8k_demonstrations}


PAIRS: dict[str, Split] = {"arithmetic": arithmetic_pairs}


DEFAULT_EVAL_SPLIT = "test"


# Room for each task's answers, in tokens: `grpo eval`'s default max_completion_length on the task (32 else).
# GSM8K's reference solutions in the asked layout take 92 tokens (median), 234 at the 99th percentile, in
# SmolLM2's tokenizer; its prompts at most 316 (under grpo train's max_prompt_length of 512).
# A calculator episode that calls one tool and answers takes 58–62 tokens after its prompt (both turns and the
# tool's message between them; its prompts take 430–432 with the tools block): 96 leaves room for a retry.
COMPLETION_LENGTHS: dict[str, int] = {"arithmetic": 32, "gsm8k": 256, "calculator": 96}
