"""Multi-turn trajectories sampled in one batch (grpo.agents.rollout): the token sequence, its masks, and the
episodes' records."""

from __future__ import annotations

from pathlib import Path

from agent_model import QUESTION, write_tool

from grpo.agents.rollout import Agent
from grpo.rollout.backends import DefaultBackend
from grpo.rollout.generate import stop_token_ids


def load(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def sample(directory: Path, tmp_path: Path, **settings):
    model, tokenizer = load(directory)
    agent = Agent.load([f"{write_tool(tmp_path)}:add"], None, tokenizer, max_turns=3, tool_timeout=5)
    rows = [{"prompt": QUESTION, "answer": "5"}]
    options = dict(num_generations=4, max_completion_length=160, max_prompt_length=1024, seeds=[7])
    options.update(settings)
    stops = stop_token_ids(model, tokenizer)
    return agent.sample(DefaultBackend(model), rows, stop_ids=stops, **options), tokenizer


def test_an_episode_calls_the_tool_reads_its_result_and_answers(agent_model, tmp_path):
    rollout, tokenizer = sample(agent_model, tmp_path, greedy=True)
    record = rollout.episodes[0]
    assert [m["role"] for m in record.messages] == ["assistant", "tool", "assistant"]
    assert record.messages[1] == {"role": "tool", "name": "add", "content": "5"}
    assert (record.turns, record.tool_calls, record.tool_errors) == (2, 1, 0)
    assert rollout.texts[0] == "<answer>5</answer>"
    assert not rollout.truncated[0]
    text = tokenizer.decode(rollout.completion_ids[0][rollout.completion_mask[0].bool()])
    assert text.endswith("<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n<answer>5</answer><|im_end|>")


class Broken:
    def __init__(self):
        raise RuntimeError("no board")

    def reset(self, **row):
        return None


def test_an_environment_that_cannot_be_made_leaves_its_episode_without_one(agent_model, tmp_path):
    _, tokenizer = load(agent_model)
    agent = Agent([], Broken, tokenizer, max_turns=2, tool_timeout=5)
    episode = agent.new_episode()
    assert episode.record.environment is None and episode.record.environment_errors == 1
    assert "Broken() raised RuntimeError('no board')" in episode.record.errors[0]
    assert episode.start({"prompt": QUESTION}) is None
