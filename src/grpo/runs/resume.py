"""What a resumed run takes from the run it continues, and what it must find unchanged.

Its settings: those saved with its newest checkpoint, or, for a run killed before its first checkpoint,
those its run directory recorded at the start (config.yaml; the run then starts again from step 0, and
being seeded it ends as it would have). They are the base layer of `grpo train`'s config:
:func:`grpo.config.loading.load_config` takes it as a function of the settings given
(``base=resumed_base``), so that the settings package needs nothing of the checkpoints' code.

Its reward code: the sha256 of each code file behind its rewards, recorded at the start in
reward_files.json (:func:`record_reward_files`; which files: :func:`grpo.rewards.core.reward_code_files`).
A checkpoint is resumed only while every one of them still holds what it held then
(:func:`check_reward_files`): otherwise the run would go on optimising another reward than the one it
started with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grpo.config.grpo import GRPOConfig
from grpo.config.loading import convert, read_yaml
from grpo.errors import CheckpointError, ConfigError
from grpo.files import write_json_atomic
from grpo.runs.layout import CONFIG_FILE, REWARD_FILES_FILE


def resumed_base(given: dict[str, Any]) -> dict[str, Any]:
    """The base layer under the settings ``given`` (by a config file and flags): the settings of the run
    that resume_from_checkpoint names when one is named, else none."""
    resume_from = given.get("resume_from_checkpoint")
    return resumed_settings(resume_from, given) if resume_from else {}


def is_run_directory(path: Path) -> bool:
    """Whether ``path`` is a directory that `grpo train` has started a run in: it holds its config.yaml."""
    return (path / CONFIG_FILE).is_file()


def resumed_settings(resume_from: str, given: dict[str, Any]) -> dict[str, Any]:
    """The settings of the run that ``resume_from`` names, as the base layer of a resumed run: those saved
    with the checkpoint it names or its newest one, else those in its config.yaml (a run without a
    checkpoint yet). Its output directory is that run's directory unless one is given."""
    from grpo.models.checkpoint import (  # (imports torch: only to resume)
        latest_checkpoint,
        read_trainer_state,
    )

    path = Path(resume_from)
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint).get("config") or {}
        source, run_directory = f"{checkpoint}/trainer_state.json", checkpoint.parent
    elif is_run_directory(path):
        saved, source, run_directory = read_yaml(path / CONFIG_FILE), str(path / CONFIG_FILE), path
    else:
        raise ConfigError(f"{path}: resume_from_checkpoint: {not_a_run(path)}")
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    base = convert(GRPOConfig, {name: value for name, value in saved.items() if name in known}, source)
    base["resume_from_checkpoint"] = str(checkpoint or path)
    if "output_dir" not in given:
        base["output_dir"] = str(run_directory)
    return base


def not_a_run(path: Path) -> str:
    """Why ``path``, holding no checkpoint, cannot be resumed."""
    if not path.exists():
        return "no such directory"
    if not path.is_dir():
        return "a file, not a run directory or a checkpoint"
    return f"neither a run directory (no {CONFIG_FILE}) nor a checkpoint"


def file_sha256(path: Path) -> str:
    """The sha256 of the file's bytes, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_reward_files(run_directory: Path, files: Mapping[str, Path]) -> None:
    """Write reward_files.json: for each reward entry backed by the user's code (``files``, see
    :func:`grpo.rewards.core.reward_code_files`), its file and that file's sha256 now."""
    records = {name: {"file": str(path), "sha256": file_sha256(path)} for name, path in files.items()}
    write_json_atomic(run_directory / REWARD_FILES_FILE, records)


def check_reward_files(run_directory: Path, reward_funcs: Sequence[Any]) -> None:
    """Refuse to resume the run in ``run_directory`` (a ConfigError naming the file) when a code file it
    recorded for one of the rewards it still names (``reward_funcs``) has changed or is gone since. A run
    recorded before grpo did so has nothing to check."""
    record = run_directory / REWARD_FILES_FILE
    if not record.is_file():
        return
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        entries = [(name, Path(entry["file"]), entry["sha256"]) for name, entry in recorded.items()]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        raise CheckpointError(f"{record}: damaged (not the reward files grpo recorded)") from None
    named = {spec.get("name") if isinstance(spec, Mapping) else spec for spec in reward_funcs}
    for name, path, then in entries:
        if name not in named:  # (a reward that the resumed run's own settings replaced)
            continue
        now = file_sha256(path) if path.is_file() else None
        if now != then:
            raise ConfigError(
                f"reward file {path} changed since the run started (sha256 {then[:12]}… then, "
                f"{f'{now[:12]}…' if now else 'no file'} now): resuming would optimise another reward; "
                "restore it or start a new run"
            )
