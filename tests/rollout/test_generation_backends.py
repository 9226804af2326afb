"""Every generation backend keeps one contract: shapes and padding, greedy decoding as transformers does
it, stop tokens, seeds, exact log-probs where it reports them, and samples that follow the policy's weights.

vLLM is not installed here: its backend runs against a fake ``vllm`` module that wraps a transformers model of
its own (loaded from the checkpoint, as vLLM loads it), so its outputs are real and it sees the policy's new
weights only through what the backend sends it; it records what it was sent.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.accel.fused import fused_decoding
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import load_config
from grpo.errors import ConfigError
from grpo.models.policy import load_policy
from grpo.rewards import Reward
from grpo.rollout.backend_base import GenerationBackend
from grpo.rollout.backends import DefaultBackend, make_backend
from grpo.rollout.generate import completion_mask_and_truncation, generate, stop_token_ids, tokenize_prompts
from grpo.rollout.paged import PagedBackend
from grpo.rollout.sampling import sample_completions
from grpo.rollout.scoring import completion_logps
from grpo.rollout.vllm import VLLMBackend
from grpo.train.grpo import GRPOTrainer

PROMPTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", "the answer is", "0 1 2"]
BACKENDS = ["default", "default-unfused", "paged", "vllm"]


# --- a fake vllm --------------------------------------------------------------------------------------------
class FakeSamplingParams:
    """vllm.SamplingParams: keeps what it was given."""

    def __init__(self, **settings):
        self.__dict__.update(settings)


class FakeLoRARequest:
    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class FakeEngineModel:
    """The engine's model as ``LLM.apply_model`` hands it over: ``load_weights`` takes checkpoint names."""

    def __init__(self, llm: FakeLLM):
        self.llm = llm

    def load_weights(self, weights):
        parameters = dict(self.llm.model.named_parameters())
        for name, tensor in weights:
            if name not in parameters:
                raise ValueError(f"There is no module or parameter named {name!r}")
            with torch.no_grad():
                parameters[name].copy_(tensor)
            self.llm.loaded.append(name)
        return set(self.llm.loaded)


class FakeLLM:
    """vllm.LLM as grpo's backend uses it, over its own transformers copy of the checkpoint. Each request is
    one completion (n = 1); its seed, temperature, top-k/top-p, stop tokens and log-probs are honoured by
    grpo's own decoding loop, and a LoRARequest runs the adapter loaded from its directory."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, model: str, **settings):
        self.settings = {"model": model, **settings}
        dtype = getattr(torch, settings["dtype"])
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
        self.loaded: list[str] = []  # the weights load_weights received, by name
        self.lora_requests: list[FakeLoRARequest | None] = []  # the lora_request of each generate call
        self.adapters: dict[int, torch.nn.Module] = {}
        self.requests: list[FakeSamplingParams] = []  # every request's sampling parameters
        self.prefix_cache_resets = 0
        FakeLLM.instances.append(self)

    def apply_model(self, func):
        return [func(FakeEngineModel(self))]

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1

    def _with_adapter(self, request: FakeLoRARequest) -> torch.nn.Module:
        if request.lora_int_id not in self.adapters:
            from peft import PeftModel

            assert self.settings.get("enable_lora"), "a LoRA request to an engine built without enable_lora"
            self.adapters[request.lora_int_id] = PeftModel.from_pretrained(
                copy.deepcopy(self.model), request.lora_path
            ).eval()
        return self.adapters[request.lora_int_id]

    @torch.no_grad()
    def generate(self, prompts, sampling_params, *, lora_request=None, use_tqdm=True):
        self.lora_requests.append(lora_request)
        self.requests.extend(sampling_params)
        model = self.model if lora_request is None else self._with_adapter(lora_request)
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            assert params.n == 1
            ids = torch.tensor([prompt["prompt_token_ids"]])
            greedy = params.temperature == 0
            uniforms = None
            if not greedy and params.seed is not None:
                generator = torch.Generator().manual_seed(params.seed)
                uniforms = torch.rand((1, params.max_tokens), generator=generator)
            tokens, logps = sample_completions(
                model,
                ids,
                torch.ones_like(ids),
                num_generations=1,
                max_new_tokens=params.max_tokens,
                stop_ids=params.stop_token_ids,
                pad_id=0,
                temperature=params.temperature or 1.0,
                top_p=params.top_p,
                top_k=params.top_k,
                greedy=greedy,
                uniforms=uniforms,
            )
            token_ids = tokens[0].tolist()
            logprobs = None
            if params.logprobs is not None:
                logprobs = [
                    {t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(token_ids, logps[0].tolist())
                ]
            completion = SimpleNamespace(index=0, token_ids=token_ids, logprobs=logprobs)
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[completion]))
        return outputs


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A fake ``vllm`` importable for the test; returns the list of engines built."""
    vllm = types.ModuleType("vllm")
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    vllm.LLM, vllm.SamplingParams, request.LoRARequest = FakeLLM, FakeSamplingParams, FakeLoRARequest
    vllm.lora, lora.request = lora, request
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the backend sets it; restored afterwards
    monkeypatch.setattr(FakeLLM, "instances", [])
    return FakeLLM.instances


# --- helpers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture()
def policy(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture(params=BACKENDS)
def make(request, fake_vllm):
    """Builds the parametrized backend for a policy."""

    def build(policy: torch.nn.Module, **settings) -> GenerationBackend:
        if request.param == "default-unfused":
            return DefaultBackend(policy)
        if request.param == "default":
            settings["decoder"] = fused_decoding(policy)
        return make_backend(request.param, policy, **settings)

    return build


def greedy_reference(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """transformers' own greedy decoding."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(model, tokenizer),
        )
    return tokenizer.batch_decode(out[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)


def perturb(model: torch.nn.Module, seed: int, names: str = "", scale: float = 0.3) -> None:
    """Add noise to the parameters whose names contain ``names`` (all by default)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if names in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def lora_policy(tiny_model: Path, seed: int = 1) -> torch.nn.Module:
    """A LoRA policy whose adapters are not zero, so that they change what it samples."""
    models, _ = load_policy(GRPOConfig(model_name_or_path=str(tiny_model), beta=0.0), str(tiny_model))
    perturb(models.policy, seed, names="lora_B")
    return models.policy.eval()


def merged(policy: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(policy).merge_and_unload().eval()


# --- the contract -------------------------------------------------------------------------------------------
def test_completions_are_right_padded_groups_with_masks(make, policy, tokenizer):
    g = 3
    torch.manual_seed(0)
    rollout = generate(
        policy, tokenizer, PROMPTS, num_generations=g, max_completion_length=10, backend=make(policy)
    )
    n = len(PROMPTS) * g
    assert rollout.completion_ids.shape[0] == n and 1 <= rollout.completion_ids.shape[1] <= 10
    assert rollout.prompt_index.tolist() == [i // g for i in range(n)]
    assert len(rollout.texts) == n
    mask = rollout.completion_mask.bool()
    # The mask is ones then zeros, and everything past it is padding.
    assert torch.equal(mask, mask.cummin(dim=1).values)
    assert (rollout.completion_ids[~mask] == tokenizer.pad_token_id).all()
    lengths = mask.sum(dim=1)
    stops = torch.tensor(stop_token_ids(policy, tokenizer))
    for row, length in enumerate(lengths.tolist()):
        last = rollout.completion_ids[row, length - 1]
        assert bool(rollout.truncated[row]) == (not torch.isin(last, stops).item())
        assert not rollout.truncated[row] or length == 10
    if rollout.sampling_logps is not None:
        assert rollout.sampling_logps.shape == rollout.completion_ids.shape
        assert (rollout.sampling_logps[~mask] == 0).all() and (rollout.sampling_logps[mask] < 0).all()


def test_greedy_decoding_matches_transformers_generate(make, policy, tokenizer):
    backend = make(policy)
    ours = generate(
        policy, tokenizer, PROMPTS, num_generations=2, max_completion_length=12, greedy=True, backend=backend
    )
    expected = greedy_reference(policy, tokenizer, PROMPTS, 12)
    assert ours.texts == [text for text in expected for _ in range(2)]


def test_a_stop_token_ends_its_completion(make, policy, tokenizer):
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, PROMPTS, 10**9)
    backend = make(policy)
    settings = {"num_generations": 2, "max_new_tokens": 8, "pad_id": tokenizer.pad_token_id, "greedy": True}
    free, _ = backend.sample(prompt_ids, prompt_mask, stop_ids=[tokenizer.eos_token_id], **settings)
    # Stop prompt 0 at the token its greedy completion gives third (where that token first appears).
    stop = free[0, 2].item()
    first = free[0].tolist().index(stop)
    ids, _ = backend.sample(prompt_ids, prompt_mask, stop_ids=[tokenizer.eos_token_id, stop], **settings)
    mask, truncated = completion_mask_and_truncation(ids, [tokenizer.eos_token_id, stop])
    assert ids[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    assert mask[0].sum().item() == first + 1 and not truncated[0]
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()  # nothing after a stop but padding


def test_sampling_is_reproducible_and_a_seeded_group_does_not_depend_on_its_batch(make, policy, tokenizer):
    backend = make(policy)

    def sample(prompts, seeds=None, **settings):
        settings = {"num_generations": 3, "max_completion_length": 10, "temperature": 1.5, **settings}
        return generate(policy, tokenizer, prompts, seeds=seeds, backend=backend, **settings).completion_ids

    torch.manual_seed(3)
    first = sample(PROMPTS)
    torch.manual_seed(3)
    assert torch.equal(sample(PROMPTS), first)  # the global seed fixes the samples
    both = sample(PROMPTS[:2], seeds=[11, 22])
    assert torch.equal(sample(PROMPTS[:2], seeds=[11, 22]), both)
    assert len({tuple(row) for row in both.tolist()}) > 1  # the completions of a group differ
    if not backend.supports_seeds:
        assert isinstance(backend, PagedBackend)
        return
    alone = [sample([PROMPTS[0]], seeds=[11]), sample([PROMPTS[1]], seeds=[22])]
    for i, group in enumerate(alone):
        width = group.shape[1]
        assert torch.equal(group, both[i * 3 : i * 3 + 3, :width])
        assert (both[i * 3 : i * 3 + 3, width:] == tokenizer.pad_token_id).all()
    swapped = sample([PROMPTS[1], PROMPTS[0]], seeds=[22, 11])
    assert torch.equal(swapped[:3, : alone[1].shape[1]], alone[1])
    assert not torch.equal(sample(PROMPTS[:2], seeds=[12, 22])[:3], both[:3])  # another seed, other samples
    in_pieces = sample(PROMPTS[:2], seeds=[11, 22], batch_size=3)  # one group at a time
    assert torch.equal(in_pieces, both[:, : in_pieces.shape[1]])


@pytest.mark.parametrize("filters", [{}, {"top_k": 5, "top_p": 0.9}])
def test_sampling_log_probs_are_the_policys(make, policy, tokenizer, filters):
    backend = make(policy)
    torch.manual_seed(2)
    rollout = generate(
        policy,
        tokenizer,
        PROMPTS,
        num_generations=3,
        max_completion_length=10,
        temperature=0.8,
        backend=backend,
        **filters,
    )
    if rollout.sampling_logps is None:
        # Engines report the log-probs of the distribution they sampled: not the trainer's under filters.
        assert filters and not isinstance(backend, DefaultBackend)
        return
    with torch.no_grad():
        recomputed = completion_logps(
            policy,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.prompt_index,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature=0.8,
        )
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampling_logps[mask], recomputed[mask], atol=1e-4, rtol=1e-4)


def test_samples_follow_the_policys_weights_after_a_sync(make, policy, tokenizer):
    backend = make(policy)

    def greedy():
        return generate(
            policy,
            tokenizer,
            PROMPTS,
            num_generations=1,
            max_completion_length=12,
            greedy=True,
            backend=backend,
        ).texts

    before = greedy()
    perturb(policy, seed=5)
    after = greedy_reference(policy, tokenizer, PROMPTS, 12)
    assert after != before
    if isinstance(backend, VLLMBackend):
        assert greedy() == before  # the engine holds its own weights: unchanged until synced
    backend.sync_weights(policy)
    assert greedy() == after


def test_a_lora_policy_samples_what_its_merged_model_does(make, tiny_model, tokenizer):
    policy = lora_policy(tiny_model)
    backend = make(policy)
    rollout = generate(
        policy, tokenizer, PROMPTS, num_generations=1, max_completion_length=12, greedy=True, backend=backend
    )
    expected = greedy_reference(merged(policy), tokenizer, PROMPTS, 12)
    assert rollout.texts == expected
    with policy.disable_adapter():
        assert greedy_reference(policy, tokenizer, PROMPTS, 12) != expected  # the adapter matters


# --- vLLM specifics -----------------------------------------------------------------------------------------
def test_vllm_pushes_lora_adapters_without_merging(fake_vllm, tiny_model, tokenizer):
    policy = lora_policy(tiny_model)
    backend = VLLMBackend(policy, gpu_memory_utilization=0.25, seed=9)
    (engine,) = fake_vllm
    assert engine.settings["model"] == str(tiny_model)
    assert engine.settings["enable_lora"] and engine.settings["max_lora_rank"] == 16
    assert engine.settings["gpu_memory_utilization"] == 0.25 and engine.settings["seed"] == 9
    assert engine.settings["logprobs_mode"] == "processed_logprobs"
    assert engine.loaded == []  # no weights sent: the adapter travels as an adapter

    def greedy():
        return generate(
            policy,
            tokenizer,
            PROMPTS,
            num_generations=2,
            max_completion_length=12,
            greedy=True,
            backend=backend,
        ).texts

    assert greedy() == [t for t in greedy_reference(merged(policy), tokenizer, PROMPTS, 12) for _ in range(2)]
    first = engine.lora_requests[-1]
    assert first.lora_int_id == 1 and (Path(first.lora_path) / "adapter_config.json").is_file()
    perturb(policy, seed=6, names="lora_B")
    backend.sync_weights(policy)
    assert greedy() == [t for t in greedy_reference(merged(policy), tokenizer, PROMPTS, 12) for _ in range(2)]
    second = engine.lora_requests[-1]
    assert second.lora_int_id == 2 and second.lora_path != first.lora_path
    assert not Path(first.lora_path).exists()  # the adapter the engine has read is not kept on disk
    assert any(".lora_A." in name for name, _ in policy.named_parameters())  # nothing merged into the policy
    backend.close()
    assert not Path(second.lora_path).exists()


def test_vllm_can_take_merged_weights_instead_of_an_adapter(fake_vllm, tiny_model, tokenizer):
    policy = lora_policy(tiny_model)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    backend = VLLMBackend(policy, push_adapters=False)
    (engine,) = fake_vllm
    assert not engine.settings.get("enable_lora")
    assert "model.layers.0.self_attn.q_proj.weight" in engine.loaded
    assert not any("lora" in name or "base_layer" in name for name in engine.loaded)
    assert engine.prefix_cache_resets == 1
    rollout = generate(
        policy, tokenizer, PROMPTS, num_generations=1, max_completion_length=12, greedy=True, backend=backend
    )
    assert rollout.texts == greedy_reference(merged(policy), tokenizer, PROMPTS, 12)
    assert engine.lora_requests == [None]
    for name, parameter in policy.named_parameters():  # the policy itself was left as it was
        assert torch.equal(parameter, before[name])


def test_vllm_sends_one_seeded_request_per_completion(fake_vllm, policy, tokenizer):
    backend = VLLMBackend(policy)
    rollout = generate(
        policy, tokenizer, PROMPTS[:2], num_generations=3, max_completion_length=5, top_k=4, seeds=[1, 2],
        backend=backend,
    )  # fmt: skip
    (engine,) = fake_vllm
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the engine runs in this process
    assert len(engine.loaded) == len(list(policy.parameters()))  # the weights, synced when it was built
    assert len(engine.requests) == 6 and all(p.n == 1 and p.top_k == 4 for p in engine.requests)
    assert len({p.seed for p in engine.requests}) == 6  # no two completions share their randomness
    assert all(p.logprobs is None for p in engine.requests)  # top-k: the engine's log-probs are not wanted
    assert rollout.sampling_logps is None
    assert engine.requests[0].stop_token_ids == stop_token_ids(policy, tokenizer)


# --- configuration and training -----------------------------------------------------------------------------
def test_a_bad_backend_name_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="generation_backend must be one of default, paged, vllm"):
        load_config(None, {"generation_backend": "sglang"})
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        load_config(None, {"vllm_gpu_memory_utilization": 1.5})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_without_the_package_is_a_config_error(tiny_model, tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from grpo.cli.main import app

    with pytest.raises(ConfigError, match="needs the vllm package"):
        load_config(None, {"generation_backend": "vllm"})
    args = ["--model", str(tiny_model), "--dataset", str(tiny_dataset), "--output-dir", str(tmp_path / "o")]
    result = CliRunner().invoke(app, ["train", *args, "--generation-backend", "vllm"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the vllm package" in lines[0], result.stderr
    with pytest.raises(ConfigError, match="needs the vllm package"):
        VLLMBackend(AutoModelForCausalLM.from_pretrained(tiny_model))


@pytest.mark.parametrize(
    ("backend", "use_lora", "top_k"), [("paged", True, 0), ("vllm", True, 0), ("vllm", False, 5)]
)
def test_training_steps_run_on_each_backend(fake_vllm, tiny_model, tmp_path, backend, use_lora, top_k):
    def length_reward(prompts, completions, **_):
        return [min(len(c[-1]["content"]), 30) / 30 for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}]} for a in range(8)]
    config = GRPOConfig(
        model_name_or_path=str(tiny_model), num_generations=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_completion_length=10, beta=0.1, learning_rate=1e-2,
        max_steps=2, seed=3, num_iterations=2, top_k=top_k, use_lora=use_lora, generation_backend=backend,
    )  # fmt: skip
    torch.manual_seed(3)
    models, tok = load_policy(config, str(tiny_model))
    before = {k: v.detach().clone() for k, v in models.policy.named_parameters() if v.requires_grad}
    trainer = GRPOTrainer(config, models, tok, [Reward("length", length_reward)], rows, tmp_path)
    metrics = [trainer.train_step() for _ in range(2)]
    assert trainer.backend is not None and trainer.backend.name == backend
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["completions/mean_length"] > 0
    changed = [
        k for k, v in models.policy.named_parameters() if v.requires_grad and not torch.equal(v, before[k])
    ]
    assert changed
    if backend == "vllm":
        (engine,) = fake_vllm
        if use_lora:  # built at step 1 (adapter 1), synced once before step 2 (adapter 2), not per update
            assert [r.lora_int_id for r in engine.lora_requests] == [1, 2]
        else:
            assert len(engine.loaded) == 2 * len(before)  # the weights when built, then synced once


def test_the_old_log_probs_of_a_forward_pass_are_the_samplers(tiny_model, tmp_path):
    """What the trainer computes when a backend reports no log-probs is what the default backend reports."""
    config = GRPOConfig(
        model_name_or_path=str(tiny_model), num_generations=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_completion_length=10, temperature=0.7, num_iterations=2,
    )  # fmt: skip
    models, tok = load_policy(config, str(tiny_model))
    perturb(models.policy, seed=2, names="lora_B")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}]} for a in range(2)]
    trainer = GRPOTrainer(
        config, models, tok, [Reward("one", lambda completions, **_: [1.0] * 8)], rows, tmp_path
    )
    batch = trainer.sample_batch()
    tensors = trainer.training_tensors(batch)
    mask = batch.rollout.completion_mask.bool()
    recomputed = trainer.policy_logps(tensors)
    torch.testing.assert_close(recomputed[mask], batch.rollout.sampling_logps[mask], atol=1e-5, rtol=1e-5)
