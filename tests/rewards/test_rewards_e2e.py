"""A tiny run that combines a rule reward, a learned reward model (a tiny random classifier with two aspects)
and a user's file, configured in YAML: metrics.jsonl shows each one's mean and std."""

from __future__ import annotations

import json

import yaml
from cli_args import base_args
from test_reward_model import build_tiny_reward_model
from typer.testing import CliRunner

from grpo.cli.main import app


def test_rule_reward_model_and_user_rewards_combine_in_one_run(
    tiny_model, tiny_dataset, tmp_path, reward_file
):
    reward_model = build_tiny_reward_model(tmp_path / "rm", labels=["helpfulness", "safety"])
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "reward_funcs": [
                    "format",
                    {"name": "reward_model", "model": str(reward_model), "weights": {"safety": 0.5}},
                    f"{reward_file}:length_reward",
                ],
                "reward_weights": [1.0, 0.1, 1.0],
                "multi_objective_aggregation": "normalize_then_sum",
            }
        )
    )
    output = tmp_path / "run"
    args = [*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "2"]
    # base_args names its own rewards; the YAML's win when the flags are dropped.
    cut = args.index("--reward-funcs")
    args = args[:cut] + args[cut + 4 :]
    result = CliRunner().invoke(app, ["train", "--config", str(config), *args])
    assert result.exit_code == 0, result.output

    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    names = ["format", "reward_model/helpfulness", "reward_model/safety", "length_reward"]
    for line in lines:
        for name in names:
            assert f"rewards/{name}/mean" in line and f"rewards/{name}/std" in line, name
            assert line[f"rewards/{name}/failures"] == 0
        # A random classifier gives every completion a different score: its aspects vary within a step.
        assert line["rewards/reward_model/helpfulness/std"] > 0
    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert saved["reward_funcs"][1] == {
        "name": "reward_model",
        "model": str(reward_model),
        "weights": {"safety": 0.5},
    }
