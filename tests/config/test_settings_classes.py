"""The settings classes: every stage keeps its flat field names, a field shared by several stages is declared
once (in a group of grpo.config.groups), every field has a docstring that `--help` shows, and the settings
package needs nothing of grpo but its errors."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import grpo.config
from grpo.cli.main import app
from grpo.config import groups
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import field_docs, load_config, load_settings
from grpo.config.stages import BUILTIN_PAIR_SETS, DPOConfig, RewardModelConfig, SFTConfig

STAGES = {"train": GRPOConfig, "sft": SFTConfig, "reward-model": RewardModelConfig, "dpo": DPOConfig}
GROUPS = [groups.ModelSettings, groups.LoRASettings, groups.LoRALayerSettings, groups.OptimizerSettings]

# Every setting's name, as YAML keys and flags know it: none may change (accel, save_minutes and
# eval_check_samples are new).
FIELD_NAMES = {
    GRPOConfig: (
        "accel adam_beta1 adam_beta2 algorithm beta cliprange_value dataset dtype dynamic_sampling "
        "environment "
        "epsilon epsilon_high eval_check_samples eval_dataset eval_max_samples eval_on_start eval_steps "
        "fsdp fused_inference gamma generation_backend generation_batch_size gradient_accumulation_steps "
        "gradient_checkpointing importance_sampling_level lam learning_rate log_completions logging_steps "
        "lora_alpha lora_dropout lora_r lora_target_modules loss_type lr_scheduler_type "
        "mask_truncated_completions max_completion_length max_grad_norm max_nonfinite_updates "
        "max_prompt_length max_sampling_rounds max_steps max_turns model_name_or_path "
        "multi_objective_aggregation "
        "num_generations num_iterations num_threads offload_reference onednn_linear output_dir "
        "per_device_train_batch_size ref_model_sync_steps release_memory report_to resume_from_checkpoint "
        "reward_failure reward_funcs reward_timeout reward_weights save_minutes save_steps "
        "save_total_limit scale_rewards seed shuffle_dataset softmax_temperature step_delimiter "
        "tool_timeout tools "
        "step_regex supervision temperature top_entropy_quantile top_k top_p use_lora value_head_init_std "
        "vf_coef vllm_gpu_memory_utilization warmup_steps weight_decay whiten_advantages"
    ),
    SFTConfig: (
        "dataset dtype eval_dataset eval_fraction gradient_accumulation_steps gradient_checkpointing "
        "learning_rate logging_steps lora_alpha lora_dropout lora_r lora_target_modules lr_scheduler_type "
        "max_grad_norm max_length max_steps model_name_or_path num_train_epochs output_dir "
        "per_device_train_batch_size seed use_lora warmup_steps weight_decay"
    ),
    DPOConfig: (
        "beta dataset dtype eval_dataset eval_fraction fused_inference gradient_accumulation_steps "
        "gradient_checkpointing label_smoothing learning_rate logging_steps lora_alpha lora_dropout lora_r "
        "lora_target_modules lr_scheduler_type max_eval_pairs max_grad_norm max_length max_steps "
        "max_train_pairs model_name_or_path num_train_epochs output_dir per_device_train_batch_size "
        "precompute_ref_log_probs seed use_lora warmup_ratio weight_decay"
    ),
    RewardModelConfig: (
        "center_rewards_coefficient dataset dtype eval_dataset eval_fraction gradient_accumulation_steps "
        "gradient_checkpointing learning_rate logging_steps lora_alpha lora_r lr_scheduler_type "
        "max_eval_pairs max_grad_norm max_length max_steps max_train_pairs model_name_or_path "
        "num_train_epochs output_dir per_device_eval_batch_size per_device_train_batch_size seed use_lora "
        "warmup_steps weight_decay"
    ),
}


def declared(cls: type) -> dict[str, object]:
    """The fields that ``cls``'s own body declares."""
    return inspect.get_annotations(cls)


def declaring_class(cls: type, name: str) -> type:
    """The class whose body declares field ``name`` of ``cls``: the stage itself or one of its groups."""
    return next(base for base in cls.__mro__ if name in declared(base))


def definition(cls: type, name: str) -> tuple[object, object, str]:
    """What a field is: its type as written, its default, its docstring."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f.type, default, field_docs(declaring_class(cls, name)).get(name, field_docs(cls)[name])


# --- the fields --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", FIELD_NAMES, ids=lambda cls: cls.__name__)
def test_dataclasses_fields_lists_every_setting_under_its_flat_name(cls):
    assert sorted(f.name for f in dataclasses.fields(cls)) == sorted(FIELD_NAMES[cls].split())


@pytest.mark.parametrize("cls", FIELD_NAMES, ids=lambda cls: cls.__name__)
def test_a_group_field_is_set_from_yaml_and_flags_under_its_own_name(cls, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_r: 4\nmax-grad-norm: 0.5\n")
    load = load_config if cls is GRPOConfig else lambda *args: load_settings(cls, *args)
    config = load(path, {"dtype": "float32", "gradient-checkpointing": "true"})
    assert (config.lora_r, config.max_grad_norm, config.dtype, config.gradient_checkpointing) == (
        4,
        0.5,
        "float32",
        True,
    )


def test_every_stage_is_built_from_the_groups():
    for cls in STAGES.values():
        assert issubclass(cls, groups.ModelSettings | groups.LoRASettings | groups.OptimizerSettings)
        for name in ("dtype", "lora_r", "lora_alpha", "max_grad_norm", "gradient_checkpointing"):
            assert declaring_class(cls, name) in GROUPS, (cls.__name__, name)


def test_no_class_declares_again_a_field_that_a_group_it_is_built_from_declares_alike():
    for cls in [*STAGES.values(), *GROUPS]:
        for name in declared(cls):
            for base in cls.__mro__[1:]:
                if name in declared(base):
                    assert definition(cls, name) != definition(base, name), (cls.__name__, name, base)


def test_a_field_alike_in_two_stages_is_declared_once():
    """Two stages' fields with the same name, type, default and docstring come from one group."""
    stages = list(STAGES.values())
    for i, first in enumerate(stages):
        for second in stages[i + 1 :]:
            for f in dataclasses.fields(first):
                if f.name in {g.name for g in dataclasses.fields(second)}:
                    same = definition(first, f.name) == definition(second, f.name)
                    one_place = declaring_class(first, f.name) is declaring_class(second, f.name)
                    assert one_place or not same, (f.name, first.__name__, second.__name__)


def test_stages_keep_their_own_defaults_where_they_differ():
    assert (GRPOConfig().learning_rate, SFTConfig().learning_rate) == (2e-4, 2e-4)
    assert (DPOConfig().learning_rate, RewardModelConfig().learning_rate) == (5e-5, 1e-4)
    assert (GRPOConfig().warmup_steps, SFTConfig().warmup_steps, RewardModelConfig().warmup_steps) == (
        2,
        0,
        0,
    )
    assert GRPOConfig().lr_scheduler_type == "constant_with_warmup"
    assert {SFTConfig().lr_scheduler_type, DPOConfig().lr_scheduler_type} == {"linear"}
    assert (SFTConfig().num_train_epochs, RewardModelConfig().num_train_epochs) == (3.0, 1)
    assert field_docs(SFTConfig)["weight_decay"] != field_docs(DPOConfig)["weight_decay"]


def test_accel_is_a_setting_of_train_on_by_default():
    assert GRPOConfig().accel is True
    assert field_docs(GRPOConfig)["accel"].startswith("Run grpo's CPU speed and memory code (grpo.accel:")
    assert (
        "whatever onednn_linear, fused_inference, release_memory and offload_reference say"
        in (field_docs(GRPOConfig)["accel"])
    )
    assert load_config(None, {"accel": "false"}).accel is False


def test_the_built_in_pair_sets_are_the_data_code_s():
    from grpo.data.preferences import BUILTIN_PAIRS
    from grpo.data.tasks import PAIRS

    assert set(BUILTIN_PAIR_SETS) == set(BUILTIN_PAIRS) | set(PAIRS)


# --- docstrings and --help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", FIELD_NAMES, ids=lambda cls: cls.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    assert all(docs.values())


MACHINE_FIGURES = re.compile(
    r"\d\s*(GB|MB/s|×)|\bAMD\b|\bEPYC\b|this project's|twice as fast|s a step|\d+\s*–\s*\d+%|under \d+ s\b"
)


@pytest.mark.parametrize("cls", FIELD_NAMES, ids=lambda cls: cls.__name__)
def test_no_docstring_quotes_one_machine_s_figures(cls):
    for name, doc in field_docs(cls).items():
        assert not MACHINE_FIGURES.search(doc), (name, doc)


@pytest.mark.parametrize("command", STAGES)
def test_every_field_is_a_flag_whose_help_is_its_docstring(command):
    cls = STAGES[command]
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    assert set(params) == {f.name for f in dataclasses.fields(cls)} | {"config_file"}
    for name, doc in field_docs(cls).items():
        assert params[name].help.replace("\\[", "[") == doc, name


@pytest.mark.parametrize("command", STAGES)
def test_help_shows_every_field_s_docstring(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    for name, doc in field_docs(STAGES[command]).items():
        flag = "--" + name.replace("_", "-")
        assert flag[:24] in text, flag
        assert " ".join(doc.split()[:6]) in text, (name, doc)


def test_help_keeps_the_flag_names_and_aliases():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    for flag in ("--config", "--learning-rate", "--use-lora", "--no-use-lora", "--model", "--resume"):
        assert flag in result.output, flag


# --- what the settings package imports ---------------------------------------------------------------------


def test_the_settings_package_imports_nothing_of_grpo_but_its_errors():
    package = Path(grpo.config.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "grpo" or name.startswith("grpo."):
                    assert name == "grpo.errors" or name.startswith("grpo.config"), (path.name, name)
