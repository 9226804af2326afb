"""Loading the user's objects named "module:name" or "path/to/file.py:name": what is found, and the one-line
error for each way an entry can be wrong."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from grpo.errors import ConfigError
from grpo.user_code import is_user_code, load_object, one_line, user_code_file

CODE = """
from dataclasses import dataclass

LIMIT = 3


@dataclass
class Point:
    x: int


def double(x):
    return 2 * x
"""


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my-code.py"
    path.write_text(CODE, encoding="utf-8")
    return path


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "grpo_test_user_code_module"
    (tmp_path / f"{name}.py").write_text(CODE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def load(spec: str, kind: str | None = None):
    return load_object(spec, what="thing", error=ConfigError, kind=kind)


def test_loads_a_function_from_a_file_and_from_a_module(user_file, user_module):
    assert load(f"{user_file}:double")(4) == 8
    assert load(f"{user_module}:double")(5) == 10
    assert load(f"{user_file}:LIMIT") == 3
    assert load("json:dumps") is json.dumps


def test_a_file_is_one_module_while_unchanged_so_its_classes_pickle(user_file):
    point_class = load(f"{user_file}:Point")  # a dataclass needs its module in sys.modules while it runs
    assert load(f"{user_file}:Point") is point_class
    assert pickle.loads(pickle.dumps(point_class(2))).x == 2


def test_an_edited_file_is_read_afresh(user_file):
    assert load(f"{user_file}:LIMIT") == 3
    user_file.write_text(CODE.replace("LIMIT = 3", "LIMIT = 40"), encoding="utf-8")
    assert load(f"{user_file}:LIMIT") == 40


@pytest.mark.parametrize(
    ("spec", "kind", "expected"),
    [
        ("{dir}/missing.py:f", None, "thing '{dir}/missing.py:f': file {dir}/missing.py not found"),
        (
            "{dir}/my-code.py:nope",
            "function",
            "thing '{dir}/my-code.py:nope': {dir}/my-code.py has no function 'nope'",
        ),
        ("{dir}/my-code.py:nope", None, "thing '{dir}/my-code.py:nope': {dir}/my-code.py has no 'nope'"),
        ("{dir}/broken.py:f", None, "thing '{dir}/broken.py:f': importing {dir}/broken.py failed: boom"),
        (
            "{dir}/syntax.py:f",
            None,
            "thing '{dir}/syntax.py:f': importing {dir}/syntax.py failed: invalid syntax",
        ),
        (
            "grpo_no_such_module_xyz:f",
            None,
            "thing 'grpo_no_such_module_xyz:f': cannot import grpo_no_such_module_xyz",
        ),
        ("no_colon", None, "thing 'no_colon': use 'module:name' or 'path/to/file.py:name'"),
        ("json:", None, "thing 'json:': use 'module:name' or 'path/to/file.py:name'"),
        (":dumps", None, "thing ':dumps': use 'module:name' or 'path/to/file.py:name'"),
    ],
)
def test_each_bad_entry_is_one_line_naming_it(user_file, spec, kind, expected):
    directory = user_file.parent
    (directory / "broken.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    (directory / "syntax.py").write_text("def f(:\n", encoding="utf-8")
    modules_before = set(sys.modules)
    with pytest.raises(ConfigError) as caught:
        load(spec.format(dir=directory), kind)
    message = str(caught.value)
    assert message.startswith(expected.format(dir=directory))
    assert "\n" not in message
    if "importing" in expected:  # a file that failed to import leaves no half-made module behind
        assert not [name for name in set(sys.modules) - modules_before if name.startswith("grpo_user_")]


def test_the_error_class_is_the_callers():
    class MyError(Exception):
        pass

    with pytest.raises(MyError, match="tools entry 'json:nope': json has no 'nope'"):
        load_object("json:nope", what="tools entry", error=MyError)


def test_an_error_message_over_several_lines_becomes_one(tmp_path):
    path = tmp_path / "multi.py"
    path.write_text("raise ValueError('first\\n\\n  second')\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(f"{path}:f")
    assert str(caught.value).endswith("failed: first / second")
    assert one_line("a\n b \n\nc") == "a / b / c"


def test_which_code_files_are_the_users(user_file, user_module):
    assert user_code_file(f"{user_file}:double") == user_file
    assert (
        user_code_file(f"{user_module}:double").resolve()
        == (user_file.parent / f"{user_module}.py").resolve()
    )
    assert user_code_file("json:dumps") is None
    assert user_code_file("grpo.user_code:load_object") is None
    assert user_code_file("accuracy") is None
    assert is_user_code(user_file) and not is_user_code(Path(json.__file__))
