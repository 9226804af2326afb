"""Sampling a group of completions per prompt, whatever backend decodes them: :func:`generate`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from grpo.errors import DataError
from grpo.rollout.backend_base import GenerationBackend
from grpo.rollout.backends import DefaultBackend
from grpo.rollout.batch import Rollout


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt_texts: list[str],
    *,
    num_generations: int,
    max_completion_length: int,
    max_prompt_length: int = 10**9,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    batch_size: int | None = None,
    seeds: Sequence[int] | None = None,
    backend: GenerationBackend | None = None,
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (greedy when ``greedy``).

    ``backend`` does the sampling (default: grpo's own loop on ``model``'s forward, see
    :class:`grpo.rollout.backends.DefaultBackend`); whichever it is, its completions get the same masks,
    truncation flags and texts here. ``batch_size`` bounds the completions decoded at once (default: all); it
    is rounded to whole groups. ``seeds`` (one per prompt) makes each group draw its randomness from its own
    seed, so that a prompt's completions do not depend on which other prompts are sampled with it, or in
    which process; without them the global random generator is used.
    """
    if seeds is not None and len(seeds) != len(prompt_texts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_texts)} prompts")
    backend = backend or DefaultBackend(model)
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompt_texts, max_prompt_length)
    stops = stop_token_ids(model, tokenizer)
    completion_ids, sampling_logps = backend.sample(
        prompt_ids,
        prompt_mask,
        num_generations=num_generations,
        max_new_tokens=max_completion_length,
        stop_ids=stops,
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        greedy=greedy,
        seeds=None if seeds is None else list(seeds),
        batch_size=batch_size,
    )
    completion_ids = completion_ids.cpu()
    completion_mask, truncated = completion_mask_and_truncation(completion_ids, stops)
    present = completion_mask.bool()
    # Whatever a backend leaves after a completion's stop token is padding here.
    completion_ids = torch.where(present, completion_ids, tokenizer.pad_token_id)
    if sampling_logps is not None:
        sampling_logps = torch.where(present, sampling_logps.cpu(), 0.0)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        truncated,
        texts,
        num_generations,
        sampling_logps,
        tokenizer.pad_token_id,
    )


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the tokenizer's end-of-sequence and the generation config's."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return sorted(ids)


def tokenize_prompts(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    if encoded.input_ids.shape[1] > max_length:
        raise DataError(
            f"a prompt has {encoded.input_ids.shape[1]} tokens, more than max_prompt_length = {max_length}"
        )
    return encoded.input_ids, encoded.attention_mask


def completion_mask_and_truncation(
    completion_ids: torch.Tensor, stop_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask = 1 up to and including the first stop token; truncated = no stop token at all."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, dtype=completion_ids.dtype))
    has_stop = is_stop.any(dim=1)
    first_stop = torch.where(has_stop, is_stop.int().argmax(dim=1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1]).unsqueeze(0)
    mask = (positions <= first_stop.unsqueeze(1)).long()
    return mask, ~has_stop
