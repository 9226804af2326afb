"""Sampling groups of completions from the policy, and the log-probabilities of sampled tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from grpo.algo.logprobs import token_logps


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
    memory per step per layer (a sizeable share of a decoding step); this layer copies only the new token.
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


class DecodingSteps(Protocol):
    """Prefill and decoding steps over a key/value cache that the steps keep: what
    :func:`sample_completions` runs, through the model's own forward or a faster one (grpo.accel.fused)."""

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The prompts' (P, L) last-position logits (P, V); their cache is kept."""

    def expand(self, repeats: int) -> None:
        """Repeat each cached row ``repeats`` times (a prompt's cache for each of its G completions)."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the cached ``rows`` (the completions still running), in that order."""

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed (rows, W) tokens at (rows, W) positions, attending to ``mask`` (rows, cached + W) and each
        other causally; the logits (rows, V) after each row's last."""


StepsFactory = Callable[[int], DecodingSteps]  # key/value capacity -> fresh steps


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
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]


# A callback of :func:`decode`: rows that just ended a turn (their sampled stop token), with that turn's
# tokens, and whether that was the last position (no room for more); for each, the tokens to feed it before
# its next turn (a tool's result and the next assistant header), or None when its episode is over. At the
# last position a list (even empty) says the episode would have gone on: the row is cut, not ended.
TurnEnds = Callable[[list[int], list[list[int]], bool], list["list[int] | None"]]


@dataclass
class Decoded:
    """What :func:`decode` returns: N = prompts × G rows, T ≤ max_new_tokens positions."""

    tokens: torch.Tensor  # (N, T): each row's tokens, pad_id after its last
    logps: torch.Tensor  # (N, T): log-probs of the sampled tokens (temperature-scaled, unfiltered); else 0
    sampled: torch.Tensor  # (N, T) bool: tokens the model drew, not those fed to it between turns
    lengths: torch.Tensor  # (N,): tokens in each row
    ended: torch.Tensor  # (N,) bool: the row ended by itself, not cut at max_new_tokens


@torch.no_grad()
def sample_completions(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **settings: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """One turn per row: :func:`decode`'s tokens and log-probs (settings as there, without ``turn_ends``)."""
    decoded = decode(model, prompt_ids, prompt_mask, **settings)
    return decoded.tokens, decoded.logps


@torch.no_grad()
def decode(
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
    steps: StepsFactory | None = None,
    uniforms: torch.Tensor | None = None,
    keep_going: Callable[[bool], bool] | None = None,
    turn_ends: TurnEnds | None = None,
    first_feeds: Sequence[Sequence[int]] | None = None,
) -> Decoded:
    """Decode N = prompts × G rows of at most ``max_new_tokens`` tokens each, with the log-probs of the
    sampled tokens under the temperature-scaled (unfiltered) distribution: the sampling policy's
    log-probs, which the trainer reuses instead of a forward pass when μ > 1.

    Each prompt is prefilled once and its key/value cache copied for its G rows, and a row that has ended
    leaves the batch at once, so no step is spent on prompts twice or on finished rows. The steps run through
    ``steps(capacity)`` (default: :class:`TransformersSteps`, the model's own forward). ``uniforms``
    (N, max_new_tokens), from :func:`group_uniforms`, are each row's random draws, one per position (default:
    the global generator's, through ``torch.multinomial``).

    Multi-turn rows: without ``turn_ends`` a row ends at its first stop token. With it, a row that samples a
    stop token has ended a turn, and ``turn_ends`` says what to feed it before its next turn (or that it
    has ended). Fed tokens take the row's next positions (``sampled`` False); a row keeps its key/value
    cache across turns, and while every running row has tokens to feed they go in one forward pass.
    ``first_feeds`` (one per row) are fed before a row's first turn (an environment's first observation).

    ``keep_going(unfinished)`` makes the decoding steps collective: told whether this process has rows
    still running, it says whether any process has. Every process then runs the same number of steps, one
    position each, on all its rows (a sharded model's every forward is a collective); what follows a row's
    end is padding.
    """
    capacity = prompt_ids.shape[1] + max_new_tokens
    device = prompt_ids.device
    steps = (steps or functools.partial(TransformersSteps, model))(capacity)
    positions = prompt_positions(prompt_mask)
    logits = steps.prefill(prompt_ids, prompt_mask, positions).repeat_interleave(num_generations, dim=0)
    steps.expand(num_generations)
    total = len(logits)
    mask = prompt_mask.new_ones((total, capacity))
    mask[:, : prompt_ids.shape[1]] = prompt_mask.repeat_interleave(num_generations, dim=0)
    next_position = positions[:, -1:].repeat_interleave(num_generations, dim=0) + 1
    tokens = torch.full((total, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=device)
    logps = torch.zeros((total, max_new_tokens), device=device)
    sampled = torch.zeros((total, max_new_tokens), dtype=torch.bool, device=device)
    lengths = torch.full((total,), max_new_tokens, dtype=torch.long)
    ended = torch.zeros(total, dtype=torch.bool)
    stops = torch.tensor(stop_ids, device=device)
    active = torch.arange(total, device=device)
    feeds: dict[int, list[int]] = {r: list(f) for r, f in enumerate(first_feeds or []) if f}
    turn_start = [len(feeds.get(r, [])) for r in range(total)]
    position = 0  # every running row's next position: rows advance together
    while True:
        draws = None if uniforms is None else uniforms[active, position]
        chosen = pick_tokens(
            logits, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, uniforms=draws
        )
        drew = torch.ones(len(active), dtype=torch.bool, device=device)
        for i, row in enumerate(active.tolist() if feeds else []):
            if row in feeds:
                chosen[i], drew[i] = feeds[row].pop(0), False
                if not feeds[row]:
                    del feeds[row]
        tokens[active, position] = chosen
        logps[active, position] = torch.where(drew, token_logps(logits, chosen, temperature), 0.0)
        sampled[active, position] = drew
        position += 1
        running = ~(drew & torch.isin(chosen, stops) & ~ended[active.cpu()].to(device))
        if turn_ends is not None and not running.all():
            running = continue_turns(active, running, tokens, turn_start, position, turn_ends, feeds)
        for row in active[~running].tolist():
            ended[row], lengths[row] = True, position
        if keep_going is not None:
            if position == max_new_tokens or not keep_going(bool((~ended).any())):
                break
            running = torch.ones_like(running)  # (no row ever leaves the batch here)
        elif position == max_new_tokens or not running.any():
            break
        if not running.all():
            keep = running.nonzero().squeeze(1)
            steps.keep(keep)
            active, chosen, mask, next_position = active[keep], chosen[keep], mask[keep], next_position[keep]
        # While every running row has tokens to feed, they go with this step's token in one pass (leaving
        # the last position to the loop, which ends there).
        width = 1
        if keep_going is None and feeds.keys() >= set(active.tolist()):
            width += min(min(len(feeds[row]) for row in active.tolist()), max_new_tokens - position - 1)
        inputs = chosen.unsqueeze(1)
        if width > 1:
            fed = [[feeds[row].pop(0) for _ in range(width - 1)] for row in active.tolist()]
            for row in [r for r in active.tolist() if not feeds[r]]:
                del feeds[row]
            extra = torch.tensor(fed, dtype=tokens.dtype, device=device)
            tokens[active, position : position + width - 1] = extra
            position += width - 1
            inputs = torch.cat([inputs, extra], dim=1)
        offsets = torch.arange(width, device=device)
        logits = steps.step(inputs, mask[:, : prompt_ids.shape[1] + position], next_position + offsets)
        next_position = next_position + width
    after_end = torch.arange(position).unsqueeze(0) >= lengths.unsqueeze(1)
    after_end = after_end.to(device)
    tokens, logps, sampled = tokens[:, :position], logps[:, :position], sampled[:, :position]
    return Decoded(
        tokens.masked_fill(after_end, pad_id),
        logps.masked_fill(after_end, 0.0),
        sampled & ~after_end,
        lengths.clamp(max=position),
        ended,
    )


def continue_turns(
    active: torch.Tensor,
    running: torch.Tensor,
    tokens: torch.Tensor,
    turn_start: list[int],
    position: int,
    turn_ends: TurnEnds,
    feeds: dict[int, list[int]],
) -> torch.Tensor:
    """Ask ``turn_ends`` about the rows whose turn just ended (``running`` False): those given tokens to
    feed (or an empty list: none) run on, their feeds recorded and their next turn starting after them;
    the others stay ended."""
    indices = (~running).nonzero().squeeze(1).tolist()
    rows = [int(active[i]) for i in indices]
    turns = [tokens[row, turn_start[row] : position].tolist() for row in rows]
    last = position == tokens.shape[1]
    running = running.clone()
    for i, row, feed in zip(indices, rows, turn_ends(rows, turns, last)):
        if feed is not None:
            if feed:
                feeds[row] = list(feed)
            turn_start[row] = position + len(feed)
            running[i] = True  # (at the last position: cut, so not ended)
    return running


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
