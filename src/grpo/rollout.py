"""Sampling groups of completions from the policy, and the log-probabilities of sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from grpo.errors import DataError


@dataclass
class Rollout:
    """A batch of sampled completions; completion i belongs to prompt i // num_generations."""

    prompt_ids: torch.Tensor  # (prompts, P), left-padded, each prompt once
    prompt_mask: torch.Tensor  # (prompts, P)
    completion_ids: torch.Tensor  # (N, C), right-padded; N = prompts × num_generations
    completion_mask: torch.Tensor  # (N, C): 1 up to and including the end-of-sequence token
    truncated: torch.Tensor  # (N,) bool: stopped by max_completion_length, not by the model
    texts: list[str]  # decoded completions, special tokens removed
    num_generations: int
    sampling_logps: torch.Tensor  # (N, C): log-probs of the tokens under the (temperature-scaled) sampler

    @property
    def prompt_index(self) -> torch.Tensor:
        """(N,) the prompt row of each completion."""
        return torch.arange(len(self.completion_ids)) // self.num_generations


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
    """Sample ``num_generations`` completions for each prompt (greedy when ``greedy``).

    ``batch_size`` bounds the completions decoded at once (default: all); it is rounded to whole groups.
    """
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompt_texts, max_prompt_length)
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts_at_once = max(1, (batch_size or len(prompt_ids) * num_generations) // num_generations)
    pieces = []
    for start in range(0, len(prompt_ids), prompts_at_once):
        pieces.append(
            sample_completions(
                model,
                prompt_ids[start : start + prompts_at_once].to(device),
                prompt_mask[start : start + prompts_at_once].to(device),
                num_generations=num_generations,
                max_new_tokens=max_completion_length,
                stop_ids=stops,
                pad_id=tokenizer.pad_token_id,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                greedy=greedy,
            )
        )
    model.train(was_training)

    width = max(ids.shape[1] for ids, _ in pieces)
    completion_ids = torch.cat(
        [
            nn.functional.pad(ids.cpu(), (0, width - ids.shape[1]), value=tokenizer.pad_token_id)
            for ids, _ in pieces
        ]
    )
    sampling_logps = torch.cat([nn.functional.pad(lp.cpu(), (0, width - lp.shape[1])) for _, lp in pieces])
    completion_mask, truncated = completion_mask_and_truncation(completion_ids, stops)
    visible = torch.where(completion_mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(visible, skip_special_tokens=True)
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        truncated,
        texts,
        num_generations,
        sampling_logps,
    )


class PreallocatedLayer(DynamicLayer):
    """A key/value cache layer that writes each new token into a buffer sized once for the whole decode.

    transformers' DynamicLayer concatenates the whole cache with each new token, which copies O(length)
    memory per step per layer (a fifth of a decoding step here); this layer copies only the new token.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            size = max(self.capacity, key_states.shape[-2])
            self.key_buffer = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty(
                (*value_states.shape[:-2], size, value_states.shape[-1])
            )
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"key/value cache capacity {self.key_buffer.shape[-2]} exceeded")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer = self.key_buffer[indices]
        self.value_buffer = self.value_buffer[indices]
        self._refresh_views()


def decoding_cache(model: nn.Module, capacity: int) -> Cache | None:
    """A preallocated cache for models whose every layer attends to the whole past; None (the model's own
    cache) for sliding-window, hybrid or recurrent models."""
    config = getattr(model, "config", None)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"} or getattr(config, "sliding_window", None):
        return None
    return Cache(layer_class_to_replicate=lambda: PreallocatedLayer(capacity))


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_generations: int,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode completions (N = prompts × G, width ≤ max_new_tokens), padded with ``pad_id`` after a stop,
    and the log-probs of the chosen tokens under the temperature-scaled (unfiltered) distribution: the
    sampling policy's log-probs, which the trainer reuses instead of a forward pass when μ > 1.

    Each prompt is prefilled once and its key/value cache copied for its G completions, and a row that
    has stopped leaves the batch at once, so no step is spent on prompts twice or on finished rows.
    """
    positions = prompt_positions(prompt_mask)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        past_key_values=decoding_cache(model, prompt_ids.shape[1] + max_new_tokens),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_generations)
    logits = out.logits[:, -1].repeat_interleave(num_generations, dim=0)
    mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    next_position = positions[:, -1:].repeat_interleave(num_generations, dim=0) + 1
    total = len(mask)
    tokens = torch.full((total, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    logps = torch.zeros((total, max_new_tokens), device=prompt_ids.device)
    active = torch.arange(total, device=prompt_ids.device)
    stops = torch.tensor(stop_ids, device=prompt_ids.device)
    for step in range(max_new_tokens):
        chosen = pick_tokens(logits, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
        tokens[active, step] = chosen
        logps[active, step] = token_logps(logits, chosen, temperature)
        running = ~torch.isin(chosen, stops)
        if step == max_new_tokens - 1 or not running.any():
            return tokens[:, : step + 1], logps[:, : step + 1]
        if not running.all():
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, chosen, mask, next_position = active[keep], chosen[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        out = model(
            input_ids=chosen.unsqueeze(1),
            attention_mask=mask,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
        next_position = next_position + 1
    return tokens, logps


def pick_tokens(
    logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int, greedy: bool
) -> torch.Tensor:
    """Greedy or sampled next tokens from (B, V) logits, with temperature, top-k and top-p filtering."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)


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


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[token] = logit[token] − logsumexp(logits), with a lean backward.

    The forward takes the logsumexp a chunk of rows at a time, so its temporary is a chunk, not the whole
    (…, vocab) tensor. The backward builds the gradient, one-hot minus softmax, in a single tensor, where
    autograd's own gather and logsumexp backwards would allocate several of that size.
    """

    ROWS_PER_CHUNK = 256

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        lse = torch.cat(
            [torch.logsumexp(chunk, dim=-1) for chunk in flat.split(_SelectiveLogSoftmax.ROWS_PER_CHUNK)]
        )
        lse = lse.view(tokens.shape)
        ctx.save_for_backward(logits, tokens, lse)
        return logits.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, tokens, lse = ctx.saved_tensors
        grad_logits = torch.exp(logits - lse.unsqueeze(-1))  # softmax
        grad_logits.mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits, None


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., tokens] without materialising the full (…, vocab) log-softmax."""
    return _SelectiveLogSoftmax.apply(logits, tokens)


def completion_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs (B, C) of completions, computing each distinct prompt once.

    Completion b continues prompt ``prompt_index[b]``. The prompts this batch uses are run once, their
    key/value cache is gathered to one row per completion (a differentiable index, so gradients reach the
    prompt's activations from every completion), and only the completion tokens run again. When G
    completions share a prompt this does the prompt's work once instead of G times. Logits are divided by
    the sampling temperature so that the probabilities are those of the distribution that was sampled.
    """
    used, local_index = torch.unique(prompt_index, return_inverse=True)
    prompt_ids, prompt_mask = prompt_ids[used], prompt_mask[used]
    positions = prompt_positions(prompt_mask)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    cache.batch_select_indices(local_index)
    width = completion_ids.shape[1]
    attention_mask = torch.cat([prompt_mask[local_index], completion_mask.to(prompt_mask.dtype)], dim=1)
    completion_positions = positions[local_index, -1:] + 1 + torch.arange(width, device=positions.device)
    # The first completion token is predicted by the prompt's last position; the last completion token
    # predicts nothing we need, so it is not fed in. Log-probs are joined, not the (much larger) logits.
    logps = [token_logps(out.logits[local_index, -1:], completion_ids[:, :1], temperature)]
    if width > 1:
        rest = model(
            input_ids=completion_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=completion_positions[:, :-1],
            past_key_values=cache,
            use_cache=True,
        ).logits
        logps.append(token_logps(rest, completion_ids[:, 1:], temperature))
    return torch.cat(logps, dim=1)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of ``tokens`` under softmax(logits / temperature), in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, tokens)


def completion_logps_unshared(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The plain computation that :func:`completion_logps` must match: each prompt+completion run whole."""
    input_ids = torch.cat([prompt_ids[prompt_index], completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask[prompt_index], completion_mask.to(prompt_mask.dtype)], dim=1)
    width = completion_ids.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=prompt_positions(attention_mask),
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    return token_logps(logits, completion_ids, temperature)
