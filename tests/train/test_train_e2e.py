"""End to end: `grpo train` and `grpo eval` on a tiny random model, through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch
from cli_args import base_args
from safetensors.torch import load_file
from typer.testing import CliRunner

from grpo.cli.main import app


def train(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_lora_run_changes_the_adapter_and_writes_loadable_files(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    output = tmp_path / "run"
    code, log = train(
        [
            *base_args(tiny_model, tiny_dataset, output, reward_file),
            "--max-steps",
            "3",
            "--save-steps",
            "2",
            "--beta",
            "0.04",
        ]
    )
    assert code == 0, log

    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in (
        "reward",
        "rewards/length_reward/mean",
        "rewards/accuracy/std",
        "kl",
        "loss",
        "grad_norm",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/truncated_ratio",
        "frac_reward_zero_std",
        "learning_rate",
        "step_time",
        "tokens_per_second",
    ):
        assert key in lines[0], key
    assert all(m["frac_reward_zero_std"] < 1 for m in lines)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint = output / "checkpoint-3"
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"
    for name in ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer_state.json"):
        assert (checkpoint / name).is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    assert not list(output.rglob("*.bin")) and not list(output.rglob("*.pt")), "nothing pickled"

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(output / "final_model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits, adapter_logits, merged_logits = (m(ids).logits for m in (base, with_adapter, merged))
    assert not torch.allclose(base_logits, merged_logits), "the final model must differ from the base"
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)

    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["peak_memory_mb"] > 0


def test_full_fine_tuning_with_reference_and_two_iterations(tiny_model, tiny_dataset, tmp_path, reward_file):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "full"
    code, log = train(
        [
            *base_args(tiny_model, tiny_dataset, output, reward_file),
            "--max-steps",
            "2",
            "--no-use-lora",
            "--gradient-checkpointing",
            "--num-iterations",
            "2",
            "--beta",
            "0.1",
            "--loss-type",
            "dapo",
            "--learning-rate",
            "1e-3",
        ]
    )
    assert code == 0, log
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(output / "final_model").state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) >= len(before) // 2, f"only {changed} changed"
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    # The second pass of each step runs on weights that the first pass moved: the policy has left the
    # reference, so the KL term is positive by the last step.
    assert lines[-1]["kl"] > 0


def test_eval_command_scores_a_run_directory(tiny_model, tiny_dataset, tmp_path, reward_file):
    output = tmp_path / "run"
    code, log = train([*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "1"])
    assert code == 0, log
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(output),
            "--dataset",
            str(tiny_dataset),
            "--num-samples",
            "3",
            "--max-completion-length",
            "6",
            "--output",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(report.read_text())
    checkpoint = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(output / "checkpoint-1"),
            "--dataset",
            str(tiny_dataset),
            "--max-samples",
            "4",
            "--max-completion-length",
            "4",
        ],
    )
    assert checkpoint.exit_code == 0, checkpoint.output
    assert json.loads(checkpoint.stdout)["rows"] == 4
    assert saved["summary"]["rows"] == 16
    assert {"solved", "pass@1", "pass@3", "reward/accuracy", "reward/format"} <= set(saved["summary"])
    assert len(saved["rows"][0]["completions"]) == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-generations", "1"], "num_generations must be at least 2"),
        (["--epsilon", "-0.1"], "epsilon must not be negative"),
        (["--per-device-train-batch-size", "3"], "do not divide into groups"),
        (["--dataset", "missing.jsonl"], "missing.jsonl: dataset file not found"),
        (["--learning-rate", "fast"], "learning_rate must be a number"),
        (["--loss-type", "ppo"], "loss_type must be one of"),
        ([], "no-such-model: model directory not found"),
    ],
)
def test_bad_input_fails_with_one_line_and_exit_code_2(tiny_model, tiny_dataset, tmp_path, flags, message):
    args = [
        "--model",
        str(tmp_path / "no-such-model"),
        "--dataset",
        str(tiny_dataset),
        "--output-dir",
        str(tmp_path / "out"),
        *flags,
    ]
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists(), "a rejected run writes nothing"


def test_unknown_setting_in_a_config_file_suggests_the_right_name(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.001\n")
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown setting 'learning_rat'; did you mean 'learning_rate'?" in result.stderr


def test_eval_takes_the_rewards_of_a_config_file_kinds_with_options_included(
    tiny_model, tiny_dataset, tmp_path
):
    config = tmp_path / "run.yaml"
    config.write_text(
        "reward_funcs:\n  - {name: format, partial_credit: true, tags: [answer]}\n  - accuracy\n"
    )
    args = [
        "eval",
        "--model",
        str(tiny_model),
        "--dataset",
        str(tiny_dataset),
        "--config",
        str(config),
        "--max-samples",
        "2",
        "--max-completion-length",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"reward/format", "reward/accuracy"} <= set(summary)
