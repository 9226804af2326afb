"""Tools: loading the user's functions with their schemas, the one-line error for each bad entry, an
environment's methods as tools, and calls that never raise (errors, hangs, wrong arguments, non-strings)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from grpo.agents.tools import (
    Tool,
    call_tool,
    check_environment_tools,
    environment_tools,
    load_tools,
)
from grpo.errors import ConfigError

TOOLS = '''
import asyncio
import time


def add(a: int, b: int) -> str:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(a + b)


def shout(text: str, times: int = 1) -> str:
    """Repeat a text in capitals.

    Args:
        text: What to repeat.
        times: How often.
    """
    return " ".join([text.upper()] * times)


def fail(x: int) -> str:
    """Always fails.

    Args:
        x: Anything.
    """
    raise ValueError(f"no good: {x}")


def hang(x: int) -> str:
    """Sleeps for five seconds.

    Args:
        x: Anything.
    """
    time.sleep(5)
    return "late"


def count(x: int) -> str:
    """Returns a number, not a text.

    Args:
        x: Anything.
    """
    return x + 1


def leave(x: int) -> str:
    """Tries to end the process.

    Args:
        x: Anything.
    """
    raise SystemExit(3)


async def wait_and_add(a: int, b: int) -> str:
    """Adds asynchronously.

    Args:
        a: The first number.
        b: The second number.
    """
    await asyncio.sleep(0)
    return str(a + b)


def no_hints(a, b):
    """Add.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(a + b)


def no_docstring(a: int) -> str:
    return str(a)


def undescribed(a: int, b: int) -> str:
    """Add, but b is not described.

    Args:
        a: The first number.
    """
    return str(a + b)


def variadic(*numbers: int) -> str:
    """Add them all.

    Args:
        numbers: The numbers.
    """
    return str(sum(numbers))


NOT_A_FUNCTION = 3


class Calculator:
    """A class is no tool."""
'''


@pytest.fixture()
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS, encoding="utf-8")
    return path


@pytest.fixture()
def tools(tools_file: Path) -> dict[str, Tool]:
    names = ["add", "shout", "fail", "hang", "count", "leave", "wait_and_add"]
    return {tool.name: tool for tool in load_tools([f"{tools_file}:{name}" for name in names])}


def test_a_tool_from_a_file_has_its_name_function_and_schema(tools_file):
    (tool,) = load_tools([f"{tools_file}:add"])
    assert tool.name == "add" and tool.source == f"{tools_file}:add"
    assert tool.function(a=2, b=3) == "5"
    assert tool.schema == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two whole numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The first number."},
                    "b": {"type": "integer", "description": "The second number."},
                },
                "required": ["a", "b"],
            },
            "return": {"type": "string"},
        },
    }


def test_a_tool_from_a_module(tools_file, monkeypatch):
    monkeypatch.syspath_prepend(str(tools_file.parent))
    monkeypatch.setitem(sys.modules, "my_tools", None)
    monkeypatch.delitem(sys.modules, "my_tools")  # (restored to absent afterwards)
    (tool,) = load_tools(["my_tools:shout"])
    assert tool.function(text="hi", times=2) == "HI HI"
    assert tool.schema["function"]["parameters"]["required"] == ["text"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{dir}/missing.py:add", "file {dir}/missing.py not found"),
        ("grpo_no_such_tools_module:add", "cannot import grpo_no_such_tools_module (No module named"),
        ("{dir}/my_tools.py:subtract", "{dir}/my_tools.py has no function 'subtract'"),
        ("{dir}/my_tools.py:NOT_A_FUNCTION", "my_tools.py:NOT_A_FUNCTION': is not a function (int)"),
        ("{dir}/my_tools.py:Calculator", "is a class, not a function"),
        ("{dir}/my_tools.py:no_hints", "Argument a is missing a type hint in function no_hints"),
        (
            "{dir}/my_tools.py:no_docstring",
            "Cannot generate JSON schema for no_docstring because it has no docs",
        ),
        ("{dir}/my_tools.py:undescribed", "the docstring has no description for the argument 'b'"),
        ("{dir}/my_tools.py:variadic", "takes *numbers: a tool's arguments must each have a name"),
    ],
)
def test_each_bad_tools_entry_is_a_config_error_of_one_line_naming_it(tools_file, entry, expected):
    entry = entry.format(dir=tools_file.parent)
    with pytest.raises(ConfigError) as caught:
        load_tools([f"{tools_file}:add", entry])
    message = str(caught.value)
    assert message.startswith(f"tools entry {entry!r}: ")
    assert expected.format(dir=tools_file.parent) in message
    assert "\n" not in message


def test_two_tools_with_one_name_are_refused(tools_file, tmp_path):
    other = tmp_path / "other" / "more_tools.py"
    other.parent.mkdir()
    other.write_text(TOOLS, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_tools([f"{tools_file}:add", f"{tools_file}:shout", f"{other}:add"])
    assert str(caught.value) == (
        f"tools entry '{other}:add': a tool named 'add' comes from '{tools_file}:add' too; "
        "tool names must differ"
    )


# --- calling ------------------------------------------------------------------------------------------------
def test_a_call_that_works_gives_its_text(tools):
    outcome = call_tool(tools["add"], {"a": 2, "b": 40}, timeout=5)
    assert outcome.text == "42" and outcome.error is None
    assert call_tool(tools["shout"], {"text": "hi"}, timeout=None).text == "HI"
    assert call_tool(tools["wait_and_add"], {"a": 1, "b": 1}, timeout=5).text == "2"


def test_an_exception_becomes_the_tools_text_and_an_error(tools):
    outcome = call_tool(tools["fail"], {"x": 7}, timeout=5)
    assert outcome.text == "error: ValueError: no good: 7"
    assert outcome.error is not None


def test_a_tool_that_tries_to_exit_does_not_end_the_run(tools):
    outcome = call_tool(tools["leave"], {"x": 1}, timeout=5)
    assert outcome.text.startswith("error: SystemExit") and outcome.error is not None


def test_a_hung_tool_is_given_up_after_its_timeout(tools):
    start = time.perf_counter()
    outcome = call_tool(tools["hang"], {"x": 1}, timeout=0.2)
    assert time.perf_counter() - start < 1.0
    assert outcome.text == "error: tool 'hang' timed out after 0.2 s" and outcome.error is not None


def test_a_result_that_is_not_a_string_is_an_error(tools):
    outcome = call_tool(tools["count"], {"x": 1}, timeout=5)
    assert outcome.text == "error: tool 'count' returned int, not a string" and outcome.error is not None


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"a": 1}, "error: tool 'add': missing a required argument: 'b'"),
        ({"a": 1, "b": 2, "c": 3}, "error: tool 'add': got an unexpected keyword argument 'c'"),
        ({"x": 1}, "error: tool 'add': missing a required argument: 'a'"),
    ],
)
def test_wrong_argument_names_are_an_error_before_the_call(tools, arguments, expected):
    outcome = call_tool(tools["add"], arguments, timeout=5)
    assert outcome.text == expected and outcome.error is not None


def test_wrongly_typed_arguments_fail_inside_the_tool_not_the_run(tools):
    outcome = call_tool(tools["add"], {"a": "1", "b": 2}, timeout=5)
    assert outcome.text.startswith("error: TypeError:") and outcome.error is not None


# --- environments' methods ----------------------------------------------------------------------------------
class Counter:
    """An environment whose public methods are tools."""

    LIMIT = 10

    def __init__(self):
        self.total = 0

    def reset(self, **row) -> str:
        self.total = int(row.get("start", 0))
        return f"at {self.total}"

    def step(self, text: str) -> str | None:
        return None

    def increase(self, by: int) -> str:
        """Add to the total.

        Args:
            by: How much to add.
        """
        self.total += by
        return str(self.total)

    @staticmethod
    def describe() -> str:
        """What this is."""
        return "a counter"

    @property
    def doubled(self) -> int:
        return 2 * self.total

    def _private(self) -> str:
        return "hidden"


class BadCounter(Counter):
    def decrease(self, by):
        """Take from the total.

        Args:
            by: How much.
        """
        self.total -= by
        return str(self.total)


def test_an_environments_public_methods_are_tools_bound_to_the_instance():
    first, second = Counter(), Counter()
    tools = {tool.name: tool for tool in environment_tools(first)}
    assert sorted(tools) == ["describe", "increase"]  # not reset, step, a property, a constant or _private
    assert tools["increase"].source == "Counter.increase"
    assert "self" not in tools["increase"].schema["function"]["parameters"]["properties"]
    assert call_tool(tools["increase"], {"by": 5}, timeout=5).text == "5"
    assert first.total == 5 and second.total == 0
    assert call_tool(tools["describe"], {}, timeout=5).text == "a counter"


def test_a_method_that_is_no_tool_is_named_with_its_class():
    with pytest.raises(ConfigError) as caught:
        environment_tools(BadCounter())
    assert str(caught.value).startswith(
        "environment 'BadCounter': method BadCounter.decrease: Argument by is missing a type hint"
    )
    with pytest.raises(ConfigError) as caught:
        check_environment_tools(BadCounter, entry="games.py:BadCounter")
    assert str(caught.value).startswith("environment 'games.py:BadCounter': method BadCounter.decrease: ")
    check_environment_tools(Counter)  # the good class passes, without an instance
