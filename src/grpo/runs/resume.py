"""A resumed run's settings: those saved with its checkpoint, as the base layer of `grpo train`'s config.

:func:`grpo.config.loading.load_config` takes the base layer as a function of the settings given
(``base=resumed_base``), so that the settings package needs nothing of the checkpoints' code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from grpo.config.grpo import GRPOConfig
from grpo.config.loading import convert
from grpo.errors import ConfigError


def resumed_base(given: dict[str, Any]) -> dict[str, Any]:
    """The base layer under the settings ``given`` (by a config file and flags): the settings of the
    checkpoint that resume_from_checkpoint names when one is named, else none."""
    resume_from = given.get("resume_from_checkpoint")
    return resumed_settings(resume_from, given) if resume_from else {}


def resumed_settings(resume_from: str, given: dict[str, Any]) -> dict[str, Any]:
    """The settings saved with the checkpoint that ``resume_from`` names, as the base layer of a resumed
    run; its output directory is the checkpoint's run directory unless one is given."""
    from grpo.models.checkpoint import (  # (imports torch: only to resume)
        latest_checkpoint,
        read_trainer_state,
    )

    checkpoint = latest_checkpoint(Path(resume_from))
    if checkpoint is None:
        raise ConfigError(
            f"{resume_from}: resume_from_checkpoint names no checkpoint or run directory with one"
        )
    saved = read_trainer_state(checkpoint).get("config") or {}
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    source = f"{checkpoint}/trainer_state.json"
    base = convert(GRPOConfig, {name: value for name, value in saved.items() if name in known}, source)
    base["resume_from_checkpoint"] = str(checkpoint)
    if "output_dir" not in given:
        base["output_dir"] = str(checkpoint.parent)
    return base
