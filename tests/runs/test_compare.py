"""`grpo compare`: methods trained side by side on the tiny model through the CLI, the table's figures by
hand, finished runs not run again, and bad comparison files refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grpo.cli.main import app
from grpo.runs.compare import markdown_table, plan, plot_series, spread

TINY_TRAIN = {
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_completion_length": 8,
    "learning_rate": 1e-2,
}


def write_comparison(path: Path, tiny_model: Path, output: Path, **overrides) -> Path:
    data = {
        "output_dir": str(output),
        "model": str(tiny_model),
        "dataset": "arithmetic",
        "seeds": [1],
        "max_steps": 2,
        "eval_max_samples": 4,
        "eval_steps": 1,
        "common": TINY_TRAIN,
        "methods": {
            "grpo": {},
            "ppo": {"algorithm": "ppo"},
            "dpo": {"kind": "dpo", "per_device_train_batch_size": 2, "max_eval_pairs": 4},
        },
        **overrides,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # the methods in the order given
    return path


def run(config: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["compare", str(config)])
    return result.exit_code, result.stderr


def test_grpo_ppo_and_dpo_side_by_side_on_the_same_budget_and_held_out_questions(tiny_model, tmp_path):
    output = tmp_path / "out"
    config = write_comparison(tmp_path / "c.yaml", tiny_model, output)
    code, err = run(config)
    assert code == 0, err

    results = json.loads((output / "comparison.json").read_text())
    assert results["method_order"] == ["grpo", "ppo", "dpo"]
    assert results["held_out_questions"] == 4 and results["held_out_solved_before"] is not None
    by_method = {row["method"]: row for row in results["runs"]}
    for name in ("grpo", "ppo"):
        row = by_method[name]
        settings = yaml.safe_load((output / f"{name}-seed1" / "settings.yaml").read_text())
        assert settings["max_steps"] == 2 and settings["seed"] == 1 and settings["eval_max_samples"] == 4
        assert [p[0] for p in row["curves"]["reward"]] == [1, 2]
        assert [p[0] for p in row["curves"]["held_out_solved"]] == [0, 1, 2], "before, during, after"
        assert row["peak_memory_mb"] > 0 and row["trainable_parameters"] > 0
    assert yaml.safe_load((output / "ppo-seed1" / "settings.yaml").read_text())["algorithm"] == "ppo"
    # PPO holds a value head besides what GRPO holds: one weight per hidden unit and a bias.
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    extra = by_method["ppo"]["resident_parameters"] - by_method["grpo"]["resident_parameters"]
    assert extra == hidden + 1
    dpo = by_method["dpo"]
    assert dpo["held_out_solved_after"] is not None, "the DPO model is scored on the same questions"
    assert json.loads((output / "dpo-seed1" / "summary.json").read_text())["steps"] == 2

    table = (output / "comparison.md").read_text()
    assert table.splitlines()[0].startswith("| method | held-out solved before | held-out solved after |")
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == ["| grpo", "| ppo", "| dpo"]
    for name in ("reward-step", "reward-time", "held-out-step", "held-out-time"):
        assert (output / f"{name}.svg").read_text().startswith("<svg")
    page = (output / "report.html").read_text()
    assert page.count("<svg") == 4 and "held-out solved after" in page and "dpo" in page


def test_a_finished_comparison_run_again_trains_nothing_and_a_new_seed_trains_only_its_runs(
    tiny_model, tmp_path
):
    output = tmp_path / "out"
    methods = {"grpo": {}, "rloo": {"algorithm": "rloo"}}
    config = write_comparison(tmp_path / "c.yaml", tiny_model, output, methods=methods)
    assert run(config)[0] == 0
    summary = (output / "grpo-seed1" / "summary.json").read_text()

    code, err = run(config)
    assert code == 0, err
    assert err.count("finished earlier") == 2
    assert (output / "grpo-seed1" / "summary.json").read_text() == summary

    write_comparison(config, tiny_model, output, methods=methods, seeds=[1, 2])
    code, err = run(config)
    assert code == 0, err
    assert err.count("finished earlier") == 2 and (output / "rloo-seed2" / "summary.json").is_file()
    results = json.loads((output / "comparison.json").read_text())
    assert results["seeds"] == [1, 2] and len(results["runs"]) == 4


def test_spread_and_the_table_by_hand():
    assert spread([0.5, 0.7, None]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1414, abs=1e-4)}
    assert spread([3]) == {"mean": 3.0, "std": 0.0}
    assert spread([None, float("nan")]) == {"mean": None, "std": None}
    nothing = {"mean": None, "std": None}
    results = {
        "model": "m",
        "dataset": "arithmetic",
        "seeds": [1, 2],
        "held_out_questions": 100,
        "held_out_solved_before": 0.195,
        "methods": {
            "grpo": {
                "held_out_solved_after": {"mean": 0.8, "std": 0.05},
                "reward_last_steps": {"mean": 1.8123, "std": 0.1},
                "kl_last_steps": {"mean": 0.002, "std": 0.0},
                "wall_seconds": {"mean": 600.4, "std": 20.2},
                "seconds_per_step_median": {"mean": 15.0, "std": 0.0},
                "peak_memory_mb": {"mean": 3500.0, "std": 0.0},
                "trainable_parameters": {"mean": 4_884_480.0, "std": 0.0},
                "resident_parameters": {"mean": 139_399_488.0, "std": 0.0},
            },
            "dpo": {key: nothing for key in ("held_out_solved_after", "reward_last_steps", "kl_last_steps")}
            | {"wall_seconds": {"mean": 100.0, "std": 0.0}}
            | {
                key: nothing
                for key in (
                    "seconds_per_step_median",
                    "peak_memory_mb",
                    "trainable_parameters",
                    "resident_parameters",
                )
            },
        },
    }
    lines = markdown_table(results).splitlines()
    assert lines[2] == (
        "| grpo | 19.5% | 80.0% ± 5.0% | 1.81 ± 0.1 | 0.002 | 600 ± 20 | 15 | 3500 | 4.88 M | 139.40 M |"
    )
    assert lines[3] == "| dpo | 19.5% | — | — | — | 100 | — | — | — | — |"
    assert "seeds 1, 2 (mean ± std over seeds)" in markdown_table(results)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": {}}, "unknown key 'method'"),
        ({"methods": []}, "methods must map each method's name to its settings"),
        ({"seeds": "1"}, "seeds must be a list of integers"),
        ({"methods": {"a": {"kind": "sft"}}}, "methods: a: kind must be train or dpo"),
        ({"methods": {"a": {"algorithm": "ppo2"}}}, "methods: a: algorithm must be one of"),
        ({"methods": {"d": {"kind": "dpo", "beta": 0}}}, "beta must be positive"),
        ({"common": {"learning_rat": 1}}, "common: unknown setting 'learning_rat'"),
    ],
)
def test_bad_comparison_files_are_one_line_errors_before_anything_runs(
    tiny_model, tmp_path, changes, message
):
    output = tmp_path / "out"
    config = write_comparison(tmp_path / "c.yaml", tiny_model, output, **changes)
    code, err = run(config)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not output.exists()


def test_every_run_gets_the_same_budget_model_and_seed(tiny_model, tmp_path):
    config = write_comparison(tmp_path / "c.yaml", tiny_model, tmp_path / "out", seeds=[3, 4])
    runs = plan(config).runs
    assert [(r.method, r.seed) for r in runs] == [(m, s) for m in ("grpo", "ppo", "dpo") for s in (3, 4)]
    for r in runs:
        assert r.settings["max_steps"] == 2 and r.settings["model_name_or_path"] == str(tiny_model)
        assert r.settings["dataset"] == "arithmetic" and r.directory.name == f"{r.method}-seed{r.seed}"


def test_plot_lines_take_a_colour_per_method_and_a_line_style_per_seed():
    def run_row(method: str, seed: int) -> dict:
        return {"method": method, "seed": seed, "curves": {"reward": [[1, 5.0, 0.5], [2, 9.0, 0.7]]}}

    results = {
        "seeds": [1, 2],
        "method_order": ["grpo", "ppo"],
        "methods": {},
        "runs": [run_row(m, s) for m in ("grpo", "ppo") for s in (1, 2)],
    }
    series, styles = plot_series(results, "reward", 1)
    assert [label for label, _, _ in series] == [
        "grpo (seed 1)",
        "grpo (seed 2)",
        "ppo (seed 1)",
        "ppo (seed 2)",
    ]
    assert series[0][1:] == ([5.0, 9.0], [0.5, 0.7]), "x is the training time, y the value"
    assert [(s["color"], s["linestyle"]) for s in styles] == [
        ("C0", "-"),
        ("C0", "--"),
        ("C1", "-"),
        ("C1", "--"),
    ]


def test_a_common_setting_leaves_out_the_methods_that_would_ignore_it(tiny_model, tmp_path):
    methods = {"clipped": {"num_iterations": 2}, "softmax": {"algorithm": "softmax_weighted"}}
    common = {"epsilon": 0.1}  # clips the ratio under num_iterations 2; softmax_weighted has no ratio
    config = write_comparison(
        tmp_path / "c.yaml", tiny_model, tmp_path / "out", methods=methods, common=common
    )
    settings = {r.method: r.settings for r in plan(config).runs}
    assert settings["clipped"]["epsilon"] == 0.1 and settings["softmax"]["epsilon"] == 0.2
    method_own = {"softmax": {"algorithm": "softmax_weighted", "epsilon": 0.1}}
    config = write_comparison(tmp_path / "d.yaml", tiny_model, tmp_path / "out", methods=method_own)
    code, err = run(config)
    assert code == 2 and "epsilon = 0.1 would be ignored" in err, "a method's own setting is never dropped"
    config = write_comparison(
        tmp_path / "e.yaml", tiny_model, tmp_path / "out", methods={"a": {}}, common=common
    )
    code, err = run(config)
    assert code == 2 and "common: epsilon = 0.1 would be ignored by every train method" in err, err
