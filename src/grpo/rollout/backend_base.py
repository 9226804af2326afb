"""What every generation backend provides (:class:`GenerationBackend`), and the helpers they share."""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import nn


class GenerationBackend(ABC):
    """Samples completions for tokenized prompts.

    ``supports_seeds`` says whether a group sampled from a seed is the same whatever else is in the batch
    (which data-parallel runs need to match a single-process run).
    """

    name: ClassVar[str]
    supports_seeds: ClassVar[bool]

    @abstractmethod
    def sample(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        num_generations: int,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Completions for the left-padded prompts (P, L): ``num_generations`` per prompt, prompt i's at rows
        i·G … i·G + G − 1 of (N, C ≤ max_new_tokens) token ids, right-padded with ``pad_id`` after each
        completion's first stop token; and the log-probs (N, C) of those tokens under softmax(logits /
        temperature), unfiltered by top-k and top-p, or None where the backend cannot give them.

        ``seeds`` (one per prompt) seed each group's randomness; without them the backend draws from the
        global generator, so ``torch.manual_seed`` makes it reproducible. ``batch_size`` bounds the
        completions decoded at once, where the backend decides that.
        """

    def sync_weights(self, policy: nn.Module) -> None:
        """Make the next samples come from ``policy`` as it is now (the trainer calls it before sampling when
        optimizer updates changed the policy since the last sampling). A no-op for backends that decode with
        the live policy."""
        return None

    def close(self) -> None:
        """Release what the backend holds (an engine, files)."""
        return None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def right_padded(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> torch.Tensor:
    """Rows of different lengths as one (len(rows), ≥ 1) tensor, filled with ``value`` on the right."""
    width = max(1, max((len(r) for r in rows), default=0))
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def until_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens up to and including the first stop token."""
    tokens = list(tokens)
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


def logps_are_exact(greedy: bool, top_k: int, top_p: float) -> bool:
    """Whether an engine's log-probs of sampled tokens are the ones the trainer needs. Engines report them
    under the distribution they sampled from; that is softmax(logits / temperature) only when no top-k or
    top-p filter renormalised it, and sampling at all (greedy decoding reports unscaled ones)."""
    return not greedy and top_k == 0 and top_p >= 1.0


def completion_seed(seed: int, index: int) -> int:
    """A 63-bit seed for completion ``index`` of the group seeded ``seed``: distinct for distinct pairs, so
    that no two completions of a batch share their randomness (vLLM would give a request with ``n`` samples
    the seeds s, s + 1, …, which overlap between groups seeded s and s + 1)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
