"""Sampling groups of completions from the policy, and the log-probabilities of sampled tokens."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from grpo import onednn
from grpo.errors import DataError
from grpo.fused import FusedDecoder, unwrap

if TYPE_CHECKING:
    from grpo.generation import GenerationBackend


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
    # (N, C): log-probs of the tokens under the (temperature-scaled) sampler; None when the backend that
    # sampled cannot give them (the trainer then computes them with a forward pass of the policy)
    sampling_logps: torch.Tensor | None
    pad_id: int = 0  # fills completion_ids past each completion's end

    @property
    def prompt_index(self) -> torch.Tensor:
        """(N,) the prompt row of each completion."""
        return torch.arange(len(self.completion_ids)) // self.num_generations

    @property
    def num_groups(self) -> int:
        return len(self.prompt_ids)

    def select_groups(self, groups: list[int]) -> Rollout:
        """The rollout of the given groups (prompts), in that order."""
        rows = [g * self.num_generations + i for g in groups for i in range(self.num_generations)]
        return Rollout(
            self.prompt_ids[groups],
            self.prompt_mask[groups],
            self.completion_ids[rows],
            self.completion_mask[rows],
            self.truncated[rows],
            [self.texts[r] for r in rows],
            self.num_generations,
            None if self.sampling_logps is None else self.sampling_logps[rows],
            self.pad_id,
        )

    @staticmethod
    def join(parts: list[Rollout]) -> Rollout:
        """One rollout of several, prompts left-padded and completions right-padded to common widths."""
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)
        width = max(p.completion_ids.shape[1] for p in parts)

        def left(t: torch.Tensor, value: int) -> torch.Tensor:
            return nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)

        def right(t: torch.Tensor, value: float) -> torch.Tensor:
            return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        first = parts[0]
        known = all(p.sampling_logps is not None for p in parts)
        return Rollout(
            torch.cat([left(p.prompt_ids, first.pad_id) for p in parts]),
            torch.cat([left(p.prompt_mask, 0) for p in parts]),
            torch.cat([right(p.completion_ids, first.pad_id) for p in parts]),
            torch.cat([right(p.completion_mask, 0) for p in parts]),
            torch.cat([p.truncated for p in parts]),
            [text for p in parts for text in p.texts],
            first.num_generations,
            torch.cat([right(p.sampling_logps, 0.0) for p in parts]) if known else None,
            first.pad_id,
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
    fused: bool = True,
    seeds: Sequence[int] | None = None,
    backend: GenerationBackend | None = None,
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (greedy when ``greedy``).

    ``backend`` does the sampling (default: grpo's own loop on ``model``, see
    :class:`grpo.generation.DefaultBackend`); whichever it is, its completions get the same masks, truncation
    flags and texts here. ``batch_size`` bounds the completions decoded at once (default: all); it is rounded
    to whole groups. ``fused`` decodes through :class:`grpo.fused.FusedDecoder` where the model supports it
    (default backend only). ``seeds`` (one per prompt) makes each group draw its randomness from its own
    seed, so that a prompt's completions do not depend on which other prompts are sampled with it, or in
    which process; without them the global random generator is used.
    """
    if seeds is not None and len(seeds) != len(prompt_texts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_texts)} prompts")
    if backend is None:
        from grpo.generation import DefaultBackend  # grpo.generation imports this module

        backend = DefaultBackend(model, fused=fused)
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


def group_uniforms(seeds: Sequence[int], num_generations: int, steps: int) -> torch.Tensor:
    """(len(seeds) × G, steps) uniform numbers in [0, 1): the random draws of each completion at each decoding
    step, group i's from a generator seeded with ``seeds[i]`` alone. Drawn on the CPU, so that they are the
    same whatever the device that decodes."""
    draws = [
        torch.rand((num_generations, steps), generator=torch.Generator().manual_seed(seed)) for seed in seeds
    ]
    return torch.cat(draws) if draws else torch.empty((0, steps))


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


class TransformersSteps:
    """Prefill and decoding steps through the model's own forward: any architecture transformers runs."""

    def __init__(self, model: nn.Module, capacity: int):
        self.model, self.capacity = model, capacity

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=decoding_cache(self.model, self.capacity),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def expand(self, repeats: int) -> None:
        self.cache.batch_repeat_interleave(repeats)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]


class FusedSteps:
    """The same steps through a :class:`grpo.fused.FusedDecoder` and its single key/value buffer."""

    def __init__(self, decoder: FusedDecoder, capacity: int):
        self.decoder, self.capacity = decoder, capacity

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.cache = self.decoder.new_cache(len(ids), ids.shape[1])
        return self.decoder.logits(self.decoder.forward(ids, positions, mask.bool(), self.cache)[:, -1])

    def expand(self, repeats: int) -> None:
        rows = torch.arange(self.cache.keys.shape[1], device=self.cache.keys.device)
        self.cache = self.cache.gathered(rows.repeat_interleave(repeats), self.capacity)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache = self.cache.compacted(rows)

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder.forward(tokens.unsqueeze(1), positions, mask.bool(), self.cache)
        return self.decoder.logits(hidden[:, -1])


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
    decoder: FusedDecoder | None = None,
    uniforms: torch.Tensor | None = None,
    keep_going: Callable[[bool], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode completions (N = prompts × G, width ≤ max_new_tokens), padded with ``pad_id`` after a stop,
    and the log-probs of the chosen tokens under the temperature-scaled (unfiltered) distribution: the
    sampling policy's log-probs, which the trainer reuses instead of a forward pass when μ > 1.

    Each prompt is prefilled once and its key/value cache copied for its G completions, and a row that
    has stopped leaves the batch at once, so no step is spent on prompts twice or on finished rows. With a
    ``decoder`` (the model's weights, fused) the steps run through it instead of the model's own forward.
    ``uniforms`` (N, max_new_tokens), from :func:`group_uniforms`, are each completion's random draws, one per
    step (default: the global generator's, through ``torch.multinomial``).

    ``keep_going(unfinished)`` makes the decoding steps collective: told whether this process has rows
    still running, it says whether any process has. Every process then runs the same number of steps on
    all its rows (a sharded model's every forward is a collective); what follows a stop is padding anyway.
    """
    capacity = prompt_ids.shape[1] + max_new_tokens
    steps = FusedSteps(decoder, capacity) if decoder is not None else TransformersSteps(model, capacity)
    positions = prompt_positions(prompt_mask)
    logits = steps.prefill(prompt_ids, prompt_mask, positions).repeat_interleave(num_generations, dim=0)
    steps.expand(num_generations)
    total = len(logits)
    mask = prompt_mask.new_ones((total, capacity))
    mask[:, : prompt_ids.shape[1]] = prompt_mask.repeat_interleave(num_generations, dim=0)
    length = prompt_ids.shape[1]
    next_position = positions[:, -1:].repeat_interleave(num_generations, dim=0) + 1
    tokens = torch.full((total, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    logps = torch.zeros((total, max_new_tokens), device=prompt_ids.device)
    active = torch.arange(total, device=prompt_ids.device)
    stops = torch.tensor(stop_ids, device=prompt_ids.device)
    finished = torch.zeros(total, dtype=torch.bool, device=prompt_ids.device)
    for step in range(max_new_tokens):
        draws = None if uniforms is None else uniforms[active, step]
        chosen = pick_tokens(
            logits, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, uniforms=draws
        )
        tokens[active, step] = chosen
        logps[active, step] = token_logps(logits, chosen, temperature)
        running = ~torch.isin(chosen, stops)
        if keep_going is not None:
            finished |= ~running  # (no row ever leaves the batch here)
            running = ~finished
            if step == max_new_tokens - 1 or not keep_going(bool(running.any())):
                return tokens[:, : step + 1], logps[:, : step + 1]
            running = torch.ones_like(running)
        elif step == max_new_tokens - 1 or not running.any():
            return tokens[:, : step + 1], logps[:, : step + 1]
        if not running.all():
            keep = running.nonzero().squeeze(1)
            steps.keep(keep)
            active, chosen, mask, next_position = active[keep], chosen[keep], mask[keep], next_position[keep]
        length += 1
        logits = steps.step(chosen, mask[:, :length], next_position)
        next_position = next_position + 1
    return tokens, logps


def pick_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    greedy: bool,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy or sampled next tokens from (B, V) logits, with temperature, top-k and top-p filtering.

    Sampling draws from the global generator (``torch.multinomial``), or, given ``uniforms`` (B,) in [0, 1),
    takes row b's token by inverting its cumulative distribution at ``uniforms[b]``: each row's pick then
    depends on its own draw alone, not on the other rows of the batch.
    """
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
    probs = logits.softmax(dim=-1)
    if uniforms is None:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    cumulative = probs.cumsum(dim=-1)
    # The first token whose cumulative probability exceeds u: a token of probability 0 is never picked.
    targets = (uniforms.to(cumulative) * cumulative[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
    return picked.clamp(max=logits.shape[-1] - 1)


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
    """log_softmax(logits)[token] = logit[token] − logsumexp(logits), without (…, vocab) temporaries.

    A (rows, vocab) tensor is hundreds of megabytes here, and each new one costs page faults as well as
    memory. The forward takes the logsumexp a chunk of rows at a time through one reused buffer. The
    backward builds the gradient, softmax minus one-hot, in one new tensor, or, with ``reuse_logits``, in
    the saved logits' own memory: for logits nothing else reads (a model's fresh output); autograd's
    version check then refuses a second backward through the same graph.
    """

    ROWS_PER_CHUNK = 256

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, reuse_logits: bool, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.reuse_logits = reuse_logits
        flat = logits.reshape(-1, logits.shape[-1])
        lse = flat.new_empty(len(flat))
        # The entropy, −Σ p log p = logsumexp − Σ p·x, comes from the same pass (empty when not asked for).
        entropy = flat.new_empty(len(flat) if with_entropy else 0)
        buffer = flat.new_empty((min(len(flat), _SelectiveLogSoftmax.ROWS_PER_CHUNK), flat.shape[-1]))
        for start in range(0, len(flat), _SelectiveLogSoftmax.ROWS_PER_CHUNK):
            rows = slice(start, start + _SelectiveLogSoftmax.ROWS_PER_CHUNK)
            chunk = flat[rows]
            peak = chunk.amax(dim=-1, keepdim=True)
            shifted = torch.sub(chunk, peak, out=buffer[: len(chunk)]).exp_()
            total = shifted.sum(dim=-1)
            lse[rows] = total.log().add_(peak.squeeze(-1))
            if with_entropy:
                entropy[rows] = lse[rows] - torch.linalg.vecdot(shifted, chunk) / total
        lse = lse.view(tokens.shape)
        ctx.save_for_backward(logits, tokens, lse)
        entropy = entropy.view(tokens.shape) if with_entropy else entropy
        ctx.mark_non_differentiable(entropy)
        logps = logits.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1) - lse
        return logps, entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        shifted = logits.sub_(lse.unsqueeze(-1)) if ctx.reuse_logits else logits - lse.unsqueeze(-1)
        grad_logits = shifted.exp_()  # softmax
        grad_logits.mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits, None, None, None


def selective_log_softmax(
    logits: torch.Tensor, tokens: torch.Tensor, reuse_logits: bool = False
) -> torch.Tensor:
    """log_softmax(logits)[..., tokens] without materialising the full (…, vocab) log-softmax.

    ``reuse_logits`` lets the backward overwrite ``logits`` with its gradient: only for a tensor that
    nothing else reads afterwards.
    """
    return _SelectiveLogSoftmax.apply(logits, tokens, reuse_logits, False)[0]


def selective_log_softmax_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, reuse_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`selective_log_softmax`, and the entropy of each row's distribution (no gradient)."""
    return _SelectiveLogSoftmax.apply(logits, tokens, reuse_logits, True)


class _HeadLogSoftmax(torch.autograd.Function):
    """log_softmax(hidden @ weightᵀ / temperature)[token] for rows of final hidden states, a chunk of rows
    at a time: the (rows, vocab) logits never exist whole, in the forward pass or the backward, which
    recomputes each chunk's logits instead of keeping them (one more LM-head product per token, in exchange
    for the largest tensor of a training micro-batch: 8 completions × 127 tokens × 49,152 logits are 200 MB
    in float32). The gradient reaches the hidden states and, when it is trained, the weight.

    When only the hidden states need a gradient (a frozen head, as under LoRA), the forward pass also keeps
    each row's expected output embedding, softmax @ weight: the gradient of log p[token] with respect to the
    row is then (weight[token] − expected) / temperature, and the backward pass needs no product at all —
    two LM-head products per token instead of three."""

    # A chunk's logits and their gradient are 25 MB each for the default model; 256 rows cost the
    # benchmark's full fine-tuning step 50-70 MB more at its peak, and were no faster.
    ROWS_PER_CHUNK = 128

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = len(hidden)
        logps = hidden.new_empty(rows, dtype=torch.float32)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if with_entropy else logps.new_empty(0)
        # A frozen head: keep softmax @ weight per row (H values) instead of recomputing logits later.
        expected = None
        if ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]:
            expected = torch.empty_like(hidden)
        for part in _row_chunks(rows, _HeadLogSoftmax.ROWS_PER_CHUNK):
            logits = _chunk_logits(product, hidden[part], weight, temperature)
            chosen = logits.gather(-1, tokens[part].unsqueeze(-1)).squeeze(-1)
            peak = logits.amax(dim=-1, keepdim=True)
            # The exponentials overwrite the logits unless the entropy still needs them: a new chunk-sized
            # tensor costs more in page faults than the subtraction itself.
            shifted = (logits - peak if with_entropy else logits.sub_(peak)).exp_()
            total = shifted.sum(dim=-1)
            lse[part] = total.log().add_(peak.squeeze(-1))
            logps[part] = chosen - lse[part]
            if with_entropy:
                entropy[part] = lse[part] - torch.linalg.vecdot(shifted, logits) / total
            if expected is not None:
                expected[part] = product(shifted.to(weight.dtype), weight.t())
                expected[part] /= total.unsqueeze(-1).to(weight.dtype)
        if expected is not None:
            ctx.save_for_backward(weight, tokens, expected)
        else:
            ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.product = temperature, product
        ctx.frozen_head = expected is not None
        # Inside in_place_weight_gradients, the weight's gradient goes straight into its .grad.
        in_place = ctx.needs_input_grad[1] and _GRADIENTS_IN_PLACE.get() and _plain_leaf(weight)
        ctx.grad_into = weight if in_place else None
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[Any, ...]:
        if ctx.frozen_head:
            weight, tokens, expected = ctx.saved_tensors
            scale = (grad / ctx.temperature).unsqueeze(-1).to(expected.dtype)
            return (weight[tokens] - expected).mul_(scale), None, None, None, None, None
        hidden, weight, tokens, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        if ctx.grad_into is not None:
            grad_weight = _dense_grad(ctx.grad_into)
        elif want_weight:
            grad_weight = torch.zeros_like(weight)
        for part in _row_chunks(len(hidden), _HeadLogSoftmax.ROWS_PER_CHUNK):
            logits = _chunk_logits(ctx.product, hidden[part], weight, ctx.temperature)
            # d log p[token] / d logits = one-hot(token) − softmax, times the incoming gradient.
            grad_logits = logits.sub_(lse[part].unsqueeze(-1)).exp_().mul_(-grad[part].unsqueeze(-1))
            grad_logits.scatter_add_(-1, tokens[part].unsqueeze(-1), grad[part].unsqueeze(-1))
            grad_logits = grad_logits.div_(ctx.temperature).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = ctx.product(grad_logits, weight.t())
            if grad_weight is not None:
                # Accumulating in place, BLAS beats oneDNN's product plus an addition.
                grad_weight.addmm_(grad_logits.T, hidden[part])
        if ctx.grad_into is not None:
            grad_weight = None  # already in .grad
        return grad_hidden, grad_weight, None, None, None, None


_GRADIENTS_IN_PLACE = contextvars.ContextVar("gradients_in_place", default=False)


def _dense_grad(parameter: torch.Tensor) -> torch.Tensor:
    if parameter.grad is None:
        parameter.grad = torch.zeros_like(parameter)
    return parameter.grad


@contextlib.contextmanager
def in_place_weight_gradients(model: nn.Module) -> Iterator[None]:
    """Forward and backward passes run inside this put the (trained) LM head's and input embedding's weight
    gradients straight into their ``.grad`` (made zero first when missing), as a training loop that calls
    ``loss.backward()`` would have them. Autograd would otherwise hold each whole-vocabulary gradient until
    the last use of the weight is differentiated: with tied weights, three 113 MB tensors for the default
    model (the head's, the prompts' and the completions' embeddings), summed at the end of the backward
    pass. Here the head adds its gradient itself and the embedding's gradients are sparse (only the rows of
    tokens that occur), added into the dense ``.grad``; and the prompt pass of :func:`shared_prompt_forward`
    runs on stand-ins that share the weights' ``.grad`` (see :func:`_stand_ins_sharing_gradients`). Not for
    ``torch.autograd.grad``, which would not see them; nothing changes for frozen weights or weights with
    hooks."""
    base = unwrap(model)
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    sparse = type(embedding) is nn.Embedding and _plain_leaf(embedding.weight) and not embedding.sparse
    if sparse:
        _dense_grad(embedding.weight)  # so that sparse gradients are added into it, never become it
        embedding.sparse = True
    token = _GRADIENTS_IN_PLACE.set(True)
    try:
        yield
    finally:
        _GRADIENTS_IN_PLACE.reset(token)
        if sparse:
            embedding.sparse = False


def _stand_ins_sharing_gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    """Inside :func:`in_place_weight_gradients`, for the prompt pass of :func:`shared_prompt_forward`: a
    stand-in for each trained weight, sharing its values and its ``.grad`` tensor.

    Both passes use every weight, and autograd sums a weight's gradients from all its uses before adding
    them to ``.grad``: the completion pass's gradients (as large as the trained weights) would wait for the
    prompt pass's, which come last in the backward pass. With the prompt pass on stand-ins, each pass adds
    its gradients to the same ``.grad`` as soon as they are computed."""
    if not _GRADIENTS_IN_PLACE.get():
        return {}
    stand_ins = {}
    for name, parameter in module.named_parameters():
        if _plain_leaf(parameter) and parameter.grad is not None and not parameter.grad.is_sparse:
            stand_in = parameter.detach().requires_grad_()
            stand_in.grad = parameter.grad
            stand_ins[name] = stand_in
    return stand_ins


def _plain_leaf(weight: torch.Tensor) -> bool:
    """A trained parameter whose gradient nothing else watches (no hooks)."""
    hooks = weight._backward_hooks or getattr(weight, "_post_accumulate_grad_hooks", None)
    return weight.requires_grad and weight.is_leaf and not hooks


def _row_chunks(rows: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, rows, size)]


def _chunk_logits(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """A chunk's logits in float32 (as token_logps casts them), divided by the sampling temperature."""
    logits = product(hidden, weight).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def head_token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logps` of the logits that the (bias-free) linear ``head`` would make of ``hidden``
    (…, H), computed a chunk of rows at a time (see :class:`_HeadLogSoftmax`); its products go through
    oneDNN when the head's own forward does (:func:`grpo.onednn.route_linears`)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    product = onednn.linear if onednn.is_routed(head) else F.linear
    logps, entropy = _HeadLogSoftmax.apply(
        flat, head.weight, tokens.reshape(-1), temperature, with_entropy, product
    )
    if with_entropy:
        return logps.view(tokens.shape), entropy.view(tokens.shape)
    return logps.view(tokens.shape)


def plain_output_head(model: nn.Module) -> nn.Module | None:
    """The model's LM head when :func:`head_token_logps` can stand in for it (a plain linear layer without
    bias, not adapted, not sharded), else None."""
    from grpo.sharding import is_sharded

    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or not hasattr(base, "get_decoder"):
        return None
    return None if is_sharded(model) else head


class PromptPrefixLayer(DynamicLayer):
    """A cache layer that holds a prompt's keys and values and hands each forward pass them joined with its
    own, keeping nothing: a pass can run twice (gradient checkpointing recomputes it) and see the same cache.
    """

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> PromptPrefixLayer:
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextlib.contextmanager
def checkpointing_flags(model: nn.Module, **flags: bool) -> Iterator[None]:
    """Set attributes of every module of ``model`` that takes part in gradient checkpointing (its layers and
    the model that decides ``use_cache``) for the duration of the block."""
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    saved = [{name: layer.__dict__[name] for name in flags if name in layer.__dict__} for layer in layers]
    for layer in layers:
        layer.__dict__.update(flags)
    try:
        yield
    finally:
        for layer, before in zip(layers, saved):
            for name in flags:
                layer.__dict__.pop(name, None)
            layer.__dict__.update(before)


@dataclass
class SharedPromptOutputs:
    """What the model says at each completion token's position, from :func:`shared_prompt_forward`."""

    first_logits: torch.Tensor | None  # (B, 1, V): the prompt's last position, which predicts the first token
    rest_logits: torch.Tensor | None  # (B, C − 1, V): the completion's positions that predict the rest
    hidden_states: torch.Tensor | None  # (B, C, H): the final hidden states behind those logits, if asked
    head_hidden: torch.Tensor | None = None  # (B, C, H): under ``head_free``, instead of any logits

    def token_logps(
        self,
        completion_ids: torch.Tensor,
        temperature: float,
        head: nn.Module | None = None,
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (B, C) of ``completion_ids`` (and entropies, with ``with_entropy``), from
        the logits or, under ``head_free``, from ``head`` applied a chunk at a time. Log-probs are joined,
        not the (much larger) logits."""
        if self.head_hidden is not None:
            return head_token_logps(self.head_hidden, head, completion_ids, temperature, with_entropy)
        pieces = [token_logps(self.first_logits, completion_ids[:, :1], temperature, True, with_entropy)]
        if self.rest_logits is not None:
            rest = completion_ids[:, 1:]
            pieces.append(token_logps(self.rest_logits, rest, temperature, True, with_entropy))
        if with_entropy:
            return torch.cat([p[0] for p in pieces], dim=1), torch.cat([p[1] for p in pieces], dim=1)
        return torch.cat(pieces, dim=1)


def shared_prompt_forward(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    output_hidden_states: bool = False,
    head_free: bool = False,
) -> SharedPromptOutputs:
    """The forward passes behind :func:`completion_logps`: each distinct prompt run once, its key/value
    cache gathered to one row per completion, then the completion tokens against it. The first completion
    token is predicted by the prompt's last position; the last one predicts nothing we need, so it is not
    fed in. With ``output_hidden_states`` also the final hidden state at each of those positions (PPO's
    value head reads them). With ``head_free`` both passes stop before the LM head and the final hidden
    states at those positions are returned (``head_hidden``) for :func:`head_token_logps`."""
    used, local_index = torch.unique(prompt_index, return_inverse=True)
    prompt_ids, prompt_mask = prompt_ids[used], prompt_mask[used]
    positions = prompt_positions(prompt_mask)
    # The decoder alone (its final norm included) when the caller applies the head itself.
    runner = unwrap(model).get_decoder() if head_free else model
    prompt_kwargs = dict(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        use_cache=True,
        output_hidden_states=output_hidden_states,
        **({} if head_free else {"logits_to_keep": 1}),
    )
    with checkpointing_flags(model, gradient_checkpointing=False):
        stand_ins = _stand_ins_sharing_gradients(runner)
        if stand_ins:
            out = torch.func.functional_call(runner, stand_ins, (), prompt_kwargs, strict=False)
        else:
            out = runner(**prompt_kwargs)
    prefix = Cache(
        layers=[
            PromptPrefixLayer.holding(layer.keys[local_index], layer.values[local_index])
            for layer in out.past_key_values.layers
        ]
    )
    width = completion_ids.shape[1]
    attention_mask = torch.cat([prompt_mask[local_index], completion_mask.to(prompt_mask.dtype)], dim=1)
    completion_positions = positions[local_index, -1:] + 1 + torch.arange(width, device=positions.device)
    hidden = [out.hidden_states[-1][local_index, -1:]] if output_hidden_states else []
    head_hidden = [out.last_hidden_state[local_index, -1:]] if head_free else []
    rest_logits = None
    if width > 1:
        with checkpointing_flags(model, _can_checkpoint_with_cache=True):
            rest = runner(
                input_ids=completion_ids[:, :-1],
                attention_mask=attention_mask[:, :-1],
                position_ids=completion_positions[:, :-1],
                past_key_values=prefix,  # read whatever use_cache says
                use_cache=False,
                output_hidden_states=output_hidden_states,
            )
        if head_free:
            head_hidden.append(rest.last_hidden_state)
        else:
            rest_logits = rest.logits
        if output_hidden_states:
            hidden.append(rest.hidden_states[-1])
    return SharedPromptOutputs(
        first_logits=None if head_free else out.logits[local_index, -1:],
        rest_logits=rest_logits,
        hidden_states=torch.cat(hidden, dim=1) if hidden else None,
        head_hidden=torch.cat(head_hidden, dim=1) if head_free else None,
    )


def completion_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, C) of completions, computing each distinct prompt once (with
    ``with_entropy``, also the entropy (B, C) of the distribution each token was drawn from, no gradient).

    Completion b continues prompt ``prompt_index[b]``. The prompts this batch uses are run once, their
    key/value cache is gathered to one row per completion (a differentiable index, so gradients reach the
    prompt's activations from every completion), and only the completion tokens run again. When G
    completions share a prompt this does the prompt's work once instead of G times. Logits are divided by
    the sampling temperature so that the probabilities are those of the distribution that was sampled.

    Under gradient checkpointing the prompts (one row each, a small share of the activations) run without
    it, and the completions' layers are recomputed in the backward pass reading the same prompt cache:
    transformers' own checkpointing would drop the cache and run each prompt once per completion.
    """
    head = plain_output_head(model)
    out = shared_prompt_forward(
        model,
        prompt_ids,
        prompt_mask,
        prompt_index,
        completion_ids,
        completion_mask,
        head_free=head is not None,
    )
    return out.token_logps(completion_ids, temperature, head, with_entropy)


def token_logps(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    reuse_logits: bool = False,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` under softmax(logits / temperature), in float32 (``reuse_logits``: see
    :func:`selective_log_softmax`); with ``with_entropy``, also each position's entropy."""
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    # A tensor made here (by the cast or the division) is ours to reuse, whatever the caller said.
    reuse = reuse_logits or scaled is not logits
    if with_entropy:
        return selective_log_softmax_and_entropy(scaled, tokens, reuse_logits=reuse)
    return selective_log_softmax(scaled, tokens, reuse_logits=reuse)


@torch.no_grad()
def token_logps_in_place(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`token_logps` without autograd, worked out in the memory of ``logits``, which it overwrites:
    for a model's fresh output that nothing else reads. A second tensor of their size would cost more in
    page faults than the arithmetic."""
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled.div_(temperature)
    chosen = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    peak = scaled.amax(dim=-1, keepdim=True)
    lse = scaled.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
    return chosen - lse


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
