"""grpo.accel.memory: what a phase of a step frees goes back to the operating system (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)

# Blocks of 4-8 MB of which every other one is freed while its neighbours stay alive. Served from the heap
# (as glibc does below its threshold, which it raises up to 32 MB as a run goes on; set to 32 MB here so that
# it always does), the holes stay in the process; mapped on their own (from 4 MB) they never do. Prints the
# resident MB the freed blocks still hold, and what they hold after release_free_memory().
PROGRAM = """
import sys, torch
from grpo.accel.memory import map_blocks_from, release_free_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
assert map_blocks_from(4 if sys.argv[1] == "mapped" else 32)
blocks = [torch.ones((1 + i % 2) * 2**20) for i in range(80)]
live = rss()
for i in range(0, len(blocks), 2):
    blocks[i] = None  # 160 MB freed, between blocks that stay
held = 160 - (live - rss())
release_free_memory()
print(round(held), round(160 - (live - rss())))
"""


def resident_growth(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    after_loop, after_release = out.stdout.split()
    return int(after_loop), int(after_release)


def test_freed_heap_pages_go_back_when_released():
    kept, released = resident_growth("heap")
    assert kept > 120  # the heap holds the freed blocks' pages
    assert released < 20


def test_large_blocks_mapped_on_their_own_are_never_kept():
    kept, released = resident_growth("mapped")
    assert kept < 20
    assert released < 20


def test_gradients_in_one_block_are_zero_views_of_one_tensor_and_keep_existing_ones():
    from grpo.accel.memory import gradients_in_one_block

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].bias.grad = torch.ones(2)
    model[0].bias.requires_grad_(False)
    gradients_in_one_block(model.parameters())
    assert model[0].bias.grad is None  # frozen
    assert torch.equal(model[1].bias.grad, torch.ones(2))  # already there: kept
    made = [model[0].weight.grad, model[1].weight.grad]
    assert all(torch.count_nonzero(g) == 0 for g in made)
    assert made[0].untyped_storage().data_ptr() == made[1].untyped_storage().data_ptr()
    model(torch.randn(5, 3)).sum().backward()  # autograd adds into the views
    assert torch.count_nonzero(model[0].weight.grad) > 0
