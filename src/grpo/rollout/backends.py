"""Generation backends: what samples the completions, behind one interface.

:func:`grpo.rollout.generate.generate` tokenizes the prompts, hands them to a :class:`GenerationBackend`, and
turns what comes back into a :class:`~grpo.rollout.batch.Rollout` (masks, truncation flags, texts) the same
way for every backend. Three backends, made by :func:`make_backend`:

- ``"default"`` (:class:`DefaultBackend`): grpo's own decoding loop on the live policy, through the fused
  decoder where the model allows it. Exact sampling log-probs; seeds per group.
- ``"paged"`` (:class:`PagedBackend`): transformers' continuous batching on the live policy: a paged key/value
  cache, and a finished request's place taken at once by a waiting one. No seeds per group.
- ``"vllm"`` (:class:`VLLMBackend`): a vLLM engine in the trainer's process, holding its own copy of the
  weights, which :meth:`GenerationBackend.sync_weights` brings up to date after optimizer updates.

A backend that cannot give the sampler's log-probs returns None for them; the trainer then computes the old
policy's log-probs with a forward pass when it needs them (``num_iterations`` > 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from grpo.errors import ConfigError
from grpo.rollout.backend_base import GenerationBackend, evaluating
from grpo.rollout.paged import PagedBackend
from grpo.rollout.sampling import Decoded, StepsFactory, TurnEnds, decode, group_uniforms
from grpo.rollout.vllm import VLLMBackend

DecoderFactory = Callable[[int], StepsFactory | None]  # rows decoded at once -> steps
BACKENDS = ("default", "paged", "vllm")


class DefaultBackend(GenerationBackend):
    """grpo's own decoding loop (:func:`grpo.rollout.sampling.decode`) on the live policy: each
    prompt prefilled once, its cache copied to its G completions, finished rows dropped at once; through
    ``decoder``'s steps where it gives some, else transformers' forward steps.

    It reads the policy's weights at each call, so nothing needs syncing. Its log-probs are exact, and with
    seeds each completion's draws come from its group's own generator (inverse-CDF sampling).
    """

    name = "default"
    supports_seeds = True

    def __init__(
        self,
        model: nn.Module,
        decoder: DecoderFactory | None = None,
        keep_going: Callable[[bool], bool] | None = None,
    ):
        # decoder: faster decoding steps for a batch of this many rows (grpo.accel.fused.fused_decoding),
        # or None where it does not apply. keep_going: decoding steps in lockstep with the other ranks (a
        # sharded policy; see grpo.rollout.sampling.decode).
        self.model, self.decoder, self.keep_going = model, decoder, keep_going

    @torch.no_grad()
    def sample(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **settings: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = self.sample_turns(prompt_ids, prompt_mask, **settings)  # one turn per row
        return decoded.tokens, decoded.logps

    @torch.no_grad()
    def sample_turns(
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
        turn_ends: TurnEnds | None = None,
        first_feeds: Sequence[Sequence[int]] | None = None,
    ) -> Decoded:
        """Rows of one or more turns (see :func:`grpo.rollout.sampling.decode`: ``turn_ends`` is told the
        rows' indices in the whole batch), on the CPU."""
        model, g = self.model, num_generations
        pieces = []
        with evaluating(model):
            device = next(model.parameters()).device
            prompts_at_once = max(1, (batch_size or len(prompt_ids) * g) // g)
            steps = self.decoder(prompts_at_once * g) if self.decoder is not None else None
            try:
                for start in range(0, len(prompt_ids), prompts_at_once):
                    rows = slice(start, start + prompts_at_once)
                    uniforms = None
                    if seeds is not None and not greedy:
                        uniforms = group_uniforms(seeds[rows], g, max_new_tokens).to(device)
                    pieces.append(
                        decode(
                            model,
                            prompt_ids[rows].to(device),
                            prompt_mask[rows].to(device),
                            num_generations=g,
                            max_new_tokens=max_new_tokens,
                            stop_ids=list(stop_ids),
                            pad_id=pad_id,
                            temperature=temperature,
                            top_p=top_p,
                            top_k=top_k,
                            greedy=greedy,
                            steps=steps,
                            uniforms=uniforms,
                            keep_going=self.keep_going,
                            turn_ends=offset_rows(turn_ends, start * g),
                            first_feeds=first_feeds and first_feeds[start * g : rows.stop * g],
                        )
                    )
            finally:
                del steps  # a fast decoder's weight copies are needed no longer
        width = max(piece.tokens.shape[1] for piece in pieces)

        def joined(name: str, value: float | bool) -> torch.Tensor:
            parts = [getattr(piece, name).cpu() for piece in pieces]
            return torch.cat([nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in parts])

        return Decoded(
            joined("tokens", pad_id),
            joined("logps", 0.0),
            joined("sampled", False),
            torch.cat([piece.lengths for piece in pieces]),
            torch.cat([piece.ended for piece in pieces]),
        )


def offset_rows(turn_ends: TurnEnds | None, offset: int) -> TurnEnds | None:
    """``turn_ends`` for a slice of the batch starting at row ``offset``."""
    if turn_ends is None or offset == 0:
        return turn_ends
    return lambda rows, turns, last: turn_ends([row + offset for row in rows], turns, last)


def make_backend(
    name: str,
    policy: nn.Module,
    *,
    decoder: DecoderFactory | None = None,
    seed: int = 0,
    vllm_gpu_memory_utilization: float = 0.3,
    max_model_len: int | None = None,
    keep_going: Callable[[bool], bool] | None = None,
) -> GenerationBackend:
    """The backend called ``name`` ("default", "paged" or "vllm") for ``policy``; ``decoder`` and
    ``keep_going`` (a sharded policy's lockstep) are the :class:`DefaultBackend`'s."""
    if name == "default":
        return DefaultBackend(policy, decoder=decoder, keep_going=keep_going)
    if name == "paged":
        return PagedBackend(policy)
    if name == "vllm":
        return VLLMBackend(
            policy, gpu_memory_utilization=vllm_gpu_memory_utilization, seed=seed, max_model_len=max_model_len
        )
    raise ConfigError(f"generation_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
