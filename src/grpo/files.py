"""Writing a run's files so that a process killed at any moment leaves either the old version of a file or
the new one, never a torn one: write under a temporary name, flush to disk, rename into place."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGING_PREFIX = ".tmp-"


RETIRED_PREFIX = ".old-"


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    staging = path.with_name(f"{STAGING_PREFIX}{path.name}")
    try:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)  # (a full disk or a directory in the way: leave nothing behind)
        raise
    fsync_directory(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_directory_atomic(directory: Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write a directory's files into a staging directory, flush them, and move the result to
    ``directory``. An existing ``directory`` is replaced only once the new one is complete."""
    directory = Path(directory)
    staging = directory.with_name(f"{STAGING_PREFIX}{directory.name}")
    retired = directory.with_name(f"{RETIRED_PREFIX}{directory.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fill(staging)
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    fsync_directory(staging)
    if directory.exists():
        shutil.rmtree(retired, ignore_errors=True)
        directory.rename(retired)
    staging.rename(directory)
    fsync_directory(directory.parent)
    shutil.rmtree(retired, ignore_errors=True)
    return directory


def remove_leftovers(directory: Path) -> None:
    """Delete what a killed write left behind: staging copies, and a replaced directory that was about to
    be deleted (restored instead when its replacement never arrived)."""
    if not directory.is_dir():
        return
    for retired in directory.glob(f"{RETIRED_PREFIX}*"):
        original = retired.with_name(retired.name[len(RETIRED_PREFIX) :])
        if original.exists():
            shutil.rmtree(retired, ignore_errors=True) if retired.is_dir() else retired.unlink()
        else:
            retired.rename(original)
    for staging in directory.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(staging, ignore_errors=True) if staging.is_dir() else staging.unlink()


def check_output_dir(path: Path, setting: str = "output_dir", create: bool = True) -> Path:
    """``path`` as a directory a command can write its files into, created if missing (with ``create``;
    without, only checked: its nearest existing parent must be a writable directory); else
    :class:`grpo.errors.ConfigError` with one line naming it and ``setting``. Nothing in it is touched."""
    from grpo.errors import ConfigError

    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        what = "it" if existing == path else str(existing)
        raise ConfigError(f"{setting} {path}: {what} is a file, not a directory; choose another")
    if not create:
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{setting} {path}: cannot be created ({existing} is not writable by this user)"
            )
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{setting} {path}: cannot be created ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting} {path}: is not writable by this user")
    return path
