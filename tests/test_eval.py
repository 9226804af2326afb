"""pass@k against hand-computed values, and the solved rate of a greedy evaluation."""

from __future__ import annotations

import pytest

from grpo.eval import pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # the share of correct samples
        (5, 2, 2, 1 - 3 / 10),  # 1 − C(3,2)/C(5,2)
        (5, 0, 3, 0.0),  # nothing correct
        (5, 3, 3, 1.0),  # fewer wrong samples (2) than k (3): some draw is always right
        (10, 1, 5, 1 - 126 / 252),  # 1 − C(9,5)/C(10,5)
    ],
)
def test_pass_at_k_matches_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)
