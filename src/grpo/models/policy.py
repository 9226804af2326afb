"""The policy being trained and the reference model its KL term is measured against.

:func:`load_policy` loads both: under LoRA the reference is the policy with its adapters switched off (one
copy of the base weights); under full fine-tuning a frozen copy; with ``beta = 0`` none.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from grpo.config.grpo import GRPOConfig
from grpo.models.loading import (
    enable_checkpointing,
    load_causal_lm,
    load_tokenizer,
    pick_dtype,
    resolve_model,
    wrap_lora,
)

REFERENCE_ADAPTER = "reference"


class PolicyAndReference:
    """The trainable policy and a way to run the frozen reference model.

    Under LoRA the reference is the policy with its adapters switched off, so there is one copy of the base
    weights in memory. Under full fine-tuning it is a frozen copy made before training. With beta = 0 there
    is no reference at all.

    :meth:`sync_reference` makes the reference the current policy (DeepSeekMath's iterative RL): under full
    fine-tuning by copying the weights into the frozen copy; under LoRA by copying the adapters into a
    second, frozen adapter that the reference then runs with (the base weights stay shared).
    """

    def __init__(
        self, policy: nn.Module, reference: nn.Module | None, uses_adapters: bool, needs_reference: bool
    ):
        self.policy = policy
        self._reference = reference
        self.uses_adapters = uses_adapters
        self.needs_reference = needs_reference
        # Set by grpo.accel.offload when the reference's frozen weights live in a mapped file: takes them (or
        # those among the tensors given) out of resident memory until they are next read.
        self.release_reference_weights: Callable[[Iterable[torch.Tensor] | None], None] | None = None
        self.reference_is_policy_copy = False  # sync_reference has run (iterative RL): checkpoints hold it

    @property
    def has_reference_adapter(self) -> bool:
        return self.uses_adapters and REFERENCE_ADAPTER in self.policy.peft_config

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        if not self.needs_reference:
            raise RuntimeError("this run has no reference model (beta = 0)")
        if self.has_reference_adapter:
            trained = self.policy.active_adapter
            self.policy.set_adapter(REFERENCE_ADAPTER)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter(trained)  # which also makes only the trained adapter trainable again
        elif self.uses_adapters:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            try:
                yield self._reference
            finally:
                self.release_reference()

    def release_reference(self, tensors: Iterable[torch.Tensor] | None = None) -> None:
        """Take an offloaded reference's weights (or those of them among ``tensors``) out of resident memory
        until they are next read; a no-op unless grpo.accel offloaded them."""
        if self.release_reference_weights is not None:
            self.release_reference_weights(tensors)

    def to(self, device: torch.device) -> PolicyAndReference:
        """Move the policy and a reference copy to ``device``."""
        self.policy.to(device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen copy under full fine-tuning (None under LoRA or without a reference)."""
        return self._reference

    def reference_to_save(self) -> tuple[bool, dict[str, nn.Module] | None]:
        """Whether a checkpoint must hold the reference (it has become a copy of the policy), and the model
        to save for it beside the policy: the frozen copy under full fine-tuning; under LoRA none, since the
        reference adapter is saved with the policy's adapters (peft writes every adapter)."""
        synced = self.needs_reference and (self.has_reference_adapter or self.reference_is_policy_copy)
        return synced, ({REFERENCE_ADAPTER: self._reference} if synced and not self.uses_adapters else None)

    def sync_reference_every(self, every: int, step: int) -> bool:
        """Iterative RL (``ref_model_sync_steps``): after every ``every``-th step the reference becomes the
        policy (0 = never); whether it did after ``step``."""
        if not (every and step % every == 0 and self.needs_reference):
            return False
        self.sync_reference()
        return True

    @torch.no_grad()
    def sync_reference(self) -> None:
        """From now on the reference is the policy as it is now."""
        if not self.needs_reference:
            return
        self.reference_is_policy_copy = True
        if not self.uses_adapters:
            self._reference.load_state_dict(self.policy.state_dict())
            self.release_reference()
            return
        trained = self.policy.active_adapter
        if not self.has_reference_adapter:
            self.policy.add_adapter(REFERENCE_ADAPTER, self.policy.peft_config[trained])
        for name, parameter in self.policy.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                parameter.copy_(
                    self.policy.get_parameter(name.replace(f".{REFERENCE_ADAPTER}.", f".{trained}."))
                )
                parameter.requires_grad_(False)


def load_policy(config: GRPOConfig, path: str | None = None) -> tuple[PolicyAndReference, Any]:
    """The policy (with LoRA adapters when configured), its reference and the tokenizer."""
    path = path or resolve_model(config.model_name_or_path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, pick_dtype(config.dtype, trained=not config.use_lora))
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    needs_reference = config.beta != 0
    if config.use_lora:
        policy = wrap_lora(model, config)
        return PolicyAndReference(policy, None, True, needs_reference), tokenizer
    reference = None
    if needs_reference:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return PolicyAndReference(model, reference, False, needs_reference), tokenizer
