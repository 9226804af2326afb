"""Environments: loading the user's class, checked on the class before any instance exists, with the
one-line error for each way it can be wrong; its methods as tools; whether it plays a text game."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from grpo.agents.environments import has_step, load_environment
from grpo.agents.tools import call_tool, environment_tools
from grpo.errors import ConfigError

GAMES = '''
CREATED = []


class GuessTheNumber:
    """A game: the model guesses with a tool, the environment keeps the secret."""

    def __init__(self):
        CREATED.append(self)
        self.secret = 0
        self.guesses = 0

    def reset(self, secret: int = 7, **row) -> str:
        self.secret = int(secret)
        self.guesses = 0
        return "I think of a number from 1 to 10."

    def guess(self, number: int) -> str:
        """Guess the number.

        Args:
            number: Your guess.
        """
        self.guesses += 1
        if number == self.secret:
            return "right"
        return "higher" if number < self.secret else "lower"


class TextGame:
    def __init__(self, rounds: int = 2):
        self.rounds = rounds

    def reset(self, **row):
        return None

    def step(self, text: str) -> str | None:
        self.rounds -= 1
        return None if self.rounds <= 0 else "again"


class NeedsArguments:
    def __init__(self, size, seed=0):
        pass

    def reset(self, **row):
        pass


class NoReset:
    def guess(self, number: int) -> str:
        """Guess.

        Args:
            number: Your guess.
        """
        return "no"


class ResetIsData:
    reset = "not a method"


class StepIsData:
    step = 3

    def reset(self, **row):
        pass


class UntypedTool:
    def reset(self, **row):
        pass

    def guess(self, number):
        """Guess.

        Args:
            number: Your guess.
        """
        return "no"


class UndocumentedTool:
    def reset(self, **row):
        pass

    def guess(self, number: int) -> str:
        return "no"


def make_game():
    return GuessTheNumber()
'''


@pytest.fixture()
def games_file(tmp_path: Path) -> Path:
    path = tmp_path / "games.py"
    path.write_text(GAMES, encoding="utf-8")
    return path


def test_a_class_from_a_file_is_checked_without_making_an_instance(games_file):
    cls = load_environment(f"{games_file}:GuessTheNumber")
    assert cls.__name__ == "GuessTheNumber"
    assert sys.modules[cls.__module__].CREATED == []


def test_a_class_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_games.py").write_text(GAMES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "grpo_test_games", None)
    monkeypatch.delitem(sys.modules, "grpo_test_games")  # (restored to absent afterwards)
    assert load_environment("grpo_test_games:TextGame").__name__ == "TextGame"


def test_an_environments_methods_become_tools_that_change_its_state(games_file):
    cls = load_environment(f"{games_file}:GuessTheNumber")
    game = cls()
    assert game.reset(secret=4, question="ignored") == "I think of a number from 1 to 10."
    (tool,) = environment_tools(game)
    assert tool.name == "guess" and tool.schema["function"]["parameters"]["required"] == ["number"]
    answers = [call_tool(tool, {"number": n}, timeout=5).text for n in (2, 6, 4)]
    assert answers == ["higher", "lower", "right"] and game.guesses == 3
    assert not has_step(game)


def test_a_text_game_has_step_and_no_tools(games_file):
    game = load_environment(f"{games_file}:TextGame")()
    assert has_step(game) and environment_tools(game) == []
    assert game.step("a") == "again" and game.step("b") is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Missing", "{file} has no class 'Missing'"),
        ("make_game", "make_game is not a class (function)"),
        ("CREATED", "CREATED is not a class (list)"),
        (
            "NeedsArguments",
            "NeedsArguments() needs size; each trajectory's instance is made with no arguments",
        ),
        ("NoReset", "NoReset has no reset method (reset(self, **row))"),
        ("ResetIsData", "ResetIsData has no reset method"),
        ("StepIsData", "StepIsData.step is not a method (step(self, text))"),
        ("UntypedTool", "method UntypedTool.guess: Argument number is missing a type hint in function guess"),
        ("UndocumentedTool", "method UndocumentedTool.guess: Cannot generate JSON schema for guess because"),
    ],
)
def test_each_bad_environment_is_a_config_error_of_one_line_naming_it(games_file, name, expected):
    spec = f"{games_file}:{name}"
    with pytest.raises(ConfigError) as caught:
        load_environment(spec)
    message = str(caught.value)
    assert message.startswith(f"environment {spec!r}: {expected.format(file=games_file)}")
    assert "\n" not in message


def test_a_missing_file_or_module_is_named(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^environment '.*nowhere\.py:Game': file .*nowhere\.py not found$"
    ):
        load_environment(f"{tmp_path}/nowhere.py:Game")
    with pytest.raises(ConfigError, match=r"^environment 'grpo_no_such_games:Game': cannot import grpo_no"):
        load_environment("grpo_no_such_games:Game")
