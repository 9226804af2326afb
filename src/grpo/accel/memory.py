"""Keeping the resident memory of a CPU run near what its tensors need.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves blocks under its mmap
threshold from heaps it rarely gives back, and raises that threshold (up to 32 MB) each time a larger
mapped block is freed; a step's many differently sized activations then leave the heap fragmented, and the
process keeps far more than its live tensors (benchmarks/RESULTS.md has the measured figures).

Two remedies, both glibc's own: a fixed mmap threshold, so that every block of at least a few megabytes is
mapped on its own and returned when freed, and ``malloc_trim`` between the phases of a step (sampling,
scoring, each update), which returns the free pages inside the heaps. Elsewhere (another C library, or
not Linux) these are no-ops.

A block mapped afresh costs a page fault per 4 KB page on first touch, comparable to the product that
fills it for a chunk of logits; so the hot paths reuse such memory in place instead (the LM head's chunks,
the reference's scoring). PyTorch's own ``THP_MEM_ALLOC_ENABLE=1``, set before a process's first CPU tensor,
backs tensors of 2 MB or more with transparent huge pages instead. grpo does not set it: where measured it
helped the benchmark's lean step a little and slowed the default run (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Iterable

import torch

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def map_blocks_from(megabytes: float) -> bool:
    """Serve every allocation of at least ``megabytes`` with its own mapping, given back when it is freed
    (this also stops glibc from raising the threshold by itself). True when the C library took it."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, int(megabytes * 2**20)))


def release_free_memory() -> None:
    """Return the free pages of the C heaps to the operating system (a few milliseconds)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def gradients_in_one_block(parameters: Iterable[torch.Tensor]) -> None:
    """Give each parameter that has no gradient yet a zero one, all of them views of one block.

    Made before the first backward pass of an update, the gradients (as large as the trained weights) are
    one allocation instead of hundreds of few-megabyte blocks scattered between the activations, which
    would keep the heap under them from being given back while they live."""
    missing = [p for p in parameters if p.requires_grad and p.grad is None]
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for parameter in missing:
        by_kind.setdefault((parameter.dtype, parameter.device), []).append(parameter)
    for (dtype, device), group in by_kind.items():
        block = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=device)
        offset = 0
        for parameter in group:
            parameter.grad = block[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()


# release_memory: allocations this large are mapped on their own. Above a micro-batch's MLP activations
# (8 × 127 × 1536 floats = 6.2 MB for the default model), which stay on the heap: mapping them too lowers
# the peak further but costs more in page faults on fresh memory than it saves (benchmarks/RESULTS.md).
MAPPED_BLOCK_MB = 8
