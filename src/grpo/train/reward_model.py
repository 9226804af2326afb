"""Training a reward model from preference pairs: the recipe behind `grpo reward-model`.

A causal LM becomes a sequence classifier with one label (transformers keeps its backbone and adds a new
``score`` head) and learns, from pairs ``{"prompt", "chosen", "rejected"}``, to give the chosen answer the
higher reward: the Bradley-Terry loss −log σ(r_chosen − r_rejected). Under LoRA the backbone gets adapters
and the head is trained whole; the saved model has the adapters merged, so that it is a plain
``AutoModelForSequenceClassification`` that the ``reward_model`` reward kind loads as it is.

Every sequence is encoded by :class:`grpo.rewards.model.RewardModelScorer`, the code that scores with the
model during GRPO, and held-out pairs are scored through its forward pass: the chat template, the
truncation and the padding the model learns under are the ones it is used under.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from grpo.algo.preference_losses import bradley_terry_loss
from grpo.config.loading import to_dict
from grpo.config.stages import RewardModelConfig
from grpo.data.preferences import PairRow, is_builtin, load_pairs
from grpo.data.prompts import step_batches
from grpo.errors import DataError, ModelError
from grpo.files import check_output_dir, remove_leftovers, write_json_atomic, write_text_atomic
from grpo.models.loading import (
    enable_checkpointing,
    load_tokenizer,
    pick_dtype,
    refuse_pickled_weights,
    resolve_model,
    save_final_model,
    trainable_parameters,
)
from grpo.rewards.model import RewardModelScorer
from grpo.runs.layout import (
    CONFIG_FILE,
    EVAL_AFTER_FILE,
    EVAL_BEFORE_FILE,
    FINAL_MODEL,
    METRICS_FILE,
    SUMMARY_FILE,
    eval_file,
)
from grpo.train.common import peak_memory_mb, seed_everything, stage_output_dir, step_progress
from grpo.train.update import apply_update

EncodedPair = tuple[list[int], list[int]]  # token ids of (prompt + chosen, prompt + rejected)


# --- data ------------------------------------------------------------------------------------------------
def load_train_and_eval_pairs(config: RewardModelConfig) -> tuple[list[PairRow], list[PairRow]]:
    """The training pairs and the held-out pairs, capped by max_train_pairs and max_eval_pairs; every row
    checked (a DataError names the file and row) before anything is loaded or written."""
    train = load_pairs(config.dataset, "train")
    if config.eval_dataset is not None:
        held_out = load_pairs(config.eval_dataset, "test")
    elif is_builtin(config.dataset):
        held_out = load_pairs(config.dataset, "test")
    elif config.eval_fraction > 0:
        count = max(1, round(len(train) * config.eval_fraction))
        if count >= len(train):
            raise DataError(
                f"{config.dataset}: {len(train)} pairs are too few to hold out eval_fraction = "
                f"{config.eval_fraction} of them and train on the rest"
            )
        picked = set(random.Random(config.seed).sample(range(len(train)), count))
        held_out = [pair for i, pair in enumerate(train) if i in picked]
        train = [pair for i, pair in enumerate(train) if i not in picked]
    else:
        held_out = []
    if config.max_train_pairs:
        train = train[: config.max_train_pairs]
    if config.max_eval_pairs:
        held_out = held_out[: config.max_eval_pairs]
    return train, held_out


def encode_pairs(scorer: RewardModelScorer, pairs: list[PairRow]) -> list[EncodedPair]:
    return [
        (scorer.encode(p["prompt"], p["chosen"]), scorer.encode(p["prompt"], p["rejected"])) for p in pairs
    ]


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids padded on the right with ``pad_id`` and their attention mask, as the scorer pads: the
    classifier pools the last token that is not ``config.pad_token_id``."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


# --- the model -------------------------------------------------------------------------------------------
def load_reward_backbone(config: RewardModelConfig, path: str) -> tuple[nn.Module, Any]:
    """The model to train (a one-label sequence classifier, with LoRA adapters when configured) and its
    tokenizer, with ``config.pad_token_id`` set as the reward kind sets it when it loads the model."""
    from transformers import AutoModelForSequenceClassification

    refuse_pickled_weights(Path(path), "model")
    tokenizer = load_tokenizer(path)  # sets a pad token from eos when there is none
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=pick_dtype(config.dtype), use_safetensors=True
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot load the model as a sequence classifier ({error})") from None
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        text_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # a classifier never generates: no key/value cache to build
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            target_modules="all-linear",  # under SEQ_CLS, peft leaves the score head out of it
            modules_to_save=["score"],  # the new head is trained whole and saved with the adapters
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


# --- training --------------------------------------------------------------------------------------------
def total_steps(config: RewardModelConfig, num_pairs: int) -> int:
    return config.max_steps or math.ceil(num_pairs / config.pairs_per_step) * config.num_train_epochs


def train_pairs(
    model: nn.Module,
    pad_id: int,
    pairs: list[EncodedPair],
    config: RewardModelConfig,
    log: Callable[[dict[str, float]], None],
) -> list[dict[str, float]]:
    """Minimise the Bradley-Terry loss over ``pairs``; return the logged metrics (also passed to ``log``).

    A step's pairs are sorted by length before they are cut into micro-batches: the step's gradient is the
    same, with less padding. Each micro-batch runs its chosen and rejected sequences in one forward.
    """
    from transformers import get_scheduler

    steps = total_steps(config, len(pairs))
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=steps
    )
    device = next(model.parameters()).device
    batches = itertools.islice(step_batches(len(pairs), config.pairs_per_step, config.seed), steps)
    window: list[dict[str, float]] = []  # the steps since the last logged line
    logged = []
    seen = 0  # pairs learnt from so far, for the epoch count
    model.train()
    for step, batch in enumerate(batches, start=1):
        started = time.perf_counter()
        batch.sort(key=lambda i: max(len(pairs[i][0]), len(pairs[i][1])))
        sums = dict.fromkeys(("loss", "accuracy", "margin"), 0.0)
        for start in range(0, len(batch), config.per_device_train_batch_size):
            micro = [pairs[i] for i in batch[start : start + config.per_device_train_batch_size]]
            input_ids, attention_mask = pad_right([c for c, _ in micro] + [r for _, r in micro], pad_id)
            rewards = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            rewards = rewards.logits[:, 0].float()
            loss, metrics = bradley_terry_loss(
                rewards[: len(micro)], rewards[len(micro) :], config.center_rewards_coefficient
            )
            share = len(micro) / len(batch)  # the step's loss is the mean over all of its pairs
            (loss * share).backward()
            for key, value in {"loss": loss.item(), **metrics}.items():
                sums[key] += value * share
        grad_norm, learning_rate = apply_update(
            optimizer, scheduler, config.max_grad_norm, sums["loss"], step
        )
        seen += len(batch)
        window.append({**sums, "grad_norm": grad_norm, "step_time": time.perf_counter() - started})
        if step % config.logging_steps == 0 or step == steps:
            line = {"step": float(step), "epoch": seen / len(pairs)}
            line.update({key: statistics.fmean(m[key] for m in window) for key in window[0]})
            line["learning_rate"] = learning_rate
            logged.append(line)
            log(line)
            window = []
    return logged


# --- evaluation ------------------------------------------------------------------------------------------
def score_pairs(scorer: RewardModelScorer, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards of the chosen and of the rejected answers, from the scorer's own batched forward."""
    scorer.model.eval()
    rewards = scorer.forward([c for c, _ in pairs] + [r for _, r in pairs])[:, 0]
    return rewards[: len(pairs)], rewards[len(pairs) :]


def evaluate_pairs(scorer: RewardModelScorer, pairs: list[EncodedPair]) -> dict[str, Any]:
    """Held-out pair accuracy, mean margin and loss, and each pair's two rewards."""
    chosen, rejected = score_pairs(scorer, pairs)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    return {
        "summary": {"pairs": len(pairs), "loss": loss.item(), **metrics},
        "rows": [{"chosen": c, "rejected": r} for c, r in zip(chosen.tolist(), rejected.tolist())],
    }


# --- the recipe ------------------------------------------------------------------------------------------
def run_reward_model(config: RewardModelConfig, console: Console) -> dict[str, Any]:
    """Train a reward model and write output_dir/{config.yaml, metrics.jsonl, eval_before.json,
    eval_after.json, final_model/, summary.json}; return the summary.

    Bad input (a setting, a pair, the model) fails before anything is written.
    """
    started = time.perf_counter()
    config.validate()
    train_rows, eval_rows = load_train_and_eval_pairs(config)
    model_path = resolve_model(config.model_name_or_path)
    output_dir = stage_output_dir(config.output_dir, "reward-model", config.dataset, fallback="pairs")
    config = dataclasses.replace(config, output_dir=str(output_dir))
    seed_everything(config.seed)  # the new score head's initial weights come from torch's generator
    model, tokenizer = load_reward_backbone(config, model_path)
    # The scorer that grpo.rewards.model builds at use time, around the model being trained.
    scorer = RewardModelScorer(
        model,
        tokenizer,
        batch_size=config.per_device_eval_batch_size,
        max_length=config.max_length,
        outputs=None,
    )
    train_ids, eval_ids = encode_pairs(scorer, train_rows), encode_pairs(scorer, eval_rows)

    check_output_dir(output_dir)
    remove_leftovers(output_dir)
    for stale in (METRICS_FILE, EVAL_BEFORE_FILE, EVAL_AFTER_FILE, SUMMARY_FILE):
        (output_dir / stale).unlink(missing_ok=True)  # an earlier run's: none may pass for this one's
    write_text_atomic(output_dir / CONFIG_FILE, yaml.safe_dump(to_dict(config), sort_keys=False))
    console.print(
        f"[bold]grpo reward-model[/]: {config.model_name_or_path} on {len(train_ids)} pairs of "
        f"{config.dataset}, {len(eval_ids)} held out → {output_dir}"
    )

    def held_out(tag: str) -> dict[str, Any] | None:
        if not eval_ids:
            return None
        result = evaluate_pairs(scorer, eval_ids)
        write_json_atomic(output_dir / eval_file(tag), result)
        console.print(f"held-out ({tag}): pair accuracy {result['summary']['accuracy']:.1%}")
        return result["summary"]

    before = held_out("before")
    steps = total_steps(config, len(train_ids))
    lines: list[str] = []
    with step_progress(console, steps) as show:

        def log(metrics: dict[str, float]) -> None:
            lines.append(json.dumps(metrics) + "\n")
            write_text_atomic(output_dir / METRICS_FILE, "".join(lines))
            info = (
                f"loss {metrics['loss']:.3f}  accuracy {metrics['accuracy']:.0%}  "
                f"{metrics['step_time']:.1f}s/step"
            )
            show(int(metrics["step"]), info)

        training_started = time.perf_counter()
        history = train_pairs(model, scorer.pad_id, train_ids, config, log)
        train_seconds = time.perf_counter() - training_started
    after = held_out("after")
    save_final_model(model, tokenizer, output_dir / FINAL_MODEL)

    summary = {
        "output_dir": str(output_dir),
        "final_model": str(output_dir / FINAL_MODEL),
        "model": config.model_name_or_path,
        "dataset": config.dataset,
        "train_pairs": len(train_ids),
        "eval_pairs": len(eval_ids),
        "steps": steps,
        "epochs": round(history[-1]["epoch"], 3),
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "held_out_accuracy_before": before["accuracy"] if before else None,
        "held_out_accuracy_after": after["accuracy"] if after else None,
        "held_out_margin_before": before["margin"] if before else None,
        "held_out_margin_after": after["margin"] if after else None,
        "seconds_per_step": round(train_seconds / steps, 3),
        "peak_memory_mb": round(peak_memory_mb()),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    if before and after:
        console.print(f"held-out pair accuracy: {before['accuracy']:.1%} → {after['accuracy']:.1%}")
    console.print(f"reward model: {output_dir / FINAL_MODEL}")
    return summary
