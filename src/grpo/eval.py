"""Scoring a model on a prompt set with the same reward functions it is trained with."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from grpo.data import Row, render_prompt
from grpo.rewards import Reward, score_groups
from grpo.rollout import generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k) (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    rewards: Sequence[Reward],
    *,
    max_completion_length: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    max_prompt_length: int = 10**9,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy (one sample) or sampled (``num_samples`` > 1) scores; returns (summary, one record per row).

    A completion is *solved* when every reward function gives it full marks (≥ 1.0): with the accuracy and
    format rewards that is strict accuracy — the right answer in the asked format. Learned scores without a
    full mark (reward models) are reported but do not count, unless nothing else scores. With several
    samples the summary adds the unbiased pass@k for k = 1 and ``num_samples``.
    """
    greedy = num_samples == 1
    graded = [f for f, reward in enumerate(rewards) if not getattr(reward.func, "unbounded", False)]
    records: list[dict[str, Any]] = []
    all_scores = []
    for start in range(0, len(rows), max(1, batch_size // num_samples)):
        chunk = list(rows[start : start + max(1, batch_size // num_samples)])
        prompts = [render_prompt(row["prompt"], tokenizer) for row in chunk]
        rollout = generate(
            model,
            tokenizer,
            prompts,
            num_generations=num_samples,
            max_completion_length=max_completion_length,
            max_prompt_length=max_prompt_length,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
        )
        scores = score_groups(rewards, chunk, rollout.texts).values
        all_scores.append(scores)
        marks = scores[:, graded] if graded else scores
        solved = (torch.nan_to_num(marks, nan=1.0) >= 1.0).all(dim=1).view(len(chunk), num_samples)
        for i, row in enumerate(chunk):
            records.append(
                {
                    "prompt": row["prompt"]
                    if isinstance(row["prompt"], str)
                    else row["prompt"][-1]["content"],
                    "answer": row.get("answer"),
                    "completions": rollout.texts[i * num_samples : (i + 1) * num_samples],
                    "scores": {
                        r.name: scores[i * num_samples : (i + 1) * num_samples, f].tolist()
                        for f, r in enumerate(rewards)
                    },
                    "solved": solved[i].tolist(),
                }
            )
    scores = torch.cat(all_scores)
    solved_counts = [sum(r["solved"]) for r in records]
    summary: dict[str, float] = {"rows": float(len(records)), "samples_per_row": float(num_samples)}
    summary["solved"] = sum(solved_counts) / (len(records) * num_samples)
    for f, reward in enumerate(rewards):
        summary[f"reward/{reward.name}"] = torch.nanmean(scores[:, f]).item()
    if not greedy:
        for k in sorted({1, num_samples}):
            summary[f"pass@{k}"] = sum(pass_at_k(num_samples, c, k) for c in solved_counts) / len(records)
    return summary, records
