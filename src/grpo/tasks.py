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
    question, worked = ARITHMETIC_EXAMPLE
    return [
        {
            "prompt": [
                {"role": "system", "content": ARITHMETIC_SYSTEM},
                {"role": "user", "content": question},
                {"role": "assistant", "content": worked},
                {"role": "user", "content": f"What is {a} + {b}?"},
            ],
            "answer": str(a + b),
        }
        for a, b in chosen
    ]


TASKS: dict[str, Callable[[str], list[dict[str, Any]]]] = {"arithmetic": arithmetic}
DEFAULT_EVAL_SPLIT = "test"
