"""Frozen weights kept out of resident memory between uses: a mapped file the page cache serves.

:func:`offload_reference` moves a run's reference weights (the frozen copy under full fine-tuning; under
LoRA the base weights, which the policy shares) into a :class:`MappedParameters` file;
:func:`release_layers_after_use` lets a training pass hold about one layer of them at a time.
"""

from __future__ import annotations

import mmap
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grpo.models.policy import PolicyAndReference
from grpo.models.structure import unwrap


class MappedParameters:
    """Parameters moved into an unnamed file in ``directory``, memory-mapped: the operating system reads them
    back from its page cache when they are used, and :meth:`release` takes them (all, or some) out of the
    process's resident memory until the next use. For frozen weights that are read a few times per step.

    Each parameter starts on a page of its own, so that any of them can be released alone. The mapping is
    shared, so writes to the parameters (``load_state_dict``) go to the file and survive a release. Tied
    parameters stay tied (one region each).
    """

    @torch.no_grad()
    def __init__(self, parameters: Iterable[torch.Tensor], directory: Path):
        unique = list({id(p): p for p in parameters}.values())
        page = mmap.PAGESIZE
        offsets, size = [], 0
        for parameter in unique:
            offsets.append(size)
            size += -(-parameter.numel() * parameter.element_size() // page) * page
        with tempfile.TemporaryFile(dir=directory) as file:  # unnamed once closed: gone with the process
            file.truncate(max(size, 1))
            self.map = mmap.mmap(file.fileno(), max(size, 1))
        self.regions: dict[int, tuple[int, int]] = {}  # a parameter's address → its (offset, bytes)
        for parameter, offset in zip(unique, offsets, strict=True):
            count = parameter.numel()
            mapped = torch.frombuffer(self.map, dtype=parameter.dtype, count=count, offset=offset)
            parameter.data = mapped.view(parameter.shape).copy_(parameter.data)
            self.regions[parameter.data_ptr()] = (offset, count * parameter.element_size())
        self.release()

    def release(self, tensors: Iterable[torch.Tensor] | None = None) -> None:
        """Drop the mapped pages (of ``tensors`` only, when given: those of them that are mapped parameters or
        views of one from its start) from this process's resident memory; their contents stay in the file."""
        if tensors is None:
            self.map.madvise(mmap.MADV_DONTNEED)
            return
        for tensor in tensors:
            region = self.regions.get(tensor.data_ptr())
            if region is not None:
                self.map.madvise(mmap.MADV_DONTNEED, *region)


def release_layers_after_use(model: nn.Module, release: Callable[[list[torch.Tensor]], None]) -> int:
    """Hooks on each decoder layer of ``model`` that call ``release`` with its frozen weights after its
    forward pass, and after its backward pass (once the gradient of its input is known).

    With the frozen weights in a :class:`MappedParameters` file, a training micro-batch then keeps about one
    layer of them resident at a time instead of all of them: a layer reads its weights back from the page
    cache (no disk) when it next needs them. Releasing after the forward pass alone is not enough: the
    backward pass frees activations into the heap, which keeps them, while it reads the weights back.
    Returns how many layers have the hooks.
    """
    layers = getattr(unwrap(model).get_decoder(), "layers", [])
    for layer in layers:
        frozen = [p for p in layer.parameters() if not p.requires_grad]

        def after_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any, frozen=frozen) -> None:
            release(frozen)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: release(frozen))

        layer.register_forward_hook(after_forward, with_kwargs=True)
    return len(layers)


def offload_reference(models: PolicyAndReference, directory: Path) -> bool:
    """Keep the reference's frozen weights in a mapped file in ``directory``, resident only while they are
    read (see :class:`MappedParameters`): the frozen copy's under full fine-tuning; under LoRA the base
    weights, which the policy shares. True when there are such weights, on the CPU."""
    if not models.needs_reference:
        return False
    if models.uses_adapters:
        frozen = [p for p in models.policy.parameters() if not p.requires_grad]
    else:
        frozen = list(models.reference_model.parameters())
    if not frozen or frozen[0].device.type != "cpu":
        return False
    if models.release_reference_weights is None:
        models.release_reference_weights = MappedParameters(frozen, directory).release
    return True
