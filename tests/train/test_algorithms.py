"""The baselines beside GRPO (RLOO, REINFORCE, softmax-weighted group log-likelihood) and the GRPO variants
DAPO's dynamic sampling and entropy-based token masking: the math by hand, and training through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_args import base_args
from safetensors.torch import load_file
from typer.testing import CliRunner

from grpo.algo.advantages import leave_one_out_advantages, softmax_group_weights
from grpo.algo.logprobs import high_entropy_tokens
from grpo.algo.losses import softmax_weighted_loss
from grpo.cli.main import app


def test_leave_one_out_advantages_by_hand():
    # Group of 3 with rewards 3, 0, 0: 3 − mean(0, 0) = 3; 0 − mean(3, 0) = −1.5 (twice).
    # Group of 3 with rewards 1, 1, 1: no signal.
    advantages = leave_one_out_advantages(torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=3)
    torch.testing.assert_close(advantages, torch.tensor([3.0, -1.5, -1.5, 0.0, 0.0, 0.0]))


def test_leave_one_out_needs_groups_of_two_or_more():
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0]), group_size=1)


def test_softmax_group_weights_by_hand():
    rewards = torch.tensor([0.0, math.log(3.0), 5.0, 5.0])
    weights = softmax_group_weights(rewards, group_size=2, temperature=1.0)
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.75, 0.5, 0.5]))
    # τ = 0.5 squares the odds: 1 : 9.
    sharper = softmax_group_weights(rewards, group_size=2, temperature=0.5)
    torch.testing.assert_close(sharper[:2], torch.tensor([0.1, 0.9]))


def test_softmax_weighted_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, 99.0]], requires_grad=True)  # 99 is padding
    mask = torch.tensor([[1, 1], [1, 0]])
    weights = torch.tensor([0.25, 0.75])
    loss, _ = softmax_weighted_loss(logps, None, weights, mask, num_groups=1)
    # Sequence log-likelihoods −3 and −3: loss = −(0.25·(−3) + 0.75·(−3)) = 3.
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -0.25], [-0.75, 0.0]]))


def test_softmax_weighted_loss_adds_the_kl_term_over_the_batch_tokens():
    logps = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.0 + math.log(2.0), -1.0]])  # ρ = 2 on the first token: k3 = 2 − ln 2 − 1
    loss, metrics = softmax_weighted_loss(
        logps, ref, torch.ones(1), torch.ones(1, 2), num_groups=1, beta=0.5, num_tokens=4
    )
    expected_kl = 2 - math.log(2.0) - 1
    assert loss.item() == pytest.approx(2.0 + 0.5 * expected_kl / 4)
    assert metrics["kl"] == pytest.approx(expected_kl / 2)


def test_high_entropy_tokens_keep_the_top_quantile_of_real_tokens():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]])  # 10 is padding: it must not count
    kept = high_entropy_tokens(entropy, mask, quantile=0.5)
    # Real entropies 1, 2, 3, 4, 0.5: the median 2 is the threshold.
    assert kept.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]


def train(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output


def metrics(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def adapter_changed(output, steps: int) -> bool:
    first = load_file(output / "checkpoint-1" / "adapter_model.safetensors")
    last = load_file(output / f"checkpoint-{steps}" / "adapter_model.safetensors")
    return any(not torch.equal(first[k], last[k]) for k in first)


@pytest.mark.parametrize(
    "flags",
    [
        ["--algorithm", "rloo"],
        ["--algorithm", "reinforce"],
        ["--algorithm", "softmax_weighted", "--softmax-temperature", "0.5", "--beta", "0.04"],
        ["--top-entropy-quantile", "0.2"],
        ["--algorithm", "ppo", "--lam", "0.9", "--vf-coef", "0.5"],
    ],
    ids=["rloo", "reinforce", "softmax_weighted", "top_entropy_quantile", "ppo"],
)
def test_each_algorithm_trains_through_the_cli(flags, tiny_model, tiny_dataset, tmp_path, reward_file):
    output = tmp_path / "run"
    args = [
        *base_args(tiny_model, tiny_dataset, output, reward_file),
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--save-total-limit",
        "0",
        *flags,
    ]
    code, log = train(args)
    assert code == 0, log
    lines = metrics(output)
    assert [m["step"] for m in lines] == [1, 2] and all(math.isfinite(m["loss"]) for m in lines)
    assert adapter_changed(output, 2)
    if "--top-entropy-quantile" in flags:
        assert all(m["entropy/mean"] > 0 for m in lines)
    if "ppo" in flags:  # the critic is trained and saved with the run's checkpoints
        assert all(math.isfinite(m["value_loss"]) for m in lines)
        assert (output / "checkpoint-2" / "value_head.safetensors").is_file()
        assert not (output / "final_model" / "value_head.safetensors").exists(), (
            "the final model is the policy"
        )


HALF_CONSTANT = """
def half_constant(prompts, completions, answer, **_):
    # Rows whose answer is even get the same reward whatever the completion: their groups carry no signal.
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [0.5 if int(a) % 2 == 0 else min(len(t), 40) / 40 for t, a in zip(texts, answer)]
"""


def test_dynamic_sampling_leaves_no_group_without_a_signal(tiny_model, tiny_dataset, tmp_path, reward_file):
    rewards = tmp_path / "half.py"
    rewards.write_text(HALF_CONSTANT)
    output = tmp_path / "run"
    args = [
        *base_args(tiny_model, tiny_dataset, output, reward_file),
        "--reward-funcs",
        f"{rewards}:half_constant",
        "--reward-weights",
        "1",
        "--max-steps",
        "3",
        "--dynamic-sampling",
        "--max-sampling-rounds",
        "6",
    ]
    code, log = train(args)
    assert code == 0, log
    lines = metrics(output)
    assert all(m["frac_reward_zero_std"] == 0 for m in lines)
    assert any(m["sampling_rounds"] > 1 for m in lines), "some step had to sample more prompts"

    without = tmp_path / "without"
    plain = [
        *base_args(tiny_model, tiny_dataset, without, reward_file),
        "--reward-funcs",
        f"{rewards}:half_constant",
        "--reward-weights",
        "1",
        "--max-steps",
        "3",
    ]
    assert train(plain)[0] == 0
    assert any(m["frac_reward_zero_std"] > 0 for m in metrics(without)), "the reward does leave flat groups"
