"""Which settings act in which runs: every setting of `grpo train` either acts under the chosen algorithm,
backend and options, or the run is refused at start with one line naming it and why.

:data:`ACTS_ONLY_WHEN` is the table: for each setting that some runs ignore, the condition under which it
acts, as a predicate on the config, and in words why it does nothing otherwise. A setting may have several
rows (epsilon needs a clipping algorithm *and* more than one update per batch). Every other setting acts in
every run: :data:`ACTS_ALWAYS` names them, and a test holds each field of GRPOConfig to be in one or the
other, so that a setting added later cannot be silently ignored unnoticed. :func:`ignored_settings`
applies the table and :func:`check_settings_act` refuses what it finds; :func:`check_processes` refuses what
several processes (torchrun) would do differently from one.

A settings dataclass cannot tell a value that was given from its default, so only a value other than the
default is refused: the default is what every run gets, used or not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grpo.errors import ConfigError

if TYPE_CHECKING:
    from grpo.config.grpo import GRPOConfig


@dataclass(frozen=True)
class ActsWhen:
    """``setting`` acts only when ``when`` holds of the config; ``otherwise`` says why not (formatted with
    the config's fields, e.g. ``{algorithm!r}``)."""

    setting: str
    when: Callable[[GRPOConfig], bool]
    otherwise: str


# The algorithms whose loss clips πθ/πθ_old (reinforce does not clip; softmax_weighted has no ratio).
CLIPPING_ALGORITHMS = ("grpo", "rloo", "ppo")
LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
PPO_SETTINGS = ("gamma", "lam", "vf_coef", "cliprange_value", "whiten_advantages", "value_head_init_std")


# The built-in tasks (grpo.data.tasks), which have their own held-out split. Named here so that the settings
# need nothing of the data code; a test keeps the two the same.
BUILTIN_TASKS = ("arithmetic", "gsm8k", "calculator")


def has_held_out(config: GRPOConfig) -> bool:
    """Whether the run has held-out rows to score: an eval_dataset, or a built-in task's held-out split."""
    return config.eval_dataset is not None or config.dataset in BUILTIN_TASKS


NO_LORA = "use_lora is off, so the whole model trains, without adapters"
NO_AGENT = "there are no tools and no environment, so each completion is one assistant turn"
NO_ACCEL = "accel is off, which runs plain PyTorch and transformers"
NO_HELD_OUT = (
    "there are no held-out rows to score (dataset {dataset!r} is not a built-in task; set eval_dataset)"
)
ONE_UPDATE = "with num_iterations 1 each batch gets one update, from the policy that sampled it, so "

ACTS_ONLY_WHEN: tuple[ActsWhen, ...] = (
    # --- the model and the speed code ---
    *(ActsWhen(name, lambda c: c.use_lora, NO_LORA) for name in LORA_SETTINGS),
    *(ActsWhen(name, lambda c: c.acts, NO_AGENT) for name in ("max_turns", "tool_timeout")),
    ActsWhen("release_memory", lambda c: c.accel, NO_ACCEL),
    ActsWhen("offload_reference", lambda c: c.accel, NO_ACCEL),
    ActsWhen("offload_reference", lambda c: c.beta != 0, "beta is 0, so there is no reference model"),
    # --- sampling ---
    ActsWhen(
        "vllm_gpu_memory_utilization",
        lambda c: c.generation_backend == "vllm",
        "generation_backend is {generation_backend!r}: there is no vLLM engine to give a share of the GPU",
    ),
    ActsWhen(
        "generation_batch_size",
        lambda c: c.generation_backend != "vllm",
        "generation_backend 'vllm' hands the engine every completion at once and lets it batch them",
    ),
    ActsWhen(
        "max_sampling_rounds",
        lambda c: c.dynamic_sampling,
        "dynamic_sampling is off, so each step samples one batch",
    ),
    # --- rewards ---
    ActsWhen(
        "multi_objective_aggregation",
        lambda c: c.supervision == "outcome",
        "supervision 'process' normalises each group's step rewards together, not each function's",
    ),
    ActsWhen(
        "step_delimiter",
        lambda c: c.supervision == "process",
        "supervision is 'outcome', so completions are not split into steps",
    ),
    ActsWhen(
        "step_delimiter", lambda c: c.step_regex is None, "step_regex is set, and steps end at its matches"
    ),
    ActsWhen(
        "step_regex",
        lambda c: c.supervision == "process",
        "supervision is 'outcome', so completions are not split into steps",
    ),
    # --- the algorithm ---
    ActsWhen(
        "scale_rewards",
        lambda c: c.algorithm == "grpo",
        "algorithm {algorithm!r} does not divide its advantages by a standard deviation (only grpo does)",
    ),
    ActsWhen(
        "scale_rewards",
        lambda c: c.supervision == "outcome",
        "supervision 'process' divides step rewards by their group's standard deviation, whatever it says",
    ),
    ActsWhen(
        "softmax_temperature",
        lambda c: c.algorithm == "softmax_weighted",
        "algorithm {algorithm!r} does not weight completions by softmax(r/τ) (softmax_weighted does)",
    ),
    *(
        ActsWhen(
            name,
            lambda c: c.algorithm in CLIPPING_ALGORITHMS,
            "algorithm {algorithm!r} does not clip the ratio πθ/πθ_old (grpo, rloo and ppo do)",
        )
        for name in ("epsilon", "epsilon_high")
    ),
    *(
        ActsWhen(
            name, lambda c: c.num_iterations > 1, ONE_UPDATE + "the clip has no change of policy to bound"
        )
        for name in ("epsilon", "epsilon_high")
    ),
    ActsWhen(
        "loss_type",
        lambda c: c.algorithm != "softmax_weighted",
        "algorithm 'softmax_weighted' averages its weighted log-likelihoods over groups, whatever it says",
    ),
    ActsWhen(
        "importance_sampling_level",
        lambda c: c.algorithm != "softmax_weighted",
        "algorithm 'softmax_weighted' has no importance ratio",
    ),
    ActsWhen(
        "importance_sampling_level",
        # A sequence's ratio, exp(mean of its tokens' log-ratios), then has the gradient of its tokens' ratios
        # summed; per-token advantages (process supervision, PPO's GAE) weigh the tokens differently.
        lambda c: c.num_iterations > 1 or c.supervision == "process" or c.algorithm == "ppo",
        ONE_UPDATE + "every ratio is 1 and a sequence's ratio gives the same gradient as its tokens' ratios",
    ),
    ActsWhen(
        "ref_model_sync_steps",
        lambda c: c.beta != 0,
        "beta is 0, so there is no reference model to sync",
    ),
    ActsWhen(
        "ref_model_sync_steps",
        lambda c: c.ref_model_sync_steps < c.max_steps,
        "max_steps is {max_steps}, so the reference would first be synced after training ends",
    ),
    *(
        ActsWhen(
            name, lambda c: c.algorithm == "ppo", "algorithm {algorithm!r} has no critic (a PPO setting)"
        )
        for name in PPO_SETTINGS
    ),
    ActsWhen(
        "cliprange_value",
        lambda c: c.num_iterations > 1,
        "with num_iterations 1 each batch gets one update, from the critic that valued it, so the clip has "
        "no change of values to bound",
    ),
    # --- the held-out checks ---
    ActsWhen("eval_max_samples", has_held_out, NO_HELD_OUT),
    # (0, no checks during training, is what a run without held-out rows does anyway)
    ActsWhen("eval_steps", lambda c: has_held_out(c) or c.eval_steps == 0, NO_HELD_OUT),
    ActsWhen(
        "eval_steps",
        lambda c: c.eval_steps < c.max_steps,
        "max_steps is {max_steps}, so no check would come before training ends (eval_after scores the end)",
    ),
    ActsWhen("eval_check_samples", has_held_out, NO_HELD_OUT),
    ActsWhen("eval_check_samples", lambda c: c.eval_steps > 0, "eval_steps is 0, so there are no checks"),
    # --- the schedule ---
    ActsWhen(
        "warmup_steps",
        lambda c: c.lr_scheduler_type != "constant",
        "lr_scheduler_type 'constant' has no warm-up (constant_with_warmup has)",
    ),
)

ACTS_ALWAYS = frozenset(
    {
        # the model, and how it is held
        "model_name_or_path",
        "use_lora",
        "dtype",
        "gradient_checkpointing",
        "fsdp",  # (check_processes refuses it in a single process)
        "accel",
        # Switches whose one value other than the default turns something off, which every run honours
        # (accel off, a model the fused forward does not cover, or no held-out rows turn it off as well).
        "onednn_linear",
        "fused_inference",
        "eval_on_start",
        # data and sampling
        "dataset",
        "eval_dataset",
        "max_prompt_length",
        "shuffle_dataset",
        "num_generations",
        "max_completion_length",
        "temperature",
        "top_p",
        "top_k",
        "mask_truncated_completions",
        "generation_backend",
        "tools",
        "environment",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "dynamic_sampling",
        # rewards
        "reward_funcs",
        "reward_weights",
        "reward_failure",
        "reward_timeout",
        "supervision",
        # the algorithm (PPO too: its reference syncs, its policy loss masks by entropy, its reward honours
        # multi_objective_aggregation)
        "algorithm",
        "top_entropy_quantile",
        "num_iterations",
        "beta",
        # optimisation
        "learning_rate",
        "adam_beta1",
        "adam_beta2",
        "weight_decay",
        "max_grad_norm",
        "lr_scheduler_type",
        "max_nonfinite_updates",
        "max_steps",
        "seed",
        # output (a periodic setting past max_steps still acts at the end: the last step is always logged
        # and checkpointed)
        "output_dir",
        "resume_from_checkpoint",
        "logging_steps",
        "save_steps",
        "save_minutes",
        "save_total_limit",
        "num_threads",
        "log_completions",
        "report_to",
    }
)


def field_default(config: Any, name: str) -> Any:
    """The default of ``config``'s field ``name``."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def ignored_settings(config: GRPOConfig) -> dict[str, str]:
    """Each setting whose value, other than its default, this run would ignore, with the first reason why
    (see :data:`ACTS_ONLY_WHEN`), in the table's order."""
    ignored: dict[str, str] = {}
    for row in ACTS_ONLY_WHEN:
        value = getattr(config, row.setting)
        if (
            row.setting not in ignored
            and value != field_default(config, row.setting)
            and not row.when(config)
        ):
            ignored[row.setting] = row.otherwise.format_map(vars(config))
    return ignored


def check_settings_act(config: GRPOConfig) -> None:
    """Raise ConfigError naming the first setting that this run would ignore, and why."""
    ignored = ignored_settings(config)
    if ignored:
        setting, reason = next(iter(ignored.items()))
        raise ConfigError(f"{setting} = {getattr(config, setting)!r} would be ignored: {reason}")


def check_processes(config: GRPOConfig, world_size: int) -> None:
    """Raise ConfigError when ``world_size`` processes (a torchrun or accelerate launch) cannot run
    ``config`` as one process would, or when the config needs several and has one."""
    if world_size > 1 and config.algorithm == "ppo":
        raise ConfigError(
            "algorithm: ppo runs in one process only (its critic is not synchronised across processes)"
        )
    if world_size > 1 and config.generation_backend == "paged":
        raise ConfigError(
            f"generation_backend: 'paged' cannot seed each group, so {world_size} processes would not sample "
            "what one does; use 'default' (or 'vllm' on GPUs)"
        )
    if world_size == 1 and config.fsdp:
        raise ConfigError(
            "fsdp: shards the model across processes: launch with torchrun --nproc-per-node N (N ≥ 2)"
        )
