"""The share of a step's completions that are solved, counted as held-out evaluation counts it."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.train.step_metrics import solved_share

NAN = math.nan


def test_a_completion_is_solved_with_full_marks_from_every_reward_function():
    # Columns: accuracy, format. Rows: right and formatted; right only; formatted only; neither.
    scores = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert solved_share(scores) == 0.25
    # More than a full mark is a full mark (a reward that pays beyond 1).
    assert solved_share(torch.tensor([[1.0, 3.5], [0.9, 3.5]])) == 0.5


def test_a_reward_that_did_not_score_a_completion_does_not_count_against_it():
    scores = torch.tensor([[1.0, NAN], [NAN, NAN], [0.0, NAN]])
    assert solved_share(scores) == pytest.approx(2 / 3)


def test_learned_scores_count_only_when_nothing_else_is_graded():
    # Columns: accuracy, a reward model's score (no full mark: not graded).
    scores = torch.tensor([[1.0, -2.0], [0.0, 5.0]])
    assert solved_share(scores, graded=[True, False]) == 0.5
    assert solved_share(scores[:, 1:], graded=[False]) == 0.5, "only learned scores: they decide"
