"""Data parallelism over torch.distributed: which rank does what, and the few collectives a step needs.

A run launched by ``torchrun`` or ``accelerate launch`` (they set ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``) takes ``prompts_per_step`` prompts per rank each step (batch settings are per process, as in
TRL), contiguous shares of the step's prompts. A rank samples, scores and trains on its own groups (a group
never spans ranks); the ranks meet only to sum gradients before each update, to count the batch's tokens
(the "dapo" normaliser), and to gather what the logs show. Every rank holds the whole model and the same
optimizer state, so one rank writes the files, and a run can resume on any number of ranks. Without those
variables, or with ``WORLD_SIZE=1``, nothing here talks to anyone.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size``, on GPU ``local_rank`` of its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The rank that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a step's ``items`` (whose count the world size divides)."""
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    def first_index(self, total: int) -> int:
        """The position in the whole step of this rank's first item, out of ``total``."""
        return self.rank * (total // self.world_size)

    # --- collectives (no-ops on one process) ----------------------------------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (e.g. a signal asked one of them to stop)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the ranks (the same keys on every rank)."""
        if not self.distributed:
            return values
        keys = sorted(values)
        stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device())
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, stacked.tolist())}

    def gather(self, item: T) -> list[T]:
        """Every rank's ``item`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [item]
        items: list[Any] = [None] * self.world_size
        dist.all_gather_object(items, item)
        return items

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Make every rank's ``tensors`` rank 0's (e.g. freshly initialised adapters), in place."""
        if self.distributed:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    @property
    def device(self) -> torch.device:
        """Where this rank trains: its own GPU when the node has one per rank, else the CPU."""
        if torch.cuda.is_available() and torch.cuda.device_count() > self.local_rank:
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def collective_device() -> torch.device:
    """Where small tensors must live for a collective: the GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ranks_from_environment() -> Ranks:
    """The ranks torchrun / accelerate launch describe in the environment (one process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return Ranks(rank, world, local)


def init(ranks: Ranks, timeout_minutes: float = 30) -> None:
    """Join the process group (NCCL when each rank has a GPU, gloo otherwise) and pick this rank's GPU."""
    if not ranks.distributed or dist.is_initialized():
        return
    use_gpu = ranks.device.type == "cuda"
    if use_gpu:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(
        backend="nccl" if use_gpu else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def shutdown() -> None:
    if dist.is_initialized():
        # A sharded model's state holds the group and its pending work in reference cycles: free them while
        # the group is alive, or they go at interpreter exit and gloo's threads abort the process.
        gc.collect()
        dist.destroy_process_group()


def group_seeds(seed: int, step: int, draw: int, first: int, count: int) -> list[int]:
    """The sampling seed of each of ``count`` groups, from the run's seed, the step, the draw (dynamic
    sampling's extra rounds) and the group's position in the whole step: the same completions whatever the
    number of processes, and on resume without any saved generator state."""

    def seed_of(index: int) -> int:
        digest = hashlib.blake2b(f"{seed}/{step}/{draw}/{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    return [seed_of(first + i) for i in range(count)]


def sum_gradients_(
    parameters: Iterable[torch.Tensor], ranks: Ranks, scale: float, bucket_elements: int = 2**24
) -> None:
    """Sum the gradients over the ranks and multiply them by ``scale``, a bucket of parameters per
    all-reduce (few messages, and never a second copy of all the gradients at once). A parameter no rank
    has a gradient for keeps none, as it would in one process: AdamW then leaves it alone."""
    if not ranks.distributed:
        return
    params = [p for p in parameters if p.requires_grad]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=collective_device())
    present = ranks.sum_(has_grad)
    params = [p for p, seen in zip(params, present.tolist()) if seen]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params, bucket_elements):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.mul_(scale)
        for p, piece in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(piece.view_as(p.grad))


def _buckets(params: list[torch.Tensor], limit: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if bucket and size + p.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
