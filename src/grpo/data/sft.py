"""SFT rows and their tokens: ``{"prompt", "completion"}`` rows or ``{"messages": [...]}`` conversations,
checked, tokenized with the loss on the completion (or every assistant turn) only, truncated, batched."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from grpo.data.prompts import FILE_SUFFIXES, Row, _read_file, _read_hub, check_row, render_prompt
from grpo.data.tasks import DEMONSTRATIONS
from grpo.errors import DataError


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
