"""Defaults, YAML + override layering, coercion and validation errors of the run config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo.config.grpo import GRPOConfig
from grpo.config.loading import load_config, to_dict
from grpo.errors import ConfigError, GRPOError


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and layering ----------------------------------------------------------------------------


def test_defaults_validate():
    GRPOConfig().validate()


# The default dataset is the built-in arithmetic task, which reads its curriculum in order.
DEFAULT_RUN = dataclasses.replace(GRPOConfig(), shuffle_dataset=False)


def test_load_config_without_file_or_overrides_gives_the_defaults_and_the_default_tasks_settings():
    assert load_config() == DEFAULT_RUN


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == DEFAULT_RUN


def test_yaml_values_replace_the_defaults(tmp_path):
    config = load_config(write_yaml(tmp_path, "max_steps: 7\nbeta: 0.0\ndataset: data.jsonl\n"))
    assert (config.max_steps, config.beta, config.dataset) == (7, 0.0, "data.jsonl")
    assert config.seed == GRPOConfig().seed


def test_overrides_win_over_the_yaml_file(tmp_path):
    path = write_yaml(tmp_path, "max_steps: 7\nseed: 3\n")
    config = load_config(path, {"max_steps": 9})
    assert config.max_steps == 9
    assert config.seed == 3


def test_full_dict_of_a_config_round_trips_through_yaml(tmp_path):
    original = dataclasses.replace(
        GRPOConfig(), max_steps=5, eval_dataset="held.jsonl", reward_weights=[1.0, 0.5]
    )
    path = write_yaml(tmp_path, yaml.safe_dump(to_dict(original)))
    assert load_config(path) == original


def test_kebab_case_keys_in_yaml_and_overrides(tmp_path):
    path = write_yaml(tmp_path, "learning-rate: 0.001\nnum-generations: 4\n")
    config = load_config(path, {"max-completion-length": 20})
    assert config.learning_rate == 0.001
    assert config.num_generations == 4
    assert config.max_completion_length == 20


def test_model_alias_sets_model_name_or_path(tmp_path):
    assert load_config(write_yaml(tmp_path, "model: ./my-model\n")).model_name_or_path == "./my-model"
    assert load_config(None, {"model": "other"}).model_name_or_path == "other"


# --- coercion -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("learning_rate", "1e-4", 1e-4),
        ("beta", "0", 0.0),
        ("max_steps", "3", 3),
        ("max_steps", " 3 ", 3),
        ("max_steps", "2e3", 2000),
        ("use_lora", "false", False),
        ("use_lora", "True", True),
        ("eval_on_start", "no", False),
        ("reward_funcs", "accuracy, format", ["accuracy", "format"]),
        ("reward_funcs", "accuracy", ["accuracy"]),
        ("reward_weights", "1, 0.5", [1.0, 0.5]),
        ("eval_dataset", "none", None),
        ("output_dir", "None", None),
        ("generation_batch_size", "null", None),
        ("epsilon_high", "none", None),
        ("reward_weights", "none", None),
        ("scale_rewards", "none", "none"),
    ],
)
def test_strings_are_coerced_to_the_field_type(name, text, expected):
    value = getattr(load_config(None, {name: text}), name)
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_scientific_notation_string_becomes_a_float(tmp_path):
    # YAML 1.1 reads "1e-4" (no dot) as a string; coercion must still make it a float.
    config = load_config(write_yaml(tmp_path, "learning_rate: 1e-4\n"))
    assert config.learning_rate == pytest.approx(1e-4)
    assert isinstance(config.learning_rate, float)


def test_yaml_list_is_accepted_for_a_list_field(tmp_path):
    config = load_config(write_yaml(tmp_path, "reward_funcs: [format]\nreward_weights: [2]\n"))
    assert config.reward_funcs == ["format"]
    assert config.reward_weights == [2.0]


def test_null_for_a_required_field_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="dataset must not be empty"):
        load_config(None, {"dataset": None})


# --- unknown keys and wrong types ---------------------------------------------------------------------


def test_unknown_override_suggests_the_close_field():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"learning_rat": 0.1})
    message = str(caught.value)
    assert "'learning_rat'" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_yaml_key_names_the_file_and_the_key(tmp_path):
    path = write_yaml(tmp_path, "num-generation: 4\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "'num-generation'" in message
    assert "did you mean 'num_generations'" in message


def test_unknown_key_without_a_close_field_has_no_suggestion():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"zzzz": 1})
    assert "unknown setting 'zzzz'" in str(caught.value)
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lora_r", "abc"),
        ("lora_r", 2.5),
        ("lora_r", True),
        ("lora_r", "12.0"),
        ("learning_rate", "fast"),
        ("learning_rate", False),
        ("use_lora", "maybe"),
        ("dataset", ["a", "b"]),
        ("reward_weights", "1,heavy"),
        ("max_steps", {"a": 1}),
    ],
)
def test_wrong_type_is_a_config_error_naming_the_field(name, value):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {name: value})
    assert name in str(caught.value)
    assert "command line" in str(caught.value)


def test_wrong_type_in_yaml_names_the_file_and_the_field(tmp_path):
    path = write_yaml(tmp_path, "max_steps: many\n")
    with pytest.raises(ConfigError, match="max_steps must be an integer") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


# --- impossible values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"num_generations": 1}, "num_generations"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        (
            {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1, "num_generations": 2},
            "num_generations",
        ),
        (
            {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "num_generations": 8},
            "gradient_accumulation_steps",
        ),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"scale_rewards": "std"}, "scale_rewards"),
        ({"reward_weights": [1.0]}, "reward_weights"),
        ({"reward_funcs": "accuracy", "reward_weights": "1,2"}, "reward_weights"),
        ({"reward_funcs": ""}, "reward_funcs"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"max_steps": 0}, "max_steps"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"generation_batch_size": 0}, "generation_batch_size"),
    ],
)
def test_impossible_value_is_a_config_error_naming_the_field(overrides, field_name):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert field_name in str(caught.value)


@pytest.mark.parametrize("name", ["temperature", "learning_rate", "epsilon", "beta"])
def test_nan_float_value_is_a_config_error(name):
    with pytest.raises(ConfigError, match=name):
        load_config(None, {name: "nan"})


# --- bad files ----------------------------------------------------------------------------------------


def test_invalid_yaml_is_a_config_error_with_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "seed: 1\nreward_funcs: [accuracy, format\nbeta: 0\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "(line " in str(caught.value)


def test_non_utf8_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"dataset: caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("text", ["- max_steps\n- 3\n", "42\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="must be a mapping") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_directory_as_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


# --- properties ---------------------------------------------------------------------------------------

VALID_VALUES = st.fixed_dictionaries(
    {
        "lora_r": st.integers(1, 4096),
        "max_steps": st.integers(1, 10**9),
        "seed": st.integers(-(2**63), 2**63),
        "warmup_steps": st.integers(0, 10**6),
        "learning_rate": st.floats(0, 10, allow_nan=False, allow_infinity=False),
        "beta": st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
        "temperature": st.floats(1e-6, 100, allow_nan=False, allow_infinity=False),
        "top_p": st.floats(0, 1, exclude_min=True),
    }
)


@settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=VALID_VALUES)
def test_valid_numbers_written_into_yaml_round_trip(tmp_path, values):
    path = write_yaml(tmp_path, "".join(f"{name}: {value!r}\n" for name, value in values.items()))
    config = load_config(path)
    for name, value in values.items():
        assert getattr(config, name) == value
        assert type(getattr(config, name)) is type(value)


@settings(max_examples=80, deadline=None, database=None)
@given(text=st.one_of(st.text(max_size=30), st.from_regex(r"\s*-?\d{1,25}\s*", fullmatch=True)))
def test_any_text_for_an_int_field_gives_a_config_error_or_the_right_int(text):
    try:
        config = load_config(None, {"seed": text})
    except ConfigError as error:
        assert "seed" in str(error)
        return
    assert type(config.seed) is int
    assert float(config.seed) == float(text.strip())


FIELD_NAMES = [f.name for f in dataclasses.fields(GRPOConfig)]
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=5,
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mapping=st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=12), YAML_VALUES, max_size=4))
def test_any_yaml_mapping_gives_a_valid_config_or_one_line_error(tmp_path, mapping):
    path = write_yaml(tmp_path, yaml.safe_dump(mapping, allow_unicode=True))
    try:
        config = load_config(path)
    except GRPOError as error:
        assert "\n" not in str(error), str(error)
        return
    config.validate()
    for name, value in mapping.items():
        if (
            name in FIELD_NAMES
            and isinstance(value, bool | int)
            and not isinstance(getattr(config, name), str)
        ):
            assert getattr(config, name) == value
