"""The settings a built-in task (grpo.data.tasks) brings, under those a user gives
(grpo.config.loading.load_config): the default task its order, an agent task its tools and room for its
turns. Spec strings, so that the settings import nothing of the task code."""

from __future__ import annotations

TASK_SETTINGS: dict[str, dict[str, object]] = {
    # (grpo.data.tasks: the training split is a curriculum, easiest sums first)
    "arithmetic": {"shuffle_dataset": False},
    # (grpo.data.agent_tasks: an episode that calls one tool and answers takes about 60 tokens)
    # (exact_answer: digits in the final turn's answer tags, the answer the tool gave)
    "calculator": {
        "tools": ["grpo.data.agent_tasks:add", "grpo.data.agent_tasks:multiply"],
        "reward_funcs": ["grpo.data.agent_tasks:exact_answer", "format"],
        "max_completion_length": 96,
        "max_steps": 12,
        "eval_max_samples": 100,
        "eval_steps": 0,
    },
}
