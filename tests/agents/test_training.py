"""Training on multi-turn trajectories: only the model's own tokens carry the loss, a one-turn trajectory
trains exactly as a single completion, and a user's own tool file and environment class train through the CLI
(LoRA and full fine-tuning, μ > 1, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from agent_model import QUESTION, write_tool
from safetensors.torch import load_file
from typer.testing import CliRunner

from grpo.algo.losses import policy_loss
from grpo.cli.main import app

TIMINGS = {"step_time", "generation_time", "tokens_per_second"}

ENVIRONMENT = '''
class Counter:
    """Counts the model's turns and answers each with how many are left; its hint() is a tool."""

    def __init__(self):
        self.turns = 0

    def reset(self, answer, **row):
        self.answer, self.turns = answer, 0
        return f"You have 3 turns to find {len(answer)} digits."

    def step(self, text):
        self.turns += 1
        return None if self.turns >= 2 else f"{3 - self.turns} turns left."

    def hint(self, digit: int) -> str:
        """Whether a digit is in the answer.

        Args:
            digit: The digit to look for.
        """
        return "yes" if str(digit) in self.answer else "no"
'''
REWARDS = """
def used_tools(prompts, completions, **columns):
    return [float(sum(m["role"] == "tool" for m in c)) for c in completions]


def counted_turns(prompts, completions, environments, **columns):
    return [env.turns / 2 for env in environments]


def only_one_turn(prompts, completions, **columns):
    return [min(len(c[-1]["content"]), 40) / 40 for c in completions]
"""
SILENT = '''
class Silent:
    """An environment that neither speaks nor has tools: every episode is one assistant turn."""

    def reset(self, **row):
        return None
'''


def test_the_loss_has_no_gradient_at_masked_tokens():
    logps = torch.randn(2, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 1, 1, 0, 0]])
    loss, _ = policy_loss(logps, logps.detach() - 0.1, logps.detach() + 0.2, torch.tensor([1.0, -0.5]), mask,
                          epsilon_low=0.2, epsilon_high=0.2, beta=0.04, loss_type="grpo",
                          max_completion_length=6)  # fmt: skip
    loss.backward()
    assert (logps.grad[mask == 0] == 0).all() and (logps.grad[mask == 1] != 0).all()


def train(
    directory: Path, model: Path, *flags: str, steps: int = 2, reward_funcs: str = ""
) -> tuple[int, str]:
    directory.mkdir(parents=True, exist_ok=True)
    dataset = directory / "sums.jsonl"
    rows = [{"prompt": QUESTION, "answer": "5"}] * 8  # the episode the agent model knows by heart
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "my_rewards.py").write_text(REWARDS)
    args = [
        "train", "--model", str(model), "--dataset", str(dataset), "--seed", "7",
        "--num-generations", "4", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
        "--learning-rate", "1e-4", "--max-steps", str(steps), "--eval-steps", "0", "--warmup-steps", "0",
        "--reward-funcs", reward_funcs or f"accuracy,{directory / 'my_rewards.py'}:used_tools", *flags,
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def lines(path: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (path / name).read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    model = run / "final_model"
    name = (
        "adapter_model.safetensors"
        if (model / "adapter_model.safetensors").is_file()
        else "model.safetensors"
    )
    return load_file(model / name)


@pytest.mark.parametrize("flags", [[], ["--no-use-lora", "--num-iterations", "2"]], ids=["lora", "full-mu2"])
def test_a_users_tool_file_trains_through_the_cli(agent_model, tmp_path, flags):
    tools = write_tool(tmp_path)
    output = tmp_path / "run"
    code, log = train(tmp_path, agent_model, "--tools", f"{tools}:add", "--max-completion-length", "160",
                      "--output-dir", str(output), *flags)  # fmt: skip
    assert code == 0, log
    metrics = lines(output, "metrics.jsonl")
    assert all(m["episodes/tool_calls"] > 0 and m["episodes/turns_max"] >= 2 for m in metrics)
    assert all(m["rewards/used_tools/mean"] > 0 for m in metrics)
    samples = [s for line in lines(output, "samples.jsonl") for s in line["samples"]]
    called = [s for s in samples if s["tool_calls"] and s["messages"][1].get("name") == "add"]
    assert called and called[0]["messages"][1]["content"] == "5"
    assert all(s["completion"] == s["messages"][-1]["content"] for s in called if not s["truncated"])


def test_an_environment_class_trains_and_rewards_read_its_instances(agent_model, tmp_path):
    (tmp_path / "counter.py").write_text(ENVIRONMENT)
    output = tmp_path / "run"
    rewards = f"accuracy,{tmp_path / 'my_rewards.py'}:counted_turns"
    counter = f"{tmp_path / 'counter.py'}:Counter"
    code, log = train(tmp_path, agent_model, "--environment", counter, "--max-completion-length", "200",
                      "--output-dir", str(output), reward_funcs=rewards)  # fmt: skip
    assert code == 0, log
    metrics = lines(output, "metrics.jsonl")
    assert all(m["episodes/turns_max"] == 2 and m["rewards/counted_turns/mean"] > 0 for m in metrics)
    samples = [s for line in lines(output, "samples.jsonl") for s in line["samples"]]
    assert all(
        s["messages"][0] == {"role": "user", "content": "You have 3 turns to find 1 digits."} for s in samples
    )
    answered = [s["messages"] for s in samples if s["turns"] == 2]
    assert answered and all(m[2] == {"role": "user", "content": "2 turns left."} for m in answered)


def test_a_one_turn_trajectory_trains_exactly_as_a_single_completion(tiny_model, tmp_path):
    (tmp_path / "silent.py").write_text(SILENT)
    rewards = f"{tmp_path / 'my_rewards.py'}:only_one_turn"
    flags = ["--max-completion-length", "12", "--beta", "0.04", "--num-iterations", "2"]
    code, log = train(
        tmp_path, tiny_model, *flags, "--output-dir", str(tmp_path / "plain"), reward_funcs=rewards
    )
    assert code == 0, log
    code, log = train(tmp_path, tiny_model, *flags, "--environment", f"{tmp_path / 'silent.py'}:Silent",
                      "--output-dir", str(tmp_path / "agent"), reward_funcs=rewards)  # fmt: skip
    assert code == 0, log
    plain, agent = lines(tmp_path / "plain", "metrics.jsonl"), lines(tmp_path / "agent", "metrics.jsonl")
    for one, other in zip(plain, agent):
        assert {k: v for k, v in one.items() if k not in TIMINGS} == {
            k: v for k, v in other.items() if k not in TIMINGS and not k.startswith("episodes/")
        }
        assert other["episodes/turns_max"] == 1
    expected, got = weights(tmp_path / "plain"), weights(tmp_path / "agent")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_an_agent_run_resumes_exactly(agent_model, tmp_path):
    tools = write_tool(tmp_path)
    flags = ["--tools", f"{tools}:add", "--max-completion-length", "160", "--save-steps", "1"]
    assert train(tmp_path, agent_model, *flags, "--output-dir", str(tmp_path / "long"), steps=3)[0] == 0
    assert train(tmp_path, agent_model, *flags, "--output-dir", str(tmp_path / "short"), steps=1)[0] == 0
    resumed = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "short"), "--max-steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    long, short = lines(tmp_path / "long", "metrics.jsonl"), lines(tmp_path / "short", "metrics.jsonl")
    assert [{k: v for k, v in m.items() if k not in TIMINGS} for m in long] == [
        {k: v for k, v in m.items() if k not in TIMINGS} for m in short
    ]
    assert (tmp_path / "long" / "samples.jsonl").read_text() == (
        tmp_path / "short" / "samples.jsonl"
    ).read_text()
    expected, got = weights(tmp_path / "long"), weights(tmp_path / "short")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_episodes_that_run_out_of_memory_are_sampled_again_fewer_at_a_time(
    agent_model, tmp_path, monkeypatch
):
    from grpo.agents.rollout import Agent

    sample, calls = Agent.sample, []

    def short_of_memory(self, backend, rows, **settings):
        calls.append(settings["batch_size"])
        if len(calls) == 1:
            raise MemoryError("out of memory")
        return sample(self, backend, rows, **settings)

    monkeypatch.setattr(Agent, "sample", short_of_memory)
    tools = write_tool(tmp_path)
    code, log = train(tmp_path, agent_model, "--tools", f"{tools}:add", "--max-completion-length", "64",
                      "--output-dir", str(tmp_path / "run"), steps=1)  # fmt: skip
    assert code == 0, log
    assert calls[:2] == [None, 4] and "retrying with generation_batch_size = 4" in log
