"""The "paged" generation backend: transformers' continuous batching (a paged key/value cache) on the live
policy."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from grpo.models.structure import unwrap
from grpo.rollout.backend_base import GenerationBackend, evaluating, logps_are_exact, right_padded, until_stop


class PagedBackend(GenerationBackend):
    """transformers' continuous batching on the live policy (its ``init_continuous_batching`` manager: a paged
    key/value cache in blocks of ``PAGE_SIZE`` tokens, each prompt prefilled once and forked into its G
    requests, and a finished request's place taken at once by a waiting one). Where measured (a GPU and a
    CPU, benchmarks/RESULTS.md) it is slower than grpo's own loop; it is there for models and attention
    kernels (flash attention) where that may turn, and as a second implementation.

    The manager is used directly rather than through ``generate_batch`` so that every request is queued
    before its generation loop starts (the first batch, and so the sampling, then does not depend on thread
    timing) and so that a failed request raises instead of coming back missing. The cache is sized for the
    call (transformers would otherwise size it from the free memory: most of a GPU, or, on a CPU, gigabytes
    that take half a minute to allocate).

    Seeds: the sampler draws every request's token from one generator in one ``torch.multinomial`` over the
    batch, so per-group seeds cannot be honoured (``supports_seeds`` is False). The call is seeded as a
    whole instead, from the seeds when given, else from one number drawn from the global generator (which
    the manager's own reseeding leaves untouched otherwise): the same batch gives the same completions, but
    a group's completions depend on the other prompts in the batch, so a data-parallel run with this backend
    does not sample what a single process would.

    Log-probs: the manager reports those of the distribution it sampled from, which are the trainer's
    only without top-k or top-p (see :func:`logps_are_exact`); otherwise None.
    """

    name = "paged"
    supports_seeds = False
    PAGE_SIZE = 32

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
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
        from transformers import ContinuousBatchingConfig, GenerationConfig

        g = 1 if greedy else num_generations  # greedy completions of a prompt are all the same
        inputs = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        with_logps = logps_are_exact(greedy, top_k, top_p)
        sampling = {} if greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        generation = GenerationConfig(
            do_sample=not greedy,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            num_return_sequences=g,
            **sampling,
        )
        requests = len(inputs) * g
        longest = max(len(ids) for ids in inputs) + max_new_tokens
        if seeds is not None:
            seed = int(hashlib.blake2b(repr(list(seeds)).encode(), digest_size=8).hexdigest(), 16) >> 1
        else:
            seed = int(torch.randint(2**62, (1,)).item())
        batching = ContinuousBatchingConfig(
            page_size=self.PAGE_SIZE,
            num_blocks=requests * (math.ceil(longest / self.PAGE_SIZE) + 1),
            max_batch_tokens=max(sum(len(ids) for ids in inputs), requests),
            max_requests_per_batch=min(requests, max(g, batch_size or requests)),
            return_logprobs=with_logps,
            seed=seed,
        )
        # The manager reseeds the global generators with its seed: leave them as they were.
        with evaluating(self.model), torch.random.fork_rng(), transformers_attention(self.model):
            request_ids, results = self._run(inputs, generation, batching, max_new_tokens)
        groups: dict[str, list[Any]] = {request_id: [] for request_id in request_ids}
        for request_id in sorted(results):  # a request's forks are "<id>__child#<i>"
            groups[request_id.partition("__child#")[0]].append(results[request_id])
        if any(len(group) != g for group in groups.values()):
            raise RuntimeError(f"continuous batching returned a group without its {g} completions")
        outputs = [output for request_id in request_ids for output in groups[request_id]]
        tokens = [until_stop(output.generated_tokens, stop_ids) for output in outputs]
        if greedy:
            tokens = [t for t in tokens for _ in range(num_generations)]
        completion_ids = right_padded(tokens, pad_id, torch.long)
        if not with_logps:
            return completion_ids, None
        logps = [list(output.logprobs)[: len(t)] for output, t in zip(outputs, tokens)]
        return completion_ids, right_padded(logps, 0.0, torch.float32)

    def _run(
        self, inputs: list[list[int]], generation: Any, batching: Any, max_new_tokens: int
    ) -> tuple[list[str], dict[str, Any]]:
        """Every request queued, then the manager's loop started; the requests' ids (in the order of
        ``inputs``) and the finished outputs by id, forks included."""
        manager = self.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        try:
            request_ids = manager.add_requests(inputs=inputs, max_new_tokens=max_new_tokens)
            expected = len(inputs) * generation.num_return_sequences
            manager.start()
            results: dict[str, Any] = {}
            while len(results) < expected:
                output = manager.get_result(timeout=1)
                if output is None:
                    if not manager.is_running():
                        raise RuntimeError("continuous batching stopped before every request finished")
                    continue
                if output.error is not None:
                    raise RuntimeError(f"continuous batching failed a request: {output.error}")
                if output.is_finished():
                    results[output.request_id] = output
            return request_ids, results
        finally:
            manager.stop(block=True)
            manager.destroy()


@contextlib.contextmanager
def transformers_attention(model: nn.Module) -> Iterator[None]:
    """transformers' own "sdpa" attention for the duration, where the model runs another registered under a
    name of its own (grpo.accel's grouped attention): continuous batching accepts only transformers' own."""
    base = unwrap(model)
    current = base.config._attn_implementation
    own = current in ("eager", "sdpa") or current.startswith(("flash", "flex", "paged"))
    foreign = not own
    if foreign:
        base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if foreign:
            base.set_attn_implementation(current)
