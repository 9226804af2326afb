"""Which code files stand behind a run's rewards (recorded so that a run refuses to resume once one has
changed): the files that entries name, and the user's own modules; never Python's, an installed package's
or grpo's."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import grpo.rewards.rules
from grpo.rewards import build_rewards
from grpo.rewards.core import is_user_code, reward_code_files

BODY = "def brevity(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"


def test_a_file_entry_is_recorded_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("my_rewards.py").write_text(BODY)
    specs = ["my_rewards.py:brevity", {"name": "my_rewards.py:brevity", "weight": 2.0}, "format"]
    build_rewards(specs)
    assert reward_code_files(specs) == {"my_rewards.py:brevity": Path("my_rewards.py")}


def test_a_users_own_module_is_recorded_by_its_file(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    build_rewards(["team_rewards:brevity"])
    (name, path), *_ = reward_code_files(["team_rewards:brevity"]).items()
    assert name == "team_rewards:brevity" and path.resolve() == (tmp_path / "team_rewards.py").resolve()


def test_built_in_kinds_pythons_and_installed_packages_modules_and_grpo_are_not_recorded():
    specs = ["accuracy", "json:dumps", "yaml:safe_dump", "grpo.rewards.rules:format_reward"]
    assert reward_code_files(specs) == {}


def test_what_counts_as_the_users_code(tmp_path):
    assert is_user_code(tmp_path / "anything.py")
    assert not is_user_code(Path(grpo.rewards.rules.__file__))
    assert not is_user_code(Path(json.__file__)) and not is_user_code(Path(yaml.__file__))
