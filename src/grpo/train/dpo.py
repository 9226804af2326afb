"""Direct Preference Optimization (Rafailov et al., 2023): offline training on preference pairs.

DPO needs no sampling and no reward function. For each pair it compares how much more likely the policy makes
the chosen answer than the reference model does, against the same for the rejected answer, and pushes that
difference up through −log σ(β · ((log πθ(y_c|x) − log π_ref(y_c|x)) − (log πθ(y_r|x) − log π_ref(y_r|x)))).
β · (log πθ − log π_ref) is the answer's *implicit reward*; a held-out pair counts as right when its chosen
answer's implicit reward is the higher one.

Prompts are rendered as `grpo train` renders them (the chat template with its generation prompt), so that a
model trained here starts its answers where GRPO's sampler would. A sequence's log-prob is the sum over its
answer tokens and the end-of-sequence token that closes it; the prompt itself is not scored. Each prompt
runs once per forward pass and its key/value cache serves both of its answers
(:func:`grpo.rollout.scoring.completion_logps`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn
from transformers import get_scheduler

from grpo.accel.install import Speedups, make_models_lean
from grpo.algo.preference_losses import dpo_loss
from grpo.config.loading import to_dict
from grpo.config.stages import DPOConfig
from grpo.data.preferences import PairRow, is_builtin, load_pairs
from grpo.data.prompts import render_prompt
from grpo.errors import DataError, ModelError
from grpo.files import check_output_dir, remove_leftovers, write_json_atomic, write_text_atomic
from grpo.models.loading import parameter_counts, resolve_model, save_final_model, trainable_parameters
from grpo.models.policy import PolicyAndReference, load_policy
from grpo.runs.layout import CONFIG_FILE, FINAL_MODEL, METRICS_FILE, SUMMARY_FILE
from grpo.train.common import peak_memory_mb, seed_everything, stage_output_dir, step_progress
from grpo.train.update import apply_update


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair as token ids: the prompt as `grpo train` renders it, and each answer followed by the
    end-of-sequence token (so that the policy also learns where to stop)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool  # max_length cut the prompt's start or an answer's end


def fit_to_length(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """Cut a pair so that the prompt and either answer together take at most ``max_length`` tokens.

    The prompt loses tokens from its start first, since the end of a conversation matters most to the
    answer, but keeps at least half of ``max_length``; past that the answers lose tokens from their end.
    """
    longest = max(len(chosen), len(rejected))
    kept = min(len(prompt), max(max_length - longest, max_length // 2))
    room = max_length - kept
    return prompt[len(prompt) - kept :], chosen[:room], rejected[:room]


def encode_pairs(pairs: Sequence[PairRow], tokenizer: Any, max_length: int, where: str) -> list[EncodedPair]:
    """Tokenize checked pairs (:func:`grpo.data.preferences.load_pairs`); a pair that cannot be used is a
    DataError naming ``where`` and its row."""
    end = [tokenizer.eos_token_id]
    encoded = []
    for number, pair in enumerate(pairs, start=1):
        if pair["chosen"] == pair["rejected"]:
            raise DataError(f"{where}: row {number}: 'chosen' and 'rejected' are the same answer")
        try:
            text = render_prompt(pair["prompt"], tokenizer)
        except DataError as error:
            raise DataError(f"{where}: row {number}: {error}") from None
        prompt, chosen, rejected = (
            tokenizer(text, add_special_tokens=False).input_ids,
            tokenizer(pair["chosen"], add_special_tokens=False).input_ids + end,
            tokenizer(pair["rejected"], add_special_tokens=False).input_ids + end,
        )
        cut = fit_to_length(prompt, chosen, rejected, max_length)
        truncated = [len(part) for part in cut] != [len(prompt), len(chosen), len(rejected)]
        encoded.append(EncodedPair(*cut, truncated=truncated))
    return encoded


def hold_out(
    pairs: list[EncodedPair], fraction: float, seed: int, where: str
) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """Split ``pairs`` into (training, held-out) with ``fraction`` of them, at least one, held out by seed."""
    count = max(1, round(len(pairs) * fraction))
    if count >= len(pairs):
        raise DataError(f"{where}: eval_fraction = {fraction} of {len(pairs)} pairs leaves none to train on")
    held = set(random.Random(seed).sample(range(len(pairs)), count))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


@dataclass
class PairBatch:
    """Pairs laid out for one forward pass: each prompt once (left-padded), then all chosen answers and all
    rejected answers (right-padded); answer row i continues prompt ``prompt_index[i]``."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    prompt_index: torch.Tensor  # (2B,): 0..B-1 for the chosen answers, then again for the rejected ones
    completion_ids: torch.Tensor  # (2B, C)
    completion_mask: torch.Tensor  # (2B, C)

    @classmethod
    def of(cls, pairs: Sequence[EncodedPair], pad_id: int, device: torch.device) -> PairBatch:
        prompt_ids, prompt_mask = padded([p.prompt for p in pairs], pad_id, left=True)
        answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        completion_ids, completion_mask = padded(answers, pad_id, left=False)
        index = torch.arange(len(pairs)).repeat(2)
        tensors = (prompt_ids, prompt_mask, index, completion_ids, completion_mask)
        return cls(*(t.to(device) for t in tensors))


def padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one (rows, longest) tensor and its mask, padded on the left or the right."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


Scorer = Callable[..., torch.Tensor]  # completion_logps' signature: per-token log-probs (rows, C)


def sequence_logps(score: Scorer, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (B,) of the chosen and the rejected answers of ``batch`` (their padding left out)."""
    per_token = score(
        batch.prompt_ids, batch.prompt_mask, batch.prompt_index, batch.completion_ids, batch.completion_mask
    )
    summed = (per_token * batch.completion_mask).sum(dim=1)
    chosen, rejected = summed.chunk(2)
    return chosen, rejected


class DPOTrainer:
    """The DPO loop: AdamW with a transformers schedule, gradient accumulation over micro-batches, clipping.

    On construction it scores the held-out pairs with the reference model, once for the whole run (the
    reference never changes), and with ``precompute_ref_log_probs`` the training pairs too.
    """

    def __init__(
        self,
        config: DPOConfig,
        models: PolicyAndReference,
        tokenizer: Any,
        train_pairs: list[EncodedPair],
        eval_pairs: list[EncodedPair],
        output_dir: Path,
    ):
        self.config = config
        self.models = models
        self.policy = models.policy
        self.pad_id = tokenizer.pad_token_id
        # The fused decoder scores without gradients where it applies; training uses the chunked LM head.
        self.speed = Speedups(fused_inference=config.fused_inference, chunked_head=True)
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.output_dir = output_dir
        self.device = next(self.policy.parameters()).device
        self.steps = config.training_steps(len(train_pairs))
        self.step = 0
        self.logged: list[dict[str, float]] = []  # the lines of metrics.jsonl
        self.optimizer = torch.optim.AdamW(
            list(trainable_parameters(self.policy).values()),
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.steps),
            num_training_steps=self.steps,
        )
        self.eval_reference = self.reference_scores(eval_pairs) if eval_pairs else None
        self.train_reference = None
        if config.precompute_ref_log_probs:
            self.train_reference = self.reference_scores(train_pairs)
            if not models.uses_adapters:  # the frozen copy has done its work: free its memory
                self.models = PolicyAndReference(
                    self.policy, None, uses_adapters=False, needs_reference=False
                )

    # --- scoring without gradients -------------------------------------------------------------------------
    def scores(self, model: nn.Module, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        """(N, 2) summed log-probs of each pair's chosen and rejected answer under ``model``, in eval mode."""
        size = self.config.per_device_train_batch_size
        score: Scorer = self.speed.scorer(model, size * self.config.max_length)
        batches = (
            PairBatch.of(pairs[i : i + size], self.pad_id, self.device) for i in range(0, len(pairs), size)
        )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return torch.cat([torch.stack(sequence_logps(score, batch), dim=1) for batch in batches])
        finally:
            model.train(was_training)

    def reference_scores(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        """(N, 2) the reference model's summed log-probs of each pair's chosen and rejected answer."""
        with self.models.reference() as reference:
            return self.scores(reference, pairs)

    def held_out(self) -> dict[str, float] | None:
        """The policy's DPO loss, preference accuracy and mean margin on the held-out pairs (None: no pairs).

        Before training the policy is the reference, so every margin is 0: the loss is log 2, the accuracy 0.
        """
        if self.eval_reference is None:
            return None
        policy = self.scores(self.policy, self.eval_pairs)
        loss, metrics = dpo_loss(
            policy[:, 0],
            policy[:, 1],
            self.eval_reference[:, 0],
            self.eval_reference[:, 1],
            self.config.beta,
            self.config.label_smoothing,
        )
        return {
            "loss": loss.item(),
            "accuracy": metrics["rewards/accuracy"],
            "margin": metrics["rewards/margin"],
        }

    # --- one step ------------------------------------------------------------------------------------------
    def step_order(self) -> Iterator[list[int]]:
        """The training pairs' indices of each step: a seeded shuffle per epoch, whose remainder (fewer pairs
        than a step) waits for a later epoch instead of making a small step."""
        generator = torch.Generator().manual_seed(self.config.seed)
        per_step = min(self.config.pairs_per_step, len(self.train_pairs))
        while True:
            order = torch.randperm(len(self.train_pairs), generator=generator).tolist()
            for start in range(0, len(order) - per_step + 1, per_step):
                yield order[start : start + per_step]

    def train_step(self, indices: list[int]) -> dict[str, float]:
        """One optimizer step on the pairs ``indices``, accumulated over micro-batches; the step's metrics."""
        c = self.config
        started = time.perf_counter()
        pairs = [self.train_pairs[i] for i in indices]
        if self.train_reference is not None:
            reference = self.train_reference[indices]
        else:
            reference = self.reference_scores(pairs)
        score = self.speed.training_scorer(self.policy)
        sums: dict[str, float] = defaultdict(float)
        self.policy.train()
        for start in range(0, len(pairs), c.per_device_train_batch_size):
            part = slice(start, start + c.per_device_train_batch_size)
            chosen, rejected = sequence_logps(score, PairBatch.of(pairs[part], self.pad_id, self.device))
            loss, metrics = dpo_loss(
                chosen, rejected, reference[part, 0], reference[part, 1], c.beta, c.label_smoothing
            )
            share = len(chosen) / len(pairs)  # micro-batches weighted by their pairs: the step's mean loss
            (loss * share).backward()
            metrics |= {
                "loss": loss.item(),
                "logps/chosen": chosen.mean().item(),
                "logps/rejected": rejected.mean().item(),
            }
            for key, value in metrics.items():
                sums[key] += value * share
        grad_norm, learning_rate = apply_update(
            self.optimizer, self.scheduler, c.max_grad_norm, sums["loss"], self.step + 1
        )
        self.step += 1
        return {
            **sums,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "epoch": self.step * len(pairs) / len(self.train_pairs),
            "step_time": time.perf_counter() - started,
        }

    # --- the loop ------------------------------------------------------------------------------------------
    def train(
        self, progress: Callable[[int, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Run all steps, writing metrics.jsonl every ``logging_steps``; return the logged lines."""
        since_last_line: list[dict[str, float]] = []
        for indices in itertools.islice(self.step_order(), self.steps - self.step):
            metrics = self.train_step(indices)
            since_last_line.append(metrics)
            if self.step % self.config.logging_steps == 0 or self.step == self.steps:
                means = {key: statistics.fmean(m[key] for m in since_last_line) for key in metrics}
                # A line's place in the run is its last step's, not the mean of its steps'.
                line = {
                    "step": float(self.step),
                    **means,
                    "epoch": metrics["epoch"],
                    "learning_rate": metrics["learning_rate"],
                }
                self.logged.append(line)
                text = "".join(json.dumps(m) + "\n" for m in self.logged)
                write_text_atomic(self.output_dir / METRICS_FILE, text)
                since_last_line = []
            if progress is not None:
                progress(self.step, metrics)
        return self.logged


def load_pair_sets(config: DPOConfig) -> tuple[list[PairRow], list[PairRow]]:
    """The training pairs and the held-out pairs named by the config (before any eval_fraction split)."""
    train = load_pairs(config.dataset, "train")
    if config.eval_dataset is not None:
        return train, load_pairs(config.eval_dataset, "test")
    if is_builtin(config.dataset):
        return train, load_pairs(config.dataset, "test")
    return train, []


def run_dpo(config: DPOConfig, console: Console) -> dict[str, Any]:
    """Train with DPO and score the held-out pairs before and after; returns the run's summary.

    Writes config.yaml, metrics.jsonl, summary.json and final_model/ (adapters merged) to the output
    directory, which is created only once the data, the model and every pair have been checked.
    """
    started = time.perf_counter()
    train_rows, eval_rows = load_pair_sets(config)
    model_path = resolve_model(config.model_name_or_path)
    output_dir = stage_output_dir(config.output_dir, "dpo", config.dataset)
    seed_everything(config.seed)

    # load_policy reads only the model and LoRA settings, which DPOConfig shares with GRPOConfig by name.
    models, tokenizer = load_policy(config, model_path)  # type: ignore[arg-type]
    make_models_lean(models)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"{model_path}: the tokenizer has no end-of-sequence token to close the answers with"
        )
    train_pairs = encode_pairs(train_rows, tokenizer, config.max_length, config.dataset)
    eval_where = config.eval_dataset or config.dataset
    eval_pairs = encode_pairs(eval_rows, tokenizer, config.max_length, eval_where)
    if config.eval_fraction:
        train_pairs, eval_pairs = hold_out(train_pairs, config.eval_fraction, config.seed, config.dataset)
    train_pairs = train_pairs[: config.max_train_pairs or None]
    eval_pairs = eval_pairs[: config.max_eval_pairs or None]

    config = dataclasses.replace(config, output_dir=str(output_dir))
    check_output_dir(output_dir)
    remove_leftovers(output_dir)
    for stale in (output_dir / METRICS_FILE, output_dir / SUMMARY_FILE):
        stale.unlink(missing_ok=True)  # an earlier run's, which this one replaces
    write_text_atomic(output_dir / CONFIG_FILE, yaml.safe_dump(to_dict(config), sort_keys=False))
    console.print(
        f"[bold]grpo dpo[/]: {config.model_name_or_path} on {len(train_pairs)} pairs of {config.dataset} "
        f"→ {output_dir}"
    )

    trainer = DPOTrainer(config, models, tokenizer, train_pairs, eval_pairs, output_dir)
    before = trainer.held_out()
    with step_progress(console, trainer.steps) as show:

        def report(step: int, metrics: dict[str, float]) -> None:
            info = (
                f"loss {metrics['loss']:.3f}  accuracy {metrics['rewards/accuracy']:.2f}  "
                f"margin {metrics['rewards/margin']:.3f}  {metrics['step_time']:.1f}s/step"
            )
            show(step, info, log_line=step % config.logging_steps == 0)

        history = trainer.train(progress=report)
    after = trainer.held_out()
    save_final_model(models.policy, tokenizer, output_dir / FINAL_MODEL)

    window = max(1, min(5, len(history) // 4))
    summary = {
        "output_dir": str(output_dir),
        "final_model": str(output_dir / FINAL_MODEL),
        "steps": trainer.step,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "truncated_pairs": sum(p.truncated for p in (*train_pairs, *eval_pairs)),
        "loss_first_steps": statistics.fmean(m["loss"] for m in history[:window]),
        "loss_last_steps": statistics.fmean(m["loss"] for m in history[-window:]),
        "held_out_accuracy_before": before["accuracy"] if before else None,
        "held_out_accuracy_after": after["accuracy"] if after else None,
        "held_out_loss_before": before["loss"] if before else None,
        "held_out_loss_after": after["loss"] if after else None,
        "held_out_margin_after": after["margin"] if after else None,
        "seconds_per_step_median": statistics.median(m["step_time"] for m in history),
        "peak_memory_mb": round(peak_memory_mb()),
        **parameter_counts(models.policy, models.reference_model),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    if before and after:
        console.print(
            f"held-out preference accuracy {before['accuracy']:.1%} → {after['accuracy']:.1%}, "
            f"DPO loss {before['loss']:.3f} → {after['loss']:.3f}"
        )
    console.print(f"run files: {output_dir}")
    return summary
