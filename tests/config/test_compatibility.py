"""Nothing silently ignored: every setting of `grpo train` acts in the run it is given to, or the run is
refused at start with one line naming it and why; what several processes cannot reproduce is refused too.
The refusals that rest on an argument about the math (one update per batch, the schedules) test it."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from transformers import get_scheduler
from typer.testing import CliRunner

from grpo.algo.losses import LOSS_TYPES, policy_loss
from grpo.cli.main import app
from grpo.config import grpo as grpo_config
from grpo.config.checks import LR_SCHEDULERS
from grpo.config.compatibility import (
    ACTS_ALWAYS,
    ACTS_ONLY_WHEN,
    BUILTIN_TASKS,
    PPO_SETTINGS,
    check_processes,
    ignored_settings,
)
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import field_docs, load_config
from grpo.data.tasks import TASKS
from grpo.errors import ConfigError

FILE = {"dataset": "rows.jsonl"}  # a dataset that is not a built-in task: no held-out rows of its own


@pytest.fixture(autouse=True)
def vllm_installed(monkeypatch):
    """The vLLM backend's settings are checked as if vllm were installed (validate refuses it otherwise)."""
    monkeypatch.setattr(grpo_config, "module_available", lambda name: True)


# (the setting, settings under which its value would be ignored, the same value where it acts)
CASES = [
    *[
        (name, {"use_lora": False, name: value}, {name: value})
        for name, value in [
            ("lora_r", 8),
            ("lora_alpha", 8),
            ("lora_dropout", 0.1),
            ("lora_target_modules", "q_proj"),
        ]
    ],
    ("release_memory", {"accel": False, "release_memory": True}, {"release_memory": True}),
    ("offload_reference", {"accel": False, "offload_reference": True}, {"offload_reference": True}),
    ("offload_reference", {"beta": 0, "offload_reference": True}, {"beta": 0.1, "offload_reference": True}),
    (
        "vllm_gpu_memory_utilization",
        {"generation_backend": "paged", "vllm_gpu_memory_utilization": 0.5},
        {"generation_backend": "vllm", "vllm_gpu_memory_utilization": 0.5},
    ),
    (
        "generation_batch_size",
        {"generation_backend": "vllm", "generation_batch_size": 8},
        {"generation_backend": "paged", "generation_batch_size": 8},
    ),
    ("max_sampling_rounds", {"max_sampling_rounds": 6}, {"dynamic_sampling": True, "max_sampling_rounds": 6}),
    (
        "multi_objective_aggregation",
        {"supervision": "process", "multi_objective_aggregation": "normalize_then_sum"},
        {"algorithm": "ppo", "multi_objective_aggregation": "normalize_then_sum"},
    ),
    ("step_delimiter", {"step_delimiter": ". "}, {"supervision": "process", "step_delimiter": ". "}),
    (
        "step_delimiter",
        {"supervision": "process", "step_regex": r"\n+", "step_delimiter": ". "},
        {"supervision": "process", "step_delimiter": ". "},
    ),
    ("step_regex", {"step_regex": r"\n+"}, {"supervision": "process", "step_regex": r"\n+"}),
    *[
        ("scale_rewards", {"algorithm": algorithm, "scale_rewards": "batch"}, {"scale_rewards": "batch"})
        for algorithm in ("rloo", "reinforce", "softmax_weighted", "ppo")
    ],
    ("scale_rewards", {"supervision": "process", "scale_rewards": "none"}, {"scale_rewards": "none"}),
    *[
        (
            "softmax_temperature",
            {"algorithm": algorithm, "softmax_temperature": 0.5},
            {"algorithm": "softmax_weighted", "softmax_temperature": 0.5},
        )
        for algorithm in ("grpo", "ppo")
    ],
    *[
        (
            name,
            {"algorithm": algorithm, "num_iterations": 2, name: 0.3},
            {"algorithm": "rloo", "num_iterations": 2, name: 0.3},
        )
        for name, algorithm in itertools.product(
            ("epsilon", "epsilon_high"), ("reinforce", "softmax_weighted")
        )
    ],
    *[
        (name, {"algorithm": algorithm, name: 0.3}, {"algorithm": algorithm, "num_iterations": 2, name: 0.3})
        for name, algorithm in itertools.product(("epsilon", "epsilon_high"), ("grpo", "ppo"))
    ],
    (
        "loss_type",
        {"algorithm": "softmax_weighted", "loss_type": "dapo"},
        {"algorithm": "reinforce", "loss_type": "dapo"},
    ),
    (
        "importance_sampling_level",
        {"algorithm": "softmax_weighted", "num_iterations": 2, "importance_sampling_level": "sequence"},
        {"algorithm": "ppo", "num_iterations": 2, "importance_sampling_level": "sequence"},
    ),
    (
        "importance_sampling_level",
        {"importance_sampling_level": "sequence"},
        {"supervision": "process", "importance_sampling_level": "sequence"},
    ),
    (
        "ref_model_sync_steps",
        {"beta": 0, "ref_model_sync_steps": 5},
        {"algorithm": "ppo", "ref_model_sync_steps": 5},
    ),
    (
        "ref_model_sync_steps",
        {"max_steps": 5, "ref_model_sync_steps": 5},
        {"max_steps": 6, "ref_model_sync_steps": 5},
    ),
    *[
        (name, {name: value}, {"algorithm": "ppo", "num_iterations": 2, name: value})
        for name, value in [
            ("gamma", 0.99),
            ("lam", 0.9),
            ("vf_coef", 0.5),
            ("cliprange_value", 0.3),
            ("whiten_advantages", False),
            ("value_head_init_std", 0.01),
        ]
    ],
    (
        "cliprange_value",
        {"algorithm": "ppo", "cliprange_value": 0.3},
        {"algorithm": "ppo", "num_iterations": 2, "cliprange_value": 0.3},
    ),
    (
        "eval_max_samples",
        {**FILE, "eval_max_samples": 10},
        {**FILE, "eval_dataset": "held.jsonl", "eval_max_samples": 10},
    ),
    ("eval_steps", {**FILE, "eval_steps": 5}, {"eval_steps": 5}),
    ("eval_steps", {"max_steps": 5, "eval_steps": 5}, {"max_steps": 6, "eval_steps": 5}),
    ("eval_check_samples", {**FILE, "eval_check_samples": 10}, {"eval_check_samples": 10}),
    ("max_turns", {"max_turns": 2}, {"max_turns": 2, "tools": ["tools.py:add"]}),
    ("tool_timeout", {"tool_timeout": 1.0}, {"tool_timeout": 1.0, "environment": "game.py:Game"}),
    ("eval_check_samples", {"eval_steps": 0, "eval_check_samples": 10}, {"eval_check_samples": 10}),
    (
        "warmup_steps",
        {"lr_scheduler_type": "constant", "warmup_steps": 5},
        {"lr_scheduler_type": "linear", "warmup_steps": 5},
    ),
]


@pytest.mark.parametrize(
    ("setting", "ignored", "acts"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_a_value_that_would_be_ignored_is_refused_in_one_line_naming_it(setting, ignored, acts):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ignored)
    message = str(caught.value)
    assert message.startswith(f"{setting} = ") and "would be ignored: " in message and "\n" not in message
    load_config(None, acts)  # the same value where it acts


def test_the_built_in_tasks_are_the_data_code_s():
    assert set(BUILTIN_TASKS) == set(TASKS)


def test_every_ignored_setting_is_listed_with_its_first_reason():
    """(What `grpo compare` or a preflight can show at once, rather than the first refusal alone.)"""
    config = GRPOConfig(algorithm="softmax_weighted", epsilon=0.3, loss_type="dapo", gamma=0.9, lora_r=8)
    assert list(ignored_settings(config)) == ["epsilon", "loss_type", "gamma"]
    assert ignored_settings(config)["epsilon"].startswith("algorithm 'softmax_weighted' does not clip")
    assert ignored_settings(GRPOConfig(lora_r=8)) == {}


def test_every_row_of_the_table_has_a_case():
    for row in ACTS_ONLY_WHEN:
        configs = [GRPOConfig(**ignored) for setting, ignored, _ in CASES if setting == row.setting]
        assert any(not row.when(config) for config in configs), f"no case of {row.setting}: {row.otherwise}"


def test_every_setting_acts_always_or_says_when():
    """A field added to GRPOConfig without a place here fails: say whether it acts in every run."""
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    conditional = {row.setting for row in ACTS_ONLY_WHEN}
    assert fields - ACTS_ALWAYS - conditional == set(), "classify these settings"
    assert (ACTS_ALWAYS | conditional) - fields == set(), "no such settings"
    assert ACTS_ALWAYS & conditional == set(), "a setting cannot act always and only sometimes"


RUN_KINDS = [
    {
        "algorithm": algorithm,
        "generation_backend": backend,
        "use_lora": lora,
        "beta": beta,
        **supervision,
        **data,
    }
    for algorithm, backend, lora, beta, supervision, data in itertools.product(
        ("grpo", "rloo", "reinforce", "softmax_weighted", "ppo"),
        ("default", "paged", "vllm"),
        (True, False),
        (0.0, 0.04),
        ({}, {"supervision": "process"}, {"dynamic_sampling": True}, {"num_iterations": 2}),
        ({}, FILE, {"accel": False}),
    )
    if not (supervision.get("supervision") == "process" and algorithm not in ("grpo", "reinforce"))
]


def test_no_kind_of_run_refuses_a_setting_left_at_its_default():
    for settings in RUN_KINDS:
        load_config(None, settings)


def test_a_refusal_through_the_cli_is_one_line_and_exit_code_2():
    result = CliRunner().invoke(app, ["train", "--algorithm", "ppo", "--scale-rewards", "batch"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: scale_rewards = 'batch' would be ignored: algorithm 'ppo' does not divide its advantages by "
        "a standard deviation (only grpo does)"
    ]


# --- several processes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "world_size", "message"),
    [
        ({"algorithm": "ppo"}, 2, "algorithm: ppo runs in one process only"),
        (
            {"generation_backend": "paged"},
            4,
            "generation_backend: 'paged' cannot seed each group, so 4 processes",
        ),
        ({"fsdp": True, "use_lora": False}, 1, "fsdp: shards the model across processes"),
    ],
)
def test_what_several_processes_cannot_reproduce_is_refused(settings, world_size, message):
    config = load_config(None, settings)
    with pytest.raises(ConfigError, match=message):
        check_processes(config, world_size)


@pytest.mark.parametrize(
    ("settings", "world_size"),
    [
        ({}, 1),
        ({}, 2),
        ({"algorithm": "ppo"}, 1),
        ({"generation_backend": "paged"}, 1),
        ({"generation_backend": "vllm"}, 2),
        ({"fsdp": True, "use_lora": False}, 2),
    ],
)
def test_what_several_processes_reproduce_is_accepted(settings, world_size):
    check_processes(load_config(None, settings), world_size)


# --- the arguments behind the refusals ---------------------------------------------------------------------
def policy_gradient(advantages: torch.Tensor, **kwargs) -> torch.Tensor:
    """The gradient of the policy loss in a batch's one update, where the old log-probs are the current ones
    (GRPO passes them detached)."""
    torch.manual_seed(0)
    logps = (-torch.rand(3, 5) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    loss, _ = policy_loss(
        logps, logps.detach(), None, advantages, mask, beta=0.0, max_completion_length=5, **kwargs
    )
    (gradient,) = torch.autograd.grad(loss, logps)
    return gradient


OUTCOME = torch.tensor([1.5, -0.5, -1.0])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_with_one_update_per_batch_the_clip_changes_nothing(loss_type):
    tight = policy_gradient(OUTCOME, epsilon_low=0.01, epsilon_high=0.01, loss_type=loss_type)
    loose = policy_gradient(OUTCOME, epsilon_low=0.9, epsilon_high=5.0, loss_type=loss_type)
    torch.testing.assert_close(tight, loose, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_with_one_update_per_batch_a_sequence_ratio_gives_its_tokens_gradient(loss_type):
    by_token = policy_gradient(OUTCOME, loss_type=loss_type, importance_sampling_level="token")
    by_sequence = policy_gradient(OUTCOME, loss_type=loss_type, importance_sampling_level="sequence")
    torch.testing.assert_close(by_sequence, by_token)
    # Per-token advantages (process supervision) are another matter: the sequence ratio spreads them.
    per_token = torch.linspace(-1.0, 1.0, 15).view(3, 5)
    spread = policy_gradient(per_token, loss_type=loss_type, importance_sampling_level="sequence")
    assert not torch.allclose(spread, policy_gradient(per_token, loss_type=loss_type))


def learning_rates(name: str, warmup_steps: int, updates: int = 3) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=10)
    rates = []
    for _ in range(updates):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()  # as the trainers call it: without a metric
    return rates


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_schedule_offered_runs_as_the_trainers_step_it(name):
    assert all(rate >= 0 for rate in learning_rates(name, warmup_steps=2))


def test_a_schedule_that_needs_more_than_a_step_is_refused():
    with pytest.raises(ConfigError, match="lr_scheduler_type must be one of"):
        load_config(None, {"lr_scheduler_type": "reduce_lr_on_plateau"})


def test_the_constant_schedule_has_no_warm_up():
    assert (
        learning_rates("constant", warmup_steps=5) == learning_rates("constant", warmup_steps=0) == [1.0] * 3
    )


def test_the_ppo_settings_are_the_fields_documented_as_ppo_s():
    documented = {name for name, doc in field_docs(GRPOConfig).items() if doc.startswith("PPO:")}
    assert set(PPO_SETTINGS) == documented


def test_an_agent_tasks_settings_name_the_data_codes_tools():
    from grpo.config.tasks import TASK_SETTINGS
    from grpo.data.agent_tasks import CALCULATOR_TOOLS

    assert TASK_SETTINGS["calculator"]["tools"] == CALCULATOR_TOOLS
    config = load_config(None, {"dataset": "calculator"})
    assert config.tools == CALCULATOR_TOOLS and config.max_completion_length == 96
    assert load_config(None, {"dataset": "calculator", "tools": "my.py:f"}).tools == ["my.py:f"]
