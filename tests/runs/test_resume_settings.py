"""What a resumed run takes from the run it continues (its settings, from a checkpoint or, before the first
one, from config.yaml) and what it must find unchanged (its reward code files)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from grpo.config.grpo import GRPOConfig
from grpo.config.loading import load_config, to_dict
from grpo.errors import CheckpointError, ConfigError
from grpo.runs.resume import check_reward_files, record_reward_files, resumed_base, resumed_settings


def started_run(directory: Path, **settings: object) -> Path:
    """A run directory as `grpo train` leaves it before its first checkpoint: config.yaml only."""
    directory.mkdir(parents=True)
    config = GRPOConfig(output_dir=str(directory), **settings)
    (directory / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return directory


def test_a_run_without_a_checkpoint_resumes_with_the_settings_of_its_config_yaml(tmp_path):
    run = started_run(tmp_path / "run", learning_rate=0.5, seed=3, reward_funcs=["format"])
    config = load_config(None, {"resume_from_checkpoint": str(run), "max_steps": 7}, base=resumed_base)
    assert (config.learning_rate, config.seed, config.reward_funcs) == (0.5, 3, ["format"])
    assert config.max_steps == 7, "what is given goes on top"
    assert config.output_dir == str(run) and config.resume_from_checkpoint == str(run)


def test_the_run_s_settings_lie_above_its_task_s(tmp_path):
    """A run recorded with shuffling on (before the arithmetic task turned it off) resumes as it ran."""
    run = started_run(tmp_path / "run", shuffle_dataset=True)
    assert load_config(None, {"resume_from_checkpoint": str(run)}, base=resumed_base).shuffle_dataset is True
    assert load_config(None, {}).shuffle_dataset is False, "a new run on the task reads it in order"


def test_an_output_dir_given_with_the_resume_wins(tmp_path):
    run = started_run(tmp_path / "run")
    given = {"resume_from_checkpoint": str(run), "output_dir": str(tmp_path / "elsewhere")}
    assert load_config(None, given, base=resumed_base).output_dir == str(tmp_path / "elsewhere")


def test_a_setting_config_yaml_has_that_this_grpo_lacks_is_left_out(tmp_path):
    run = started_run(tmp_path / "run", learning_rate=0.5)
    with open(run / "config.yaml", "a") as config:
        config.write("a_retired_setting: 1\n")
    assert resumed_settings(str(run), {})["learning_rate"] == 0.5


def test_a_bad_value_in_config_yaml_is_named(tmp_path):
    run = started_run(tmp_path / "run")
    (run / "config.yaml").write_text("max_steps: many\n")
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(run))}/config\\.yaml: max_steps must be an integer, got 'many'$"
    ):
        resumed_settings(str(run), {})


@pytest.mark.parametrize(
    "what, says",
    [
        ("missing", "no such directory"),
        ("a file", "a file, not a run directory or a checkpoint"),
        ("an empty directory", "neither a run directory (no config.yaml) nor a checkpoint"),
    ],
)
def test_what_is_neither_a_run_nor_a_checkpoint_is_one_line(tmp_path, what, says):
    path = tmp_path / "thing"
    if what == "a file":
        path.write_text("x")
    elif what == "an empty directory":
        path.mkdir()
    with pytest.raises(ConfigError) as raised:
        resumed_settings(str(path), {})
    assert str(raised.value) == f"{path}: resume_from_checkpoint: {says}"


# --- reward code files ---------------------------------------------------------------------------------
SPEC = "my_rewards.py:brevity"


@pytest.fixture()
def recorded(tmp_path, monkeypatch) -> Path:
    """A run directory that recorded ``my_rewards.py`` (a path relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    Path("my_rewards.py").write_text("def brevity(prompts, completions, **kw):\n    return [0.0]\n")
    run = tmp_path / "run"
    run.mkdir()
    record_reward_files(run, {SPEC: Path("my_rewards.py")})
    return run


def test_the_record_names_each_reward_with_its_file_and_sha256(recorded):
    (entry,) = json.loads((recorded / "reward_files.json").read_text()).items()
    assert entry[0] == SPEC and entry[1]["file"] == "my_rewards.py" and len(entry[1]["sha256"]) == 64


def test_unchanged_files_resume(recorded):
    check_reward_files(recorded, [SPEC, "format"])


def test_a_changed_file_is_refused_with_both_hashes(recorded):
    then = json.loads((recorded / "reward_files.json").read_text())[SPEC]["sha256"]
    Path("my_rewards.py").write_text("def brevity(prompts, completions, **kw):\n    return [1.0]\n")
    now = hashlib.sha256(Path("my_rewards.py").read_bytes()).hexdigest()
    with pytest.raises(ConfigError) as raised:
        check_reward_files(recorded, [{"name": SPEC, "weight": 2.0}])
    assert str(raised.value) == (
        f"reward file my_rewards.py changed since the run started (sha256 {then[:12]}… then, "
        f"{now[:12]}… now): resuming would optimise another reward; restore it or start a new run"
    )


def test_a_missing_file_is_refused(recorded):
    Path("my_rewards.py").unlink()
    with pytest.raises(ConfigError, match=r"^reward file my_rewards\.py changed since the run started "):
        check_reward_files(recorded, [SPEC])
    with pytest.raises(ConfigError, match=r"… then, no file now\): resuming would optimise another reward"):
        check_reward_files(recorded, [SPEC])


def test_a_reward_the_resumed_settings_replaced_is_not_checked(recorded):
    Path("my_rewards.py").unlink()
    check_reward_files(recorded, ["format"])


def test_a_run_from_before_the_record_has_nothing_to_check(tmp_path):
    check_reward_files(tmp_path, [SPEC])


def test_a_damaged_record_is_named(recorded):
    (recorded / "reward_files.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"reward_files\.json: damaged"):
        check_reward_files(recorded, [SPEC])
