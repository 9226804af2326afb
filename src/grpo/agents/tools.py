"""Tools: the user's Python functions that a model calls during an episode.

A tool is a plain function (or an environment's public method) with type hints and a Google-style
docstring, as written for TRL and for transformers' chat templates; its JSON schema comes from
``transformers.utils.get_json_schema`` and reaches the chat template as ``tools=``. Tools take named
arguments and return a string, the text the model sees next.

Loading checks every tool before a model loads (one line naming the entry, :class:`ConfigError`);
calling one never raises: an exception, a hang past the timeout, arguments that do not fit its
signature or a result that is not a string become an error outcome whose text the model sees instead.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grpo.errors import ConfigError
from grpo.user_code import load_object, one_line

# An environment's methods that drive the episode rather than being offered to the model.
EPISODE_METHODS = ("reset", "step")
SCHEMA_NEEDS = "a tool needs a type hint on every argument and a Google-style docstring describing each"


@dataclass(frozen=True)
class Tool:
    """A function the model may call, its name and its JSON schema (``{"type": "function", "function":
    {...}}``); ``source`` is the entry it came from (``"calc.py:add"``, ``"Game.guess"``)."""

    name: str
    function: Callable[..., Any]
    schema: dict
    source: str = ""


@dataclass(frozen=True)
class ToolOutcome:
    """What a call gave: ``text`` for the tool message, and ``error`` (None when the call worked)."""

    text: str
    error: str | None = None


# --- loading and checking ---------------------------------------------------------------------------------
def tool_schema(function: Callable[..., Any]) -> dict:
    """The JSON schema of ``function``; ValueError with one line saying what is missing (type hints, a
    Google-style docstring with every argument described, named arguments only)."""
    from transformers.utils import get_json_schema

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError) as error:
        raise ValueError(f"its signature cannot be read ({one_line(error)})") from None
    variadic = [p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic:
        raise ValueError(f"takes *{variadic[0]}: a tool's arguments must each have a name and a type hint")
    try:
        return get_json_schema(function)
    except Exception as error:  # TypeHintParsingException, DocstringParsingException, NameError of a hint
        parts = [str(part).strip() for part in error.args] or [type(error).__name__]
        raise ValueError(f"{one_line(' '.join(parts))} ({SCHEMA_NEEDS})") from None


def check_tool_function(function: Any) -> dict:
    """The schema of a would-be tool, after checking that it is a plain callable (not a class)."""
    if inspect.isclass(function):
        raise ValueError("is a class, not a function")
    if not callable(function):
        raise ValueError(f"is not a function ({type(function).__name__})")
    return tool_schema(function)


def load_tools(specs: Sequence[str]) -> list[Tool]:
    """The tools that ``"path/to/file.py:function"`` and ``"module:function"`` entries name, checked:
    ConfigError (one line naming the entry) for a missing file, module or function, something that is not
    a function, a missing type hint or docstring, and two tools with the same name."""
    tools: list[Tool] = []
    for spec in specs:
        function = load_object(spec, what="tools entry", error=ConfigError, kind="function")
        try:
            schema = check_tool_function(function)
        except ValueError as error:
            raise ConfigError(f"tools entry {spec!r}: {error}") from None
        tools.append(Tool(schema["function"]["name"], function, schema, spec))
    check_unique_names(tools)
    return tools


def check_unique_names(tools: Sequence[Tool]) -> None:
    """ConfigError when two tools share a name (the model could not tell them apart)."""
    seen: dict[str, Tool] = {}
    for tool in tools:
        if tool.name in seen:
            raise ConfigError(
                f"tools entry {tool.source!r}: a tool named {tool.name!r} comes from "
                f"{seen[tool.name].source!r} too; tool names must differ"
            )
        seen[tool.name] = tool


def public_method_names(cls: type) -> list[str]:
    """The names of the functions, static and class methods that ``cls`` and its bases define, public
    (no leading underscore) and not ``reset`` or ``step``, in definition order. Properties and data
    attributes are not tools."""
    names: list[str] = []
    for klass in reversed(cls.__mro__[:-1]):  # bases first, ``object`` left out
        for name, value in vars(klass).items():
            if name.startswith("_") or name in EPISODE_METHODS or name in names:
                continue
            if inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod)):
                names.append(name)
    return [name for name in names if _is_method(cls, name)]


def _is_method(cls: type, name: str) -> bool:
    # A subclass may shadow a base's method with data (``guess = None``): then it is no tool.
    value = inspect.getattr_static(cls, name)
    return inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod))


def check_environment_tools(cls: type, *, entry: str | None = None) -> None:
    """The tool checks on an environment class's public methods, before any instance exists: ConfigError
    ``"environment 'ENTRY': method Class.name: ..."`` for the first that fails."""
    for name in public_method_names(cls):
        function = getattr(cls, name)  # unbound: get_json_schema leaves out an unannotated self or cls
        try:
            tool_schema(function)
        except ValueError as error:
            raise _method_error(entry or cls.__name__, cls, name, error) from None


def _method_error(entry: str, cls: type, name: str, error: ValueError) -> ConfigError:
    return ConfigError(f"environment {entry!r}: method {cls.__name__}.{name}: {error}")


def environment_tools(environment: object) -> list[Tool]:
    """An environment instance's public methods other than ``reset`` and ``step``, as tools bound to it."""
    cls = type(environment)
    tools = []
    for name in public_method_names(cls):
        method = getattr(environment, name)
        try:
            schema = tool_schema(method)
        except ValueError as error:
            raise _method_error(cls.__name__, cls, name, error) from None
        tools.append(Tool(name, method, schema, f"{cls.__name__}.{name}"))
    return tools


# --- calling ------------------------------------------------------------------------------------------------
def call_tool(tool: Tool, arguments: dict, timeout: float | None) -> ToolOutcome:
    """Call ``tool`` with ``**arguments`` in a worker thread, waiting at most ``timeout`` seconds (None or
    0: as long as it takes). Never raises: a failure is an outcome whose text says what went wrong."""
    problem = argument_problem(tool, arguments)
    if problem is not None:
        return _failed(f"tool {tool.name!r}: {problem}")
    finished, value = call_in_thread(tool.function, arguments, timeout, f"tool {tool.name!r}")
    if not finished:
        return _failed(value)
    if isinstance(value, BaseException):
        return _failed(f"{type(value).__name__}: {one_line(value)}")
    if not isinstance(value, str):
        return _failed(f"tool {tool.name!r} returned {type(value).__name__}, not a string")
    return ToolOutcome(value)


# Calls of one function still running past their timeout, after which it is called no more: each keeps a
# thread (Python cannot stop one), and threads that spin slow the whole run.
MAX_HUNG_CALLS = 4
_hung: dict[Callable[..., Any], list[threading.Thread]] = {}


def call_in_thread(
    function: Callable[..., Any], arguments: dict, timeout: float | None, what: str, args: tuple = ()
) -> tuple[bool, Any]:
    """``function(*args, **arguments)`` (awaited when async) in a daemon thread, waiting at most ``timeout``
    seconds: (True, its result or the exception it raised), or (False, why it has no result: it timed out,
    or too many of its earlier calls still hang). Never raises."""
    key = getattr(function, "__func__", function)  # (an environment's method: one count for its instances)
    hung = _hung.setdefault(key, [])
    hung[:] = [thread for thread in hung if thread.is_alive()]
    if len(hung) >= MAX_HUNG_CALLS:
        return False, f"{what} not called: {len(hung)} earlier calls are still running past their timeout"
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            value = function(*args, **arguments)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            result["value"] = value
        except BaseException as error:  # SystemExit too: user code must not end the run
            result["value"] = error

    # A daemon thread: a call that hangs keeps it, but never holds up the interpreter's exit.
    worker = threading.Thread(target=run, name=f"grpo-{what}", daemon=True)
    worker.start()
    worker.join(timeout or None)
    if worker.is_alive():
        hung.append(worker)
        return False, f"{what} timed out after {timeout:g} s"
    return True, result.get("value")


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def argument_problem(tool: Tool, arguments: Any) -> str | None:
    """Why ``arguments`` cannot be passed to the tool (unknown or missing names), or None."""
    if not isinstance(arguments, dict):
        return f"arguments must be an object, got {type(arguments).__name__}"
    try:
        signature = inspect.signature(tool.function)
    except (TypeError, ValueError):
        return None  # (a builtin without a signature: let the call itself say)
    try:
        signature.bind(**arguments)
    except TypeError as error:
        return one_line(error)
    return None


def _failed(message: str) -> ToolOutcome:
    return ToolOutcome(f"error: {message}", message)
