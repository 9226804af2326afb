"""A tiny model taught one episode by heart: asked a sum, it calls the user's `add` tool in the fallback
format, reads the result and answers in <answer> tags. Random weights never write a well-formed call, so
the multi-turn paths (calls parsed, tools run, results fed back) need a model that does."""

from __future__ import annotations

from pathlib import Path

import torch

ADD_TOOL = '''
def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(a + b)
'''
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def write_tool(directory: Path) -> Path:
    path = directory / "my_tools.py"
    path.write_text(ADD_TOOL)
    return path


def teach_episode(directory: Path) -> Path:
    """The tiny model in ``directory`` after memorising the episode as the agent renders it (tools block
    included), saved in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.agents.rollout import Agent

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    agent = Agent.load([f"{write_tool(directory)}:add"], None, tokenizer, max_turns=3, tool_timeout=5)
    episode = [
        *agent.prompt_messages({"prompt": QUESTION}),
        {"role": "assistant", "content": CALL},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "<answer>5</answer>"},
    ]
    text = tokenizer.apply_chat_template(episode, tools=agent.template_tools, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    return directory
