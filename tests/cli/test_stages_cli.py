"""`grpo sft`, `grpo reward-model` and `grpo dpo` through the real CLI on the tiny model: each stage does what
defines it (SFT lowers the held-out loss, the reward model ranks held-out pairs, DPO lowers its loss and
prefers the chosen answers), a --config file sits under the flags, and bad input ends with one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import Result
from conftest import separable_pairs, write_pairs
from sft_data import sums_dataset, write_jsonl
from typer.testing import CliRunner

from grpo.cli.main import app, quiet_libraries

quiet_libraries()  # as the `grpo` command does before it runs


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def summary_of(result: Result, output: Path) -> dict:
    """The summary a finished run prints on stdout, checked against the one it wrote."""
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert json.loads((output / "summary.json").read_text()) == summary
    return summary


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return separable_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


# --- each stage does its job -------------------------------------------------------------------------------


def test_sft_lowers_the_held_out_loss_and_saves_a_changed_causal_lm(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "sft"
    result = invoke(
        "sft",
        "--model",
        str(tiny_model),
        "--dataset",
        str(sums_dataset(tmp_path / "sums.jsonl")),
        "--eval-fraction",
        "0.2",
        "--max-steps",
        "10",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--output-dir",
        str(output),
    )
    summary = summary_of(result, output)
    assert (summary["train_rows"], summary["eval_rows"], summary["steps"]) == (8, 2, 10)
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final_model"} <= {
        p.name for p in output.iterdir()
    }

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(output / "final_model").state_dict()
    assert base.keys() == tuned.keys()
    assert any(not torch.equal(base[name], tuned[name]) for name in base), "the saved weights are the base's"


def test_reward_model_ranks_held_out_pairs_above_chance_and_saves_a_classifier(
    tiny_model, tmp_path, pairs_file
):
    from transformers import AutoModelForSequenceClassification

    output = tmp_path / "rm"
    result = invoke(
        "reward-model",
        "--model",
        str(tiny_model),
        "--dataset",
        str(pairs_file),
        "--eval-fraction",
        "0.25",
        "--max-steps",
        "16",
        "--learning-rate",
        "1e-2",
        "--output-dir",
        str(output),
    )
    summary = summary_of(result, output)
    assert (summary["train_pairs"], summary["eval_pairs"], summary["steps"]) == (48, 16, 16)
    after, before = summary["held_out_accuracy_after"], summary["held_out_accuracy_before"]
    assert after > 0.5 and after > before, summary

    classifier = AutoModelForSequenceClassification.from_pretrained(output / "final_model").eval()
    assert classifier.config.num_labels == 1
    with torch.no_grad():
        assert classifier(torch.tensor([[5, 6, 7, 8]])).logits.shape == (1, 1)


def test_dpo_lowers_its_loss_and_prefers_the_chosen_held_out_answers(tiny_model, tmp_path, pairs_file):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "dpo"
    result = invoke(
        "dpo",
        "--model",
        str(tiny_model),
        "--dataset",
        str(pairs_file),
        "--eval-fraction",
        "0.25",
        "--max-steps",
        "8",
        "--learning-rate",
        "2e-2",
        "--beta",
        "0.5",
        "--warmup-ratio",
        "0",
        "--seed",
        "3",
        "--output-dir",
        str(output),
    )
    summary = summary_of(result, output)
    assert (summary["train_pairs"], summary["eval_pairs"], summary["steps"]) == (48, 16, 8)
    assert summary["loss_last_steps"] < summary["loss_first_steps"], summary
    after, before = summary["held_out_accuracy_after"], summary["held_out_accuracy_before"]
    assert after > 0.5 and after > before, summary
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"], summary
    AutoModelForCausalLM.from_pretrained(output / "final_model")  # a policy `grpo train --model` can take


# --- settings from a file ----------------------------------------------------------------------------------


def test_a_config_file_gives_the_settings_and_flags_given_with_it_win(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "sft"
    settings = {
        "model": str(tiny_model),  # the alias, as on the command line
        "dataset": str(sums_dataset(tmp_path / "sums.jsonl")),
        "output-dir": str(output),  # kebab-case, as on the command line
        "eval_fraction": 0.2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "max_steps": 2,
        "use_lora": True,
    }
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(settings))

    summary = summary_of(invoke("sft", "--config", str(config), "--max-steps", "3", "--no-use-lora"), output)
    assert summary["steps"] == 3
    saved = yaml.safe_load((output / "config.yaml").read_text())
    from_flags = {"max_steps": 3, "use_lora": False}
    from_file = {"learning_rate": 0.01, "logging_steps": 1, "eval_fraction": 0.2}
    assert {name: saved[name] for name in {**from_flags, **from_file}} == {**from_flags, **from_file}
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    # Full fine-tuning moves the embeddings, which LoRA (all-linear) leaves alone.
    name = "model.embed_tokens.weight"
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()[name]
    tuned = AutoModelForCausalLM.from_pretrained(output / "final_model").state_dict()[name]
    assert not torch.equal(tuned, base)


# --- bad input ---------------------------------------------------------------------------------------------

SFT_ROW = {"prompt": "What is 3 + 4?", "completion": "<answer>7</answer>"}
PAIR = {"prompt": "What is 3 + 4?", "chosen": "<answer>7</answer>", "rejected": "<answer>8</answer>"}


def sft_file_without_completion(tmp: Path) -> Path:
    return write_jsonl(tmp / "rows.jsonl", [SFT_ROW, {"prompt": "What is 1 + 1?"}])


def pairs_file_without_rejected(tmp: Path) -> Path:
    return write_pairs(
        tmp / "pairs.jsonl", [PAIR, {"prompt": "What is 1 + 1?", "chosen": "<answer>2</answer>"}]
    )


def good_file(command: str, tmp: Path) -> Path:
    if command == "sft":
        return write_jsonl(tmp / "rows.jsonl", [SFT_ROW, SFT_ROW])
    return write_pairs(tmp / "pairs.jsonl", [PAIR, PAIR])


# (command, the dataset file given (None: a good one), extra flags, what the error line must name)
BadInput = tuple[str, Callable[[Path], Path] | None, list[str], list[str]]
BAD_INPUT: dict[str, BadInput] = {
    **{
        f"{command}: a learning rate that is not a number": (
            command,
            None,
            ["--learning-rate", "abc"],
            ["learning_rate", "'abc'"],
        )
        for command in ("sft", "reward-model", "dpo")
    },
    **{
        f"{command}: a dataset file that does not exist": (
            command,
            lambda tmp: tmp / "missing.jsonl",
            [],
            ["{tmp}/missing.jsonl", "not found"],
        )
        for command in ("sft", "reward-model", "dpo")
    },
    "sft: a row without its completion": (
        "sft",
        sft_file_without_completion,
        [],
        ["{tmp}/rows.jsonl", "row 2", "'completion'"],
    ),
    **{
        f"{command}: a pair without its rejected answer": (
            command,
            pairs_file_without_rejected,
            [],
            ["{tmp}/pairs.jsonl", "row 2", "'rejected'"],
        )
        for command in ("reward-model", "dpo")
    },
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_ends_with_one_error_line_exit_code_2_and_no_output_directory(case, tiny_model, tmp_path):
    command, dataset, flags, named = case
    data = dataset(tmp_path) if dataset else good_file(command, tmp_path)
    output = tmp_path / "out"
    result = invoke(
        command, "--model", str(tiny_model), "--dataset", str(data), "--output-dir", str(output), *flags
    )

    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in named:
        assert part.replace("{tmp}", str(tmp_path)) in lines[0], (part, lines[0])
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not output.exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["train", "--learning-rat", "1"], "error: grpo train: No such option: --learning-rat"),
        (["dpo", "--use-lora", "maybe"], "error: grpo dpo: Got unexpected extra argument(s) (maybe)"),
        (["pipelines", "p.yaml"], "error: grpo: No such command 'pipelines'."),
        (["eval"], "error: grpo eval: Missing option '--model'."),
    ],
)
def test_a_flag_or_command_that_does_not_exist_is_one_line_and_exit_code_2(args, line):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "grpo", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), done.stderr


def test_an_unexpected_error_surfaces_as_itself(monkeypatch):
    """Only usage errors and Ctrl-C are turned into exit codes; anything else is a bug to see whole."""
    from grpo.cli import main as cli

    def broken(*args, **kwargs):
        raise LookupError("a bug")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(LookupError, match="a bug"):
        cli.main()
