"""A short real `grpo train` run on the tiny model through the CLI, for the tests of what a run leaves
besides its model: samples.jsonl, TensorBoard events, warnings, report.html."""

from __future__ import annotations

import json
from pathlib import Path

from cli_args import base_args
from typer.testing import CliRunner

from grpo.cli.main import app

# The tiny model's completions never take the answer format; a reward on their length varies from step 1.
REWARDS = """
def length_reward(prompts, completions, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [min(len(t), 40) / 40 for t in texts]
"""
# Every prompt ends with markup that would run a script and load an image if the report did not escape the
# run's text (prompts, like completions, reach the page as they are).
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def train_tiny_run(
    tiny_model: Path, directory: Path, *flags: str, steps: int = 3, subsets: bool = False
) -> tuple[Path, str]:
    """Train ``steps`` steps with held-out scores before, at step 2 (of a longer run) and after; return the
    run directory and what the command printed. ``subsets``: the rows name one ("even" or "odd" b)."""
    directory.mkdir(parents=True, exist_ok=True)
    dataset = directory / "sums.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}? {HOSTILE}"}], "answer": str(a + b)}
        | ({"subset": "odd" if b % 2 else "even"} if subsets else {})
        for a in range(4)
        for b in range(4)
    ]
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    rewards = directory / "my_rewards.py"
    rewards.write_text(REWARDS)
    output = directory / "run"
    args = [
        "train",
        *base_args(tiny_model, dataset, output, rewards),
        "--max-steps",
        str(steps),
        "--eval-dataset",
        str(dataset),
        "--eval-max-samples",
        "4",
        *(["--eval-steps", "2"] if steps > 2 else []),  # (a check at or after the last step is refused)
        *flags,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return output, result.output  # stdout and stderr, as a terminal shows them
