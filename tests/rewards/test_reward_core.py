"""How rewards are named (names, files, mappings with options), called (async, timeouts, several aspects at
once) and what happens when one fails (stop, zero, skip the group)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from grpo.errors import RewardError
from grpo.rewards import Reward, build_rewards, score
from grpo.rewards.core import BUILTIN_KINDS

COMPLETIONS = ["a", "bb", "ccc", "dddd"]
PROMPTS = ["p"] * 4


def lengths(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def test_a_mapping_names_a_kind_with_its_weight():
    (reward,) = build_rewards([{"name": "format", "weight": 0.25}])
    assert reward.name == "format" and reward.weight == 0.25


def test_weights_given_separately_win_over_a_mappings_own():
    (reward,) = build_rewards([{"name": "format", "weight": 0.25}], weights=[3.0])
    assert reward.weight == 3.0


def test_an_unknown_option_of_a_builtin_kind_is_named():
    with pytest.raises(RewardError, match="reward 'accuracy': unknown option 'colour'"):
        build_rewards([{"name": "accuracy", "colour": "red"}])


def test_options_for_a_users_function_are_refused():
    with pytest.raises(RewardError, match="only built-in kinds take options"):
        build_rewards([{"name": "math:sqrt", "scale": 2}])


def test_a_mapping_without_a_name_is_refused():
    with pytest.raises(RewardError, match="entry 1: a mapping needs a 'name'"):
        build_rewards([{"weight": 1.0}])


def test_every_builtin_kind_loads_with_its_defaults_or_says_what_it_needs():
    for kind in BUILTIN_KINDS:
        try:
            build_rewards([kind])
        except RewardError as error:  # a kind that cannot work without options names what is missing
            assert kind in str(error)


def test_async_reward_functions_are_awaited():
    async def slow_lengths(prompts, completions, **_):
        await asyncio.sleep(0.01)
        return lengths(prompts, completions)

    scores = score([Reward("async", slow_lengths)], PROMPTS, COMPLETIONS, {}).values
    assert scores.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def sleepy(prompts, completions, **_):
    time.sleep(2)
    return [1.0] * len(completions)


def test_a_reward_function_that_times_out_fails_as_the_policy_says():
    started = time.perf_counter()
    with pytest.raises(RewardError, match=r"reward function 'sleepy' timed out after 0\.2 s"):
        score([Reward("sleepy", sleepy)], PROMPTS, COMPLETIONS, {}, timeout=0.2)
    assert time.perf_counter() - started < 1.5
    zero = score([Reward("sleepy", sleepy)], PROMPTS, COMPLETIONS, {}, timeout=0.2, on_failure="zero")
    assert zero.values.flatten().tolist() == [0.0] * 4 and zero.failures == {"sleepy": 4}


def nan_for_the_third(prompts, completions, **_):
    return [1.0, 2.0, math.nan, 4.0]


def test_failure_policy_zero_scores_only_the_failed_completions_zero():
    scored = score(
        [Reward("odd", nan_for_the_third), Reward("len", lengths)],
        PROMPTS,
        COMPLETIONS,
        {},
        on_failure="zero",
    )
    assert scored.values[:, 0].tolist() == [1.0, 2.0, 0.0, 4.0]
    assert scored.values[:, 1].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert scored.failures == {"odd": 1} and scored.skip_rows is None


def test_failure_policy_skip_group_marks_the_whole_group_of_a_failure():
    scored = score(
        [Reward("odd", nan_for_the_third)], PROMPTS, COMPLETIONS, {}, on_failure="skip_group", group_size=2
    )
    assert scored.skip_rows.tolist() == [False, False, True, True]
    assert not scored.values.isnan().any() or scored.values[2, 0].isnan()  # never used: its group is out


def test_failure_policy_stop_names_the_function_the_completion_and_the_value():
    with pytest.raises(RewardError, match="reward function 'odd' returned nan for completion 2"):
        score([Reward("odd", nan_for_the_third)], PROMPTS, COMPLETIONS, {})


def aspects(prompts, completions, **_):
    return {"length": lengths(prompts, completions), "vowels": [float(c.count("a")) for c in completions]}


aspects.outputs = ["length", "vowels"]


def test_a_function_with_several_aspects_gives_a_named_reward_each_and_is_called_once(monkeypatch, tmp_path):
    path = tmp_path / "aspects.py"
    path.write_text(
        "calls = []\n"
        "def judge(prompts, completions, **_):\n"
        "    calls.append(1)\n"
        "    return {'length': [float(len(c)) for c in completions], 'vowels': [0.0] * len(completions)}\n"
        "judge.outputs = ['length', 'vowels']\n"
    )
    rewards = build_rewards([f"{path}:judge"], weights=[2.0])
    assert [(r.name, r.weight, r.output) for r in rewards] == [
        ("judge/length", 2.0, "length"),
        ("judge/vowels", 2.0, "vowels"),
    ]
    scored = score(rewards, PROMPTS, COMPLETIONS, {})
    assert scored.values.tolist() == [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]
    assert len(rewards[0].func.__globals__["calls"]) == 1


def test_normalise_then_sum_lets_the_weights_not_the_scales_decide():
    from grpo.algo.advantages import group_advantages, normalize_per_function
    from grpo.rewards import weighted_sum

    small = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    large = small.flip(0) * 1000  # the two functions disagree, on very different scales
    rewards = [Reward("small", lengths, weight=2.0), Reward("large", lengths, weight=1.0)]
    both = torch.cat([small, large], dim=1)
    summed_first = group_advantages(weighted_sum(both, rewards), 2)
    normalised_first = group_advantages(weighted_sum(normalize_per_function(both, 2), rewards), 2)
    assert summed_first[1] < 0 < summed_first[0]  # the large-scale function decides despite its weight
    assert normalised_first[0] < 0 < normalised_first[1]  # the heavier-weighted function decides
