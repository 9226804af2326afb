"""The contract between sampling and the loss (grpo.rollout.batch): a per-token loss mask keeps tokens in a
sequence without training on them, and a single-turn completion trains exactly as before the mask existed."""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.algo.losses import policy_loss
from grpo.config.grpo import GRPOConfig
from grpo.rollout.batch import Rollout, ScoredBatch, TrajectoryBatch
from grpo.rollout.generate import generate
from grpo.rollout.scoring import completion_logps
from grpo.train.distributed import Ranks
from grpo.train.grpo import MicroBatchLoss

PROMPTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", "the answer is"]


def sampled(tiny_model) -> tuple[torch.nn.Module, Rollout]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, PROMPTS, num_generations=2, max_completion_length=8)
    return model, rollout


def scored(rollout: Rollout) -> ScoredBatch:
    n = len(rollout.completion_ids)
    rewards = torch.arange(n, dtype=torch.float32)
    advantages = rewards - rewards.view(-1, rollout.num_generations).mean(dim=1).repeat_interleave(2)
    return ScoredBatch(rollout, rewards, rewards[:, None], advantages, torch.zeros(n, dtype=torch.bool), {})


def test_a_single_turn_rollout_trains_on_every_completion_token(tiny_model):
    _, rollout = sampled(tiny_model)
    assert torch.equal(rollout.loss_mask, rollout.completion_mask)
    batch = TrajectoryBatch.of(scored(rollout), torch.device("cpu"), micro_batch_size=3, temperature=1.0)
    assert torch.equal(batch.loss_mask, rollout.completion_mask)
    assert batch.micro_batches == [slice(0, 3), slice(3, 6)]
    # Truncated completions (DAPO) and skipped groups leave the loss; the sequences stay as they are.
    truncated = dataclasses.replace(rollout, truncated=torch.tensor([True, False, False, False]))
    skipped = scored(truncated)
    skipped.skipped[2:] = True
    masked = TrajectoryBatch.of(skipped, torch.device("cpu"), 4, 1.0, mask_truncated=True)
    assert masked.loss_mask[0].sum() == 0 and masked.loss_mask[2:].sum() == 0
    assert torch.equal(masked.loss_mask[1], rollout.completion_mask[1])
    assert torch.equal(masked.completion_mask, rollout.completion_mask)


def test_masked_tokens_get_no_gradient_and_the_sequence_keeps_them(tiny_model):
    """Tokens marked 0 in the loss mask (as a tool's output in a multi-turn trajectory would be) stay in the
    sequence the model reads, carry no policy loss or KL, and their log-probs get no gradient."""
    model, rollout = sampled(tiny_model)
    loss_mask = rollout.completion_mask.clone()
    loss_mask[:, 2:4] = 0  # two tokens in the middle of every completion: not the model's own
    trajectory = dataclasses.replace(rollout, loss_mask=loss_mask)
    batch = TrajectoryBatch.of(scored(trajectory), torch.device("cpu"), 4, 1.0)
    config = GRPOConfig(num_generations=2, beta=0.1)
    loss_of = MicroBatchLoss(config, batch, batch.loss_mask.sum(), 2, False, Ranks())
    part = batch.micro_batches[0]
    logps = batch.logps(lambda *args: completion_logps(model, *args), part)
    logps.retain_grad()
    reference = logps.detach() - 0.3  # a reference the policy differs from: the KL term has a gradient
    loss, _ = loss_of(part, logps, None, reference, None)
    loss.backward()
    assert logps.grad[:, 2:4].abs().sum() == 0
    assert (logps.grad * batch.loss_mask[part]).abs().sum() > 0
    # The masked tokens are still read: the trajectory's log-probs are a plain forward pass's over the same
    # tokens, every position included.
    with torch.no_grad():
        rows = batch.prompt_index[part]
        ids = torch.cat([batch.prompt_ids[rows], batch.completion_ids[part]], dim=1)
        mask = torch.cat([batch.prompt_mask[rows], batch.completion_mask[part]], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        width = batch.completion_ids.shape[1]
        plain = logits[:, -width - 1 : -1].log_softmax(dim=-1)
        plain = plain.gather(-1, batch.completion_ids[part].unsqueeze(-1)).squeeze(-1)
    present = batch.completion_mask[part].bool()
    torch.testing.assert_close(logps.detach()[present], plain[present], atol=1e-5, rtol=1e-5)


def test_the_loss_over_a_masked_trajectory_is_the_loss_over_its_trained_tokens(tiny_model):
    """policy_loss under the mask equals policy_loss on the trained tokens alone, computed by hand."""
    model, rollout = sampled(tiny_model)
    loss_mask = rollout.completion_mask.clone()
    loss_mask[:, :1] = 0
    batch = TrajectoryBatch.of(
        scored(dataclasses.replace(rollout, loss_mask=loss_mask)), torch.device("cpu"), 4, 1.0
    )
    with torch.no_grad():
        logps = batch.logps(lambda *args: completion_logps(model, *args), slice(0, 4))
    advantages = batch.advantages[:4]
    mask = batch.loss_mask[:4]
    loss, _ = policy_loss(logps, logps, None, advantages, mask, beta=0.0, loss_type="bnpo")
    # ρ = 1 everywhere: the per-token loss is −A, averaged over the trained tokens.
    trained = batch.loss_mask[:4].float()
    expected = -(advantages[:, None] * trained).sum() / trained.sum()
    torch.testing.assert_close(loss, expected)
