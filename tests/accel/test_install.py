"""grpo.accel.install: one call applies the CPU speed and memory code; ``accel: false`` leaves the models as
transformers made them and trains to the same results, through the plain path only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grpo.accel import lean_layers, onednn
from grpo.accel.chunked_head import chunked_completion_logps
from grpo.accel.install import Speedups, install
from grpo.config.grpo import GRPOConfig
from grpo.models.policy import load_policy
from grpo.models.structure import unwrap
from grpo.rewards import Reward
from grpo.rollout.scoring import completion_logps
from grpo.train.grpo import GRPOTrainer


def lean_and_routed(model: nn.Module) -> tuple[bool, bool, bool]:
    """Whether grouped attention, the lean gated MLPs and oneDNN linear layers are in place."""
    base = unwrap(model)
    attention = base.config._attn_implementation == lean_layers.GROUPED_SDPA
    mlps = any(getattr(m.forward, "__func__", None) is lean_layers._gated_mlp_forward for m in base.modules())
    routed = any(onednn.is_routed(m) for m in base.modules() if isinstance(m, nn.Linear))
    return attention, mlps, routed


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_install_applies_everything_and_accel_false_nothing(tiny_model, tmp_path, use_lora):
    config = GRPOConfig(model_name_or_path=str(tiny_model), use_lora=use_lora, beta=0.1)
    models, _ = load_policy(config, str(tiny_model))
    assert lean_and_routed(models.policy) == (False, False, False), "loading alone is plain transformers"
    plain = install(models, GRPOConfig(accel=False), tmp_path)
    assert plain == Speedups()
    assert lean_and_routed(models.policy) == (False, False, False)
    assert plain.training_scorer(models.policy).func is completion_logps
    assert plain.decoder(models.policy) is None

    speedups = install(models, config, tmp_path)
    assert lean_and_routed(models.policy) == (True, True, onednn.available())
    if not use_lora:  # the frozen reference copy is made lean too (it never trains, so it is not routed)
        assert lean_and_routed(models.reference_model)[:2] == (True, True)
    assert speedups.fused_inference and speedups.chunked_head and speedups.gradients_in_place
    assert speedups.training_scorer(models.policy).func is chunked_completion_logps
    assert speedups.decoder(models.policy) is not None


def test_a_run_without_accel_trains_as_the_accelerated_one(tiny_model, tmp_path):
    """Two GRPO steps (LoRA, μ = 2, β > 0) with grpo.accel and without: the same rewards, losses, KL and
    weights to float rounding."""

    def length_reward(prompts, completions, **_):
        return [min(len(c[-1]["content"]), 30) / 30 for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}]} for a in range(8)]
    metrics, weights = [], []
    for accel in (False, True):
        config = GRPOConfig(
            model_name_or_path=str(tiny_model), num_generations=4, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, max_completion_length=10, beta=0.1, learning_rate=1e-2,
            max_steps=2, seed=3, num_iterations=2, accel=accel,
        )  # fmt: skip
        torch.manual_seed(3)
        models, tokenizer = load_policy(config, str(tiny_model))
        trainer = GRPOTrainer(
            config, models, tokenizer, [Reward("length", length_reward)], rows, tmp_path / str(accel)
        )
        metrics.append([trainer.train_step() for _ in range(2)])
        weights.append(
            {k: v.detach().clone() for k, v in models.policy.named_parameters() if v.requires_grad}
        )
    for plain, fast in zip(*metrics):
        for key in ("reward", "loss", "kl", "clip_ratio/region_mean", "completions/mean_length"):
            assert fast[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5)  # AdamW: 4 updates
