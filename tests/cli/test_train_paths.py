"""`grpo train` with paths that cannot work (an output directory that is a file, a --resume of nothing
resumable, a dataset that is a directory) or with a reward file changed since the run started: one line,
exit code 2, before the model loads, and an existing run's files unchanged. And `--resume` of a run killed
before its first checkpoint: it starts again from step 0 with the settings it recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from cli_args import base_args
from safetensors.torch import load_file
from typer.testing import CliRunner

import grpo.cli.recipes
from grpo.cli.main import app


def tree_hashes(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by its relative path, with the sha256 of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def train(args: list[str]) -> tuple[int, list[str]]:
    """`grpo train ARGS` in this process: its exit code and the lines it wrote to stderr."""
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.stderr.strip().splitlines()


def refused(args: list[str], says: str) -> None:
    """`grpo train ARGS` ends with exactly the line ``error: SAYS``, exit code 2, and no traceback."""
    code, lines = train(args)
    assert code == 2, lines
    assert [line for line in lines if line.startswith("error")] == [f"error: {says}"], lines
    assert not any("Traceback" in line for line in lines)


def forbid_loading_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the model fail the test: bad input must be refused before it."""

    def load_policy(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(grpo.cli.recipes, "load_policy", load_policy)


@pytest.fixture()
def model_never_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_loading_the_model(monkeypatch)


def comparable_metrics(output: Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ between any two runs."""
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in line.items() if not k.endswith("_time") and k != "tokens_per_second"}
        for line in lines
    ]


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    """A run of one step, shared by the tests that must leave it unchanged."""
    directory = tmp_path_factory.mktemp("finished")
    dataset = directory / "sums.jsonl"
    dataset.write_text(
        "".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(4))
    )
    rewards = directory / "my_rewards.py"
    rewards.write_text(
        "def length_reward(prompts, completions, **kw):\n    return [0.5] * len(completions)\n"
    )
    code, lines = train([*base_args(tiny_model, dataset, directory / "run", rewards), "--max-steps", "1"])
    assert code == 0, lines
    return directory / "run"


# --- the output directory ------------------------------------------------------------------------------
def small_run(
    tiny_model: Path, tiny_dataset: Path, output: Path, reward_file: Path, *flags: str
) -> list[str]:
    return [*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "1", *flags]


@pytest.mark.parametrize(
    "inside, file",
    [
        ("metrics.jsonl", "metrics.jsonl"),
        ("config.yaml/run", "config.yaml"),
        ("final_model/model.safetensors/a/b", "final_model/model.safetensors"),
    ],
)
def test_an_output_dir_that_is_a_file_or_under_one_is_refused_and_the_run_there_is_unchanged(
    finished_run, tiny_model, tiny_dataset, reward_file, model_never_loads, inside, file
):
    before = tree_hashes(finished_run)
    output = finished_run / inside
    what = "it" if inside == file else str(finished_run / file)
    refused(
        small_run(tiny_model, tiny_dataset, output, reward_file),
        f"output_dir {output}: {what} is a file, not a directory; choose another",
    )
    assert tree_hashes(finished_run) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new directories on Linux")
def test_an_output_dir_that_cannot_be_created_is_refused(
    tiny_model, tiny_dataset, reward_file, model_never_loads
):
    output = Path("/proc/grpo-run")
    refused(
        small_run(tiny_model, tiny_dataset, output, reward_file),
        f"output_dir {output}: cannot be created (No such file or directory)",
    )


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_a_run_directory_this_user_cannot_write_is_refused_and_unchanged(
    tmp_path, tiny_model, tiny_dataset, reward_file, model_never_loads
):
    output = tmp_path / "locked"
    output.mkdir()
    (output / "config.yaml").write_text("seed: 1\n")
    output.chmod(0o555)
    try:
        before = tree_hashes(output)
        refused(
            small_run(tiny_model, tiny_dataset, output, reward_file),
            f"output_dir {output}: is not writable by this user",
        )
        assert tree_hashes(output) == before
    finally:
        output.chmod(0o755)


# --- --resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, says",
    [
        ("gone", "no such directory"),
        ("metrics.jsonl", "a file, not a run directory or a checkpoint"),
        ("final_model", "neither a run directory (no config.yaml) nor a checkpoint"),
    ],
)
def test_a_resume_of_nothing_resumable_is_one_line_and_the_run_is_unchanged(finished_run, target, says):
    before = tree_hashes(finished_run)
    refused(
        ["--resume", str(finished_run / target)], f"{finished_run / target}: resume_from_checkpoint: {says}"
    )
    assert tree_hashes(finished_run) == before


def test_a_resume_of_an_empty_directory_is_one_line(tmp_path):
    refused(
        ["--resume", str(tmp_path)],
        f"{tmp_path}: resume_from_checkpoint: neither a run directory (no config.yaml) nor a checkpoint",
    )


# --- datasets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--dataset", "--eval-dataset"])
@pytest.mark.parametrize("what", ["a directory", "missing"])
def test_a_dataset_that_is_a_directory_or_missing_is_one_line_naming_it(
    tmp_path, tiny_model, tiny_dataset, reward_file, model_never_loads, flag, what
):
    path = tmp_path / "data"
    if what == "a directory":
        path.mkdir()
    code, lines = train(small_run(tiny_model, tiny_dataset, tmp_path / "out", reward_file, flag, str(path)))
    assert code == 2
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), lines
    assert not (tmp_path / "out").exists()


# --- reward files changed since the run started ------------------------------------------------------------
def test_a_reward_file_changed_or_gone_since_the_run_started_is_refused_until_it_is_restored(
    tmp_path, tiny_model, tiny_dataset, reward_file, monkeypatch
):
    output = tmp_path / "run"
    assert train(small_run(tiny_model, tiny_dataset, output, reward_file))[0] == 0
    original = reward_file.read_text()
    then = hashlib.sha256(original.encode()).hexdigest()
    before = tree_hashes(output)
    # Both ways of going on: --resume, and the same command again with more steps.
    go_on = [
        ["--resume", str(output), "--max-steps", "2"],
        small_run(tiny_model, tiny_dataset, output, reward_file, "--max-steps", "2"),
    ]
    forbid_loading_the_model(monkeypatch)

    reward_file.write_text(original.replace("40", "20"))
    now = hashlib.sha256(reward_file.read_bytes()).hexdigest()
    for args in go_on:
        refused(
            args,
            f"reward file {reward_file} changed since the run started (sha256 {then[:12]}… then, {now[:12]}… "
            "now): resuming would optimise another reward; restore it or start a new run",
        )
    reward_file.unlink()
    for args in go_on:
        refused(
            args,
            f"reward file {reward_file} changed since the run started (sha256 {then[:12]}… then, no file "
            "now): resuming would optimise another reward; restore it or start a new run",
        )
    assert tree_hashes(output) == before

    reward_file.write_text(original)
    monkeypatch.undo()
    code, lines = train(go_on[0])
    assert code == 0, lines
    assert (output / "checkpoint-2").is_dir()


# --- a run killed before its first checkpoint --------------------------------------------------------------
def test_a_resume_before_the_first_checkpoint_starts_again_with_the_recorded_settings(
    tmp_path, tiny_model, tiny_dataset, reward_file
):
    # Settings other than the defaults (seed, learning rate, batch, steps): the resumed run must take them
    # from config.yaml to end as the first did.
    output = tmp_path / "run"
    code, lines = train(small_run(tiny_model, tiny_dataset, output, reward_file, "--max-steps", "2"))
    assert code == 0, lines
    expected = load_file(output / "final_model" / "model.safetensors")
    metrics = comparable_metrics(output)
    killed_before_its_first_checkpoint(output)

    code, lines = train(["--resume", str(output)])
    assert code == 0, lines
    assert (
        f"{output} has no checkpoint yet: starting from step 0 (the run is seeded, so the result is the same)"
        in lines
    )
    resumed = load_file(output / "final_model" / "model.safetensors")
    assert all((expected[name] == resumed[name]).all() for name in expected)
    assert comparable_metrics(output) == metrics


def killed_before_its_first_checkpoint(output: Path) -> None:
    """Leave ``output`` as a run killed before its first checkpoint leaves it: config.yaml, metrics, evals."""
    for later in [*output.glob("checkpoint-*"), output / "final_model", output / "summary.json"]:
        shutil.rmtree(later) if later.is_dir() else later.unlink()


def test_a_run_without_a_checkpoint_yet_is_not_overwritten_by_a_run_with_other_settings(
    tmp_path, tiny_model, tiny_dataset, reward_file, monkeypatch
):
    output = tmp_path / "run"
    assert train(small_run(tiny_model, tiny_dataset, output, reward_file))[0] == 0
    killed_before_its_first_checkpoint(output)
    before = tree_hashes(output)
    forbid_loading_the_model(monkeypatch)
    refused(
        small_run(tiny_model, tiny_dataset, output, reward_file, "--learning-rate", "0.5"),
        f"{output}: holds a run with other settings and no checkpoint yet (learning_rate: 0.01 there, 0.5 "
        "now); start it again with its own settings or choose another --output-dir",
    )
    assert tree_hashes(output) == before


def test_a_reward_file_changed_before_the_first_checkpoint_is_refused_too(
    tmp_path, tiny_model, tiny_dataset, reward_file, monkeypatch
):
    output = tmp_path / "run"
    assert train(small_run(tiny_model, tiny_dataset, output, reward_file))[0] == 0
    killed_before_its_first_checkpoint(output)
    before = tree_hashes(output)
    forbid_loading_the_model(monkeypatch)
    reward_file.write_text(reward_file.read_text().replace("40", "20"))
    for args in (["--resume", str(output)], small_run(tiny_model, tiny_dataset, output, reward_file)):
        code, lines = train(args)
        assert code == 2 and lines[-1].startswith(f"error: reward file {reward_file} changed"), lines
    assert tree_hashes(output) == before
