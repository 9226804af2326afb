"""grpo.accel in one call: :func:`install` applies the CPU speed and memory code to a run's models and returns
the :class:`Speedups` its trainer calls at the few places where that code stands in for the plain path.

With ``accel: false`` (``--no-accel``) :func:`install` changes nothing and returns ``Speedups()``, the plain
path: transformers' forward for sampling and scoring, full logits, autograd's own gradient accumulation, the
allocator's defaults. The two compute the same results to float rounding (tests hold each piece to it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from grpo.accel import fused, onednn
from grpo.accel.chunked_head import chunked_completion_logps, in_place_weight_gradients
from grpo.accel.lean_layers import make_lean
from grpo.accel.memory import (
    MAPPED_BLOCK_MB,
    gradients_in_one_block,
    map_blocks_from,
    release_free_memory,
)
from grpo.accel.offload import offload_reference, release_layers_after_use
from grpo.models.policy import PolicyAndReference
from grpo.models.structure import is_sharded, unwrap
from grpo.rollout.backends import DecoderFactory
from grpo.rollout.scoring import completion_logps

Release = Callable[[Iterable[torch.Tensor] | None], None]


class AccelSettings(Protocol):
    """The settings :func:`install` reads (GRPOConfig's)."""

    accel: bool
    onednn_linear: bool
    fused_inference: bool
    release_memory: bool
    offload_reference: bool


@dataclass(frozen=True)
class Speedups:
    """Where a trainer may run faster or leaner code than the plain path. The defaults are the plain path."""

    fused_inference: bool = False  # sample and score without gradients through grpo.accel.fused
    chunked_head: bool = False  # training log-probs through the chunked LM head (no full logits)
    gradients_in_place: bool = False  # gradients in one block, the head's and embedding's added in place
    release_memory: bool = False  # give free heap pages back to the system between a step's phases

    def decoder(self, model: nn.Module, release: Release | None = None) -> DecoderFactory | None:
        """The sampling backend's fast decoding steps for ``model`` (None: transformers' forward)."""
        return fused.fused_decoding(model, release) if self.fused_inference else None

    def scorer(self, model: nn.Module, batch_hint: int, release: Release | None = None) -> Callable[..., Any]:
        """``model``'s log-probs of completions without gradients, with
        :func:`grpo.rollout.scoring.completion_logps`' signature; ``release`` is given an offloaded model's
        weights as soon as the fused decoder has copied them."""
        if self.fused_inference and fused.supports(model):
            return fused.FusedDecoder(model, batch_hint, release=release).completion_logps
        return self.training_scorer(model)

    def training_scorer(self, model: nn.Module) -> Callable[..., Any]:
        """``model``'s log-probs of completions (entropies too with ``with_entropy=True``), differentiable."""
        score = chunked_completion_logps if self.chunked_head else completion_logps
        return functools.partial(score, model)

    @contextlib.contextmanager
    def training_pass(self, model: nn.Module) -> Iterator[None]:
        """Around a micro-batch's forward pass: gradients added straight into ``.grad`` where they can be."""
        with in_place_weight_gradients(model) if self.gradients_in_place else contextlib.nullcontext():
            yield

    def before_update(self, parameters: Iterable[torch.Tensor]) -> None:
        """Before an update's first backward pass: its gradients as one block of memory."""
        if self.gradients_in_place:
            gradients_in_one_block(parameters)

    def between_phases(self) -> None:
        """Between the phases of a step (sampling, scoring, each update): what one phase freed is not kept
        for the next."""
        if self.release_memory:
            release_free_memory()


def install(models: PolicyAndReference, settings: AccelSettings, output_dir: Path) -> Speedups:
    """Apply grpo.accel to ``models`` as ``settings`` say and return the trainer's :class:`Speedups`."""
    if not settings.accel:
        return Speedups()
    make_models_lean(models)
    if settings.release_memory:
        map_blocks_from(MAPPED_BLOCK_MB)
    if settings.onednn_linear:
        onednn.route_linears(models.policy)
    if settings.offload_reference:
        output_dir.mkdir(parents=True, exist_ok=True)
        if offload_reference(models, output_dir) and models.uses_adapters:
            # The base weights are the policy's too: training holds about a layer of them at a time.
            release_layers_after_use(models.policy, models.release_reference)
    return Speedups(
        fused_inference=settings.fused_inference,
        chunked_head=True,
        gradients_in_place=not is_sharded(models.policy),  # (a sharded model's gradients are FSDP's)
        release_memory=settings.release_memory,
    )


def make_models_lean(models: PolicyAndReference) -> None:
    """:func:`grpo.accel.lean_layers.make_lean` for the policy and a reference copy."""
    for model in (models.policy, models.reference_model):
        if model is not None:
            make_lean(unwrap(model))
