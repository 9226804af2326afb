"""PPO with a value head: GAE and the value loss by hand, log-probs and values in one pass, training steps on
the tiny model, and checkpoints that carry the critic."""

from __future__ import annotations

import json
import math
import re
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.accel import install
from grpo.algo.advantages import normalize_per_function
from grpo.algo.logprobs import high_entropy_tokens, masked_mean
from grpo.algo.losses import policy_loss
from grpo.algo.value import gae, value_loss, whiten
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import load_config
from grpo.data.prompts import load_rows
from grpo.errors import CheckpointError, ConfigError
from grpo.models.policy import load_policy
from grpo.rewards import build_rewards, weighted_sum
from grpo.rollout.batch import TrajectoryBatch
from grpo.rollout.sampling import prompt_positions
from grpo.rollout.scoring import completion_logps
from grpo.train import ppo
from grpo.train.ppo import (
    VALUE_HEAD_FILE,
    PPOTrainer,
    completion_logps_and_values,
    make_value_head,
    sequence_rewards,
)

TIMING_KEYS = {"step_time", "generation_time", "tokens_per_second"}


# --- the math by hand --------------------------------------------------------------------------------------
def test_gae_by_hand_with_padding():
    # γ = λ = 0.5. Row 0 has three real tokens; row 1 two and a padding position holding garbage.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [-0.1, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.5], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # Row 0: δ2 = 1 − 0.5 = 0.5;  δ1 = 0.5·0.5 − 0.25 = 0;  δ0 = 0.5·0.25 − 0.5 = −0.375
    #        A2 = 0.5;  A1 = 0 + 0.25·0.5 = 0.125;  A0 = −0.375 + 0.25·0.125 = −0.34375
    # Row 1: the last real token bootstraps from nothing: δ1 = 2 − 0.5 = 1.5;  δ0 = −0.1 + 0.25 − 1 = −0.85
    #        A1 = 1.5;  A0 = −0.85 + 0.25·1.5 = −0.475;  padding: 0
    expected = torch.tensor([[-0.34375, 0.125, 0.5], [-0.475, 1.5, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + torch.tensor([[0.5, 0.25, 0.5], [1.0, 0.5, 0.0]]))


def test_gae_with_gamma_and_lambda_one_returns_the_reward_to_go():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0], [0.5, 1.0, 4.0, 4.0]])
    values = torch.tensor([[0.3, 0.1, -0.4, 0.2], [0.7, 0.1, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = torch.tensor([[1.2, 1.1, 1.3, 1.0], [1.5, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(returns, to_go)
    torch.testing.assert_close(advantages, (to_go - values) * mask)


def test_whitening_is_over_real_tokens_only():
    advantages = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # Real tokens 1, 3, 5, 7: mean 4, population variance 5.
    expected = (torch.tensor([[1.0, 3.0, 4.0], [5.0, 7.0, 4.0]]) - 4) / 5**0.5 * mask
    torch.testing.assert_close(whiten(advantages, mask), expected)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 1.0, 5.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss = value_loss(values, old_values, returns, mask, cliprange=0.2)
    # Token 0: the value may only reach 0.7: max((1 − 2)², (0.7 − 2)²) = 1.69, the clipped term.
    # Token 1: max((1 − 0)², (0.7 − 0)²) = 1, the unclipped term. Token 2 is padding.
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.69 + 1.0) / 2))
    loss.backward()
    # The clipped term is constant in V: only token 1 has a gradient, ½·2·(V − R) / 2 tokens.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5, 0.0]]))
    whole_step = value_loss(values, old_values, returns, mask, cliprange=0.2, num_items_in_batch=4)
    torch.testing.assert_close(whole_step, torch.tensor(0.5 * (1.69 + 1.0) / 4))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gamma": 1.5}, "gamma must be in [0, 1]"),
        ({"lam": -0.1}, "lam must be in [0, 1]"),
        ({"vf_coef": -1.0}, "vf_coef must not be negative"),
        ({"cliprange_value": float("inf")}, "cliprange_value must be a finite number"),
        ({"supervision": "process"}, "supervision 'process' gives per-token advantages"),
    ],
)
def test_impossible_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides={"algorithm": "ppo", **settings})


# --- log-probs and values in one pass ----------------------------------------------------------------------
def test_logps_and_values_match_a_whole_sequence_forward(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    prompts = tokenizer(["What is 3 + 4?", "0 1 2"], return_tensors="pt", padding=True)
    prompt_ids, prompt_mask = prompts.input_ids, prompts.attention_mask
    torch.manual_seed(0)
    completion_ids = torch.randint(3, len(tokenizer), (4, 5))
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    prompt_index = torch.tensor([0, 0, 1, 1])
    head = make_value_head(model.config.hidden_size, init_std=0.5, seed=1)
    args = (prompt_ids, prompt_mask, prompt_index, completion_ids, completion_mask, 0.7)
    with torch.no_grad():
        logps, values, no_entropy = completion_logps_and_values(model, head, *args)
        _, _, entropy = completion_logps_and_values(model, head, *args, with_entropy=True)
        expected_logps, expected_entropy = completion_logps(model, *args, with_entropy=True)
        # The value of token t is read at the position that predicts it: the one before it.
        input_ids = torch.cat([prompt_ids[prompt_index], completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask[prompt_index], completion_mask], dim=1)
        hidden = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=prompt_positions(attention_mask),
            output_hidden_states=True,
        ).hidden_states[-1]
        width = prompt_ids.shape[1]
        expected_values = head(hidden[:, width - 1 : -1]).squeeze(-1)
    real = completion_mask.bool()
    torch.testing.assert_close(logps[real], expected_logps[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[real], expected_values[real], atol=1e-5, rtol=1e-5)
    assert no_entropy is None
    torch.testing.assert_close(entropy[real], expected_entropy[real], atol=1e-5, rtol=1e-5)
    assert values[real].std() > 0, "a value head with random weights tells states apart"

    # The critic shares the backbone: its gradient reaches the network's own weights.
    _, values, _ = completion_logps_and_values(model, head, *args)
    values[real].sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


# --- training ----------------------------------------------------------------------------------------------
def make_trainer(tiny_model: Path, dataset: Path, reward_file: Path, output: Path, **overrides) -> PPOTrainer:
    config = GRPOConfig(
        model_name_or_path=str(tiny_model),
        dataset=str(dataset),
        reward_funcs=[f"{reward_file}:length_reward"],
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=12,
        warmup_steps=0,
        output_dir=str(output),
        **{"learning_rate": 1e-2, "beta": 0.04, "num_iterations": 2, "seed": 7, **overrides},
    )
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the LoRA adapters' initial weights
    models, tokenizer = load_policy(config, str(tiny_model))
    rewards = build_rewards(config.reward_funcs)
    return PPOTrainer(
        config, models, tokenizer, rewards, load_rows(config.dataset), output, notify=lambda _: None
    )


def test_ppo_steps_train_the_policy_and_fit_the_critic(tiny_model, tiny_dataset, reward_file, tmp_path):
    # A step size at which the shared backbone moves slowly enough for the critic to keep up with it.
    trainer = make_trainer(
        tiny_model, tiny_dataset, reward_file, tmp_path / "run", max_steps=8, learning_rate=1e-3
    )
    adapters = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    # One batch, trained on again and again: the critic regresses on returns that only it and the policy's
    # KL move, so its loss must fall (with fresh samples each step it would fall, but noisily).
    batch = trainer.rollouts.sample_and_score(trainer.rollouts.sampler.batch(0))
    trainer.rollouts.sample_and_score = lambda rows, seeds=None, step=0: batch
    lines = trainer.train()

    assert [m["step"] for m in lines] == list(range(1, 9))
    first, last = lines[0], lines[-1]
    for key in ("loss", "policy_loss", "value_loss", "value/mean", "returns/mean", "explained_variance"):
        assert all(math.isfinite(m[key]) for m in lines), key
    for key in ("reward", "grad_norm", "clip_ratio/region_mean", "advantage/std", "completions/mean_length"):
        assert key in first, key
    assert last["value_loss"] < first["value_loss"] / 4, [m["value_loss"] for m in lines]
    assert first["value/mean"] == 0 and last["value/mean"] > 0, "a zero-initialised critic learns the rewards"
    assert last["kl"] != 0, "the policy has left the reference"
    assert first["value_head/parameters"] == trainer.policy.config.hidden_size + 1
    changed = [
        n for n, p in trainer.policy.named_parameters() if p.requires_grad and not p.equal(adapters[n])
    ]
    assert len(changed) == len(adapters), "every adapter moves"
    assert trainer.value_head.weight.abs().sum() > 0


def test_a_resumed_run_carries_the_value_head_and_continues_as_if_never_stopped(
    tiny_model, tiny_dataset, reward_file, tmp_path
):
    whole = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "whole", max_steps=2, save_steps=1)
    expected = whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-1"
    saved = load_file(checkpoint / VALUE_HEAD_FILE)
    assert set(saved) == {"weight", "bias"} and saved["weight"].abs().sum() > 0
    assert not list(checkpoint.rglob("*.bin")) and not list(checkpoint.rglob("*.pt")), "nothing pickled"

    resumed = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "resumed", max_steps=2)
    resumed.resume(checkpoint)
    torch.testing.assert_close(resumed.value_head.state_dict(), saved, rtol=0, atol=0)
    assert resumed.step == 1
    lines = resumed.train()

    def without_timings(line: dict) -> dict:
        return {k: v for k, v in line.items() if k not in TIMING_KEYS}

    assert json.dumps(without_timings(lines[-1])) == json.dumps(without_timings(expected[-1]))
    torch.testing.assert_close(resumed.value_head.state_dict(), whole.value_head.state_dict(), rtol=0, atol=0)
    final = tmp_path / "resumed" / "checkpoint-2"
    torch.testing.assert_close(
        load_file(final / "adapter_model.safetensors"),
        load_file(tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors"),
        rtol=0,
        atol=0,
    )


def test_a_checkpoint_without_a_value_head_is_refused(tiny_model, tiny_dataset, reward_file, tmp_path):
    trainer = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "run", max_steps=1)
    trainer.train()
    copy = tmp_path / "grpo-like" / "checkpoint-1"
    shutil.copytree(tmp_path / "run" / "checkpoint-1", copy)
    (copy / VALUE_HEAD_FILE).unlink()
    fresh = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "other", max_steps=2)
    with pytest.raises(CheckpointError, match="not a checkpoint of a PPO run"):
        fresh.resume(copy)
    assert fresh.step == 0, "nothing was restored"


# --- the settings GRPO has, acting under PPO too -----------------------------------------------------------
def without_timings(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_ppo_syncs_its_reference_every_ref_model_sync_steps_and_resumes_exactly(
    use_lora, tiny_model, tiny_dataset, reward_file, tmp_path
):
    settings = {
        "max_steps": 3,
        "save_steps": 1,
        "beta": 0.1,
        "num_iterations": 1,
        "use_lora": use_lora,
        "learning_rate": 1e-2 if use_lora else 1e-3,
    }
    synced = make_trainer(
        tiny_model, tiny_dataset, reward_file, tmp_path / "synced", ref_model_sync_steps=1, **settings
    )
    lines = synced.train()
    assert [m["reference_synced"] for m in lines] == [1.0, 1.0, 1.0]
    # From step 2 the reference is the policy that sampled the step: the KL penalty is rounding alone.
    assert all(abs(m["kl"]) < 1e-6 for m in lines[1:]), [m["kl"] for m in lines]
    unsynced = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "unsynced", **settings).train()
    assert [m["reference_synced"] for m in unsynced] == [0.0, 0.0, 0.0]
    assert abs(unsynced[2]["kl"]) > 1e-4, "without syncing the policy drifts from the reference"

    resumed = make_trainer(
        tiny_model, tiny_dataset, reward_file, tmp_path / "resumed", ref_model_sync_steps=1, **settings
    )
    resumed.resume(tmp_path / "synced" / "checkpoint-2")
    assert resumed.models.reference_is_policy_copy, "the checkpoint holds the synced reference"
    # A reference restored as the base model would show in step 3's KL and rewards.
    assert without_timings(resumed.train()[-1]) == without_timings(lines[-1])
    weights = "adapter_model.safetensors" if use_lora else "model.safetensors"
    straight = load_file(tmp_path / "synced" / "checkpoint-3" / weights)
    again = load_file(tmp_path / "resumed" / "checkpoint-3" / weights)
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def fixed_batch_trainer(tiny_model, tiny_dataset, reward_file, output, **overrides) -> tuple[PPOTrainer, Any]:
    """A PPO trainer whose every step trains on the same sampled batch (returned too)."""
    trainer = make_trainer(tiny_model, tiny_dataset, reward_file, output, max_steps=1, **overrides)
    batch = trainer.rollouts.sample_and_score(trainer.rollouts.sampler.batch(0))
    trainer.rollouts.sample_and_score = lambda rows, seeds=None, step=0: batch
    return trainer, batch


def test_ppo_trains_its_policy_on_the_high_entropy_tokens_and_logs_the_entropy(
    tiny_model, tiny_dataset, reward_file, tmp_path, monkeypatch
):
    quantile = 0.25
    trainer, batch = fixed_batch_trainer(
        tiny_model,
        tiny_dataset,
        reward_file,
        tmp_path / "run",
        num_iterations=1,
        top_entropy_quantile=quantile,
    )
    c = trainer.config
    trajectories = TrajectoryBatch.of(batch, trainer.device, c.per_device_train_batch_size, c.temperature)
    # The policy before the step's one update is the one its losses see: its log-probs and entropies.
    trainer.policy.eval()
    with torch.no_grad():
        scored = [trajectories.logps(partial(completion_logps, trainer.policy), part, with_entropy=True)
                  for part in trajectories.micro_batches]  # fmt: skip
    loss_mask = trajectories.loss_mask
    expected_masks = [
        loss_mask[part] * high_entropy_tokens(entropy, loss_mask[part], quantile)
        for part, (_, entropy) in zip(trajectories.micro_batches, scored)
    ]
    seen_policy, seen_value = [], []

    def policy_loss_spy(logps, old_logps, ref_logps, advantages, mask, **kwargs):
        loss, stats = policy_loss(logps, old_logps, ref_logps, advantages, mask, **kwargs)
        (gradient,) = torch.autograd.grad(loss, logps, retain_graph=True)
        seen_policy.append((mask, gradient))
        return loss, stats

    def value_loss_spy(values, old_values, returns, mask, *args, **kwargs):
        seen_value.append(mask)
        return value_loss(values, old_values, returns, mask, *args, **kwargs)

    monkeypatch.setattr(ppo, "policy_loss", policy_loss_spy)
    monkeypatch.setattr(ppo, "value_loss", value_loss_spy)
    metrics = trainer.train_step()

    assert len(seen_policy) == len(expected_masks)
    for (mask, gradient), expected, whole in zip(seen_policy, expected_masks, seen_value):
        torch.testing.assert_close(mask, expected, rtol=0, atol=0)
        assert 0 < mask.sum() < whole.sum(), "a quarter of the tokens, not all, train the policy"
        assert (gradient[~mask.bool()] == 0).all() and (gradient[mask.bool()] != 0).any()
    assert all(
        torch.equal(whole, loss_mask[part]) for whole, part in zip(seen_value, trajectories.micro_batches)
    )
    # The exact entropy, averaged over micro-batches; and −log π of the sampled tokens over the whole step.
    exact = [
        masked_mean(entropy, loss_mask[part]).item()
        for part, (_, entropy) in zip(trajectories.micro_batches, scored)
    ]
    assert metrics["entropy/mean"] == pytest.approx(sum(exact) / len(exact), rel=1e-4)
    sampled = torch.cat([logps for logps, _ in scored])
    assert metrics["entropy"] == pytest.approx(masked_mean(-sampled, loss_mask).item(), rel=1e-4)


def test_ppo_logs_the_entropy_of_every_step(tiny_model, tiny_dataset, reward_file, tmp_path):
    lines = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "run", max_steps=2).train()
    assert all(m["entropy"] > 0 for m in lines)
    assert not any("entropy/mean" in m for m in lines), "the exact entropy costs a pass: only when masking"


def test_ppo_credits_normalized_rewards_under_normalize_then_sum():
    # Two groups of 3; the second function's scale is 100 times the first's, and one score is not applicable.
    scores = torch.tensor(
        [[0.0, 100.0], [1.0, 300.0], [0.5, math.nan], [1.0, 200.0], [0.0, 200.0], [0.0, 500.0]]
    )
    rewards = [SimpleNamespace(weight=1.0), SimpleNamespace(weight=0.5)]
    total = weighted_sum(scores, rewards)
    batch = SimpleNamespace(scores=scores, rewards=total)
    assert torch.equal(sequence_rewards(batch, rewards, "sum_then_normalize", 3), total)
    normalized = sequence_rewards(batch, rewards, "normalize_then_sum", 3)
    torch.testing.assert_close(normalized, weighted_sum(normalize_per_function(scores, 3), rewards))
    rescaled = scores * torch.tensor([1.0, 0.01])
    again = sequence_rewards(SimpleNamespace(scores=rescaled), rewards, "normalize_then_sum", 3)
    # A function's scale no longer decides its weight (up to the 1e-4 that keeps a z-score finite).
    torch.testing.assert_close(again, normalized, rtol=0, atol=1e-4)


def test_ppo_steps_credit_the_aggregated_reward(tiny_model, tiny_dataset, reward_file, tmp_path):
    summed, batch = fixed_batch_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "sum")
    normalized, _ = fixed_batch_trainer(
        tiny_model,
        tiny_dataset,
        reward_file,
        tmp_path / "z",
        multi_objective_aggregation="normalize_then_sum",
    )
    normalized.rollouts.sample_and_score = lambda rows, seeds=None, step=0: batch
    first, second = summed.train_step(), normalized.train_step()
    assert first["reward"] == second["reward"], "the same batch, logged with its own rewards"
    assert first["returns/mean"] != pytest.approx(second["returns/mean"], abs=1e-3)


def test_ppo_gives_memory_back_between_phases_under_release_memory(
    tiny_model, tiny_dataset, reward_file, tmp_path, monkeypatch
):
    released = []
    monkeypatch.setattr(install, "map_blocks_from", lambda megabytes: None)  # (process-wide: not in a test)
    monkeypatch.setattr(install, "release_free_memory", lambda: released.append(True))
    trainer = make_trainer(
        tiny_model, tiny_dataset, reward_file, tmp_path / "run", max_steps=1, release_memory=True
    )
    trainer.train_step()
    # Before sampling, around the reference's scoring, around each of the num_iterations = 2 updates.
    assert len(released) == 1 + 2 + 2 * 2
