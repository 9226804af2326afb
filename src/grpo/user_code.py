"""Loading the user's own Python objects named in a config: ``package.module:name`` or
``path/to/file.py:name`` (reward functions, tools, environment classes).

Every failure is one line that names the entry, ``f"{what} {spec!r}: ..."``, raised as the caller's error
class, so that the CLI reports it and exits 2 before a model loads. A file entry is imported under a
module name derived from its resolved path, once while it is unchanged (an edited file is read afresh).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import site
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

SPEC_FORMS = "'module:name' or 'path/to/file.py:name'"


def one_line(text: object) -> str:
    """``text`` as one line: its non-empty lines joined with " / " (errors are reported one line each)."""
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def split_spec(spec: str, *, what: str, error: type[Exception]) -> tuple[str, str]:
    """``(target, name)`` of ``"target:name"``: a module or a ``.py`` file, and the attribute in it."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise error(f"{what} {spec!r}: use {SPEC_FORMS}")
    return target, name


def import_target(spec: str, *, what: str, error: type[Exception]) -> ModuleType:
    """The module a spec's target names: a ``.py`` file (run afresh) or an importable module."""
    target, _ = split_spec(spec, what=what, error=error)
    if not target.endswith(".py"):
        try:
            return importlib.import_module(target)
        except Exception as caught:  # a missing module, or one whose own code fails on import
            raise error(f"{what} {spec!r}: cannot import {target} ({one_line(caught)})") from None
    path = Path(target)
    if not path.is_file():
        raise error(f"{what} {spec!r}: file {path} not found")
    # A stable name per file (not per process) so that objects from it pickle the same way everywhere.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"grpo_user_{path.stem.replace('-', '_')}_{digest}"
    stamp = (path.stat().st_mtime_ns, path.stat().st_size)
    loaded = sys.modules.get(module_name)
    if loaded is not None and getattr(loaded, "__grpo_stamp__", None) == stamp:
        return loaded  # the same file, unchanged: rewards, tools and environments from it share one module
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what} {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module.__grpo_stamp__ = stamp
    sys.modules[module_name] = module  # dataclasses and pickle look a module up by name while it runs
    try:
        module_spec.loader.exec_module(module)
    except Exception as caught:
        sys.modules.pop(module_name, None)
        raise error(f"{what} {spec!r}: importing {path} failed: {one_line(caught)}") from None
    return module


def load_object(spec: str, *, what: str, error: type[Exception], kind: str | None = None) -> Any:
    """The object ``"package.module:name"`` or ``"path/to/file.py:name"`` names.

    ``what`` starts every error message (``"tools entry"``, ``"environment"``) and ``error`` is the class
    raised; ``kind`` ("function", "class") words the message for a missing name: ``"X has no function
    'f'"``.
    """
    target, name = split_spec(spec, what=what, error=error)
    module = import_target(spec, what=what, error=error)
    missing = object()
    found = getattr(module, name, missing)
    if found is missing:
        raise error(f"{what} {spec!r}: {target} has no {kind + ' ' if kind else ''}{name!r}")
    return found


def user_code_file(spec: str) -> Path | None:
    """The file of the user's own code behind ``"target:name"``, for hashing on resume: the ``.py`` path as
    written, or the file of an already importable module that is the user's (not Python's, an installed
    package's or grpo's). None for anything else."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        return None
    if target.endswith(".py"):
        return Path(target)
    origin = getattr(importlib.import_module(target), "__file__", None)
    if origin is not None and is_user_code(Path(origin)):
        return Path(origin)
    return None


def is_user_code(path: Path) -> bool:
    """Whether ``path`` lies outside Python's own library, every site-packages directory and grpo: a file
    that the user may edit between a run's start and its resumption."""
    paths = sysconfig.get_paths()
    installed = [paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")]
    installed += [*site.getsitepackages(), site.getusersitepackages()]
    roots = [Path(__file__).resolve().parent, *(Path(directory).resolve() for directory in installed)]
    return not any(path.resolve().is_relative_to(root) for root in roots)
