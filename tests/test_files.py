"""grpo.files: atomic writes leave nothing behind when they fail; output directories are checked in one
line."""

from __future__ import annotations

import pytest

from grpo.errors import ConfigError
from grpo.files import STAGING_PREFIX, check_output_dir, write_text_atomic


def test_a_failed_atomic_write_leaves_neither_a_staging_file_nor_a_changed_target(tmp_path):
    target = tmp_path / "config.yaml"
    target.mkdir()  # a directory in the way: the rename fails
    with pytest.raises(OSError):
        write_text_atomic(target, "seed: 1\n")
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_an_output_directory_is_created_with_its_parents(tmp_path):
    path = tmp_path / "runs" / "a"
    assert check_output_dir(path) == path and path.is_dir()
    assert check_output_dir(path) == path, "an existing directory is fine"


def test_an_output_directory_that_is_a_file_is_one_line_and_the_file_stays(tmp_path):
    path = tmp_path / "run"
    path.write_text("mine")
    with pytest.raises(ConfigError) as caught:
        check_output_dir(path, "--output-dir")
    assert str(caught.value) == f"--output-dir {path}: it is a file, not a directory; choose another"
    assert path.read_text() == "mine"


def test_an_output_directory_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    with pytest.raises(ConfigError) as caught:
        check_output_dir(blocker / "run" / "x")
    assert str(caught.value) == (
        f"output_dir {blocker / 'run' / 'x'}: {blocker} is a file, not a directory; choose another"
    )
    assert blocker.read_text() == "mine"
