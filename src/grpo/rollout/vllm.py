"""The "vllm" generation backend: a vLLM engine in the trainer's process, on a CUDA GPU, holding its own copy
of the weights (or the LoRA adapters), which :meth:`VLLMBackend.sync_weights` updates after optimizer
updates."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grpo.errors import ConfigError
from grpo.models.structure import effective_linear, unwrap
from grpo.rollout.backend_base import (
    GenerationBackend,
    completion_seed,
    logps_are_exact,
    right_padded,
    until_stop,
)


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
        base = unwrap(policy)
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
    base = unwrap(policy)
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
            weight, bias = effective_linear(lora_layers[owner])
            yield f"{owner}.{leaf}", weight if leaf == "weight" else bias
        else:
            yield name, parameter.detach()
