"""The runnable examples of docs/agents.md (examples/agents/): a tool file, an environment class and a reward
that reads the environments, each through `grpo train` on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grpo.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "agents"
SMALL = ["--num-generations", "2", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
         "--max-steps", "1", "--eval-steps", "0", "--max-prompt-length", "2048",
         "--max-completion-length", "48"]  # fmt: skip


def run(tmp_path: Path, model: Path, *flags: str) -> list[dict]:
    output = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--model", str(model), "--output-dir", str(output), *SMALL, *flags]
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_the_calculator_tools_train(agent_model, tmp_path):
    tools = f"{EXAMPLES / 'calculator.py'}:multiply,{EXAMPLES / 'calculator.py'}:divide"
    rewards = f"accuracy,{EXAMPLES / 'rewards.py'}:used_a_tool"
    metrics = run(tmp_path, agent_model, "--dataset", str(EXAMPLES / "products.jsonl"), "--tools", tools,
                  "--reward-funcs", rewards)  # fmt: skip
    assert "episodes/tool_calls" in metrics[0]


def test_the_guessing_game_trains_with_a_reward_that_reads_its_environments(agent_model, tmp_path):
    game = f"{EXAMPLES / 'guess_number.py'}:GuessNumber"
    dataset = str(EXAMPLES / "guess_number.jsonl")
    metrics = run(tmp_path, agent_model, "--dataset", dataset, "--environment", game,
                  "--reward-funcs", f"{EXAMPLES / 'rewards.py'}:found_it", "--max-turns", "3",
                  "--max-completion-length", "200")  # fmt: skip
    assert metrics[0]["episodes/turns_mean"] >= 1 and "rewards/found_it/mean" in metrics[0]


def test_the_examples_behave_as_documented():
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    game = load("guess_number").GuessNumber()
    assert game.reset(secret=42, prompt=[]).startswith("I am thinking")
    assert [game.step("50"), game.step("I say 40"), game.hint(), game.step("42")] == [
        "Lower.",
        "Higher.",
        "even",
        None,
    ]
    assert load("rewards").found_it([], [], [game]) == [pytest.approx(0.8)]
    assert load("calculator").multiply(12, 34) == "408"


def test_the_docs_name_only_files_that_exist():
    text = (ROOT / "docs" / "agents.md").read_text(encoding="utf-8")
    named = set(re.findall(r"examples/agents/[\w.]+\.(?:py|jsonl)", text))
    assert named and all((ROOT / path).is_file() for path in named), named
