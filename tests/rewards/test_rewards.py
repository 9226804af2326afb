"""Built-in accuracy/format rewards, loading users' reward functions, and checked, weighted scoring."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

from grpo.errors import RewardError
from grpo.rewards import (
    Reward,
    accuracy_reward,
    build_rewards,
    extract_answer,
    format_reward,
    load_reward_func,
    score,
    weighted_sum,
)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def accuracy(completion, answer) -> float:
    (value,) = accuracy_reward(["prompt"], [completion], [answer])
    return value


def fmt(completion) -> float:
    (value,) = format_reward(["prompt"], [completion])
    return value


# --- extract_answer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7\n<answer>7</answer>", "7"),
        ("<answer>  12 \n</answer>", "12"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>multi\nline</answer>", "multi\nline"),
        ("<answer></answer>", ""),
        ("the answer is 7", None),
        ("<answer>7", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --- accuracy_reward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [str, chat], ids=["string", "chat"])
@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("3 + 4 = 7\n<answer>7</answer>", "7", 1.0),
        ("3 + 4 = 8\n<answer>8</answer>", "7", 0.0),
        ("3 + 4 = 7", "7", 0.0),
        ("<answer>7", "7", 0.0),
        ("<answer>8</answer> no, <answer>7</answer>", "7", 1.0),
        ("<answer>7</answer> no, <answer>8</answer>", "7", 0.0),
        ("<answer>12.0</answer>", "12", 1.0),
        ("<answer>12</answer>", "12.0", 1.0),
        ("<answer>1,200</answer>", "1200", 1.0),
        ("<answer>-3</answer>", "-3", 1.0),
        ("<answer>-3</answer>", "3", 0.0),
        ("<answer>  7 \n</answer>", "7", 1.0),
        ("<answer>Paris</answer>", "  paris ", 1.0),
        ("<answer>New   York</answer>", "new york", 1.0),
        ("<answer></answer>", "7", 0.0),
    ],
)
def test_accuracy_reward(wrap, completion, answer, expected):
    assert accuracy(wrap(completion), answer) == expected


def test_accuracy_reward_accepts_a_non_string_reference():
    assert accuracy("<answer>7</answer>", 7) == 1.0


def test_accuracy_reward_scores_each_completion_against_its_own_answer():
    completions = ["<answer>2</answer>", "<answer>2</answer>", "<answer>5</answer>"]
    assert accuracy_reward(["p"] * 3, completions, answer=["2", "3", "5"], extra=[0, 0, 0]) == [1.0, 0.0, 1.0]


def test_accuracy_reward_uses_the_last_chat_message():
    completion = [
        {"role": "assistant", "content": "<answer>1</answer>"},
        {"role": "assistant", "content": "<answer>2</answer>"},
    ]
    assert accuracy(completion, "2") == 1.0


@pytest.mark.parametrize("completion", [42, [], ["text"]])
def test_accuracy_reward_rejects_a_completion_that_is_not_text_or_messages(completion):
    with pytest.raises(RewardError, match="completion must be a string or a list of chat messages"):
        accuracy(completion, "7")


# --- format_reward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [str, chat], ids=["string", "chat"])
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3 + 4 = 7\n<answer>7</answer>", 1.0),
        ("<answer>7</answer>", 1.0),
        ("3 + 4 = 7\n<answer>7</answer>  \n\n", 1.0),
        ("  \n<answer>7</answer>", 1.0),
        ("3 + 4 = 7\n<answer>7</answer> because 3 + 4 = 7", 0.0),
        ("<answer>7</answer>\n<answer>7</answer>", 0.0),
        ("<answer>6</answer> oops <answer>7</answer>", 0.0),
        ("3 + 4 = 7\n<answer></answer>", 0.0),
        ("3 + 4 = 7", 0.0),
        ("<answer>7", 0.0),
        ("7</answer>", 0.0),
        ("", 0.0),
        ("<answer><answer>7</answer></answer>", 0.0),
    ],
)
def test_format_reward(wrap, completion, expected):
    assert fmt(wrap(completion)) == expected


def test_format_reward_allows_a_multiline_answer():
    assert fmt("work\n<answer>line one\nline two</answer>") == 1.0


def test_format_reward_whitespace_only_answer_is_empty():
    assert fmt("3 + 4 = 7\n<answer>  </answer>") == 0.0


# --- load_reward_func ---------------------------------------------------------------------------------

USER_REWARDS = textwrap.dedent(
    """
    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    """A module `grpo_test_user_rewards` importable from sys.path for this test only."""
    name = "grpo_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(USER_REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize(("name", "func"), [("accuracy", accuracy_reward), ("format", format_reward)])
def test_load_reward_func_finds_a_builtin_by_name(name, func):
    assert load_reward_func(name) is func


def test_load_reward_func_from_a_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS, encoding="utf-8")
    func = load_reward_func(f"{path}:length_reward")
    assert func(prompts=["p", "p"], completions=["ab", "abcd"]) == [2.0, 4.0]


def test_load_reward_func_from_a_module(reward_module):
    func = load_reward_func(f"{reward_module}:length_reward")
    assert func(prompts=["p"], completions=["abc"]) == [3.0]


def test_load_reward_func_from_a_stdlib_module():
    assert load_reward_func("math:fsum") is math.fsum


def test_unknown_reward_name_lists_the_builtins():
    with pytest.raises(RewardError) as caught:
        load_reward_func("acuracy")
    message = str(caught.value)
    assert "unknown reward function 'acuracy'" in message
    assert "accuracy" in message
    assert "format" in message


def test_missing_reward_file(tmp_path):
    path = tmp_path / "missing.py"
    with pytest.raises(RewardError, match="not found") as caught:
        load_reward_func(f"{path}:f")
    assert str(path) in str(caught.value)


def test_missing_function_in_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS, encoding="utf-8")
    with pytest.raises(RewardError, match="has no function 'nope'"):
        load_reward_func(f"{path}:nope")


def test_missing_function_in_a_module(reward_module):
    with pytest.raises(RewardError, match="has no function 'nope'"):
        load_reward_func(f"{reward_module}:nope")


def test_non_callable_attribute_is_not_a_reward_function(reward_module):
    with pytest.raises(RewardError, match="has no function 'NOT_A_FUNCTION'"):
        load_reward_func(f"{reward_module}:NOT_A_FUNCTION")


def test_missing_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="cannot import grpo_no_such_module_xyz"):
        load_reward_func("grpo_no_such_module_xyz:f")


def test_reward_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    with pytest.raises(RewardError, match=r"importing .*broken\.py failed: boom"):
        load_reward_func(f"{path}:f")


def test_reward_module_that_fails_to_import_is_a_reward_error(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_broken_module.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "grpo_test_broken_module", raising=False)
    with pytest.raises(RewardError, match="boom"):
        load_reward_func("grpo_test_broken_module:f")


# --- build_rewards ------------------------------------------------------------------------------------


def test_build_rewards_names_and_default_weights(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS, encoding="utf-8")
    rewards = build_rewards(["accuracy", "format", f"{path}:length_reward"])
    assert [r.name for r in rewards] == ["accuracy", "format", "length_reward"]
    assert [r.weight for r in rewards] == [1.0, 1.0, 1.0]
    assert rewards[0].func is accuracy_reward


def test_build_rewards_with_weights():
    rewards = build_rewards(["accuracy", "format"], [2.0, 0.5])
    assert [(r.name, r.weight) for r in rewards] == [("accuracy", 2.0), ("format", 0.5)]


def test_build_rewards_propagates_a_load_error():
    with pytest.raises(RewardError, match="unknown reward function 'nope'"):
        build_rewards(["accuracy", "nope"])


# --- score ----------------------------------------------------------------------------------------------


def constant(*values):
    """A reward function that returns ``values`` whatever it is given."""

    def func(prompts, completions, **kwargs):
        return list(values)

    return func


COMPLETIONS = ["3 + 4 = 7\n<answer>7</answer>", "<answer>8</answer> because", "seven"]
COLUMNS = {"answer": ["7", "7", "7"]}


def test_score_has_one_row_per_completion_and_one_column_per_function():
    scores = score(build_rewards(["accuracy", "format"]), ["p"] * 3, COMPLETIONS, COLUMNS).values
    assert scores.shape == (3, 2)
    assert scores.dtype == torch.float32
    assert_close(scores, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))


def test_score_passes_columns_and_extra_keyword_arguments():
    seen = {}

    def spy(prompts, completions, answer, step, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, step=step)
        return [0.0] * len(completions)

    score([Reward("spy", spy)], ["p1", "p2"], ["c1", "c2"], {"answer": ["1", "2"]}, step=4)
    assert seen == {"prompts": ["p1", "p2"], "completions": ["c1", "c2"], "answer": ["1", "2"], "step": 4}


def test_score_turns_none_into_nan():
    scores = score([Reward("sparse", constant(1.0, None, 0))], ["p"] * 3, COMPLETIONS, {}).values
    assert scores[0, 0] == 1.0
    assert math.isnan(scores[1, 0])
    assert scores[2, 0] == 0.0


def test_score_accepts_a_tuple_of_ints():
    ints = Reward("ints", lambda prompts, completions, **kw: (1, 0, 2))
    assert_close(score([ints], ["p"] * 3, COMPLETIONS, {}).values, torch.tensor([[1.0], [0.0], [2.0]]))


def test_score_names_a_function_that_raises():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    rewards = [Reward("accuracy", accuracy_reward), Reward("broken", broken)]
    with pytest.raises(RewardError, match="'broken' raised KeyError"):
        score(rewards, ["p"] * 3, COMPLETIONS, COLUMNS)


def test_score_names_a_builtin_missing_its_column():
    with pytest.raises(RewardError, match="'accuracy' raised TypeError"):
        score(build_rewards(["accuracy"]), ["p"] * 3, COMPLETIONS, {})


@pytest.mark.parametrize("values", [(1.0, 1.0), (1.0, 1.0, 1.0, 1.0), ()], ids=["short", "long", "empty"])
def test_score_names_a_function_returning_the_wrong_number_of_values(values):
    with pytest.raises(RewardError, match=f"'counter' returned {len(values)} values for 3 completions"):
        score([Reward("counter", constant(*values))], ["p"] * 3, COMPLETIONS, {})


def test_score_names_a_function_returning_a_non_list():
    with pytest.raises(RewardError, match="'scalar' returned float, not a list"):
        score([Reward("scalar", lambda prompts, completions, **kw: 1.0)], ["p"] * 3, COMPLETIONS, {})


@pytest.mark.parametrize(
    "bad",
    [math.nan, math.inf, -math.inf, "1.0", True, False, [1.0], 1 + 0j],
    ids=["nan", "inf", "-inf", "string", "true", "false", "list", "complex"],
)
def test_score_names_a_function_returning_an_unusable_value(bad):
    with pytest.raises(RewardError) as caught:
        score([Reward("picky", constant(1.0, bad, 0.0))], ["p"] * 3, COMPLETIONS, {})
    message = str(caught.value)
    assert "'picky'" in message
    assert "completion 1" in message


def test_score_lets_a_reward_error_from_a_function_through_unchanged():
    with pytest.raises(RewardError, match="completion must be a string"):
        score(build_rewards(["format"]), ["p"], [123], {})


# --- weighted_sum ---------------------------------------------------------------------------------------


def test_weighted_sum_applies_the_weights():
    rewards = [Reward("a", accuracy_reward, 2.0), Reward("b", format_reward, 0.5)]
    scores = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert_close(weighted_sum(scores, rewards), torch.tensor([2.5, 0.5, 2.0, 0.0]))


def test_weighted_sum_skips_nan_scores():
    rewards = [Reward("a", accuracy_reward, 2.0), Reward("b", format_reward, 0.5)]
    scores = torch.tensor([[math.nan, 1.0], [1.0, math.nan], [math.nan, math.nan]])
    total = weighted_sum(scores, rewards)
    assert_close(total, torch.tensor([0.5, 2.0, 0.0]))
    assert torch.isfinite(total).all()


def test_weighted_sum_of_score_output_end_to_end():
    rewards = build_rewards(["accuracy", "format"], [1.0, 0.25])
    scores = score(rewards, ["p"] * 3, COMPLETIONS, COLUMNS).values
    assert_close(weighted_sum(scores, rewards), torch.tensor([1.25, 0.0, 0.0]))


def test_numpy_scores_are_accepted():
    import numpy as np

    from grpo.rewards import Reward, score

    reward = Reward("np", lambda prompts, completions, **_: np.array([1.0, 0.5], dtype=np.float32))
    assert score([reward], ["p", "p"], ["a", "b"], {}).values.flatten().tolist() == [1.0, 0.5]


def test_numbers_compare_exactly_and_commas_only_as_thousands_separators():
    from grpo.rewards import answers_match

    assert answers_match("1,200", "1200") and answers_match("-12,345.5", "-12345.50")
    assert not answers_match("1,2", "12")
    assert not answers_match("12345678901234567890", "12345678901234567891")
