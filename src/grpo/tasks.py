"""Built-in tasks: generated, verifiable prompt sets with a train split and a disjoint held-out split.

"arithmetic" is the default task. Questions are small additions; the answer must come inside
``<answer></answer>`` tags. The prompt shows the format once, in a worked example turn. Without any example
SmolLM2-135M-Instruct never uses the tags (0/64 sampled), so GRPO would see no reward to learn from; with the
example it sometimes does and often writes the sum outside the tags, which leaves room to learn. The README
gives the measured before/after figures.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

ARITHMETIC_SYSTEM = "Solve the sum, then give the final number inside <answer></answer> tags."
ARITHMETIC_EXAMPLE = ("What is 3 + 4?", "3 + 4 = 7\n<answer>7</answer>")
ARITHMETIC_SIZES = {"train": 2000, "test": 200}


def arithmetic_questions() -> list[tuple[int, int]]:
    """Every question of the task: a + b with a in 0..99 and b in 0..9 (1,000 in all)."""
    return [(a, b) for a in range(100) for b in range(10)]


def arithmetic(split: str) -> list[dict[str, Any]]:
    """Rows {"prompt": chat messages, "answer": "<a+b>"}; the held-out split shares no question with train."""
    if split not in ARITHMETIC_SIZES:
        raise ValueError(f"the arithmetic task has splits {', '.join(ARITHMETIC_SIZES)}, not {split!r}")
    questions = arithmetic_questions()
    random.Random(1234).shuffle(questions)
    held_out = questions[: ARITHMETIC_SIZES["test"]]
    if split == "test":
        chosen = held_out
    else:
        pool = questions[ARITHMETIC_SIZES["test"] :]
        rng = random.Random(5678)
        chosen = [pool[rng.randrange(len(pool))] for _ in range(ARITHMETIC_SIZES["train"])]
    return [{"prompt": arithmetic_prompt(a, b), "answer": str(a + b)} for a, b in chosen]


def arithmetic_prompt(a: int, b: int) -> list[dict[str, str]]:
    question, worked = ARITHMETIC_EXAMPLE
    return [
        {"role": "system", "content": ARITHMETIC_SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": worked},
        {"role": "user", "content": f"What is {a} + {b}?"},
    ]


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
    a, b = row["prompt"][-1]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
    return int(a), int(b)


Split = Callable[[str], list[dict[str, Any]]]
TASKS: dict[str, Split] = {"arithmetic": arithmetic}
# The same tasks as `grpo sft` rows (prompt + completion) and as preference pairs (prompt, chosen, rejected).
DEMONSTRATIONS: dict[str, Split] = {"arithmetic": arithmetic_demonstrations}
PAIRS: dict[str, Split] = {"arithmetic": arithmetic_pairs}
DEFAULT_EVAL_SPLIT = "test"
