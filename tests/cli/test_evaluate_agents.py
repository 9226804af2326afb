"""`grpo eval` on multi-turn episodes: --tools on the tiny model taught one tool-calling episode, the tools a
run recorded used by default (and flags over them), the settings' precedence (task < run < --config <
flags), and bad tools or environments as one line, exit 2, before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from agent_model import QUESTION, write_tool
from typer.testing import CliRunner

import grpo.config.tasks
import grpo.data.tasks
from grpo.cli.evaluate import AgentSettings, default_completion_length, eval_agent_settings
from grpo.cli.main import app
from grpo.config.loading import load_config
from grpo.errors import ConfigError

NO_DOCSTRING = "def add(a: int, b: int) -> str:\n    return str(a + b)\n"
# An environment offering the taught tool as its method (the same schema, so the same prompt).
ADDER = """
class Adder:
    def reset(self, **row):
        pass

    def add(self, a: int, b: int) -> str:
        \"\"\"Add two integers.

        Args:
            a: The first number.
            b: The second number.
        \"\"\"
        return str(a + b)
"""


def questions(path: Path, answers: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": QUESTION, "answer": a}) + "\n" for a in answers))
    return path


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_eval_with_tools_scores_episodes(agent_model, tmp_path):
    data = questions(tmp_path / "q.jsonl", ["5", "6"])
    output = tmp_path / "results.jsonl"
    tools = f"{write_tool(tmp_path)}:add"
    common = [
        "--model",
        str(agent_model),
        "--dataset",
        str(data),
        "--tools",
        tools,
        "--max-completion-length",
        "160",
    ]
    result = run(*common, "--output", str(output))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["solved"] == 0.5  # 5 is right for the first question only
    assert summary["episodes/turns_mean"] == 2.0 and summary["episodes/well_formed_calls"] == 1.0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [m["role"] for m in lines[0]["trajectories"][0]["messages"]] == ["assistant", "tool", "assistant"]
    about = json.loads((tmp_path / "results.summary.json").read_text())
    assert (about["tools"], about["environment"], about["max_turns"]) == ([tools], None, 4)
    assert about["max_completion_length"] == 160
    short = run(*common, "--max-turns", "1")
    assert json.loads(short.stdout)["episodes/stopped_at_max_turns"] == 1.0


def test_eval_with_an_environment_scores_episodes(agent_model, tmp_path):
    data = questions(tmp_path / "q.jsonl", ["5"])
    (tmp_path / "adder.py").write_text(ADDER)
    given = ["--environment", f"{tmp_path / 'adder.py'}:Adder", "--max-completion-length", "160"]
    result = run("--model", str(agent_model), "--dataset", str(data), *given)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["solved"] == 1.0 and summary["episodes/tool_calls"] == 1.0


def test_a_run_directory_brings_its_tools_and_flags_override_them(agent_model, tmp_path):
    data = questions(tmp_path / "q.jsonl", ["5"])
    run_dir = tmp_path / "my-run"
    shutil.copytree(agent_model, run_dir / "final_model")
    settings = {"tools": [f"{write_tool(tmp_path)}:add"], "max_turns": 3, "max_completion_length": 120}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(settings))
    recorded = run("--model", str(run_dir), "--dataset", str(data))
    assert recorded.exit_code == 0, recorded.output
    summary = json.loads(recorded.stdout)
    assert summary["solved"] == 1.0 and summary["episodes/tool_calls"] == 1.0
    single = run("--model", str(run_dir / "final_model"), "--dataset", str(data), "--tools", "")
    assert single.exit_code == 0, single.output
    assert not any(key.startswith("episodes/") for key in json.loads(single.stdout))


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--tools", "{tmp}/gone.py:add"], "tools entry '{tmp}/gone.py:add': file {tmp}/gone.py not found"),
        (
            ["--tools", "{tmp}/bare.py:add"],
            "tools entry '{tmp}/bare.py:add': Cannot generate JSON schema for add because it has no",
        ),
        (
            ["--environment", "{tmp}/bare.py:Game"],
            "environment '{tmp}/bare.py:Game': {tmp}/bare.py has no class 'Game'",
        ),
        (["--max-turns", "3"], "--max-turns and --tool-timeout act only on episodes"),
        (["--tools", "{tmp}/my_tools.py:add", "--max-turns", "0"], "--max-turns must be at least 1, got 0"),
        (["--tools", "{tmp}/my_tools.py:add", "--tool-timeout", "-1"], "--tool-timeout must be 0"),
    ],
)
def test_bad_agent_input_is_one_line_before_the_model_loads(tmp_path, flags, says):
    (tmp_path / "bare.py").write_text(NO_DOCSTRING)
    write_tool(tmp_path)
    data = questions(tmp_path / "q.jsonl", ["5"])
    given = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    # The model does not exist: an error about it would mean the model was looked at first.
    result = run("--model", str(tmp_path / "no-model"), "--dataset", str(data), *given)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: " + says.replace("{tmp}", str(tmp_path))), line
    assert "Traceback" not in result.output


def test_string_prompts_cannot_run_episodes(tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    result = run(
        "--model",
        str(tmp_path / "no-model"),
        "--dataset",
        str(data),
        "--tools",
        f"{write_tool(tmp_path)}:add",
    )
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()  # (the model, which does not exist, was not looked at)
    assert line.startswith(f"error: {data}: row 1: field 'prompt' must be chat messages"), line


# --- where the settings come from ------------------------------------------------------------------------
@pytest.fixture()
def agent_task(monkeypatch):
    """A built-in agent task "tooltask" as helper tasks declare one: its tools and room in TASK_SETTINGS."""
    monkeypatch.setitem(
        grpo.config.tasks.TASK_SETTINGS,
        "tooltask",
        {"tools": "task_tools:add,task_tools:sub", "max_turns": 5, "max_completion_length": 200},
    )
    monkeypatch.setitem(grpo.data.tasks.COMPLETION_LENGTHS, "tooltask", 48)
    return "tooltask"


def test_a_built_in_agent_task_brings_its_tools_and_room(agent_task):
    settings = eval_agent_settings("some-model", agent_task)
    assert settings == AgentSettings(["task_tools:add", "task_tools:sub"], None, 5, 10.0, 200)
    assert default_completion_length(agent_task, settings) == 200
    assert default_completion_length(agent_task, None) == 48
    assert default_completion_length("arithmetic", None) == 32
    assert eval_agent_settings("some-model", "arithmetic") is None


def test_settings_layer_task_run_config_flags(agent_task, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-4").mkdir(parents=True)
    recorded = {"tools": ["run.py:mul"], "environment": None, "max_turns": 2, "tool_timeout": 3.0}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**recorded, "max_completion_length": 90}))
    for model in (run_dir, run_dir / "checkpoint-4"):  # a run directory and a checkpoint in it
        assert eval_agent_settings(str(model), agent_task) == AgentSettings(["run.py:mul"], None, 2, 3.0, 90)
    single_turn = tmp_path / "single"
    single_turn.mkdir()
    (single_turn / "config.yaml").write_text(yaml.safe_dump({"tools": [], "environment": None}))
    assert eval_agent_settings(str(single_turn), agent_task).tools == ["task_tools:add", "task_tools:sub"]

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"environment": "games.py:Game", "max_completion_length": 64}))
    config = load_config(config_file)
    from_config = eval_agent_settings(str(run_dir), agent_task, config)
    assert from_config == AgentSettings([], "games.py:Game", 4, 10.0, 64)
    flagged = eval_agent_settings(str(run_dir), agent_task, config, tools="a.py:f, b.py:g", max_turns=7)
    assert flagged == AgentSettings(["a.py:f", "b.py:g"], "games.py:Game", 7, 10.0, 64)
    assert eval_agent_settings(str(run_dir), agent_task, config, environment="none") is None
    assert eval_agent_settings(str(run_dir), agent_task, tool_timeout=0.0).tool_timeout == 0.0
    assert eval_agent_settings(str(run_dir), agent_task, tools="") is None


def test_a_checkpoint_without_its_run_directory_brings_its_saved_settings(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    config = {"tools": ["x.py:f"], "max_turns": 6, "max_completion_length": 77}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "config": config}))
    assert eval_agent_settings(str(checkpoint), "arithmetic") == AgentSettings(["x.py:f"], None, 6, 10.0, 77)


def test_a_bad_recorded_setting_names_its_file(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"tools": ["x.py:f"], "max_turns": "many"}))
    with pytest.raises(ConfigError, match=r"config\.yaml: max_turns must be an integer, got 'many'"):
        eval_agent_settings(str(tmp_path), "arithmetic")
