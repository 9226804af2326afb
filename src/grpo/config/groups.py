"""The groups of settings that several stages share, each field declared (and documented) once.

A stage's settings class is built from the groups it needs by dataclass inheritance:
``class SFTConfig(OptimizerSettings, LoRALayerSettings, ModelSettings)`` has every field of those groups and
then its own, all flat (``dataclasses.fields(SFTConfig)`` lists them all; the YAML keys and flags are the
fields' names, whichever class declares them). Inheritance is the only way a dataclass gets another's fields
as its own, flat ones; the groups hold data and no behaviour, so nothing else is inherited. The groups'
fields come first, in the reverse order of the bases, then the stage's own.

Only a field that is the same in every stage that has it (type, default and docstring) belongs to a group;
one whose default or meaning differs between stages (model_name_or_path, use_lora, learning_rate, seed, …)
is declared by each stage. A stage whose field says something more than the group's re-declares it with its
own docstring (SFT's weight_decay, which leaves biases and norm weights alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo.config.values import Boolean, Integer, Number, Settings, Text

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelSettings(Settings):
    """How the model's weights are held and its activations kept: every stage."""

    dtype: Text = "auto"
    """Weights' dtype: "auto", "float32", "bfloat16". "auto" is bfloat16 on a GPU that supports it; on a CPU
    it is bfloat16 for a LoRA run's frozen base where the CPU multiplies bfloat16 in hardware (AVX512-BF16
    or AMX; ``GRPO_CPU_BF16=0`` says no), float32 otherwise. Under LoRA the adapters and their optimizer
    state stay float32 whatever the base's dtype."""
    gradient_checkpointing: Boolean = False
    """Recompute each layer's activations in the backward pass instead of keeping them: much less memory
    for about a third more compute. A prompt shared by several sequences (a GRPO group's completions, a DPO
    pair's two answers) still runs once."""


@dataclass
class LoRASettings(Settings):
    """The LoRA adapters' size: every stage (used when use_lora is on)."""

    lora_r: Integer = 16
    """LoRA rank."""
    lora_alpha: Integer = 32
    """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_r."""


@dataclass
class LoRALayerSettings(LoRASettings):
    """Where the adapters go and their dropout: the stages that train a causal LM (the reward model puts
    adapters on every linear layer of its backbone)."""

    lora_dropout: Number = 0.0
    """Dropout on the LoRA input; 0 by default, so that under GRPO sampling and training see the same
    policy."""
    lora_target_modules: Text = "all-linear"
    """Modules that get adapters: "all-linear" or a comma-separated list of module names."""


@dataclass
class OptimizerSettings(Settings):
    """AdamW's settings that every stage has alike."""

    weight_decay: Number = 0.0
    """AdamW weight decay."""
    max_grad_norm: Number = 1.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
