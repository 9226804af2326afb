"""Environments: the user's class named by ``environment: path/to/file.py:ClassName`` (or
``module:ClassName``), one instance per trajectory, constructed with no arguments.

``reset(**row)`` receives the dataset row's columns and may return a first observation (text); the public
methods other than ``reset`` and ``step`` are tools (TRL's ``environment_factory`` convention); an optional
``step(text) -> str | None`` answers every assistant turn with the next user message, ``None`` ending the
episode. :func:`load_environment` checks all of this on the class, before any instance or model exists.
"""

from __future__ import annotations

import inspect

from grpo.agents.tools import check_environment_tools
from grpo.errors import ConfigError
from grpo.user_code import load_object


def load_environment(spec: str) -> type:
    """The class ``"path/to/file.py:Class"`` or ``"module:Class"`` names, checked: ConfigError (one line
    naming the entry) when the file, module or class is missing, it is not a class, its constructor needs
    arguments, it has no callable ``reset``, its ``step`` is not callable, or a public method is no tool
    (no type hints or docstring)."""
    cls = load_object(spec, what="environment", error=ConfigError, kind="class")
    if not inspect.isclass(cls):
        name = spec.rpartition(":")[2]
        raise ConfigError(f"environment {spec!r}: {name} is not a class ({type(cls).__name__})")
    needed = required_parameters(cls)
    if needed:
        raise ConfigError(
            f"environment {spec!r}: {cls.__name__}() needs {', '.join(needed)}; "
            "each trajectory's instance is made with no arguments"
        )
    if not callable(getattr(cls, "reset", None)):
        raise ConfigError(f"environment {spec!r}: {cls.__name__} has no reset method (reset(self, **row))")
    if hasattr(cls, "step") and not callable(cls.step):
        raise ConfigError(f"environment {spec!r}: {cls.__name__}.step is not a method (step(self, text))")
    check_environment_tools(cls, entry=spec)
    return cls


def required_parameters(cls: type) -> list[str]:
    """The constructor's parameters that have no default (``*args``/``**kwargs`` need nothing)."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # (a class built in C without a signature: try it as it is)
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.default is inspect.Parameter.empty and p.kind not in variadic]


def has_step(environment: object) -> bool:
    """Whether the environment answers assistant turns itself (a text game) through ``step``."""
    return callable(getattr(environment, "step", None))
