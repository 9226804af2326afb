"""`grpo compare CONFIG.yaml`: several methods trained on the same task, model, seeds and step budget, then
scored on the same held-out questions, side by side.

The file::

    output_dir: runs/compare
    model: smollm2-135m-instruct
    dataset: arithmetic          # a built-in task: its prompts, and for DPO its preference pairs
    seeds: [1, 2]                # every method runs once per seed; the table gives mean ± std
    max_steps: 20                # the budget: optimizer steps per run
    eval_max_samples: 100        # held-out questions scored before, during (eval_steps) and after
    eval_steps: 5
    common: {learning_rate: 2e-4}    # `grpo train` settings every train method shares
    methods:
      grpo: {}
      ppo: {algorithm: ppo}
      dr_grpo: {loss_type: dr_grpo, scale_rewards: none}
      dpo: {kind: dpo, beta: 0.1}    # `grpo dpo` settings; kind: dpo trains offline on the task's pairs

Each run is its own process (`grpo train` or `grpo dpo` on a settings file written into its folder), so
that its peak memory is its own; its output goes to ``log.txt`` beside. A key given in the file (a judge's
``api_key``) reaches each process through its environment, so that no file written holds it. A finished
run (its summary written, its settings unchanged) is not run again, and a stopped `grpo train` run
continues from its checkpoint, so running the comparison again finishes it. The base model is scored
once, with `grpo eval`, on the held-out questions every method is scored on; so is each DPO model when
trained (train methods score themselves). The results: ``comparison.json`` (every number),
``comparison.md`` (the table), plots of reward and held-out score against step and against training time
(``*.svg``) and ``report.html`` with all of it. A common setting that a method would ignore (see
grpo.config.compatibility) is left out of that method's run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from grpo.config.compatibility import ignored_settings
from grpo.config.grpo import ALIASES, DEFAULT_MODEL, GRPOConfig
from grpo.config.loading import (
    load_config,
    load_settings,
    merge_layers,
    read_yaml,
    secrets_by_environment,
    to_dict,
    without_secrets,
)
from grpo.config.stages import DPOConfig
from grpo.errors import ConfigError, RunFailed, RunFilesError
from grpo.files import check_output_dir, write_json_atomic, write_text_atomic
from grpo.runs.layout import (
    EVAL_AFTER_FILE,
    EVAL_STEP_GLOB,
    EVAL_STEP_PREFIX,
    FINAL_MODEL,
    METRICS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    default_output_dir,
)
from grpo.runs.page import esc, fmt, html_page, html_table, pct
from grpo.runs.plots import plot_svg
from grpo.runs.resume import resumed_base

KEYS = ("output_dir", "model", "dataset", "seeds", "max_steps", "eval_max_samples", "eval_steps", "common")


SETTINGS_FILE = "settings.yaml"


LOG_FILE = "log.txt"


BASE_EVAL = "base_eval.json"


@dataclass(frozen=True)
class Run:
    method: str
    kind: str  # "train" or "dpo"
    seed: int
    directory: Path
    settings: dict[str, Any]  # the run's settings, validated, as its settings file holds them
    # The secrets its settings name by environment variable (see secrets_by_environment): never written.
    environment: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        """Whether the run has its summary and ran with these settings (a damaged settings file: no)."""
        path = self.directory / SETTINGS_FILE
        if not (self.directory / SUMMARY_FILE).is_file() or not path.is_file():
            return False
        try:
            return yaml.safe_load(path.read_text(encoding="utf-8")) == self.settings
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False  # (run again: its settings file is rewritten first)


@dataclass(frozen=True)
class Plan:
    root: Path
    model: str
    dataset: str
    eval_max_samples: int
    max_completion_length: int
    reward_funcs: list[Any]  # as the eval file holds them: secrets named by environment variable
    runs: list[Run]
    environment: dict[str, str] = field(default_factory=dict, repr=False, compare=False)


def acting(values: dict[str, Any], own: dict[str, Any], source: str) -> dict[str, Any]:
    """A train method's settings: the comparison's where they act under it (a common epsilon does nothing
    for softmax_weighted, which would refuse it), and the method's ``own`` always."""
    candidate = GRPOConfig(**merge_layers(GRPOConfig, None, values, ALIASES, source))
    ignored = set(ignored_settings(candidate)) - set(own)
    return {key: value for key, value in values.items() if key not in ignored}


def plan(path: str | Path) -> Plan:
    """Every run the comparison file asks for, each run's settings checked before anything runs."""
    data = read_yaml(path)
    unknown = sorted(set(data) - {*KEYS, "methods"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a comparison has {', '.join(KEYS)}, methods")
    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: methods must map each method's name to its settings")
    seeds = data.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    common = data.get("common") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: common must be a mapping of `grpo train` settings")
    root = Path(str(data.get("output_dir") or default_output_dir("compare", "", fallback="")))
    model = str(data.get("model") or DEFAULT_MODEL)
    dataset = str(data.get("dataset") or "arithmetic")
    shared = {"model_name_or_path": model, "dataset": dataset, "max_steps": data.get("max_steps", 20)}
    held_out = {
        "eval_max_samples": data.get("eval_max_samples", 100),
        "eval_steps": data.get("eval_steps", 0),
        "eval_check_samples": 0,  # the checks during training score the same rows as before and after
    }

    runs = []
    values, source = {**shared, **held_out, **common}, f"{path}: common"
    reference = load_config(None, acting(values, {}, source), source=source, base=resumed_base)
    eval_rewards, eval_environment = secrets_by_environment(reference.reward_funcs, f"{path}: common")
    unused_common = set(common)  # the common settings that no train method's run would act on, so far
    for name, method in methods.items():
        if not isinstance(method, dict | None):
            raise ConfigError(f"{path}: methods: {name} must be a mapping of its settings")
        method = dict(method or {})
        kind = method.pop("kind", "train")
        if kind not in ("train", "dpo"):
            raise ConfigError(f"{path}: methods: {name}: kind must be train or dpo, got {kind!r}")
        for seed in seeds:
            directory = root / f"{name}-seed{seed}"
            source = f"{path}: methods: {name}"
            given = {**shared, "seed": seed, "output_dir": str(directory)}
            environment: dict[str, str] = {}
            if kind == "train":
                values = {**given, **held_out, "eval_on_start": False, **common, **method}
                values = acting(values, method, source)
                unused_common -= values.keys()
                config = load_config(None, values, source=source, base=resumed_base)
                entries, environment = secrets_by_environment(config.reward_funcs, source)
                settings = to_dict(dataclasses.replace(config, reward_funcs=entries))
            else:
                settings = to_dict(load_settings(DPOConfig, None, {**given, **method}, source=source))
            settings = json.loads(json.dumps(settings))
            runs.append(Run(str(name), kind, seed, directory, settings, environment))
    if unused_common and any(run.kind == "train" for run in runs):  # (silently ignored otherwise)
        name = sorted(unused_common)[0]
        raise ConfigError(f"{path}: common: {name} = {common[name]!r} would be ignored by every train method")
    return Plan(
        root,
        model,
        dataset,
        int(reference.eval_max_samples),
        reference.max_completion_length,
        eval_rewards,
        runs,
        eval_environment,
    )


# --- running ----------------------------------------------------------------------------------------------
def run_command(
    command: list[str], log: Path, what: str, console: Console, environment: dict[str, str]
) -> None:
    """Run a `grpo` command in its own process, with ``environment`` added to this one's and its output
    into ``log``; a failure stops the comparison."""
    with open(log, "a", encoding="utf-8") as out:
        code = subprocess.run(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **environment},
            check=False,
        ).returncode
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise RunFailed(f"{what} failed (exit code {code}): {tail[0]} — the whole output is in {log}")
    console.print(f"  done: {what}")


def grpo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo", *args]


def evaluate_model(plan_: Plan, model: str, output: Path, log: Path, console: Console) -> None:
    """Score ``model`` on the comparison's held-out questions with the train methods' reward functions."""
    rewards = plan_.root / "rewards.yaml"
    write_text_atomic(rewards, yaml.safe_dump(without_secrets({"reward_funcs": plan_.reward_funcs})))
    command = grpo_command(
        "eval",
        "--model",
        model,
        "--dataset",
        plan_.dataset,
        "--config",
        str(rewards),
        "--max-samples",
        str(plan_.eval_max_samples),
        "--max-completion-length",
        str(plan_.max_completion_length),
        "--output",
        str(output),
    )
    run_command(command, log, f"held-out score of {model}", console, plan_.environment)


def run_comparison(path: str | Path, console: Console) -> dict[str, Any]:
    """Train and score every run of the comparison that has not finished yet; write and return the results."""
    started = time.perf_counter()
    plan_ = plan(path)
    check_output_dir(plan_.root, f"{path}: output_dir")
    console.print(
        f"[bold]grpo compare[/]: {len(plan_.runs)} runs of {plan_.model} on {plan_.dataset} → {plan_.root}"
    )
    if not (plan_.root / BASE_EVAL).is_file():
        evaluate_model(plan_, plan_.model, plan_.root / BASE_EVAL, plan_.root / LOG_FILE, console)
    for number, run in enumerate(plan_.runs, start=1):
        label = f"{run.method} (seed {run.seed})"
        if run.finished:
            console.print(f"run {number}/{len(plan_.runs)}: {label}: finished earlier")
            continue
        console.print(f"run {number}/{len(plan_.runs)}: {label} → {run.directory}")
        check_output_dir(run.directory, f"{path}: methods: {run.method}: output_dir")
        (run.directory / SUMMARY_FILE).unlink(missing_ok=True)  # a summary of other settings
        write_text_atomic(run.directory / SETTINGS_FILE, yaml.safe_dump(run.settings, sort_keys=False))
        command = "train" if run.kind == "train" else "dpo"
        args = grpo_command(command, "--config", str(run.directory / SETTINGS_FILE))
        run_command(args, run.directory / LOG_FILE, f"grpo {command} for {label}", console, run.environment)
        if run.kind == "dpo":
            final_model = str(run.directory / FINAL_MODEL)
            output = run.directory / EVAL_AFTER_FILE
            evaluate_model(plan_, final_model, output, run.directory / LOG_FILE, console)
    results = collect(plan_)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(plan_.root / "comparison.json", results)
    write_text_atomic(plan_.root / "comparison.md", markdown_table(results))
    write_plots(plan_.root, results)
    write_comparison_report(plan_.root, results)
    console.print(markdown_table(results), markup=False, highlight=False)
    console.print(f"comparison files: {plan_.root}")
    return results


# --- the results ------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    """A run's JSON file (None when missing); a damaged one is a RunFilesError naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise damaged(path, error) from None


def damaged(path: Path, error: Exception) -> RunFilesError:
    """The one-line error for a run's file that cannot be read, and how to get past it."""
    return RunFilesError(
        f"{path}: damaged ({type(error).__name__}); remove it, or that run's folder to run it again"
    )


def held_out_solved(path: Path) -> float | None:
    data = read_json(path)
    if data is None:
        return None
    try:
        return float(data["summary"]["solved"])
    except (KeyError, TypeError, ValueError) as error:
        raise damaged(path, error) from None


def curves(run: Run, base_solved: float | None) -> dict[str, list[list[float]]]:
    """(step, training seconds, value) points of the run's reward and held-out score."""
    lines = []
    metrics = run.directory / METRICS_FILE
    if metrics.is_file():
        try:
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise damaged(metrics, error) from None
    elapsed, clock = 0.0, {0: 0.0}
    for line in lines:
        elapsed += float(line.get("step_time", 0.0))
        clock[int(line["step"])] = elapsed
    reward = [[line["step"], clock[int(line["step"])], line["reward"]] for line in lines if "reward" in line]
    solved = [[0.0, 0.0, base_solved]] if base_solved is not None else []
    for path in sorted(run.directory.glob(EVAL_STEP_GLOB)):
        step = int(path.stem.removeprefix(EVAL_STEP_PREFIX))
        solved.append([float(step), clock.get(step, math.nan), held_out_solved(path)])
    after = held_out_solved(run.directory / EVAL_AFTER_FILE)
    if after is not None:
        last = max(clock) if len(clock) > 1 else float(run.settings.get("max_steps", 0))
        solved.append([float(last), clock.get(int(last), math.nan), after])
    return {"reward": reward, "held_out_solved": solved}


ROW_FIELDS = (
    ("held_out_solved_after", "held-out solved after"),
    ("reward_last_steps", "reward (last steps)"),
    ("kl_last_steps", "KL (last steps)"),
    ("wall_seconds", "wall time (s)"),
    ("seconds_per_step_median", "s/step"),
    ("peak_memory_mb", "peak memory (MB)"),
    ("trainable_parameters", "trainable params"),
    ("resident_parameters", "resident params"),
)


def collect(plan_: Plan) -> dict[str, Any]:
    """Every run's figures and curves, and per method the mean and spread over seeds."""
    base = held_out_solved(plan_.root / BASE_EVAL)
    runs = []
    for run in plan_.runs:
        summary = read_json(run.directory / SUMMARY_FILE) or {}
        if run.kind == "dpo":
            summary = {**summary, "held_out_solved_after": held_out_solved(run.directory / EVAL_AFTER_FILE)}
        row = {"method": run.method, "kind": run.kind, "seed": run.seed, "held_out_solved_before": base}
        row |= {key: summary.get(key) for key, _ in ROW_FIELDS}
        row["curves"] = curves(run, base)
        runs.append(row)
    methods = {}
    for name in dict.fromkeys(run.method for run in plan_.runs):
        mine = [row for row in runs if row["method"] == name]
        methods[name] = {key: spread([row[key] for row in mine]) for key, _ in ROW_FIELDS}
    return {
        "model": plan_.model,
        "dataset": plan_.dataset,
        "held_out_questions": plan_.eval_max_samples,
        "held_out_solved_before": base,
        "seeds": sorted({run.seed for run in plan_.runs}),
        "method_order": list(methods),  # as the file lists them (the JSON file sorts its keys)
        "methods": methods,
        "runs": runs,
    }


def spread(values: list[Any]) -> dict[str, float | None]:
    """Mean and sample standard deviation of the values that exist (std 0 for one value)."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(numbers), "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0}


def cell(value: dict[str, float | None], key: str) -> str:
    mean, std = value["mean"], value["std"]
    if mean is None:
        return "—"
    if key == "held_out_solved_after":
        text = f"{mean:.1%}"
        return text + (f" ± {std:.1%}" if std else "")
    if key in ("trainable_parameters", "resident_parameters"):
        return f"{mean / 1e6:.2f} M"
    if key in ("peak_memory_mb", "wall_seconds"):
        return f"{mean:.0f}" + (f" ± {std:.0f}" if std else "")
    return f"{mean:.3g}" + (f" ± {std:.2g}" if std else "")


def markdown_table(results: dict[str, Any]) -> str:
    before = results["held_out_solved_before"]
    header = ["method", "held-out solved before", *(label for _, label in ROW_FIELDS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, figures in results["methods"].items():
        first = "—" if before is None else f"{before:.1%}"
        lines.append("| " + " | ".join([name, first, *(cell(figures[k], k) for k, _ in ROW_FIELDS)]) + " |")
    seeds = ", ".join(str(seed) for seed in results["seeds"])
    note = (
        f"\n{results['model']} on {results['dataset']}, seeds {seeds} (mean ± std over seeds); held-out: "
        f"greedy, {results['held_out_questions']} questions, right answer in the asked format.\n"
    )
    return "\n".join(lines) + "\n" + note


SEED_LINES = ("-", "--", ":", "-.")


def plot_series(
    results: dict[str, Any], curve: str, axis: int
) -> tuple[list[tuple[str, list[float], list[float]]], list[dict[str, Any]]]:
    """One line per run, x the step (axis 0) or training seconds (axis 1), and each line's style: a colour
    per method, a line style per seed."""
    methods = results.get("method_order") or list(results["methods"])
    seeds = results["seeds"]
    series, styles = [], []
    for row in results["runs"]:
        points = [p for p in row["curves"][curve] if p[2] is not None and math.isfinite(p[axis])]
        if points:
            label = row["method"] if len(seeds) == 1 else f"{row['method']} (seed {row['seed']})"
            series.append((label, [p[axis] for p in points], [p[2] for p in points]))
            styles.append(
                {
                    "color": f"C{methods.index(row['method']) % 10}",
                    "linestyle": SEED_LINES[seeds.index(row["seed"]) % len(SEED_LINES)],
                    "linewidth": 1.6,
                }
            )
    return series, styles


PLOTS = (
    ("reward-step", "reward", 0, "mean reward of the sampled groups", "step"),
    ("reward-time", "reward", 1, "mean reward of the sampled groups", "training seconds"),
    ("held-out-step", "held_out_solved", 0, "held-out solved", "step"),
    ("held-out-time", "held_out_solved", 1, "held-out solved", "training seconds"),
)


# --- the plots and report.html ----------------------------------------------------------------------------
def write_plots(root: Path, results: dict[str, Any]) -> None:
    for name, curve, axis, ylabel, xlabel in PLOTS:
        series, styles = plot_series(results, curve, axis)
        if series:
            held_out = curve == "held_out_solved"
            svg = plot_svg(name, series, ylabel, markers=held_out, xlabel=xlabel, styles=styles)
            write_text_atomic(root / f"{name}.svg", svg)


def write_comparison_report(directory: Path, results: dict[str, Any]) -> Path:
    """report.html of a comparison: its table, its plots (the ``*.svg`` files `grpo compare` wrote beside
    it) and every run's own figures."""
    before = results.get("held_out_solved_before")
    header = ["method", "held-out solved before", *(label for _, label in ROW_FIELDS)]
    rows = [
        [esc(name), pct(before), *(esc(cell(figures[key], key)) for key, _ in ROW_FIELDS)]
        for name, figures in results["methods"].items()
    ]
    seeds = ", ".join(str(seed) for seed in results["seeds"])
    table = html_table(header, rows, "summary") + (
        f'<p class="muted">Mean ± std over seeds {esc(seeds)}; held-out: greedy, '
        f"{esc(results['held_out_questions'])} questions, right answer in the asked format.</p>"
    )
    plots = "\n".join(
        f'<figure class="plot">{(directory / f"{name}.svg").read_text(encoding="utf-8")}</figure>'
        for name, *_ in PLOTS
        if (directory / f"{name}.svg").is_file()
    )
    run_rows = [
        [esc(run["method"]), esc(run["seed"]), *(fmt(run.get(key)) for key, _ in ROW_FIELDS)]
        for run in results["runs"]
    ]
    runs = html_table(["method", "seed", *(label for _, label in ROW_FIELDS)], run_rows, "config")
    sections = [("table", "Comparison", table), ("plots", "Curves", plots), ("runs", "Runs", runs)]
    subtitle = f"{results['model']} · {results['dataset']} · {len(results['methods'])} methods"
    page = html_page(f"grpo compare · {directory.name}", "grpo compare", directory.name, subtitle, sections)
    path = directory / REPORT_FILE
    write_text_atomic(path, page)
    return path
