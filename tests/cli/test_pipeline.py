"""`grpo pipeline`: SFT → reward model → GRPO through the CLI on the tiny model, each stage's model feeding
the next, stages skipped once finished, and changed or bad settings refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grpo.cli.main import app
from grpo.cli.pipeline import plan, with_reward_model
from grpo.config.grpo import GRPOConfig

STAGE_SETTINGS = {
    "sft": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3},
    "reward_model": {"dataset": "arithmetic", "max_steps": 3, "max_eval_pairs": 8, "max_train_pairs": 32},
    "grpo": {
        "max_steps": 2,
        "num_generations": 4,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_completion_length": 8,
        "eval_max_samples": 4,
        "learning_rate": 1e-2,
    },
}


def write_pipeline(path: Path, tiny_model: Path, output: Path, **stages: dict | None) -> Path:
    data = {"output_dir": str(output), "model": str(tiny_model), **stages}
    path.write_text(yaml.safe_dump(data))
    return path


def run(config: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["pipeline", str(config)])
    return result.exit_code, result.stdout, result.stderr


def test_the_three_stages_run_in_order_each_feeding_the_next(tiny_model, tmp_path):
    output = tmp_path / "out"
    config = write_pipeline(tmp_path / "p.yaml", tiny_model, output, **STAGE_SETTINGS)
    code, _, err = run(config)
    assert code == 0, err

    sft_model = str(output / "sft" / "final_model")
    reward_model = yaml.safe_load((output / "reward_model" / "config.yaml").read_text())
    assert reward_model["model_name_or_path"] == sft_model, "the reward model starts from the SFT model"
    grpo = yaml.safe_load((output / "grpo" / "config.yaml").read_text())
    assert grpo["model_name_or_path"] == sft_model, "GRPO's policy and reference are the SFT model"
    assert grpo["reward_funcs"] == [
        "accuracy",
        "format",
        {"name": "reward_model", "model": str(output / "reward_model" / "final_model")},
    ]
    metrics = [json.loads(line) for line in (output / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("rewards/reward_model/mean" in m for m in metrics), "GRPO scored with the trained reward model"

    summary = json.loads((output / "pipeline.json").read_text())
    assert summary["stages"] == ["sft", "reward_model", "grpo"]
    assert summary["sft"]["eval_loss_before"] is not None
    assert summary["reward_model"]["eval_pairs"] == 8
    assert summary["grpo"]["steps"] == 2


def test_a_finished_pipeline_run_again_skips_every_stage_and_a_longer_grpo_continues(tiny_model, tmp_path):
    output = tmp_path / "out"
    stages = {"sft": STAGE_SETTINGS["sft"], "grpo": STAGE_SETTINGS["grpo"]}
    config = write_pipeline(tmp_path / "p.yaml", tiny_model, output, **stages)
    assert run(config)[0] == 0
    sft_summary = (output / "sft" / "summary.json").read_text()
    first_steps = (output / "grpo" / "metrics.jsonl").read_text().splitlines()

    code, _, err = run(config)
    assert code == 0, err
    assert err.count("finished earlier") == 2
    assert (output / "sft" / "summary.json").read_text() == sft_summary, "nothing ran again"

    longer = {**stages, "grpo": {**STAGE_SETTINGS["grpo"], "max_steps": 3}}
    write_pipeline(config, tiny_model, output, **longer)
    code, _, err = run(config)
    assert code == 0, err
    assert "continuing from" in err
    metrics = (output / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]
    assert metrics[:2] == first_steps, "GRPO went on from its checkpoint of step 2, not from the start"
    assert (output / "sft" / "summary.json").read_text() == sft_summary


def test_a_stage_stopped_before_its_end_runs_again(tiny_model, tmp_path):
    output = tmp_path / "out"
    config = write_pipeline(tmp_path / "p.yaml", tiny_model, output, sft=STAGE_SETTINGS["sft"])
    assert run(config)[0] == 0
    (output / "sft" / "pipeline_stage.json").unlink()  # as if stopped after its model, before its record
    code, _, err = run(config)
    assert code == 0, err
    assert "finished earlier" not in err and (output / "sft" / "pipeline_stage.json").is_file()


def test_a_finished_stage_with_changed_settings_is_refused_before_anything_runs(tiny_model, tmp_path):
    output = tmp_path / "out"
    stages = {"sft": STAGE_SETTINGS["sft"], "grpo": STAGE_SETTINGS["grpo"]}
    config = write_pipeline(tmp_path / "p.yaml", tiny_model, output, **stages)
    assert run(config)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()}

    changed = {**stages, "grpo": {**STAGE_SETTINGS["grpo"], "beta": 0.5}}
    write_pipeline(config, tiny_model, output, **changed)
    code, _, err = run(config)
    assert code == 2
    assert err.strip() == (
        f"error: {output / 'grpo'}: the grpo stage finished with other inputs (beta: 0.04 there, 0.5 now); "
        "remove that folder to run it again, or choose another output_dir"
    )
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()} == before


def test_a_finished_stage_whose_input_ran_again_is_refused(tiny_model, tmp_path):
    output = tmp_path / "out"
    stages = {"sft": STAGE_SETTINGS["sft"], "grpo": STAGE_SETTINGS["grpo"]}
    config = write_pipeline(tmp_path / "p.yaml", tiny_model, output, **stages)
    assert run(config)[0] == 0
    (output / "sft" / "pipeline_stage.json").unlink()
    code, _, err = run(config)
    assert code == 2
    assert "the grpo stage finished with other inputs (the stages it used have run again since)" in err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sft": {}, "ppo": {}}, "unknown key 'ppo'; a pipeline has output_dir, model and the stages"),
        ({"model": "m"}, "names no stage; give one or more of sft, reward_model, grpo"),
        ({"sft": [1, 2]}, "sft must be a mapping of that stage's settings"),
        ({"sft": {"output_dir": "x"}}, "sft: output_dir is the pipeline's"),
        ({"sft": {"max_step": 3}}, "sft: unknown setting 'max_step'; did you mean 'max_steps'?"),
        ({"grpo": {"beta": "high"}}, "grpo: beta must be a number, got 'high'"),
        ({"reward_model": {"learning_rate": -1}}, "learning_rate must not be negative"),
    ],
)
def test_bad_pipeline_files_are_one_line_errors_and_write_nothing(tmp_path, data, message):
    output = tmp_path / "out"
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(output), **data}))
    code, _, err = run(config)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not output.exists()


def test_settings_given_in_the_file_win_over_what_flows_between_stages(tiny_model, tmp_path):
    config = tmp_path / "p.yaml"
    data = {
        "output_dir": str(tmp_path / "out"),
        "model": str(tiny_model),
        "sft": {},
        "reward_model": {"model": "elsewhere"},
        "grpo": {
            "reward_funcs": ["accuracy", {"name": "reward_model", "weight": 0.5}],
            "reward_weights": None,
        },
    }
    config.write_text(yaml.safe_dump(data))
    _, reward_model, grpo = plan(config)
    assert reward_model.config.model_name_or_path == "elsewhere" and reward_model.inputs == ()
    assert grpo.inputs == ("sft", "reward_model")
    rm_path = str(tmp_path / "out" / "reward_model" / "final_model")
    assert grpo.config.reward_funcs == [
        "accuracy",
        {"name": "reward_model", "weight": 0.5, "model": rm_path},
    ]


def test_an_added_reward_model_gets_weight_one_beside_given_weights():
    config = GRPOConfig(reward_funcs=["accuracy", "format"], reward_weights=[2.0, 1.0])
    added = with_reward_model(config, "rm")
    assert added.reward_funcs[-1] == {"name": "reward_model", "model": "rm"}
    assert added.reward_weights == [2.0, 1.0, 1.0]
    named = with_reward_model(GRPOConfig(reward_funcs=["reward_model"]), "rm")
    assert named.reward_funcs == [{"name": "reward_model", "model": "rm"}]
    kept = with_reward_model(GRPOConfig(reward_funcs=[{"name": "reward_model", "model": "mine"}]), "rm")
    assert kept.reward_funcs == [{"name": "reward_model", "model": "mine"}]
