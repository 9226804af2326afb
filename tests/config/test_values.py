"""How a YAML or command-line value becomes a setting (grpo.config.values, read by pydantic), and the one
line a value that cannot be one gives."""

from __future__ import annotations

import datetime

import pytest

from grpo.config.loading import load_config
from grpo.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("use_lora", "on", True),
        ("use_lora", "OFF", False),
        ("use_lora", " yes ", True),
        ("use_lora", "0", False),
        ("use_lora", 1, True),
        ("max_steps", "1.5e3", 1500),
        ("max_steps", 2.0, 2),
        ("max_steps", "1_000", 1000),
        ("learning_rate", " 0.5 ", 0.5),
        ("learning_rate", 3, 3.0),
        ("dataset", 2024, "2024"),
        ("eval_dataset", datetime.date(2024, 1, 2), "2024-01-02"),
        ("dataset", "  ", "  "),  # text is kept as given, spaces too
        ("eval_dataset", "NULL", None),
        ("eval_dataset", " none", " none"),  # only the word itself means None
        ("report_to", "none", "none"),  # not an optional setting: "none" is its value
        ("reward_funcs", "accuracy,,format,", ["accuracy", "format"]),
        ("reward_funcs", ["format", {"name": "judge", 1: "x"}], ["format", {"name": "judge", "1": "x"}]),
        ("reward_funcs", [5], ["5"]),
    ],
)
def test_a_value_is_read_the_grpo_way(name, value, expected):
    got = getattr(load_config(None, {name: value}), name)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("use_lora", "t", "command line: use_lora must be true or false, got 't'"),
        ("use_lora", 1.0, "command line: use_lora must be true or false, got 1.0"),
        ("use_lora", 2, "command line: use_lora must be true or false, got 2"),
        ("max_steps", "1e-1", "command line: max_steps must be an integer, got '1e-1'"),
        ("max_steps", "12.0", "command line: max_steps must be an integer, got '12.0'"),
        ("max_steps", True, "command line: max_steps must be an integer, got True"),
        ("max_steps", "none", "command line: max_steps must be an integer, got 'none'"),
        ("generation_batch_size", "abc", "command line: generation_batch_size must be an integer, got 'abc'"),
        ("learning_rate", True, "command line: learning_rate must be a number, got True"),
        ("dataset", {"a": 1}, "command line: dataset must be a string, got {'a': 1}"),
        ("reward_funcs", None, "command line: reward_funcs must not be empty"),
        (
            "reward_weights",
            [1, None],
            "command line: reward_weights must be a list of numbers, got [1, None]",
        ),
        (
            "reward_funcs",
            [{"weight": 2}],
            "command line: reward_funcs: a mapping needs a 'name' (the reward's kind), got {'weight': 2}",
        ),
        ("reward_funcs", ["format", [1]], "command line: reward_funcs must be names or mappings, got [1]"),
        ("reward_funcs", [True], "command line: reward_funcs must be names or mappings, got True"),
    ],
)
def test_a_value_that_cannot_be_the_setting_is_one_line_naming_it(name, value, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {name: value})
    assert str(caught.value) == message


def test_the_first_bad_key_in_the_layer_s_order_is_the_one_named():
    with pytest.raises(ConfigError, match="unknown setting 'zzzz'"):
        load_config(None, {"zzzz": 1, "max_steps": "x"})
    with pytest.raises(ConfigError, match="max_steps must be an integer"):
        load_config(None, {"max_steps": "x", "zzzz": 1})


def test_the_base_layer_is_under_the_file_and_the_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\n")
    seen = []

    def base(given):
        seen.append(dict(given))
        return {"seed": 1, "max_steps": 9, "beta": 0.5}

    config = load_config(path, {"beta": "0.1"}, base=base)
    assert (config.seed, config.max_steps, config.beta) == (3, 9, 0.1)
    assert seen == [{"seed": 3, "beta": 0.1}]
