"""Supervised fine-tuning (SFT): teach a model a dataset's completions, the usual stage before GRPO.

A row is ``{"prompt", "completion"}`` — the prompt a string or chat messages, rendered exactly as `grpo train`
renders its prompts, so that the model learns to continue the very text it will later be sampled from — or
``{"messages": [...]}``, a conversation in which every assistant turn is learned. The loss is the mean
negative log-likelihood of the completion tokens only: prompt, chat-template and padding tokens are read,
never predicted. ``output_dir/final_model`` is a plain transformers model (LoRA adapters merged) that
``grpo train --model`` takes as its policy, and so as its reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn
from transformers import get_scheduler

from grpo.accel.lean_layers import make_lean
from grpo.algo.logprobs import token_logps
from grpo.config.loading import to_dict
from grpo.config.stages import SFTConfig
from grpo.data.prompts import step_batches
from grpo.data.sft import IGNORE_INDEX, Example, collate, hold_out, load_sft_rows, prepare_examples
from grpo.data.tasks import DEMONSTRATIONS
from grpo.errors import DataError, ModelError
from grpo.files import check_output_dir, remove_leftovers, write_json_atomic, write_text_atomic
from grpo.models.loading import (
    enable_checkpointing,
    load_causal_lm,
    load_tokenizer,
    pick_dtype,
    resolve_model,
    save_final_model,
    trainable_parameters,
    wrap_lora,
)
from grpo.runs.layout import CONFIG_FILE, FINAL_MODEL, METRICS_FILE, SUMMARY_FILE
from grpo.train.common import stage_output_dir, step_progress
from grpo.train.update import apply_update


def completion_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed negative log-likelihood of the batch's learned tokens.

    The logits, (rows × positions × vocabulary) and the largest tensor of a step, are computed only from
    the position before the earliest learned token on: the prompt-only columns before it predict nothing
    we learn. The last position predicts nothing either, so it is not fed in."""
    ids, labels = batch["input_ids"], batch["labels"]
    learned = labels != IGNORE_INDEX
    first = int(learned.any(dim=0).nonzero()[0])  # at least 1: a first label is never learned
    logits = model(
        input_ids=ids[:, :-1],
        attention_mask=batch["attention_mask"][:, :-1],
        logits_to_keep=ids.shape[1] - first,
    ).logits
    logps = token_logps(logits, ids[:, first:], temperature=1.0, reuse_logits=True)
    return -torch.where(learned[:, first:], logps, 0.0).sum()


def accumulate_gradients(
    model: nn.Module, examples: Sequence[Example], micro_batch_size: int, pad_token_id: int
) -> float:
    """Forward and backward one optimizer step's examples in micro-batches; return the step's loss.

    The loss is the negative log-likelihood summed over every learned token of the step, divided by their
    number. Each micro-batch's sum is divided by the step's count, not its own, so that accumulation does
    not change the objective (a mean per micro-batch would weigh a token of a short micro-batch more). As
    the sum does not depend on how rows are grouped, rows of similar length go together: less padding."""
    device = next(model.parameters()).device
    count = sum(example.learned_tokens for example in examples)
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    total = 0.0
    for start in range(0, len(ordered), micro_batch_size):
        nll = completion_nll(model, collate(ordered[start : start + micro_batch_size], pad_token_id, device))
        (nll / count).backward()
        total += nll.item()
    return total / count


@torch.no_grad()
def held_out_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_token_id: int) -> float:
    """Mean negative log-likelihood per learned token of ``examples``, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = sum(
        completion_nll(model, collate(examples[start : start + batch_size], pad_token_id, device)).item()
        for start in range(0, len(examples), batch_size)
    )
    model.train(was_training)
    return total / sum(example.learned_tokens for example in examples)


# --- the loop ----------------------------------------------------------------------------------------------
def steps_per_epoch(config: SFTConfig, rows: int) -> int:
    return math.ceil(rows / (config.per_device_train_batch_size * config.gradient_accumulation_steps))


def total_steps(config: SFTConfig, rows: int) -> int:
    return config.max_steps or max(1, math.ceil(config.num_train_epochs * steps_per_epoch(config, rows)))


def make_optimizer(model: nn.Module, config: SFTConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: decaying biases and norm scales toward 0 only
    hurts, which is why transformers' Trainer leaves them out too."""
    params = list(trainable_parameters(model).values())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


def train(
    model: nn.Module,
    examples: list[Example],
    config: SFTConfig,
    pad_token_id: int,
    on_step: Callable[[dict[str, float]], None] = lambda metrics: None,
) -> list[dict[str, float]]:
    """Make the configured number of optimizer updates over ``examples``; return each step's metrics."""
    optimizer = make_optimizer(model, config)
    steps = total_steps(config, len(examples))
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=steps
    )
    batches = step_batches(
        len(examples), config.per_device_train_batch_size * config.gradient_accumulation_steps, config.seed
    )
    per_epoch = steps_per_epoch(config, len(examples))
    history: list[dict[str, float]] = []
    num_tokens = 0
    model.train()
    for step in range(1, steps + 1):
        started = time.perf_counter()
        batch = [examples[i] for i in next(batches)]
        loss = accumulate_gradients(model, batch, config.per_device_train_batch_size, pad_token_id)
        grad_norm, learning_rate = apply_update(optimizer, scheduler, config.max_grad_norm, loss, step)
        tokens = sum(len(example.input_ids) for example in batch)
        num_tokens += tokens
        step_time = time.perf_counter() - started
        metrics = {
            "step": step,
            "epoch": step / per_epoch,
            "loss": loss,
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "num_tokens": num_tokens,
            "step_time": step_time,
        }
        history.append(metrics)
        on_step(metrics)
    return history


def log_line(window: list[dict[str, float]]) -> dict[str, float]:
    """One metrics.jsonl line for the steps since the last line: the mean loss and gradient norm, the tokens
    (prompt ones included) read per second, the latest learning rate, and the tokens read so far."""
    last = window[-1]
    return {
        "step": last["step"],
        "epoch": round(last["epoch"], 4),
        "loss": statistics.mean(m["loss"] for m in window),
        "grad_norm": statistics.mean(m["grad_norm"] for m in window),
        "learning_rate": last["learning_rate"],
        "num_tokens": last["num_tokens"],
        "tokens_per_second": sum(m["tokens"] for m in window) / sum(m["step_time"] for m in window),
    }


# --- the recipe --------------------------------------------------------------------------------------------
def load_model(config: SFTConfig, path: str) -> nn.Module:
    model = make_lean(load_causal_lm(path, pick_dtype(config.dtype, trained=not config.use_lora)))
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    # wrap_lora reads only the lora_* settings, which SFTConfig shares with GRPOConfig.
    return wrap_lora(model, config) if config.use_lora else model


def run_sft(config: SFTConfig, console: Console) -> dict[str, Any]:
    """Fine-tune ``config.model_name_or_path`` on ``config.dataset`` and write the run's files
    (config.yaml, metrics.jsonl, final_model/, summary.json); return the summary.

    Settings, rows and the model are all checked before the output directory is created, so bad input
    leaves nothing behind."""
    started = time.perf_counter()
    config.validate()
    train_rows = load_sft_rows(config.dataset, "train")
    eval_rows = None
    if config.eval_dataset or config.dataset in DEMONSTRATIONS:
        eval_rows = load_sft_rows(config.eval_dataset or config.dataset, "test")
    model_path = resolve_model(config.model_name_or_path)
    tokenizer = load_tokenizer(model_path)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{model_path}: the tokenizer has no end-of-sequence token to end completions with")
    train_set, truncated = prepare_examples(train_rows, tokenizer, config.max_length, config.dataset)
    eval_set: list[Example] = []
    if eval_rows is not None:
        eval_set, eval_truncated = prepare_examples(
            eval_rows, tokenizer, config.max_length, config.eval_dataset or config.dataset
        )
        truncated += eval_truncated
    elif config.eval_fraction:
        if len(train_set) < 2:
            raise DataError(
                f"{config.dataset}: one row cannot be split into training and held-out rows; "
                "set eval_fraction to 0 or give an eval_dataset"
            )
        train_set, eval_set = hold_out(train_set, config.eval_fraction, config.seed)
    output_dir = stage_output_dir(config.output_dir, "sft", config.dataset, fallback="data")
    torch.manual_seed(config.seed)
    model = load_model(config, model_path)

    config = dataclasses.replace(config, output_dir=str(output_dir))
    check_output_dir(output_dir)
    remove_leftovers(output_dir)
    for stale in (output_dir / METRICS_FILE, output_dir / SUMMARY_FILE):
        stale.unlink(missing_ok=True)  # an earlier run's, which this one replaces
    write_text_atomic(output_dir / CONFIG_FILE, yaml.safe_dump(to_dict(config), sort_keys=False))
    steps = total_steps(config, len(train_set))
    console.print(
        f"[bold]grpo sft[/]: {config.model_name_or_path} on {config.dataset} "
        f"({len(train_set)} rows, {steps} steps) → {output_dir}"
    )
    if truncated:
        console.print(f"{truncated} rows longer than max_length = {config.max_length} tokens were cut")

    def held_out(tag: str) -> float | None:
        if not eval_set:
            return None
        loss = held_out_loss(model, eval_set, config.per_device_train_batch_size, tokenizer.pad_token_id)
        console.print(f"held-out loss ({tag}): {loss:.4f} over {len(eval_set)} rows")
        return loss

    before = held_out("before")
    logged: list[dict[str, float]] = []  # the lines of metrics.jsonl
    window: list[dict[str, float]] = []  # the steps since the last of them
    with step_progress(console, steps) as show:

        def report(metrics: dict[str, float]) -> None:
            step = int(metrics["step"])
            window.append(metrics)
            if step % config.logging_steps and step != steps:
                show(step, f"loss {metrics['loss']:.4f}", log_line=False)
                return
            line = log_line(window)
            window.clear()
            logged.append(line)
            write_text_atomic(output_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in logged))
            show(
                step,
                f"loss {line['loss']:.4f}  lr {line['learning_rate']:.2e}  "
                f"{line['tokens_per_second']:.0f} tokens/s",
            )

        history = train(model, train_set, config, tokenizer.pad_token_id, report)
    after = held_out("after")
    save_final_model(model, tokenizer, output_dir / FINAL_MODEL)
    window = max(1, min(5, len(history) // 4))
    summary = {
        "output_dir": str(output_dir),
        "final_model": str(output_dir / FINAL_MODEL),
        "steps": len(history),
        "epochs": round(history[-1]["epoch"], 4),
        "train_rows": len(train_set),
        "eval_rows": len(eval_set),
        "truncated_rows": truncated,
        "train_loss_first_steps": statistics.mean(m["loss"] for m in history[:window]),
        "train_loss_last_steps": statistics.mean(m["loss"] for m in history[-window:]),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    if before is not None and after is not None:
        console.print(f"held-out loss: {before:.4f} → {after:.4f}")
    console.print(f"final model: {output_dir / FINAL_MODEL} (grpo train --model {output_dir / FINAL_MODEL})")
    return summary
