"""Bad paths and files given to every command but `grpo train` (tests/cli/test_bad_input.py covers train):
`grpo eval`, `sft`, `reward-model`, `dpo`, `pipeline` and `compare`, through the real CLI on the tiny model.
Each ends with one line on stderr that names the path and says what is wrong with it, exit code 2, no
traceback, and every file and directory that was there before exactly as it was. (`grpo report`'s are in
tests/runs/test_report.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import write_pairs
from sft_data import write_jsonl
from typer.testing import CliRunner

from grpo.cli.main import app, quiet_libraries

quiet_libraries()  # as the `grpo` command does before it runs

PROMPTS = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(4)]
SFT_ROWS = [{"prompt": "What is 3 + 4?", "completion": "<answer>7</answer>"}] * 2
PAIRS = [{"prompt": "What is 3 + 4?", "chosen": "<answer>7</answer>", "rejected": "<answer>8</answer>"}] * 2


@dataclass
class Case:
    what: str
    args: Callable[
        [Path, Path], list[str]
    ]  # (the test's directory, the tiny model) -> the command's arguments
    names: str  # the path the line names ({tmp}: the test's directory)
    says: str  # what the line says about it


def workspace(tmp: Path) -> None:
    """What the cases point at: a file where a directory is wanted, an empty directory, a file that is not
    YAML, good data for each command, and an earlier `grpo train` run's checkpoint."""
    (tmp / "afile").write_text("a file that must stay as it is\n")
    (tmp / "adir").mkdir()
    (tmp / "results.json").mkdir()  # a directory named as eval's output file
    (tmp / "broken.yaml").write_text("output_dir: [unclosed\n")
    write_jsonl(tmp / "prompts.jsonl", PROMPTS)
    write_jsonl(tmp / "sft.jsonl", SFT_ROWS)
    write_pairs(tmp / "pairs.jsonl", PAIRS)
    checkpoint = tmp / "train-run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (tmp / "train-run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')


def snapshot(tmp: Path) -> dict[str, bytes | None]:
    """Every path under ``tmp`` with its bytes (None for a directory)."""
    return {
        str(path.relative_to(tmp)): None if path.is_dir() else path.read_bytes() for path in tmp.rglob("*")
    }


def eval_args(model: str | Path, *flags: str) -> Callable[[Path, Path], list[str]]:
    """`grpo eval` of ``model`` ({model}: the tiny model; else relative to the test's directory)."""

    def build(tmp: Path, tiny: Path) -> list[str]:
        chosen = tiny if model == "{model}" else tmp / model
        given = [flag.replace("{tmp}", str(tmp)) for flag in flags]
        return ["eval", "--model", str(chosen), "--dataset", str(tmp / "prompts.jsonl"), *given]

    return build


STAGE_DATA = {"sft": "sft.jsonl", "reward-model": "pairs.jsonl", "dpo": "pairs.jsonl"}


def stage_args(command: str, *flags: str, model: str | None = None) -> Callable[[Path, Path], list[str]]:
    """`grpo sft`, `reward-model` or `dpo` on good data into {tmp}/out, with ``flags`` after (they win)."""

    def build(tmp: Path, tiny: Path) -> list[str]:
        chosen = str(tmp / model) if model else str(tiny)
        data = str(tmp / STAGE_DATA[command])
        given = [flag.replace("{tmp}", str(tmp)) for flag in flags]
        return [command, "--model", chosen, "--dataset", data, "--output-dir", str(tmp / "out"), *given]

    return build


def stage_cases(command: str) -> list[Case]:
    return [
        Case(
            f"{command}: output_dir is a file",
            stage_args(command, "--output-dir", "{tmp}/afile"),
            "{tmp}/afile",
            "it is a file, not a directory",
        ),
        Case(
            f"{command}: output_dir under a file",
            stage_args(command, "--output-dir", "{tmp}/afile/run"),
            "{tmp}/afile/run",
            "{tmp}/afile is a file, not a directory",
        ),
        Case(
            f"{command}: output_dir holds a `grpo train` run",
            stage_args(command, "--output-dir", "{tmp}/train-run"),
            "{tmp}/train-run",
            "holds checkpoints of a `grpo train` run",
        ),
        Case(
            f"{command}: the dataset file does not exist",
            stage_args(command, "--dataset", "{tmp}/missing.jsonl"),
            "{tmp}/missing.jsonl",
            "not found",
        ),
        Case(
            f"{command}: the model does not exist",
            stage_args(command, model="no-such-model"),
            "{tmp}/no-such-model",
            "not found",
        ),
        Case(
            f"{command}: --config is a directory",
            stage_args(command, "--config", "{tmp}/adir"),
            "{tmp}/adir",
            "config file not found: it is a directory",
        ),
    ]


def file_command(command: str, settings: dict | None = None, name: str = "run.yaml") -> Callable:
    """`grpo pipeline` or `grpo compare` of a file holding ``settings`` (None: the file ``name`` as it is);
    {model} and {tmp} in a value stand for the tiny model and the test's directory."""

    def build(tmp: Path, tiny: Path) -> list[str]:
        path = tmp / name
        if settings is not None:
            text = yaml.safe_dump(settings).replace("{model}", str(tiny)).replace("{tmp}", str(tmp))
            path.write_text(text)
        return [command, str(path)]

    return build


PIPELINE = {"model": "{model}", "sft": {"dataset": "{tmp}/sft.jsonl", "max_steps": 1}}
COMPARISON = {"model": "{model}", "max_steps": 1, "methods": {"grpo": {}}}


def file_cases(command: str, settings: dict) -> list[Case]:
    return [
        Case(
            f"{command}: the file does not exist",
            file_command(command, name="gone.yaml"),
            "{tmp}/gone.yaml",
            "config file not found",
        ),
        Case(
            f"{command}: the file is a directory",
            file_command(command, name="adir"),
            "{tmp}/adir",
            "config file not found: it is a directory",
        ),
        Case(
            f"{command}: the file is not YAML",
            file_command(command, name="broken.yaml"),
            "{tmp}/broken.yaml",
            "not valid YAML",
        ),
        Case(
            f"{command}: output_dir is a file",
            file_command(command, {**settings, "output_dir": "{tmp}/afile"}),
            "{tmp}/afile",
            "it is a file, not a directory",
        ),
        Case(
            f"{command}: output_dir under a file",
            file_command(command, {**settings, "output_dir": "{tmp}/afile/out"}),
            "{tmp}/afile/out",
            "{tmp}/afile is a file, not a directory",
        ),
    ]


CASES = [
    Case("eval: --model is a file", eval_args("afile"), "{tmp}/afile", "is a file"),
    Case("eval: --model does not exist", eval_args("gone"), "{tmp}/gone", "not found"),
    Case("eval: --model holds no model", eval_args("adir"), "{tmp}/adir", "not a model, run or checkpoint"),
    Case(
        "eval: --dataset does not exist",
        eval_args("{model}", "--dataset", "{tmp}/missing.jsonl"),
        "{tmp}/missing.jsonl",
        "not found",
    ),
    Case("eval: --dataset is a directory", eval_args("{model}", "--dataset", "{tmp}/adir"), "{tmp}/adir", ""),
    Case(
        "eval: --output under a file",
        eval_args("{model}", "--output", "{tmp}/afile/results.jsonl"),
        "{tmp}/afile",
        "it is a file, not a directory",
    ),
    Case(
        "eval: --output is a directory",
        eval_args("{model}", "--output", "{tmp}/results.json"),
        "{tmp}/results.json",
        "is a directory",
    ),
    Case(
        "eval: --config does not exist",
        eval_args("{model}", "--config", "{tmp}/gone.yaml"),
        "{tmp}/gone.yaml",
        "config file not found",
    ),
    Case(
        "eval: --config is a directory",
        eval_args("{model}", "--config", "{tmp}/adir"),
        "{tmp}/adir",
        "config file not found: it is a directory",
    ),
    Case(
        "eval: --config is not YAML",
        eval_args("{model}", "--config", "{tmp}/broken.yaml"),
        "{tmp}/broken.yaml",
        "not valid YAML",
    ),
    *(case for command in ("sft", "reward-model", "dpo") for case in stage_cases(command)),
    *file_cases("pipeline", PIPELINE),
    *file_cases("compare", COMPARISON),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.what)
def test_a_bad_path_is_one_line_naming_it_exit_code_2_and_nothing_changed(case, tiny_model, tmp_path):
    workspace(tmp_path)
    args = case.args(tmp_path, tiny_model)
    before = snapshot(tmp_path)

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    named, says = (text.replace("{tmp}", str(tmp_path)) for text in (case.names, case.says))
    assert named in lines[0] and says in lines[0], lines[0]
    after = snapshot(tmp_path)
    assert after == before, "nothing created, changed or removed"
