"""Generation backends: what samples the completions, behind one interface.

:func:`grpo.rollout.generate` tokenizes the prompts, hands them to a :class:`GenerationBackend`, and turns
what comes back into a :class:`~grpo.rollout.Rollout` (masks, truncation flags, texts) the same way for
every backend. Three backends, made by :func:`make_backend`:

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

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from grpo import fused
from grpo.errors import ConfigError
from grpo.models import plain_attention
from grpo.rollout import group_uniforms, sample_completions

BACKENDS = ("default", "paged", "vllm")


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


class DefaultBackend(GenerationBackend):
    """grpo's own decoding loop (:func:`grpo.rollout.sample_completions`) on the live policy: each prompt
    prefilled once, its cache copied to its G completions, finished rows dropped at once; through the fused
    decoder where :func:`grpo.fused.supports` the model (and ``fused``), else transformers' forward steps.

    It reads the policy's weights at each call, so nothing needs syncing. Its log-probs are exact, and with
    seeds each completion's draws come from its group's own generator (inverse-CDF sampling).
    """

    name = "default"
    supports_seeds = True

    def __init__(
        self,
        model: nn.Module,
        fused: bool = True,
        keep_going: Callable[[bool], bool] | None = None,
        release: Callable[[list[torch.Tensor]], None] | None = None,
    ):
        # keep_going: decoding steps in lockstep with the other ranks (a sharded policy; see
        # grpo.rollout.sample_completions). release: given the weights the fused decoder has copied
        # (grpo.models.PolicyAndReference.release_reference).
        self.model, self.fused, self.keep_going, self.release = model, fused, keep_going, release

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model, g = self.model, num_generations
        pieces = []
        with evaluating(model):
            device = next(model.parameters()).device
            prompts_at_once = max(1, (batch_size or len(prompt_ids) * g) // g)
            decoder = fused.sampling_decoder(model, prompts_at_once * g, self.release) if self.fused else None
            try:
                for start in range(0, len(prompt_ids), prompts_at_once):
                    rows = slice(start, start + prompts_at_once)
                    uniforms = None
                    if seeds is not None and not greedy:
                        uniforms = group_uniforms(seeds[rows], g, max_new_tokens).to(device)
                    pieces.append(
                        sample_completions(
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
                            decoder=decoder,
                            uniforms=uniforms,
                            keep_going=self.keep_going,
                        )
                    )
            finally:
                del decoder  # its weight copies are needed no longer
        width = max(ids.shape[1] for ids, _ in pieces)
        completion_ids = torch.cat(
            [nn.functional.pad(ids.cpu(), (0, width - ids.shape[1]), value=pad_id) for ids, _ in pieces]
        )
        logps = torch.cat([nn.functional.pad(lp.cpu(), (0, width - lp.shape[1])) for _, lp in pieces])
        return completion_ids, logps


class PagedBackend(GenerationBackend):
    """transformers' continuous batching on the live policy (its ``init_continuous_batching`` manager: a paged
    key/value cache in blocks of ``PAGE_SIZE`` tokens, each prompt prefilled once and forked into its G
    requests, and a finished request's place taken at once by a waiting one). Measured, it is slower than
    grpo's own loop: on an H200 (transformers 5.24, SDPA attention, no flash-attn) a 16-layer, 1024-wide
    bf16 model sampled 64 uneven prompts × 8 completions of up to 256 tokens in about 24 s against 2.7 s,
    with CUDA graphs or without; on a CPU the tiny test model took 0.7 s against 0.2 s. It is there for
    models and attention kernels (flash attention) where that may turn, and as a second implementation.

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
        with evaluating(self.model), torch.random.fork_rng(), plain_attention(self.model):
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


class VLLMBackend(GenerationBackend):
    """A vLLM engine (``vllm.LLM``, vLLM ≥ 0.10.2) colocated in the trainer's process, on the policy's own
    checkpoint, sharing the GPU with training (``gpu_memory_utilization`` is its share).

    The engine holds its own copy of the weights, so :meth:`sync_weights` must follow the optimizer updates
    before the next sampling. Under LoRA the adapter is pushed as it is, without merging: saved to a
    directory and named in a new ``LoRARequest`` (the engine loads it at the next call; its base weights are
    the policy's frozen ones). Without adapters, or with adapters vLLM cannot run (``push_adapters=False``,
    rank > 512, fully trained extra modules), the policy's weights, adapters folded in, go into the engine's
    model with ``load_weights`` through ``LLM.apply_model`` (DoRA adapters, which neither route carries
    exactly, are refused). The engine runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here), so the weights reach it by reference rather than
    through a pipe.

    Each completion is one request with its own seed (:func:`completion_seed` of its group's), so groups
    are reproducible and independent of the batch. Without seeds they are drawn from the global generator.
    Log-probs are the engine's ``processed_logprobs``: the trainer's when :func:`logps_are_exact`, else None.
    """

    name = "vllm"
    supports_seeds = True
    LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts

    def __init__(
        self,
        policy: nn.Module,
        *,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        max_model_len: int | None = None,
        push_adapters: bool = True,
    ):
        try:
            import vllm
        except ImportError:
            raise ConfigError(
                "generation_backend 'vllm' needs the vllm package (pip install vllm; it runs on a CUDA GPU)"
            ) from None
        base = fused.unwrap(policy)
        if not base.name_or_path:
            raise ConfigError("generation_backend 'vllm' needs a policy loaded from a model directory")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.adapter = adapter_vllm_runs(policy) if push_adapters else None
        longest = getattr(base.config, "max_position_embeddings", None)
        if max_model_len is not None and longest is not None:
            max_model_len = min(max_model_len, longest)  # vLLM refuses a length the model was not built for
        settings: dict[str, Any] = {
            "model": base.name_or_path,
            "dtype": str(base.dtype).removeprefix("torch."),
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            # Log-probs after temperature scaling: those of the distribution the tokens were drawn from.
            "logprobs_mode": "processed_logprobs",
        }
        if self.adapter is not None:
            rank = policy.peft_config[self.adapter].r
            settings.update(
                enable_lora=True, max_loras=1, max_lora_rank=min(r for r in self.LORA_RANKS if r >= rank)
            )
        self.llm = vllm.LLM(**settings)
        self.sampling_params = vllm.SamplingParams
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="grpo-vllm-adapter-")) if self.adapter else None
        self.lora_request: Any = None
        self.version = 0
        self.sync_weights(policy)  # the policy may differ from its checkpoint already (a resumed run)

    def sync_weights(self, policy: nn.Module) -> None:
        self.version += 1
        if self.adapter is not None:
            from vllm.lora.request import LoRARequest

            directory = self.adapter_dir / f"v{self.version}"
            policy.save_pretrained(directory, selected_adapters=[self.adapter])
            shutil.rmtree(self.adapter_dir / f"v{self.version - 1}", ignore_errors=True)
            # peft writes an adapter named "default" into the directory itself, others into subdirectories.
            path = directory if self.adapter == "default" else directory / self.adapter
            # A new id per version: vLLM keeps a loaded adapter by its id and would not read the new one.
            self.lora_request = LoRARequest(
                lora_name=f"policy-v{self.version}", lora_int_id=self.version, lora_path=str(path)
            )
            return
        weights = list(checkpoint_weights(policy))

        def load(model: nn.Module) -> None:
            model.load_weights(weights)

        self.llm.apply_model(load)
        self.llm.reset_prefix_cache()  # cached prompts' keys and values came from the old weights

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
        inputs = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        with_logps = logps_are_exact(greedy, top_k, top_p)
        copies = 1 if greedy else num_generations  # greedy completions of a prompt are all the same
        if seeds is None and not greedy:
            seeds = torch.randint(2**62, (len(inputs),)).tolist()
        requests, params = [], []
        for p, prompt in enumerate(inputs):
            for i in range(copies):
                requests.append({"prompt_token_ids": prompt})
                params.append(
                    self.sampling_params(
                        n=1,
                        temperature=0.0 if greedy else temperature,
                        top_p=top_p,
                        top_k=top_k,
                        max_tokens=max_new_tokens,
                        logprobs=0 if with_logps else None,
                        seed=None if greedy else completion_seed(seeds[p], i),
                        stop_token_ids=list(stop_ids),
                        detokenize=False,
                    )
                )
        outputs = self.llm.generate(
            requests, sampling_params=params, lora_request=self.lora_request, use_tqdm=False
        )
        tokens, logps = [], []
        for output in outputs:
            completion = output.outputs[0]
            chosen = until_stop(completion.token_ids, stop_ids)
            tokens.append(chosen)
            if with_logps:
                logps.append([position[t].logprob for position, t in zip(completion.logprobs, chosen)])
        if greedy:
            tokens = [t for t in tokens for _ in range(num_generations)]
        completion_ids = right_padded(tokens, pad_id, torch.long)
        return completion_ids, right_padded(logps, 0.0, torch.float32) if with_logps else None

    def close(self) -> None:
        del self.llm
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def adapter_vllm_runs(policy: nn.Module) -> str | None:
    """The policy's active adapter when vLLM can run it as a LoRA (plain LoRA on linear layers, rank ≤ 512,
    no extra trained modules); None for a policy without adapters or with others."""
    configs = getattr(policy, "peft_config", None)
    if not configs:
        return None
    name = policy.active_adapter
    config = configs[name]
    if getattr(config, "peft_type", None) != "LORA" or config.r > VLLMBackend.LORA_RANKS[-1]:
        return None
    if config.use_dora or getattr(config, "lora_bias", False) or config.modules_to_save:
        return None
    lora_layers = [m for m in policy.modules() if hasattr(m, "lora_A") and name in m.lora_A]
    return name if all(isinstance(m.get_base_layer(), nn.Linear) for m in lora_layers) else None


def checkpoint_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under their checkpoint names, LoRA adapters folded in (the policy itself is left
    as it is, nothing merged into it): what an inference engine's ``load_weights`` takes."""
    base = fused.unwrap(policy)
    active = getattr(policy, "active_adapter", None)
    lora_layers = {name: m for name, m in base.named_modules() if hasattr(m, "base_layer")}
    for name, parameter in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # an adapter's own matrices (folded in below), or a module an adapter trains a copy of
        if ".modules_to_save." in name:
            owner, _, rest = name.partition(".modules_to_save.")
            adapter, _, leaf = rest.partition(".")
            if adapter == active:
                yield f"{owner}.{leaf}", parameter.detach()
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in lora_layers:
            if any(getattr(lora_layers[owner], "use_dora", {}).values()):
                raise ConfigError("DoRA adapters cannot be folded into an inference engine's weights")
            weight, bias = fused.effective_linear(lora_layers[owner])
            yield f"{owner}.{leaf}", weight if leaf == "weight" else bias
        else:
            yield name, parameter.detach()


def make_backend(
    name: str,
    policy: nn.Module,
    *,
    fused: bool = True,
    seed: int = 0,
    vllm_gpu_memory_utilization: float = 0.3,
    max_model_len: int | None = None,
    keep_going: Callable[[bool], bool] | None = None,
    release: Callable[[list[torch.Tensor]], None] | None = None,
) -> GenerationBackend:
    """The backend called ``name`` ("default", "paged" or "vllm") for ``policy``; ``keep_going`` (a
    sharded policy's lockstep) and ``release`` are the :class:`DefaultBackend`'s."""
    if name == "default":
        return DefaultBackend(policy, fused=fused, keep_going=keep_going, release=release)
    if name == "paged":
        return PagedBackend(policy)
    if name == "vllm":
        return VLLMBackend(
            policy, gpu_memory_utilization=vllm_gpu_memory_utilization, seed=seed, max_model_len=max_model_len
        )
    raise ConfigError(f"generation_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
