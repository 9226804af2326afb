"""The ``entropy`` every GRPO step logs: the mean −log π of the sampled tokens over the step's loss tokens,
from the log-probs of its first pass (no extra pass), and the exact ``entropy/mean`` beside it where
top_entropy_quantile computes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_args import base_args
from typer.testing import CliRunner

from grpo.algo.logprobs import surprisal_sum
from grpo.cli.main import app
from grpo.train.grpo import GRPOTrainer
from grpo.train.step_metrics import sampled_entropy


def train(tiny_model: Path, dataset: Path, output: Path, reward_file: Path, *flags: str) -> list[dict]:
    args = ["train", *base_args(tiny_model, dataset, output, reward_file), "--report-to", "none"]
    args += ["--no-eval-on-start", "--eval-steps", "0", "--beta", "0", *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_surprisal_sum_adds_minus_the_log_probs_of_the_masked_tokens_without_gradient():
    logps = torch.tensor([[-0.5, -2.0, -9.0], [-1.0, -0.25, -4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    total = surprisal_sum(logps, mask)
    assert total.item() == pytest.approx(0.5 + 2.0 + 1.0 + 0.25 + 4.0)
    assert not total.requires_grad
    assert sampled_entropy(total.item(), mask) == pytest.approx(7.75 / 5)
    assert math.isnan(sampled_entropy(0.0, torch.zeros(2, 3))), "no loss token: nothing to estimate"


# Two updates per step, large enough (full fine-tuning at a high learning rate) for the second pass to score
# a policy measurably different from the one that sampled.
LARGE_UPDATES = ["--num-iterations", "2", "--no-use-lora", "--learning-rate", "0.1", "--warmup-steps", "0"]


def test_every_step_logs_the_entropy_of_its_sampled_tokens_from_the_first_pass(
    tiny_model, tiny_dataset, tmp_path, reward_file, monkeypatch
):
    """Two updates per step (num_iterations 2) over two micro-batches: the logged entropy is the token-
    weighted mean over the whole batch of the first pass's −log π, the pass of the policy that sampled."""
    passes: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per step, (−log π, loss mask) per call
    original = GRPOTrainer.policy_logps_and_entropy

    def recording(self, trajectories, part):
        logps, entropy = original(self, trajectories, part)
        if not passes or passes[-1][0] is not trajectories:
            passes.append([trajectories])
        passes[-1].append((-logps.detach(), trajectories.loss_mask[part]))
        return logps, entropy

    monkeypatch.setattr(GRPOTrainer, "policy_logps_and_entropy", recording)
    metrics = train(
        tiny_model, tiny_dataset, tmp_path / "run", reward_file, "--max-steps", "2", *LARGE_UPDATES
    )
    assert len(passes) == 2
    for line, (trajectories, *calls) in zip(metrics, passes):
        micro_batches = len(trajectories.micro_batches)
        assert micro_batches == 2 and len(calls) == 2 * micro_batches
        first = calls[:micro_batches]
        tokens = sum(mask.sum() for _, mask in first)
        expected = sum((nll * mask).sum() for nll, mask in first) / tokens
        assert line["entropy"] == pytest.approx(expected.item(), rel=1e-5)
        both_passes = sum((nll * mask).sum() for nll, mask in calls) / (2 * tokens)
        assert abs(line["entropy"] - both_passes.item()) > 1e-4, "the second pass scores an updated policy"
        assert "entropy/mean" not in line, (
            "the exact entropy costs a pass over the vocabulary: not by default"
        )


def test_the_estimate_agrees_with_the_exact_entropy_logged_beside_it(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    # The tiny model's next-token distributions are near uniform over its ~330 tokens: entropy about 5.8 nats.
    metrics = train(
        tiny_model,
        tiny_dataset,
        tmp_path / "run",
        reward_file,
        "--max-steps",
        "1",
        "--top-entropy-quantile",
        "0.5",
    )
    (line,) = metrics
    assert line["entropy/mean"] == pytest.approx(5.8, abs=0.1)
    assert line["entropy"] == pytest.approx(line["entropy/mean"], abs=0.1)
