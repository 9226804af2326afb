"""The checks that every settings class's ``validate`` makes of its fields."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from typing import Any

from grpo.errors import ConfigError

# The learning-rate schedules of transformers' get_scheduler that a warm-up and a total step count build, and
# that an update loop steps without arguments (reduce_lr_on_plateau and greedy want a metric at each step,
# cosine_with_min_lr and warmup_stable_decay options of their own).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


def check_fields(
    config: Any,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """The checks every settings class makes: finite numbers, fields that must be at least 1, fields that
    must not be negative, fields that name one of a few choices; a ConfigError names the first that fails."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(config, name)}")
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(config, name)!r}")


def module_available(name: str) -> bool:
    """Whether ``import name`` would find a module, without importing it."""
    return name in sys.modules or importlib.util.find_spec(name) is not None
