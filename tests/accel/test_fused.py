"""The fused inference forward must compute what transformers' forward computes, adapters included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from grpo.accel import fused
from grpo.config.grpo import GRPOConfig
from grpo.models.policy import load_policy
from grpo.rewards import Reward
from grpo.rollout.backends import DefaultBackend
from grpo.rollout.generate import generate
from grpo.rollout.scoring import completion_logps
from grpo.train.grpo import GRPOTrainer

PROMPTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", "the answer is", "0 1 2"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    return tokenizer


def lora_policy(tiny_model: Path):
    """A LoRA policy whose adapters are not zero, so that folding them in changes the weights."""
    models, _ = load_policy(GRPOConfig(model_name_or_path=str(tiny_model), beta=0.04), str(tiny_model))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in models.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return models


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_linear_is_a_linear_layer(pack, with_bias):
    torch.manual_seed(0)
    weight, bias = torch.randn(70, 24), torch.randn(70) if with_bias else None
    layer = fused.PackedLinear(weight, bias, batch_hint=5, pack=pack)
    for x in (torch.randn(5, 24), torch.randn(3, 7, 24), torch.randn(9, 24)[::3]):
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_float32_adapters_over_a_bfloat16_base_give_what_peft_computes():
    """Folded into a bfloat16 weight, an update below its resolution rounds away, so sampling would not see
    what training computes: the adapters stay apart, as peft's forward keeps them."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.q, holder.k = torch.nn.Linear(1024, 48), torch.nn.Linear(1024, 16, bias=False)
    for linear in (holder.q, holder.k):
        torch.nn.init.normal_(linear.weight, std=0.02)
    holder.bfloat16()
    peft_model = get_peft_model(holder, LoraConfig(target_modules=["q", "k"], r=4, lora_alpha=8)).eval()
    q, k = peft_model.base_model.model.q, peft_model.base_model.model.k
    assert q.lora_A["default"].weight.dtype is torch.float32
    with torch.no_grad():
        for layer in (q, k):  # updates of about a quarter of a bfloat16 step of the weights they adapt
            layer.lora_B["default"].weight.normal_(std=0.02 * 2**-8 / 4)
        aligned = q.lora_A["default"].weight[0].sign()  # inputs along an adapter: their update adds up
        x = (torch.where(torch.rand(64, 1024) < 0.2, -1.0, 1.0) * aligned).bfloat16()
        joined = fused.JoinedLinear([q, k], batch_hint=64, pack=False)
        assert torch.equal(joined(x)[0], q(x)) and torch.equal(joined(x)[1], k(x))
        delta = q.get_delta_weight("default")
        folded = F.linear(x, q.base_layer.weight + delta.bfloat16(), q.base_layer.bias)
        assert (folded != q(x)).float().mean() > 0.1  # what folding did: a different policy


def test_greedy_decoding_matches_transformers_forward(tiny_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert fused.supports(model)
    plain = generate(model, tokenizer, PROMPTS, num_generations=2, max_completion_length=16, greedy=True)
    ours = generate(
        model, tokenizer, PROMPTS, num_generations=2, max_completion_length=16, greedy=True,
        backend=DefaultBackend(model, decoder=fused.fused_decoding(model)),
    )  # fmt: skip
    assert ours.texts == plain.texts
    assert torch.equal(ours.completion_ids, plain.completion_ids)
    torch.testing.assert_close(ours.sampling_logps, plain.sampling_logps, rtol=0, atol=1e-5)


def test_seeded_sampling_through_lora_adapters_matches_transformers_forward(tiny_model, tokenizer):
    models = lora_policy(tiny_model)
    runs = []
    for use_fused in (False, True):
        decoder = fused.fused_decoding(models.policy) if use_fused else None
        torch.manual_seed(5)
        runs.append(
            generate(
                models.policy, tokenizer, PROMPTS, num_generations=4, max_completion_length=20,
                temperature=0.9, top_k=50,
                backend=DefaultBackend(models.policy, decoder=decoder),
            )
        )  # fmt: skip
    plain, ours = runs
    assert ours.texts == plain.texts
    assert len(set(ours.texts)) > 1
    torch.testing.assert_close(ours.sampling_logps, plain.sampling_logps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_lora", [True, False])
def test_reference_log_probs_match_the_shared_prompt_path(tiny_model, tokenizer, use_lora):
    models = lora_policy(tiny_model) if use_lora else load_policy(
        GRPOConfig(model_name_or_path=str(tiny_model), use_lora=False, beta=0.04), str(tiny_model)
    )[0]  # fmt: skip
    torch.manual_seed(0)
    rollout = generate(models.policy, tokenizer, PROMPTS, num_generations=3, max_completion_length=10)
    index = torch.tensor([0, 2, 3, 5, 6, 8])  # a micro-batch that skips some completions
    args = (
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.prompt_index[index],
        rollout.completion_ids[index],
        rollout.completion_mask[index],
        0.7,
    )
    mask = rollout.completion_mask[index].bool()
    with torch.inference_mode(), models.reference() as reference:
        expected = completion_logps(reference, *args)
        ours = fused.FusedDecoder(reference, pack=False).completion_logps(*args)
        packed = fused.FusedDecoder(reference, pack=True).completion_logps(*args)
    torch.testing.assert_close(ours[mask], expected[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[mask], expected[mask], rtol=0, atol=1e-5)
    if use_lora:  # the reference is the base model: the adapters really were switched off
        with torch.inference_mode():
            policy_logps = fused.FusedDecoder(models.policy).completion_logps(*args)
            policy_expected = completion_logps(models.policy, *args)
        assert (policy_logps[mask] - ours[mask]).abs().max() > 1e-3
        torch.testing.assert_close(policy_logps[mask], policy_expected[mask], rtol=0, atol=1e-5)


def test_unsupported_models_keep_transformers_forward(tmp_path, tokenizer):
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    assert not fused.supports(model)
    backend = DefaultBackend(model, decoder=fused.fused_decoding(model))
    rollout = generate(
        model, tokenizer, PROMPTS, num_generations=2, max_completion_length=6, greedy=True, backend=backend
    )
    assert rollout.completion_ids.shape[0] == 6


def test_sliding_window_and_dora_are_not_fused(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.sliding_window = 8
    assert not fused.supports(model)
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"),
    )
    assert not fused.supports(dora)


def test_a_training_step_is_the_same_with_and_without_the_fused_forward(tiny_model, tokenizer, tmp_path):
    def length_reward(prompts, completions, **_):
        return [min(len(c[-1]["content"]), 30) / 30 for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}]} for a in range(8)]
    metrics, weights = [], []
    for use_fused in (False, True):
        config = GRPOConfig(
            model_name_or_path=str(tiny_model), num_generations=4, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, max_completion_length=10, beta=0.1, learning_rate=1e-2,
            max_steps=2, seed=3, fused_inference=use_fused,
        )  # fmt: skip
        torch.manual_seed(3)
        models, tok = load_policy(config, str(tiny_model))
        trainer = GRPOTrainer(
            config, models, tok, [Reward("length", length_reward)], rows, tmp_path / str(use_fused)
        )
        torch.manual_seed(3)
        metrics.append([trainer.train_step() for _ in range(2)])
        weights.append(
            {k: v.detach().clone() for k, v in models.policy.named_parameters() if v.requires_grad}
        )
    for plain, ours in zip(*metrics):
        for key in ("reward", "loss", "kl", "completions/mean_length"):
            assert ours[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-6)


def test_a_compacted_cache_holds_the_kept_rows_in_the_same_buffers():
    torch.manual_seed(0)
    cache = fused.KVCache(torch.randn(2, 6, 3, 9, 4), torch.randn(2, 6, 3, 9, 4), length=5)
    rows = torch.tensor([0, 2, 3, 5])
    expected = cache.gathered(rows, 9)
    compacted = cache.compacted(rows)
    assert compacted.keys.data_ptr() == cache.keys.data_ptr()  # no second cache
    assert compacted.length == 5 and compacted.keys.shape[1] == len(rows)
    assert torch.equal(compacted.keys[..., :5, :], expected.keys[..., :5, :])
    assert torch.equal(compacted.values[..., :5, :], expected.values[..., :5, :])
