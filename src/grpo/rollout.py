"""Sampling groups of completions from the policy, and the log-probabilities of sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from grpo.errors import DataError


@dataclass
class Rollout:
    """A batch of prompt+completion token ids; row i*G+j is completion j of prompt i."""

    prompt_ids: torch.Tensor  # (N, P), left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C), right-padded
    completion_mask: torch.Tensor  # (N, C): 1 up to and including the end-of-sequence token
    truncated: torch.Tensor  # (N,) bool: stopped by max_completion_length, not by the model
    texts: list[str]  # decoded completions, special tokens removed

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


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
        raise DataError(f"a prompt has {encoded.input_ids.shape[1]} tokens, more than max_prompt_length = {max_length}")
    return encoded.input_ids, encoded.attention_mask


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
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (one greedy pass when ``greedy``)."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompt_texts, max_prompt_length)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    stops = stop_token_ids(model, tokenizer)
    sampling: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k or None}
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_size = batch_size or len(prompt_ids)
    pieces = []
    for start in range(0, len(prompt_ids), batch_size):
        ids = prompt_ids[start : start + batch_size].to(device)
        mask = prompt_mask[start : start + batch_size].to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_completion_length,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **sampling,
        )
        pieces.append(out[:, ids.shape[1] :].cpu())
    model.train(was_training)

    width = max(p.shape[1] for p in pieces)
    completion_ids = torch.cat(
        [nn.functional.pad(p, (0, width - p.shape[1]), value=tokenizer.pad_token_id) for p in pieces]
    )
    completion_mask, truncated = completion_mask_and_truncation(completion_ids, stops)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts)


def completion_mask_and_truncation(completion_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask = 1 up to and including the first stop token; truncated = no stop token at all."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, dtype=completion_ids.dtype))
    has_stop = is_stop.any(dim=1)
    first_stop = torch.where(has_stop, is_stop.int().argmax(dim=1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1]).unsqueeze(0)
    mask = (positions <= first_stop.unsqueeze(1)).long()
    return mask, ~has_stop


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., tokens] without materialising the full (…, vocab) log-softmax."""
    picked = logits.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs (B, C) of the last ``completion_length`` tokens of ``input_ids``.

    Only the completion positions go through the LM head (``logits_to_keep``), and logits are divided by the
    sampling temperature so that the probabilities are those of the distribution that was sampled.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion_length + 1).logits
    logits = logits[:, :-1, :].float() / temperature
    return selective_log_softmax(logits, input_ids[:, -completion_length:])
