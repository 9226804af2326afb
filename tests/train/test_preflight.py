"""`grpo doctor`'s measurements (grpo.train.preflight): one step's phases run on a real trainer without
changing it, the optimizer's time and state estimated, and a scored batch's learning signal counted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grpo.config.grpo import GRPOConfig
from grpo.data.prompts import load_rows
from grpo.models.policy import load_policy
from grpo.rewards import build_rewards
from grpo.rollout.batch import Rollout, ScoredBatch
from grpo.train import preflight
from grpo.train.grpo import GRPOTrainer
from grpo.train.ppo import PPOTrainer
from grpo.train.preflight import estimate_step, learning_signal, update_seconds


def make_trainer(
    tiny_model: Path, dataset: Path, reward_file: Path, output: Path, **overrides
) -> GRPOTrainer | PPOTrainer:
    config = GRPOConfig(
        model_name_or_path=str(tiny_model),
        dataset=str(dataset),
        reward_funcs=[f"{reward_file}:length_reward"],
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=12,
        output_dir=str(output),
        **overrides,
    )
    torch.manual_seed(config.seed)  # the LoRA adapters' initial weights, as a run seeds them
    models, tokenizer = load_policy(config, str(tiny_model))
    trainer_class = PPOTrainer if config.algorithm == "ppo" else GRPOTrainer
    rewards = build_rewards(config.reward_funcs)
    rows = load_rows(config.dataset)
    return trainer_class(config, models, tokenizer, rewards, rows, output, notify=lambda _: None)


def trained_state(trainer: GRPOTrainer | PPOTrainer) -> dict[str, torch.Tensor]:
    return {str(i): p.detach().clone() for i, p in enumerate(trainer.update.parameters)}


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_step_is_measured_without_changing_the_trainer(
    algorithm, tiny_model, tiny_dataset, reward_file, tmp_path
):
    trainer = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "run", algorithm=algorithm)
    before = trained_state(trainer)
    estimate = estimate_step(trainer, held_out_rows=load_rows(str(tiny_dataset))[:3])
    after = trained_state(trainer)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    assert all(p.grad is None for p in trainer.update.parameters), "the measured backward leaves no gradients"
    assert not trainer.update.optimizer.state, "no optimizer step"
    assert trainer.step == 0
    assert not (tmp_path / "run").exists(), "nothing written where the run's files would go"

    assert estimate.batch.rollout.num_groups == 2
    assert estimate.micro_batches == 2
    assert min(estimate.sampling, estimate.log_probs, estimate.micro_batch, estimate.update) > 0
    assert estimate.held_out_per_row > 0
    expected = estimate.sampling + estimate.log_probs + 2 * estimate.micro_batch + estimate.update
    assert estimate.step_seconds == pytest.approx(expected)
    numbers = sum(p.numel() for p in trainer.update.parameters)
    assert estimate.trainable_numbers == numbers
    assert estimate.optimizer_state_mb == pytest.approx(2 * numbers * 4 / 2**20)  # two float32 moments
    assert estimate.peak_mb == pytest.approx(estimate.measured_peak_mb + estimate.optimizer_state_mb)


def test_the_measured_groups_are_the_first_steps_own(tiny_model, tiny_dataset, reward_file, tmp_path):
    measured = estimate_step(make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "a")).batch
    trainer = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "b")
    trainer.train_step()
    assert torch.equal(measured.rollout.completion_ids, trainer.last_batch.rollout.completion_ids)
    assert torch.equal(measured.rewards, trainer.last_batch.rewards)


def test_several_updates_a_step_multiply_the_update_phases(tiny_model, tiny_dataset, reward_file, tmp_path):
    trainer = make_trainer(tiny_model, tiny_dataset, reward_file, tmp_path / "run", num_iterations=3)
    estimate = estimate_step(trainer)
    assert estimate.held_out_per_row is None, "no held-out rows, no held-out time"
    updates = 3 * (estimate.micro_batches * estimate.micro_batch + estimate.update)
    assert estimate.step_seconds == pytest.approx(estimate.sampling + estimate.log_probs + updates)


def test_the_update_is_timed_on_all_numbers_or_scaled_from_a_sample(monkeypatch):
    parameters = [torch.zeros(1000, requires_grad=True), torch.zeros(3000, requires_grad=True)]
    seconds, how = update_seconds(parameters)
    assert seconds > 0 and "stand-ins of the 4,000 trainable numbers" in how
    assert all(p.grad is None for p in parameters) and all((p == 0).all() for p in parameters)

    monkeypatch.setattr(preflight, "UPDATE_SAMPLE_NUMBERS", 1000)
    seconds, how = update_seconds(parameters)
    assert seconds > 0 and "stand-ins of 1,000 of the 4,000 trainable numbers, scaled up" in how


def scored_batch(
    rewards: list[float], scores: list[list[float]], truncated: list[bool], g: int
) -> ScoredBatch:
    n = len(rewards)
    rollout = Rollout(
        prompt_ids=torch.ones(n // g, 3, dtype=torch.long),
        prompt_mask=torch.ones(n // g, 3, dtype=torch.long),
        completion_ids=torch.ones(n, 4, dtype=torch.long),
        completion_mask=torch.ones(n, 4, dtype=torch.long),
        truncated=torch.tensor(truncated),
        texts=["x"] * n,
        num_generations=g,
        sampling_logps=None,
    )
    return ScoredBatch(
        rollout,
        torch.tensor(rewards),
        torch.tensor(scores),
        torch.zeros(n),
        torch.zeros(n, dtype=torch.bool),
        {"b": 1},
    )


def test_the_learning_signal_counts_alike_groups_truncation_and_each_rewards_range():
    nan = math.nan
    batch = scored_batch(
        rewards=[1.0, 1.0, 0.0, 2.0, 0.5, 0.5],  # groups of 2: alike, differing, alike
        scores=[[1.0, nan], [1.0, nan], [0.0, 0.0], [1.0, 1.0], [0.5, nan], [0.5, 0.0]],
        truncated=[True, False, False, False, True, True],
        g=2,
    )
    signal = learning_signal(batch, ["a", "b"])
    assert (signal.groups, signal.alike, signal.completions, signal.truncated) == (3, 2, 6, 3)
    a, b, total = signal.rewards
    assert (a.name, a.min, a.max, a.mean, a.failures) == ("a", 0.0, 1.0, pytest.approx(4 / 6), 0)
    assert (b.name, b.min, b.max, b.mean, b.failures) == ("b", 0.0, 1.0, pytest.approx(1 / 3), 1)
    assert (total.name, total.min, total.max) == ("total", 0.0, 2.0)
    assert not a.constant
