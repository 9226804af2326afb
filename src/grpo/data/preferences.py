"""Preference pairs for reward-model training and DPO: rows ``{"prompt", "chosen", "rejected"}``.

``prompt`` is a string or a list of chat messages; ``chosen`` and ``rejected`` are the two answers to it.
A file may also hold Anthropic HH-RLHF's shape, ``{"chosen", "rejected"}`` as whole "Human:/Assistant:"
dialogues that share everything up to the last "Assistant:" turn: the shared part becomes the prompt (as
chat messages) and the two last turns the answers.

The built-in ``hh-rlhf`` is HH-RLHF's harmless-base test split (2,312 human preference pairs, MIT licence,
shipped in ``grpo/data/datasets/hh_rlhf`` with its LICENSE); every tenth pair is its held-out ``test``
split. A built-in task's name (``arithmetic``) gives that task's generated pairs, with its own held-out split.
"""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from grpo.data.prompts import _read_file
from grpo.data.tasks import PAIRS
from grpo.errors import DataError

PairRow = dict[str, Any]


BUILTIN_PAIRS = {"hh-rlhf": "hh_rlhf/harmless-base-test.jsonl.gz"}


HELD_OUT_EVERY = 10  # built-in sets: every tenth pair is held out


TURN = re.compile(r"\n\n(Human|Assistant): ")


ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(dialogue: str) -> list[dict[str, str]]:
    """A "\\n\\nHuman: …\\n\\nAssistant: …" dialogue as chat messages."""
    parts = TURN.split(dialogue)
    # split() gives [text before the first turn, role, text, role, text, ...]
    return [{"role": ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]


def split_hh_pair(chosen: str, rejected: str) -> PairRow | None:
    """The prompt both dialogues share and their last assistant turns; None when they do not share one."""
    cut_chosen, cut_rejected = chosen.rfind("\n\nAssistant:"), rejected.rfind("\n\nAssistant:")
    if cut_chosen < 0 or chosen[:cut_chosen] != rejected[:cut_rejected]:
        return None
    prompt = hh_messages(chosen[:cut_chosen])
    if not prompt or prompt[-1]["role"] != "user":
        return None
    answer = len("\n\nAssistant:")
    return {
        "prompt": prompt,
        "chosen": chosen[cut_chosen + answer :].strip(),
        "rejected": rejected[cut_rejected + answer :].strip(),
    }


def is_builtin(source: str) -> bool:
    """Whether ``source`` names a built-in set of pairs, which has its own held-out "test" split."""
    return source in BUILTIN_PAIRS or source in PAIRS


def load_pairs(source: str, split: str = "train") -> list[PairRow]:
    """Pairs of a built-in set's split, or of a local file (all of it); checked, with file and row named."""
    if source in PAIRS:
        if split not in ("train", "test"):
            raise DataError(f"{source}: no split {split!r} (train, test)")
        return PAIRS[source](split)
    if source in BUILTIN_PAIRS:
        if split not in ("train", "test"):
            raise DataError(f"{source}: no split {split!r} (train, test)")
        raw = resources.files("grpo.data.datasets").joinpath(BUILTIN_PAIRS[source]).read_bytes()
        rows = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line]
        rows = [r for i, r in enumerate(rows) if (i % HELD_OUT_EVERY == 0) == (split == "test")]
        pairs = [split_hh_pair(r["chosen"], r["rejected"]) for r in rows]
        return [p for p in pairs if p is not None]  # 5 of 2,312 do not share their prompt
    path = Path(source)
    rows = _read_file(path)
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return [check_pair(row, str(path), number) for number, row in enumerate(rows, start=1)]


def check_pair(row: Any, where: str, number: int) -> PairRow:
    if not isinstance(row, dict):
        raise DataError(f"{where}: row {number}: expected an object with 'chosen' and 'rejected'")
    for field in ("chosen", "rejected"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(f"{where}: row {number}: field {field!r} must be a non-empty string")
    if "prompt" not in row:
        pair = split_hh_pair(row["chosen"], row["rejected"])
        if pair is None:
            raise DataError(
                f"{where}: row {number}: no 'prompt', and 'chosen' and 'rejected' are not Human:/Assistant: "
                "dialogues sharing everything before their last Assistant: turn"
            )
        return {**row, **pair}
    prompt = row["prompt"]
    if isinstance(prompt, str) and prompt.strip():
        return row
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    ):
        return row
    raise DataError(f"{where}: row {number}: field 'prompt' must be a string or a list of chat messages")
