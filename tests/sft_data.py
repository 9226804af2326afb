"""SFT rows for the tests of `grpo sft` and the commands that run it."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ANSWER = "<answer>7</answer>"


def sums_dataset(path: Path, rows: int = 10) -> Path:
    """Different prompts, one fixed completion: something a few steps can learn, held-out rows included."""
    return write_jsonl(
        path,
        [
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {a + 1}?"}],
                "completion": "<answer>7</answer>",
            }
            for a in range(rows)
        ],
    )
