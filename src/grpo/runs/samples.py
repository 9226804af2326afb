"""The lines of samples.jsonl: a few of a step's sampled completions, each with what the step made of it.

At every logged step (each ``logging_steps``) the trainer appends one JSON line,
``{"step": N, "samples": [...]}``, to the run's samples.jsonl (:data:`grpo.runs.layout.SAMPLES_FILE`), with
``log_completions`` records made here by :func:`sample_records`; report.html shows them, searchable, under
"Samples".
"""

from __future__ import annotations

import math
from typing import Any

from grpo.agents.episode import episode_fields
from grpo.rollout.batch import ScoredBatch


def sample_records(batch: ScoredBatch, reward_names: list[str], tokenizer: Any, count: int) -> list[dict]:
    """``count`` of the batch's completions, evenly spaced over it (so over its groups), each with its group,
    its prompt as the model saw it (chat template included), its text, each reward function's score (None
    where it did not apply), the total reward, the advantage (per-token advantages: their mean over the
    completion), its length in tokens, and whether it was truncated or its group skipped; a multi-turn
    trajectory also its messages after the prompt (the completion is its final answer) and its counts."""
    rollout = batch.rollout
    n = len(rollout.texts)
    count = min(count, n)
    picks = [i * n // count for i in range(count)]
    prompts: dict[int, str] = {}
    records = []
    for i in picks:
        group = i // rollout.num_generations
        if group not in prompts:
            ids = rollout.prompt_ids[group][rollout.prompt_mask[group].bool()]
            prompts[group] = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        present = rollout.completion_mask[i].bool()
        advantage = batch.advantages[i]
        if advantage.dim() == 1:
            advantage = advantage[present].mean() if present.any() else advantage.new_zeros(())
        scores = {name: batch.scores[i, f].item() for f, name in enumerate(reward_names)}
        records.append(
            {
                "group": group,
                "prompt": prompts[group],
                "completion": rollout.texts[i],
                "rewards": {name: None if math.isnan(v) else v for name, v in scores.items()},
                "reward": batch.rewards[i].item(),
                "advantage": advantage.item(),
                "length": int(present.sum().item()),
                "truncated": bool(rollout.truncated[i].item()),
                "skipped": bool(batch.skipped[i].item()),
                **({} if rollout.episodes is None else episode_fields(rollout.episodes[i])),
            }
        )
    return records
