"""Scoring a model on a prompt set with the same reward functions it is trained with.

Per row, greedy (one sample) or ``num_samples`` sampled completions are scored; the summary gives

* ``solved``: the share of completions that get full marks from every reward (the right answer in the
  asked format, with the default rewards);
* ``reward/<name>``: each reward function's mean;
* ``pass@k``: the chance that at least one of k samples is solved (unbiased estimate from all n samples);
* ``maj@k``: the chance that the majority answer of k samples is right (see :func:`maj_at_k`), the
  answers read as the default ``accuracy`` reward reads them (:func:`grpo.rewards.math_answers.final_answer`:
  ``<answer>``, else ``\boxed{}``, else ``#### n``; an accuracy reward configured with other ``sources``
  does not change this) and judged as it judges them. Majority voting (self-consistency) asks only for the
  right answer, not the format.

With an :class:`~grpo.agents.rollout.Agent` (tools, an environment) each sample is a multi-turn episode:
the rewards score its messages (and read its environment's final state), its final assistant message is its
completion, each row record keeps its trajectories, and the summary adds the episodes' numbers
(``episodes/turns_mean``, ``episodes/tool_calls``, ``episodes/well_formed_calls``, ...; see
:func:`grpo.agents.episode.episode_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from grpo.accel.fused import fused_decoding
from grpo.agents.episode import EpisodeRecord, episode_fields, episode_metrics, reward_arguments
from grpo.data.prompts import Row, render_prompt
from grpo.rewards import Reward, score_groups
from grpo.rewards.core import solved_completions
from grpo.rewards.math_answers import answers_equivalent, answers_match, final_answer, reference_answer
from grpo.rollout.backend_base import GenerationBackend
from grpo.rollout.backends import DefaultBackend
from grpo.rollout.generate import generate, stop_token_ids

if TYPE_CHECKING:
    from grpo.agents.rollout import Agent


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k) (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The answer given most often; None when no sample holds one (None entries abstain).

    Answers that :func:`~grpo.rewards.math_answers.answers_match` finds equal vote together ("12" and "12.0",
    "1,200" and "1200") under the spelling first given; a tie goes to the answer given first. Equality is
    the exact kind, not math-verify's: "1/2" and "0.5" vote apart, as comparing every pair through the
    math-verify helper would cost k² calls per row."""
    votes: list[list[Any]] = []  # [answer as first given, votes], in order of first appearance
    for answer in answers:
        if answer is None:
            continue
        for entry in votes:
            if answers_match(answer, entry[0]):
                entry[1] += 1
                break
        else:
            votes.append([answer, 1])
    # max() returns the first of equal maxima: the answer given first.
    return max(votes, key=lambda entry: entry[1])[0] if votes else None


def answer_is_right(answer: str | None, reference: Any) -> bool:
    """Whether an extracted answer scores 1 under the ``accuracy`` reward against a row's ``answer``."""
    return answer is not None and answers_equivalent(answer, reference_answer(reference))


def maj_at_k(answers: Sequence[str | None], reference: Any, k: int) -> float:
    """maj@k of one row from its n samples' answers: the share of right majority votes over the ⌊n/k⌋
    disjoint runs of k consecutive samples. The samples are drawn independently, so each run is a fresh
    draw of k and the average estimates maj@k without bias, using every sample at most once: for k = 1 it
    is the share of right answers, for k = n the vote of all n."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 ≤ k ≤ {len(answers)} samples, got k = {k}")
    votes = [majority_vote(answers[start : start + k]) for start in range(0, len(answers) - k + 1, k)]
    return sum(answer_is_right(voted, reference) for voted in votes) / len(votes)


# A held-out row's optional column naming the part of the split it belongs to, scored apart as well.
SUBSET_COLUMN = "subset"


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
    ks: Iterable[int] = (),
    backend: GenerationBackend | None = None,
    agent: Agent | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy (one sample) or sampled (``num_samples`` > 1) scores; returns (summary, one record per row).

    Rows with a ``subset`` column (a name: "seen phrasings", "level 3") are also scored per subset:
    ``solved/<name>`` and ``rows/<name>`` in the summary, ``subset`` in their records.

    A completion is *solved* when every reward function gives it full marks (≥ 1.0): with the accuracy and
    format rewards that is strict accuracy — the right answer in the asked format. Learned scores without a
    full mark (reward models) are reported but do not count, unless nothing else scores. The summary gives
    pass@k and maj@k for k = 1, ``num_samples`` and each of ``ks`` (maj@k only when every row has an
    ``answer``). Each record holds the row's prompt (a chat's last message), answer, completions, every
    reward's scores, solved flags, the answers read from the completions, and their majority vote.

    With an ``agent``, each sample is an episode (``backend`` then must be the default one): a record also
    holds its ``trajectories`` (:func:`grpo.agents.episode.episode_fields`), and the summary the episodes'
    numbers over all samples (:func:`grpo.agents.episode.episode_metrics`).
    """
    ks = sorted({1, num_samples, *ks})
    if ks[0] < 1 or ks[-1] > num_samples:
        raise ValueError(f"every k must be between 1 and num_samples = {num_samples}, got {ks}")
    if agent is not None and backend is not None and not isinstance(backend, DefaultBackend):
        raise ValueError(f"an agent's episodes need the default backend, got {type(backend).__name__}")
    greedy = num_samples == 1
    graded = [reward.graded for reward in rewards]
    sampling = dict(
        num_generations=num_samples,
        max_completion_length=max_completion_length,
        max_prompt_length=max_prompt_length,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
    )
    records: list[dict[str, Any]] = []
    all_scores = []
    episodes: list[EpisodeRecord] = []
    per_chunk = max(1, batch_size // num_samples)
    for start in range(0, len(rows), per_chunk):
        chunk = list(rows[start : start + per_chunk])
        backend = backend or DefaultBackend(model, decoder=fused_decoding(model))
        trajectories: list[EpisodeRecord] | None = None
        if agent is None:
            prompts = [render_prompt(row["prompt"], tokenizer) for row in chunk]
            rollout = generate(model, tokenizer, prompts, backend=backend, **sampling)
        else:
            rollout = agent.sample(backend, chunk, stop_ids=stop_token_ids(model, tokenizer), **sampling)
            trajectories = rollout.episodes
        with_environments = agent is not None and agent.environment is not None
        scores = score_chunk(rewards, chunk, rollout.texts, trajectories, with_environments)
        all_scores.append(scores)
        episodes += trajectories or []
        solved = solved_completions(scores, graded).view(len(chunk), num_samples)
        for i, row in enumerate(chunk):
            group = slice(i * num_samples, (i + 1) * num_samples)
            answers = [final_answer(text) for text in rollout.texts[group]]
            voted = majority_vote(answers)
            reference = row.get("answer")
            record = {
                "prompt": row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"],
                "answer": reference,
                "completions": rollout.texts[group],
                "scores": {r.name: scores[group, f].tolist() for f, r in enumerate(rewards)},
                "solved": solved[i].tolist(),
                "answers": answers,
                "voted": voted,
                "voted_right": None if reference is None else answer_is_right(voted, reference),
            }
            if row.get(SUBSET_COLUMN) is not None:
                record[SUBSET_COLUMN] = str(row[SUBSET_COLUMN])  # (a level given as a number too)
            if trajectories is not None:
                record["trajectories"] = [episode_fields(e) for e in trajectories[group]]
            records.append(record)
    scores = torch.cat(all_scores)
    solved_counts = [sum(r["solved"]) for r in records]
    summary: dict[str, float] = {"rows": float(len(records)), "samples_per_row": float(num_samples)}
    summary["solved"] = sum(solved_counts) / (len(records) * num_samples)
    for subset in dict.fromkeys(r[SUBSET_COLUMN] for r in records if SUBSET_COLUMN in r):
        counts = [c for c, r in zip(solved_counts, records) if r.get(SUBSET_COLUMN) == subset]
        summary[f"solved/{subset}"] = sum(counts) / (len(counts) * num_samples)
        summary[f"rows/{subset}"] = float(len(counts))
    for f, reward in enumerate(rewards):
        summary[f"reward/{reward.name}"] = torch.nanmean(scores[:, f]).item()
    for k in ks:
        summary[f"pass@{k}"] = sum(pass_at_k(num_samples, c, k) for c in solved_counts) / len(records)
    if all(r["voted_right"] is not None for r in records):
        for k in ks:
            summary[f"maj@{k}"] = sum(maj_at_k(r["answers"], r["answer"], k) for r in records) / len(records)
    if agent is not None:
        summary.update(episode_metrics(episodes))
    return summary, records


def score_chunk(
    rewards: Sequence[Reward],
    rows: list[Row],
    texts: list[str],
    episodes: list[EpisodeRecord] | None,
    environments: bool = False,
) -> torch.Tensor:
    """The completions' scores, one row each; multi-turn ``episodes`` are scored on their messages, with
    their environments' instances where the run has an environment (dropped once scored: the records
    keep the conversations)."""
    if episodes is None:
        return score_groups(rewards, rows, texts).values
    try:
        return score_groups(
            rewards,
            rows,
            texts,
            **reward_arguments(episodes, environments),
        ).values
    finally:
        for record in episodes:
            record.environment = None
