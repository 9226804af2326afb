"""The evaluator on multi-turn episodes (grpo.runs.eval.evaluate with an Agent), on the tiny model taught one
tool-calling episode: each row record keeps its trajectories, the summary adds the episodes' numbers, and
the rewards score whole trajectories and read the environments' final states, which are dropped after."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_model import QUESTION, write_tool

from grpo.agents.rollout import Agent
from grpo.rewards import build_rewards
from grpo.runs.eval import evaluate

# An environment whose `add` is the taught tool (the same schema, so the same prompt), counting its calls.
COUNTING_ENVIRONMENT = '''
class Counter:
    def __init__(self):
        self.sums = []

    def reset(self, **row):
        self.sums = []

    def add(self, a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.sums.append(a + b)
        return str(a + b)
'''

# Rewards that see what the evaluator gives them: the trajectory's messages and the environment.
TRAJECTORY_REWARDS = """
def used_the_tool(completions, environments, **kwargs):
    return [float(env.sums == [5]) for env in environments]


def tool_messages(completions, **kwargs):
    return [float(sum(m["role"] == "tool" for m in messages)) for messages in completions]
"""
TRAJECTORY_REWARDS_NAMES = ("used_the_tool", "tool_messages")


def load(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def test_an_agent_is_scored_on_episodes_with_their_trajectories_and_numbers(agent_model, tmp_path):
    model, tokenizer = load(agent_model)
    agent = Agent.load([f"{write_tool(tmp_path)}:add"], None, tokenizer, max_turns=3, tool_timeout=5)
    rows = [{"prompt": QUESTION, "answer": "5"}, {"prompt": QUESTION, "answer": "6"}]
    summary, records = evaluate(
        model, tokenizer, rows, build_rewards(["accuracy", "format"]), max_completion_length=160, agent=agent
    )
    # Both rows ask the taught question: the model calls add, reads 5 and answers 5 (right only for row 1).
    assert [r["completions"] for r in records] == [["<answer>5</answer>"]] * 2
    assert [r["solved"] for r in records] == [[True], [False]] and summary["solved"] == 0.5
    (trajectory,) = records[0]["trajectories"]
    assert [m["role"] for m in trajectory["messages"]] == ["assistant", "tool", "assistant"]
    assert trajectory["messages"][1] == {"role": "tool", "name": "add", "content": "5"}
    counts = ("turns", "tool_calls", "tool_errors", "malformed_calls", "stopped_at_max_turns", "errors")
    assert [trajectory[key] for key in counts] == [2, 1, 0, 0, False, []]
    assert summary["episodes/turns_mean"] == summary["episodes/turns_max"] == 2.0
    assert summary["episodes/tool_calls"] == 1.0 and summary["episodes/well_formed_calls"] == 1.0
    assert summary["episodes/tool_errors"] == summary["episodes/stopped_at_max_turns"] == 0.0


def test_max_turns_stops_an_episode_and_is_counted(agent_model, tmp_path):
    model, tokenizer = load(agent_model)
    agent = Agent.load([f"{write_tool(tmp_path)}:add"], None, tokenizer, max_turns=1, tool_timeout=5)
    rows = [{"prompt": QUESTION, "answer": "5"}]
    summary, records = evaluate(
        model, tokenizer, rows, build_rewards(["accuracy"]), max_completion_length=160, agent=agent
    )
    (trajectory,) = records[0]["trajectories"]
    assert [m["role"] for m in trajectory["messages"]] == ["assistant"]  # the call, never answered
    assert trajectory["stopped_at_max_turns"] is True and summary["episodes/stopped_at_max_turns"] == 1.0
    assert summary["solved"] == 0.0


def test_rewards_read_the_trajectory_and_the_environment_which_is_dropped_after(agent_model, tmp_path):
    model, tokenizer = load(agent_model)
    (tmp_path / "counter.py").write_text(COUNTING_ENVIRONMENT)
    (tmp_path / "trajectory_rewards.py").write_text(TRAJECTORY_REWARDS)
    agent = Agent.load([], f"{tmp_path / 'counter.py'}:Counter", tokenizer, max_turns=3, tool_timeout=5)
    rewards = build_rewards(
        [f"{tmp_path / 'trajectory_rewards.py'}:{name}" for name in TRAJECTORY_REWARDS_NAMES]
    )
    captured = []
    original = agent.sample

    def sample(*args, **kwargs):
        rollout = original(*args, **kwargs)
        captured.extend(rollout.episodes)
        return rollout

    agent.sample = sample
    summary, records = evaluate(
        model,
        tokenizer,
        [{"prompt": QUESTION, "answer": "5"}],
        rewards,
        max_completion_length=160,
        agent=agent,
    )
    assert records[0]["scores"] == {"used_the_tool": [1.0], "tool_messages": [1.0]}
    assert summary["episodes/tool_calls"] == 1.0
    assert [record.environment for record in captured] == [None]  # scored, then let go


def test_sampled_episodes_give_every_sample_its_trajectory(agent_model, tmp_path):
    model, tokenizer = load(agent_model)
    agent = Agent.load([f"{write_tool(tmp_path)}:add"], None, tokenizer, max_turns=2, tool_timeout=5)
    rows = [{"prompt": QUESTION, "answer": "5"}] * 3
    summary, records = evaluate(
        model,
        tokenizer,
        rows,
        build_rewards(["accuracy", "format"]),
        max_completion_length=60,
        num_samples=4,
        temperature=1.5,
        batch_size=8,  # two rows at a time: the numbers cover every chunk
        agent=agent,
    )
    trajectories = [t for record in records for t in record["trajectories"]]
    assert [len(r["trajectories"]) for r in records] == [4, 4, 4]
    for record in records:
        finals = [
            next((m["content"] for m in reversed(t["messages"]) if m["role"] == "assistant"), "")
            for t in record["trajectories"]
        ]
        assert record["completions"] == finals
    turns = [t["turns"] for t in trajectories]
    assert summary["episodes/turns_mean"] == pytest.approx(sum(turns) / 12)
    assert summary["episodes/turns_max"] == max(turns) <= 2
    assert summary["episodes/tool_calls"] == pytest.approx(sum(t["tool_calls"] for t in trajectories) / 12)
    assert {"pass@1", "pass@4", "maj@4"} <= set(summary)


def test_no_agent_no_episodes(agent_model):
    model, tokenizer = load(agent_model)
    summary, records = evaluate(
        model,
        tokenizer,
        [{"prompt": QUESTION, "answer": "5"}],
        build_rewards(["format"]),
        max_completion_length=8,
    )
    assert "trajectories" not in records[0] and not any(key.startswith("episodes/") for key in summary)


def test_an_agent_needs_the_default_backend(agent_model, tmp_path):
    model, tokenizer = load(agent_model)
    agent = Agent.load([f"{write_tool(tmp_path)}:add"], None, tokenizer, max_turns=2, tool_timeout=5)
    with pytest.raises(ValueError, match="need the default backend, got object"):
        evaluate(
            model,
            tokenizer,
            [{"prompt": QUESTION, "answer": "5"}],
            build_rewards(["format"]),
            max_completion_length=8,
            backend=object(),
            agent=agent,
        )
