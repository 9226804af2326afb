"""Process supervision: splitting completions into steps, mapping tokens to steps, scoring steps, and a
`grpo train --supervision process` run through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_args import base_args
from transformers import AutoTokenizer
from typer.testing import CliRunner

from grpo.cli.main import app
from grpo.errors import RewardError
from grpo.rewards import Reward
from grpo.rewards.process import score_steps, scores_steps, split_steps, token_steps


@pytest.mark.parametrize(
    ("text", "kwargs", "steps"),
    [
        ("one line", {}, ["one line"]),
        ("a\nb\nc", {}, ["a\n", "b\n", "c"]),
        ("a\nb\n", {}, ["a\n", "b\n"]),
        ("a\n\n\nb", {}, ["a\n\n\n", "b"]),  # blank lines join the step before them
        ("", {}, [""]),
        ("Step 1: x. Step 2: y.", {"pattern": r"\.\s*"}, ["Step 1: x. ", "Step 2: y."]),
        ("a || b || c", {"delimiter": " || "}, ["a || ", "b || ", "c"]),
    ],
)
def test_split_steps(text, kwargs, steps):
    spans = split_steps(text, **kwargs)
    assert [text[a:b] for a, b in spans] == steps
    assert spans[0][0] == 0 and spans[-1][1] == len(text)


def test_token_steps_follow_the_decoded_text(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "3 + 4 = 7\nthe answer is 7"
    ids = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    padded = torch.tensor([*ids, tokenizer.pad_token_id, tokenizer.pad_token_id])
    mask = torch.tensor([1] * len(ids) + [0, 0])
    spans = split_steps(text)
    steps = token_steps(tokenizer, padded, mask, spans)
    assert steps[-2:].tolist() == [-1, -1]
    for position, step in enumerate(steps[: len(ids) - 1].tolist()):
        start = len(tokenizer.decode(ids[:position]))
        assert spans[step][0] <= start < spans[step][1] or (start == len(text) and step == len(spans) - 1)
    assert steps[0] == 0 and steps[len(ids) - 1] == 1  # the end-of-sequence token joins the last step
    assert sorted(set(steps[: len(ids)].tolist())) == [0, 1]


def count_lines(prompts, completions, **_):
    """An outcome-style function: how many lines the text so far has, scoring each step's prefix."""
    return [float(len(c.strip().splitlines())) for c in completions]


@scores_steps
def correct_steps(prompts, completions, steps, answer, **_):
    """A step-aware function: 1 for a step that mentions the row's answer, else 0."""
    return [[float(a in step) for step in per_completion] for per_completion, a in zip(steps, answer)]


ROWS = [{"prompt": "What is 3 + 4?", "answer": "7"}]
TEXTS = ["3 + 4\n= 7", "3 + 4 = 8\nso 8"]


def test_score_steps_with_prefix_and_step_aware_functions():
    rewards = [Reward("lines", count_lines, 0.5), Reward("correct", correct_steps, 2.0)]
    spans = [split_steps(t) for t in TEXTS]
    scored = score_steps(rewards, ROWS, TEXTS, spans)
    # Completion 0: prefixes have 1 and 2 lines; steps "3 + 4\n", "= 7" mention 7 in the second.
    # Completion 1: prefixes 1 and 2 lines; no step mentions 7.
    assert scored.step_rewards == [[0.5, 1.0 + 2.0], [0.5, 1.0]]
    torch.testing.assert_close(scored.per_function, torch.tensor([[1.5, 0.5], [1.5, 0.0]]))
    assert scored.failures == {} and scored.skip_rows is None


def test_score_steps_failure_policies():
    @scores_steps
    def broken(prompts, completions, steps, **_):
        return [[1.0]] * len(steps)  # one score where there are two steps

    rewards = [Reward("broken", broken)]
    spans = [split_steps(t) for t in TEXTS]
    with pytest.raises(RewardError, match=r"returned \[1.0\] for completion 0, which has 2 steps"):
        score_steps(rewards, ROWS, TEXTS, spans)
    zero = score_steps(rewards, ROWS, TEXTS, spans, on_failure="zero")
    assert zero.step_rewards == [[0.0, 0.0], [0.0, 0.0]] and zero.failures == {"broken": 2}
    skip = score_steps(rewards, ROWS, TEXTS, spans, on_failure="skip_group")
    assert skip.skip_rows.tolist() == [True, True]


def test_a_nan_step_score_is_a_failure_not_a_signal():
    @scores_steps
    def nan_steps(prompts, completions, steps, **_):
        return [[math.nan] * len(s) for s in steps]

    with pytest.raises(RewardError, match="returned nan"):
        score_steps([Reward("nan_steps", nan_steps)], ROWS, TEXTS, [split_steps(t) for t in TEXTS])


STEP_REWARDS = """
from grpo.rewards.process import scores_steps


@scores_steps
def longer_steps(prompts, completions, steps, **columns):
    return [[min(len(step), 10) / 10 for step in per_completion] for per_completion in steps]
"""


@pytest.mark.parametrize("supervision", ["process", "outcome"])
def test_training_with_process_or_outcome_supervision_through_the_cli(
    supervision, tiny_model, tiny_dataset, tmp_path, reward_file
):
    steps_file = tmp_path / "steps.py"
    steps_file.write_text(STEP_REWARDS)
    rewards = f"{steps_file}:longer_steps" if supervision == "process" else f"{reward_file}:length_reward"
    output = tmp_path / "run"
    args = [
        *base_args(tiny_model, tiny_dataset, output, reward_file),
        "--reward-funcs", f"format,{rewards}", "--reward-weights", "1,1", "--supervision", supervision,
        "--max-steps", "2", "--save-steps", "1",
        *(["--step-regex", r"\s+"] if supervision == "process" else []),
    ]  # fmt: skip
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    name = "longer_steps" if supervision == "process" else "length_reward"
    assert all(m["advantage/abs_max"] > 0 for m in lines), "the groups carry a signal"
    assert all(f"rewards/{name}/mean" in m and m[f"rewards/{name}/failures"] == 0 for m in lines)
    from safetensors.torch import load_file

    first, second = (load_file(output / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (1, 2))
    assert any(not torch.equal(first[k], second[k]) for k in first), "the second step updated the weights"
