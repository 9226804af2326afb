"""The real default model (slow: converts and loads SmolLM2-135M-Instruct). Run with `make test-slow`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_default_model_loads_and_answers_a_sum():
    from grpo.config.grpo import GRPOConfig
    from grpo.data.prompts import load_rows, render_prompt
    from grpo.models.policy import load_policy
    from grpo.rollout.generate import generate

    models, tokenizer = load_policy(GRPOConfig())
    prompt = render_prompt([{"role": "user", "content": "What is 7 + 5?"}], tokenizer)
    rollout = generate(
        models.policy, tokenizer, [prompt], num_generations=1, max_completion_length=48, greedy=True
    )
    assert "12" in rollout.texts[0]

    # The default task's prompt makes the untrained model use the answer tags often but not always.
    rows = load_rows("arithmetic", "test")[:32]
    prompts = [render_prompt(row["prompt"], tokenizer) for row in rows]
    rollout = generate(
        models.policy, tokenizer, prompts, num_generations=1, max_completion_length=32, greedy=True
    )
    tagged = sum("<answer>" in text for text in rollout.texts)
    assert 0 < tagged <= 32
