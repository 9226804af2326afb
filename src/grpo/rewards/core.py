"""Reward functions with TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``: naming
them in a config, calling them, and checking what they return.

A reward is named in ``reward_funcs`` by a built-in kind (``"accuracy"``), by ``module:function`` or
``path/to/file.py:function``, or, in a YAML file, by a mapping with the kind and its options::

    reward_funcs:
      - accuracy
      - {name: reward_model, model: runs/rm/final_model, weight: 0.5}
      - my_rewards.py:brevity

Completions reach a function the way TRL passes them: strings for string prompts, ``[{"role": "assistant",
"content": text}]`` for chat prompts. ``None`` means "not applicable to this row" and adds nothing to the
sum. Async functions are awaited. A function may score several aspects at once: it then carries an
``outputs`` attribute (the aspects' names) and returns ``{aspect: values}``; each aspect is a reward of its
own (``name/aspect``), with its own weight.

A run records the code files behind its rewards (:func:`reward_code_files`) so that it can refuse to resume
once one has changed: the file a ``path/to/file.py:function`` entry names, and the file of the module a
``module:function`` entry names when that module is the user's own code (not part of Python, of an installed
package or of grpo). Modules that such a file imports in turn are not followed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpo.data.prompts import Row, reward_columns
from grpo.errors import RewardError
from grpo.user_code import is_user_code as is_user_code  # (re-exported: callers import it from here)
from grpo.user_code import load_object, user_code_file

RewardFunc = Callable[..., Any]
RewardSpec = str | Mapping[str, Any]
FAILURE_POLICIES = ("stop", "zero", "skip_group")
# Python 3.10 still has separate timeout classes for futures and asyncio.
TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError)

# Built-in kinds: name -> "module:factory". A factory takes the options of the config entry (none for a
# plain name) and returns a reward function. Imported on first use, so a kind's dependencies load only
# when a run uses it.
BUILTIN_KINDS: dict[str, str] = {
    "accuracy": "grpo.rewards.rules:make_accuracy",
    "format": "grpo.rewards.rules:make_format",
    "language_consistency": "grpo.rewards.rules:make_language_consistency",
    "overlong": "grpo.rewards.rules:make_overlong_penalty",
    "code": "grpo.rewards.code:make_code_reward",
    "reward_model": "grpo.rewards.model:make_reward_model",
    "judge": "grpo.rewards.judge:make_judge",
}


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        # A multi-turn trajectory's answer is its last assistant message (tool and user turns follow calls);
        # a trajectory cut before the model's first turn has none.
        said = [m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        return str(said[-1].get("content", "")) if said else ""
    raise RewardError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


def requires_columns(*names: str) -> Callable[[RewardFunc], RewardFunc]:
    """Declare the dataset columns a reward function reads, so that a run checks every row for them
    before it starts rather than failing at the step that first meets a row without one."""

    def mark(func: RewardFunc) -> RewardFunc:
        func.required_columns = tuple(names)
        return func

    return mark


# --- naming and loading -----------------------------------------------------------------------------------
@dataclass
class Reward:
    """A named reward function and its weight in the sum. ``output`` picks one aspect of a function that
    scores several (see the module's docstring)."""

    name: str
    func: RewardFunc
    weight: float = 1.0
    output: str | None = None
    required_columns: tuple[str, ...] = field(default=())

    @property
    def graded(self) -> bool:
        """Whether its full mark means solved: a learned score without one (a reward model) does not decide
        what counts as solved, in evaluation and in the training metrics alike."""
        return not getattr(self.func, "unbounded", False)

    def __post_init__(self) -> None:
        if not self.required_columns:
            self.required_columns = tuple(getattr(self.func, "required_columns", ()))


def load_reward_func(spec: str) -> RewardFunc:
    """A built-in by name (without options), ``package.module:function``, or ``path/to/file.py:function``."""
    if spec in BUILTIN_KINDS:
        return make_builtin(spec, {})
    if ":" not in spec:
        raise RewardError(
            f"unknown reward function {spec!r}: use a built-in ({', '.join(BUILTIN_KINDS)}), "
            "'module:function' or 'path/to/file.py:function'"
        )
    func = load_object(spec, what="reward function", error=RewardError, kind="function")
    if not callable(func):
        target, name = spec.rsplit(":", 1)
        raise RewardError(f"reward function {spec!r}: {target} has no function {name!r}")
    return func


def make_builtin(kind: str, options: Mapping[str, Any]) -> RewardFunc:
    module_name, factory_name = BUILTIN_KINDS[kind].split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        accepted = [p for p in inspect.signature(factory).parameters if not p.startswith("_")]
        unknown = sorted(set(options) - set(accepted))
        raise RewardError(
            f"reward {kind!r}: unknown option {', '.join(map(repr, unknown)) or '(missing a required one)'}; "
            f"it takes {', '.join(accepted) or 'none'}"
        ) from None
    try:
        return factory(**options)
    except RewardError:
        raise
    except (TypeError, ValueError, OSError) as error:
        raise RewardError(f"reward {kind!r}: {error}") from None


def build_rewards(specs: Sequence[RewardSpec], weights: Sequence[float] | None = None) -> list[Reward]:
    """Rewards from config entries: names (``"accuracy"``, ``"file.py:func"``) or mappings ``{name: kind,
    weight: w, **options}``. ``weights`` (one per entry) overrides a mapping's own weight."""
    if weights is not None and len(weights) != len(specs):
        raise RewardError(f"{len(weights)} reward weights for {len(specs)} reward functions")
    rewards: list[Reward] = []
    for index, spec in enumerate(specs):
        options = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
        kind = options.pop("name", None)
        if not isinstance(kind, str) or not kind:
            raise RewardError(f"reward_funcs entry {index + 1}: a mapping needs a 'name' (the reward's kind)")
        weight = options.pop("weight", 1.0)
        aspect_weights = options.pop("weights", None) or {}
        if weights is not None:
            weight = weights[index]
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not math.isfinite(weight):
            raise RewardError(f"reward {kind!r}: weight must be a finite number, got {weight!r}")
        if kind in BUILTIN_KINDS:
            func = make_builtin(kind, options)
        elif options:
            raise RewardError(f"reward {kind!r}: only built-in kinds take options ({', '.join(options)})")
        else:
            func = load_reward_func(kind)
        name = kind.rsplit(":", 1)[-1]
        outputs = getattr(func, "outputs", None)
        if outputs:
            for output in outputs:
                aspect = float(aspect_weights.get(output, 1.0))
                rewards.append(Reward(f"{name}/{output}", func, float(weight) * aspect, output))
        else:
            rewards.append(Reward(name, func, float(weight)))
    return rewards


def reward_code_files(specs: Sequence[RewardSpec]) -> dict[str, Path]:
    """Each entry of ``specs`` (as in ``reward_funcs``) backed by the user's own code, by its name
    (``"my_rewards.py:brevity"``), with the file it is loaded from: the path an entry names as written,
    or a user module's file. Built-in kinds, and functions of installed packages, have none. Call it once
    :func:`build_rewards` has imported them."""
    files: dict[str, Path] = {}
    for spec in specs:
        kind = spec.get("name") if isinstance(spec, Mapping) else spec
        if not isinstance(kind, str) or kind in BUILTIN_KINDS or ":" not in kind:
            continue
        path = user_code_file(kind)
        if path is not None:
            files[kind] = path
    return files


# --- calling and checking ----------------------------------------------------------------------------------
@dataclass
class Scores:
    """What the reward functions gave a batch: (N, F) values (NaN = not applicable, or a failure scored as
    the policy says) and, per function, the completions whose score failed."""

    values: torch.Tensor
    failures: dict[str, int] = field(default_factory=dict)
    failed_rows: torch.Tensor | None = None  # (N,) bool: completions some function failed to score
    skip_rows: torch.Tensor | None = None  # (N,) bool: rows whose group the "skip_group" policy drops


def call_reward(func: RewardFunc, timeout: float | None = None, **kwargs: Any) -> Any:
    """Call a reward function (awaiting it when it is async), giving up after ``timeout`` seconds."""
    if inspect.iscoroutinefunction(func):
        coroutine = func(**kwargs)
        return asyncio.run(asyncio.wait_for(coroutine, timeout) if timeout else coroutine)
    if not timeout:
        return func(**kwargs)
    # A function that overruns keeps its thread until it returns; the run goes on without its result.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(func, **kwargs).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


def score(
    rewards: Sequence[Reward],
    prompts: list,
    completions: list,
    columns: dict[str, list[Any]],
    *,
    on_failure: str = "stop",
    timeout: float | None = None,
    group_size: int = 1,
    **extra: Any,
) -> Scores:
    """Scores of every reward, shape (N, F); NaN where a function returned None.

    A function that raises, times out, or returns something unusable (the wrong number of values, NaN, inf,
    not a number) stops the run with a line naming it, the completion and the value (``on_failure="stop"``);
    or its unusable scores count as 0 (``"zero"``); or the groups of the completions concerned are left out
    of the update (``"skip_group"``, with ``group_size`` completions per group). Either way the failures are
    counted per function.
    """
    if on_failure not in FAILURE_POLICIES:
        raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
    n = len(completions)
    results: dict[int, Any] = {}
    columns_out: list[list[float]] = []
    failures: dict[str, int] = {}
    failed_rows = torch.zeros(n, dtype=torch.bool)
    for reward in rewards:
        key = id(reward.func)
        if key not in results:
            try:
                results[key] = call_reward(
                    reward.func, timeout, prompts=prompts, completions=completions, **columns, **extra
                )
            except RewardError:
                raise
            except TIMEOUTS:
                results[key] = RewardError(f"reward function {reward.name!r} timed out after {timeout} s")
            except Exception as error:  # the function's own failure
                message = f"reward function {reward.name!r} raised {type(error).__name__}: {error}"
                results[key] = RewardError(message)
        result = results[key]
        try:
            if isinstance(result, RewardError):
                raise result
            values = result
            if reward.output is not None:
                if not isinstance(values, Mapping) or reward.output not in values:
                    raise RewardError(f"reward function {reward.name!r} returned no {reward.output!r} scores")
                values = values[reward.output]
            checked, bad = _check_output(reward.name, values, n, strict=on_failure == "stop")
        except RewardError:
            if on_failure == "stop":
                raise
            checked, bad = [math.nan] * n, list(range(n))
        if bad:
            failures[reward.name] = len(bad)
            failed_rows[bad] = True
            if on_failure == "zero":
                checked = [0.0 if i in set(bad) else v for i, v in enumerate(checked)]
        columns_out.append(checked)
    values = torch.tensor(columns_out, dtype=torch.float32).T.reshape(n, len(rewards))
    skip_rows = groups_of(failed_rows, group_size) if on_failure == "skip_group" else None
    return Scores(values, failures, failed_rows, skip_rows)


def groups_of(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool: every row of a group in which any row of ``rows`` (N,) is set."""
    return rows.view(-1, group_size).any(dim=1).repeat_interleave(group_size)


def score_groups(
    rewards: Sequence[Reward],
    rows: Sequence[Row],
    texts: list[str],
    completions: list | None = None,
    **options: Any,
) -> Scores:
    """Scores of ``len(texts) // len(rows)`` consecutive completions per row: each row's prompt and columns
    repeated for its completions, and completions shaped as TRL passes them — chat messages for chat
    prompts, strings for string prompts — unless ``completions`` gives them (a multi-turn trajectory's
    messages). ``options`` go to :func:`score` (and what it does not take, such as ``environments``, to the
    functions)."""
    per_row = len(texts) // len(rows)
    completions = completions or [
        [{"role": "assistant", "content": text}] if isinstance(rows[i // per_row]["prompt"], list) else text
        for i, text in enumerate(texts)
    ]
    prompts = [row["prompt"] for row in rows for _ in range(per_row)]
    options.setdefault("group_size", per_row)
    return score(rewards, prompts, completions, reward_columns(rows, per_row), **options)


def _check_output(
    name: str, values: Any, expected: int, strict: bool = True
) -> tuple[list[float], list[int]]:
    """The values as floats (None → NaN) and the positions of unusable ones (``strict``: raise instead)."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}, not a list")
    values = list(values)
    if len(values) != expected:
        raise RewardError(
            f"reward function {name!r} returned {len(values)} values for {expected} completions"
        )
    checked, bad = [], []
    for row, value in enumerate(values):
        if value is None:
            checked.append(math.nan)
            continue
        # numbers.Real admits NumPy scalars, which TRL users' functions often return.
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            if strict:
                raise RewardError(f"reward function {name!r} returned {value!r} for completion {row}")
            checked.append(math.nan)
            bad.append(row)
            continue
        checked.append(float(value))
    return checked, bad


def solved_completions(scores: torch.Tensor, graded: Sequence[bool] | None = None) -> torch.Tensor:
    """Per completion (a row of ``scores``, a column per reward function), whether it is *solved*: full
    marks, 1 or more, from every graded function (``graded``, :attr:`Reward.graded`; all when none is). A
    function that did not score a completion (NaN) does not count against it."""
    columns = [f for f, is_graded in enumerate(graded or []) if is_graded]
    marks = scores[:, columns] if columns else scores
    return (torch.nan_to_num(marks, nan=1.0) >= 1.0).all(dim=1)


def weighted_sum(scores: torch.Tensor, rewards: Sequence[Reward]) -> torch.Tensor:
    """The total reward per completion; a None (NaN) score adds nothing."""
    weights = torch.tensor([r.weight for r in rewards], dtype=scores.dtype)
    return torch.nansum(scores * weights, dim=1)
