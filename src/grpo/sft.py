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
import itertools
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from jinja2 import TemplateError
from rich.console import Console
from torch import nn
from transformers import get_scheduler

from grpo.config import SFTConfig
from grpo.data import FILE_SUFFIXES, Row, _read_file, _read_hub, check_row, render_prompt
from grpo.errors import DataError, ModelError
from grpo.files import remove_leftovers, write_json_atomic, write_text_atomic
from grpo.models import (
    enable_checkpointing,
    load_causal_lm,
    load_tokenizer,
    pick_dtype,
    resolve_model,
    save_final_model,
    trainable_parameters,
    wrap_lora,
)
from grpo.rollout import token_logps
from grpo.run import FINAL_MODEL, apply_update, step_progress
from grpo.tasks import DEMONSTRATIONS
from grpo.trainer import METRICS_FILE


# --- rows --------------------------------------------------------------------------------------------------
def load_sft_rows(source: str, split: str = "train") -> list[Row]:
    """Rows of a built-in task's split, a local file or (online) a `datasets` split, each checked; a problem
    names file and row."""
    if source in DEMONSTRATIONS:
        return DEMONSTRATIONS[source](split)
    path = Path(source)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        rows, where = _read_file(path), str(path)
    else:
        rows, where = _read_hub(source, split), source
    if not rows:
        raise DataError(f"{where}: the dataset has no rows")
    for number, row in enumerate(rows, start=1):
        check_sft_row(row, where, number)
    return rows


def _is_message(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def check_sft_row(row: Any, where: str, number: int) -> None:
    """Fail with the file, row number and field of the first problem."""
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: row {number}: field 'messages' must be a list of chat messages")
        for index, message in enumerate(messages):
            if not _is_message(message):
                raise DataError(
                    f"{where}: row {number}: field 'messages' message {index} must be "
                    '{"role": str, "content": str}'
                )
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(f"{where}: row {number}: field 'messages' has no assistant turn to learn")
        return
    if not isinstance(row, dict) or not {"prompt", "completion"} & row.keys():
        raise DataError(
            f"{where}: row {number}: expected an object with 'prompt' and 'completion', or with 'messages'"
        )
    check_row(row, where, number)
    completion = row.get("completion")
    if not isinstance(completion, str) or not completion.strip():
        raise DataError(f"{where}: row {number}: field 'completion' must be a non-empty string")


# --- tokens and labels -------------------------------------------------------------------------------------
IGNORE_INDEX = -100  # PyTorch's and transformers' "no target at this position"


@dataclass(frozen=True)
class Example:
    """One tokenised row. The model reads ``input_ids``; ``labels`` holds the token to predict at each
    learned position and IGNORE_INDEX elsewhere (prompt, template text between turns). The first label is
    always IGNORE_INDEX: no earlier token predicts it."""

    input_ids: list[int]
    labels: list[int]

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[list[int], bool]]) -> Example:
        """Join (tokens, learned) segments, without the tokens after the last learned one: they would be
        computed for nothing."""
        ids = [token for tokens, _ in segments for token in tokens]
        labels = [token if learned else IGNORE_INDEX for tokens, learned in segments for token in tokens]
        if labels:
            labels[0] = IGNORE_INDEX
        end = max((i + 1 for i, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
        return cls(ids[:end], labels[:end])

    @property
    def learned_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(text: str, tokenizer: Any) -> list[int]:
    # No special tokens added: the chat template writes the ones a model expects, as in `grpo train`.
    return tokenizer(text, add_special_tokens=False).input_ids


def tokenize_prompt_completion(
    prompt: str | list[dict[str, str]], completion: str, tokenizer: Any
) -> Example:
    """The prompt as `grpo train` renders and tokenises it (not learned), then the completion and the
    end-of-sequence token (learned), so that the model also learns where to stop.

    Prompt and completion are tokenised apart: under GRPO the model generates tokens after the prompt's
    own tokens, which a tokenisation of the joined text could merge across the boundary."""
    prompt_ids = encode(render_prompt(prompt, tokenizer), tokenizer)
    completion_ids = [*encode(completion, tokenizer), tokenizer.eos_token_id]
    return Example.from_segments([(prompt_ids, False), (completion_ids, True)])


def tokenize_conversation(messages: list[dict[str, str]], tokenizer: Any) -> Example:
    """The conversation through the chat template, with every assistant turn learned and nothing else.

    Each assistant turn is located by rendering the conversation up to it: messages[:i] with the generation
    prompt is the text before turn i (exactly the prompt `grpo train` would render), messages[:i + 1] the
    text through its end. Each piece is tokenised on its own, so the spans are exact whatever the tokenizer
    merges. A turn is learned up to and including the first end-of-sequence token; the template's text
    after it (a newline before the next turn) is never generated, so it is read but not learned."""
    eos = tokenizer.eos_token_id
    segments: list[tuple[list[int], bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(messages[:index], tokenizer)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (before.startswith(rendered) and through.startswith(before)):
            raise DataError(
                f"the chat template does not render this conversation turn by turn (at message {index}), "
                "so its assistant turns cannot be told apart; give such rows as prompt and completion"
            )
        turn = encode(through[len(before) :], tokenizer)
        end = turn.index(eos) + 1 if eos in turn else len(turn)
        segments += [
            (encode(before[len(rendered) :], tokenizer), False),
            (turn[:end], True),
            (turn[end:], False),
        ]
        rendered = through
    return Example.from_segments(segments)


def tokenize_row(row: Row, tokenizer: Any) -> Example:
    if "messages" in row:
        return tokenize_conversation(row["messages"], tokenizer)
    return tokenize_prompt_completion(row["prompt"], row["completion"], tokenizer)


def truncate(example: Example, max_length: int) -> Example:
    """``example`` in at most ``max_length`` tokens. Everything before the first learned token is the prompt;
    it loses tokens from the left, down to its last one (which predicts the first learned token). A
    completion too long even for the room that leaves loses its end."""
    if len(example.input_ids) <= max_length:
        return example
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    completion = len(example.input_ids) - first
    start = first - min(first, max(1, max_length - completion))
    window = slice(start, start + max_length)
    return Example(example.input_ids[window], example.labels[window])


def prepare_examples(
    rows: list[Row], tokenizer: Any, max_length: int, where: str
) -> tuple[list[Example], int]:
    """Every row tokenised and cut to ``max_length``, and how many had to be cut; a row that cannot be
    rendered is named with its file and number."""
    examples, truncated = [], 0
    for number, row in enumerate(rows, start=1):
        try:
            example = tokenize_row(row, tokenizer)
        except (DataError, TemplateError) as error:
            raise DataError(f"{where}: row {number}: {error}") from None
        if example.learned_tokens == 0:
            raise DataError(f"{where}: row {number}: no completion token to learn")
        if len(example.input_ids) > max_length:
            example, truncated = truncate(example, max_length), truncated + 1
        examples.append(example)
    return examples, truncated


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out): a seeded random ``fraction`` of the examples, at least one, is held out; both
    keep the file's order."""
    count = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


# --- the loss ----------------------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX on padding).

    Right padding keeps every row's positions starting at 0 without explicit position ids."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}


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
def step_batches(count: int, rows_per_step: int, seed: int) -> Iterator[list[int]]:
    """The row indices of each optimizer step, forever: each epoch a fresh shuffle seeded by (seed, epoch)
    and cut into steps, the last one smaller when the rows do not divide evenly."""
    for epoch in itertools.count():
        order = list(range(count))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for start in range(0, count, rows_per_step):
            yield order[start : start + rows_per_step]


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
def default_output_dir(config: SFTConfig) -> Path:
    name = Path(str(config.dataset)).stem or "data"
    return Path("runs") / f"sft-{name}-{datetime.now():%Y%m%d-%H%M%S}"


def load_model(config: SFTConfig, path: str) -> nn.Module:
    model = load_causal_lm(path, pick_dtype(config.dtype))
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
    torch.manual_seed(config.seed)
    model = load_model(config, model_path)

    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    config = dataclasses.replace(config, output_dir=str(output_dir))
    remove_leftovers(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (output_dir / METRICS_FILE, output_dir / "summary.json"):
        stale.unlink(missing_ok=True)  # an earlier run's, which this one replaces
    write_text_atomic(output_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
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
    write_json_atomic(output_dir / "summary.json", summary)
    if before is not None and after is not None:
        console.print(f"held-out loss: {before:.4f} → {after:.4f}")
    console.print(f"final model: {output_dir / FINAL_MODEL} (grpo train --model {output_dir / FINAL_MODEL})")
    return summary
