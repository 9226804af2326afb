"""Hand-computed checks of group-relative advantages and the zero-variance group fraction."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from grpo.algo.advantages import group_advantages, zero_std_group_fraction

# Two groups of 4: group 0 = [1, 0, 0, 1] (mean 0.5), group 1 = [1, 1, 1, 1] (mean 1, zero variance).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_none_scale_only_subtracts_the_group_mean():
    # group 0: [1, 0, 0, 1] - 0.5 = [0.5, -0.5, -0.5, 0.5]; group 1: [1, 1, 1, 1] - 1 = 0.
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert_close(group_advantages(REWARDS, 4, "none"), expected)


def test_group_scale_divides_by_the_unbiased_group_std_plus_eps():
    # group 0: squared deviations 4 × 0.25 = 1, unbiased var = 1/3, std = 0.5773503;
    # 0.5 / (0.5773503 + 1e-4) = 0.8658754. group 1: 0 / (0 + 1e-4) = 0.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert_close(group_advantages(REWARDS, 4, "group"), expected)


def test_group_is_the_default_scale():
    assert_close(group_advantages(REWARDS, 4), group_advantages(REWARDS, 4, "group"))


def test_batch_scale_divides_by_the_unbiased_std_of_the_whole_batch():
    # batch mean = 6/8 = 0.75; six 1s deviate by 0.25, two 0s by -0.75:
    # sum of squares = 6 × 0.0625 + 2 × 0.5625 = 1.5, unbiased var = 1.5/7, std = 0.4629100;
    # 0.5 / (0.4629100 + 1e-4) = 1.0798902.
    a = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert_close(group_advantages(REWARDS, 4, "batch"), expected)


def test_batch_scale_keeps_the_relative_spread_of_groups_that_group_scale_removes():
    rewards = torch.tensor([0.0, 2.0, 0.0, 1.0])
    # centred: group 0 [-1, 1], group 1 [-0.5, 0.5].
    # group scale: std sqrt(2) and sqrt(0.5):
    # -1/(1.4142136+1e-4) = -0.7070568, -0.5/(0.7071068+1e-4) = -0.7070068 (almost equal).
    g0 = 1 / (math.sqrt(2) + 1e-4)
    g1 = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert_close(group_advantages(rewards, 2, "group"), torch.tensor([-g0, g0, -g1, g1]))
    # batch scale: mean 0.75, deviations [-0.75, 1.25, -0.75, 0.25], squares sum to 2.75, var 2.75/3,
    # std = 0.9574271; one divisor 0.9575271 for all, so group 0 keeps twice the advantage of group 1.
    d = math.sqrt(2.75 / 3) + 1e-4
    assert_close(group_advantages(rewards, 2, "batch"), torch.tensor([-1 / d, 1 / d, -0.5 / d, 0.5 / d]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_gives_exactly_zero(scale):
    adv = group_advantages(REWARDS, 4, scale)
    assert torch.isfinite(adv).all()
    assert (adv[4:] == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_of_non_dyadic_rewards_gives_exactly_zero(scale):
    # Every completion scored 0.1 (not exact in binary): the mean of eight float32 0.1s is not bitwise 0.1, so
    # centring leaves ~7e-9, which "group" then divides by (~7e-9 + 1e-4). The spec says exactly 0.
    rewards = torch.full((8,), 0.1)
    adv = group_advantages(rewards, 8, scale)
    assert torch.isfinite(adv).all()
    assert_close(adv, torch.zeros(8), atol=0.0, rtol=0.0)


def test_all_equal_batch_with_batch_scale_is_zero_not_nan():
    # batch std = 0, so the divisor is 1e-4 alone and 0 / 1e-4 = 0.
    adv = group_advantages(torch.ones(6), 3, "batch")
    assert torch.isfinite(adv).all()
    assert_close(adv, torch.zeros(6), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_size_one_gives_zero_advantages(scale):
    # each reward is its own group, so reward - mean = 0; the single-element std (NaN in torch) must not leak.
    adv = group_advantages(torch.tensor([3.0, -1.0, 0.5]), 1, scale)
    assert torch.isfinite(adv).all()
    assert_close(adv, torch.zeros(3), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_single_reward_is_zero_not_nan(scale):
    adv = group_advantages(torch.tensor([2.0]), 1, scale)
    assert_close(adv, torch.zeros(1), atol=0.0, rtol=0.0)


def test_dtype_is_preserved():
    assert group_advantages(REWARDS.double(), 4).dtype == torch.float64


@pytest.mark.parametrize(
    ("rewards", "group_size"),
    [
        (torch.zeros(2, 4), 4),  # not flat
        (torch.zeros(()), 1),  # a scalar is not flat either
        (torch.zeros(6), 4),  # 6 does not divide into groups of 4
        (torch.zeros(4), 0),
        (torch.zeros(4), -2),
    ],
)
def test_bad_shapes_raise_value_error(rewards, group_size):
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size)


def test_unknown_scale_raises_value_error():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4, "std")  # type: ignore[arg-type]


def test_zero_std_group_fraction_counts_groups_of_equal_rewards():
    # groups: [1, 0, 0, 1] varies, [1, 1, 1, 1] and [0, 0, 0, 0] are constant -> 2 of 3.
    rewards = torch.cat([REWARDS, torch.zeros(4)])
    assert zero_std_group_fraction(rewards, 4) == pytest.approx(2 / 3)


def test_zero_std_group_fraction_extremes():
    assert zero_std_group_fraction(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2) == 0.0
    # every group of one reward is trivially constant.
    assert zero_std_group_fraction(torch.tensor([0.0, 1.0, 2.0]), 1) == 1.0


# --- process supervision (DeepSeekMath §4.1.3) ---------------------------------------------------------


def test_process_advantages_of_a_hand_built_group():
    from grpo.algo.advantages import process_advantages

    # Completion A has two steps rewarded 1 and 0; B one step rewarded 1. The group's step rewards are
    # {1, 0, 1}: mean 2/3, unbiased std sqrt(1/3) = 0.57735, so the normalised rewards are A: +0.57735,
    # -1.15470; B: +0.57735. A token's advantage sums its step's and the later steps' normalised rewards.
    token_steps = torch.tensor([[0, 0, 1], [0, -1, -1]])  # B's last two positions are padding
    advantages = process_advantages([[1.0, 0.0], [1.0]], token_steps, group_size=2)
    expected = torch.tensor([[-0.57735, -0.57735, -1.15470], [0.57735, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected, atol=3e-4, rtol=0)


def test_process_advantages_are_zero_for_a_group_of_equal_step_rewards():
    from grpo.algo.advantages import process_advantages

    advantages = process_advantages([[0.5, 0.5], [0.5]], torch.tensor([[0, 1], [0, -1]]), group_size=2)
    assert torch.equal(advantages, torch.zeros(2, 2))


def test_process_advantages_normalise_each_group_on_its_own():
    from grpo.algo.advantages import process_advantages

    steps = torch.zeros(4, 1, dtype=torch.long)
    advantages = process_advantages([[0.0], [1.0], [10.0], [30.0]], steps, group_size=2)
    torch.testing.assert_close(advantages[:2], advantages[2:], atol=1e-3, rtol=0)  # same ranks, same scale


def test_normalize_per_function_z_scores_each_column_within_groups():
    from grpo.algo.advantages import normalize_per_function

    scores = torch.tensor([[0.0, 100.0], [1.0, 300.0], [5.0, float("nan")], [5.0, 7.0]])
    z = normalize_per_function(scores, group_size=2)
    # Group 1: column 0 is {0, 1} -> mean 0.5, std 0.7071; column 1 is {100, 300} -> mean 200, std 141.42.
    torch.testing.assert_close(z[:2], torch.tensor([[-0.7071, -0.7071], [0.7071, 0.7071]]), atol=1e-3, rtol=0)
    # Group 2: column 0 equal -> 0; column 1 has one value present -> 0, and NaN stays NaN.
    assert z[2:, 0].tolist() == [0.0, 0.0] and z[3, 1].item() == 0.0 and z[2, 1].isnan()
