"""Prompt datasets: read rows from files (or a built-in task), check them, and render prompts for a model.

A row has a ``prompt`` — a string used as is, or a list of chat messages rendered with the tokenizer's chat
template — and usually an ``answer``. Every other column reaches the reward functions as a keyword argument.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpo.data.tasks import TASKS
from grpo.errors import DataError

Row = dict[str, Any]


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def load_rows(source: str, split: str = "train") -> list[Row]:
    """Rows of a built-in task's split, a local file, or (online) a `datasets` dataset; checked."""
    if source in TASKS:
        return TASKS[source](split)
    path = Path(source)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        rows = _read_file(path)
        where = str(path)
    else:
        rows = _read_hub(source, split)
        where = source
    if not rows:
        raise DataError(f"{where}: the dataset has no rows")
    for number, row in enumerate(rows, start=1):
        check_row(row, where, number)
    return rows


def _read_file(path: Path) -> list[Row]:
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a dataset file")
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        # utf-8-sig: spreadsheet programs start their UTF-8 exports with a byte-order mark.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8") from None
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must be a list of objects")
        return data
    rows = []
    # JSON Lines separates rows by "\n" only; str.splitlines() would also split at U+2028 inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: a row must be a JSON object")
        rows.append(row)
    return rows


def _read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:  # more cells than the header has columns
                raise DataError(
                    f"{path}: line {reader.line_num}: {len(row) - 1 + len(row[None])} cells for "
                    f"{len(reader.fieldnames or [])} columns"
                )
            rows.append(row)
    except csv.Error as error:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({error})") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'grpo[parquet]')") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None


def _read_hub(name: str, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: no such file or built-in task ({', '.join(TASKS)}); loading a Hub dataset needs "
            "`datasets` (pip install 'grpo[hub]')"
        ) from None
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as error:  # offline, unknown name, missing split, ...
        raise DataError(f"{name}: not a file, a built-in task, or a loadable Hub dataset ({error})") from None


def check_row(row: Any, where: str, number: int) -> None:
    """Fail with the file, row number and field of the first problem."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: row {number}: expected an object with a 'prompt', got {type(row).__name__}"
        )
    if "prompt" not in row:
        raise DataError(f"{where}: row {number}: missing field 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: row {number}: field 'prompt' is empty")
        return
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: row {number}: field 'prompt' must be a string or a list of chat messages")
    for index, message in enumerate(prompt):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: row {number}: field 'prompt' message {index} must be "
                '{"role": str, "content": str}'
            )


def render_prompt(prompt: str | list[dict[str, str]], tokenizer: Any) -> str:
    """The text the model continues: chat messages through the chat template, a plain string as is."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the prompt is chat messages but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def reward_columns(rows: list[Row], repeats: int = 1) -> dict[str, list[Any]]:
    """Every column but the prompt, as lists for the reward functions' keyword arguments; each row's value
    ``repeats`` times in a row, one per completion of its group."""
    names = [name for name in rows[0] if name != "prompt"]
    return {name: [row.get(name) for row in rows for _ in range(repeats)] for name in names}


class PromptSampler:
    """Deterministic batches of rows: shuffled per epoch from (seed, epoch), so a position resumes exactly."""

    def __init__(self, rows: list[Row], batch_size: int, seed: int, shuffle: bool = True):
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle

    def order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.rows), self.seed, epoch) if self.shuffle else list(range(len(self.rows)))

    def batch(self, step: int, draw: int = 0) -> list[Row]:
        """The rows of training step ``step`` (0-based); epochs wrap around, batches never straddle them.

        ``draw`` > 0 gives further prompts for the same step (dynamic sampling asks for more when groups
        carry no signal): rows drawn at random, but determined by (seed, step, draw), so a resumed run
        draws the same ones. Unshuffled rows are read in order (a curriculum, say), so their draws come
        from the rows reached by this step.
        """
        if draw > 0:
            chooser = random.Random(f"{self.seed}/{step}/{draw}")
            reached = len(self.rows) if self.shuffle else min(len(self.rows), (step + 1) * self.batch_size)
            picks = chooser.sample(range(reached), min(self.batch_size, reached))
            picks += [chooser.randrange(reached) for _ in range(self.batch_size - len(picks))]
            return [self.rows[i] for i in picks]
        per_epoch = max(1, len(self.rows) // self.batch_size)
        epoch, position = divmod(step, per_epoch)
        order = self.order(epoch)
        if len(order) < self.batch_size:  # fewer rows than a batch: repeat the shuffled rows
            order = (order * (self.batch_size // len(order) + 1))[: self.batch_size]
        start = position * self.batch_size
        return [self.rows[i] for i in order[start : start + self.batch_size]]

    def __iter__(self) -> Iterator[list[Row]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The indices 0 … count − 1 shuffled for ``epoch``, from (seed, epoch) alone: a resumed run, or any
    process, gets the same order."""
    indices = list(range(count))
    random.Random(seed * 100_003 + epoch).shuffle(indices)
    return indices


def step_batches(count: int, rows_per_step: int, seed: int) -> Iterator[list[int]]:
    """The row indices of each optimizer step of the supervised stages, forever: each epoch a fresh
    :func:`epoch_order` cut into steps, the last one smaller when the rows do not divide evenly."""
    for epoch in itertools.count():
        order = epoch_order(count, seed, epoch)
        for start in range(0, count, rows_per_step):
            yield order[start : start + rows_per_step]
