"""`grpo pipeline CONFIG.yaml`: the stages of an RLHF run, SFT → reward model → GRPO, each feeding the next.

The file names the stages to run (any subset, always in that order) with each stage's own settings, the
same names as its command's flags::

    output_dir: runs/pipeline        # each stage writes into its own folder here: sft/, reward_model/, grpo/
    model: smollm2-135m-instruct     # where the first stage starts
    sft: {dataset: arithmetic, max_steps: 40}
    reward_model: {dataset: arithmetic, max_steps: 40}
    grpo: {max_steps: 20, reward_funcs: [accuracy, format]}

What flows between stages: the SFT model is the policy (and so the reference) of GRPO and the base that the
reward model is trained from, as in InstructGPT; the reward model becomes a ``reward_model`` reward of
GRPO: it fills in a ``{name: reward_model}`` entry that names no model, or is added to the reward functions
when none is there (with weight 1 when ``reward_weights`` are given). A stage's ``model_name_or_path`` set in
the file wins over what would flow into it.

Every stage's settings are checked before the first stage starts. A finished stage leaves a record of its
settings and of the runs of the stages it used; running the same file again skips it, so a pipeline
stopped at any point continues with the stage it was in (GRPO from its last checkpoint). A finished stage
whose settings or inputs have changed since is an error rather than a silent rerun over its results.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from grpo.config.grpo import DEFAULT_MODEL, GRPOConfig
from grpo.config.loading import field_defaults, load_config, load_settings, read_yaml, to_dict
from grpo.config.stages import RewardModelConfig, SFTConfig
from grpo.errors import ConfigError, RunFilesError
from grpo.files import check_output_dir, write_json_atomic
from grpo.runs.layout import FINAL_MODEL, SUMMARY_FILE, default_output_dir
from grpo.runs.resume import resumed_base

STAGES = ("sft", "reward_model", "grpo")


STAGE_RECORD = "pipeline_stage.json"  # written into a stage's folder once the stage has finished


@dataclass(frozen=True)
class Stage:
    name: str
    directory: Path
    config: SFTConfig | RewardModelConfig | GRPOConfig
    inputs: tuple[str, ...]  # the earlier stages whose models this one uses

    @property
    def final_model(self) -> Path:
        return self.directory / FINAL_MODEL


def plan(path: str | Path) -> list[Stage]:
    """The stages ``path`` asks for, with every setting checked and every stage's inputs wired in."""
    data = read_yaml(path)
    unknown = sorted(set(data) - {"output_dir", "model", *STAGES})
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}; a pipeline has output_dir, model and the stages "
            f"{', '.join(STAGES)}"
        )
    asked = [name for name in STAGES if name in data]
    if not asked:
        raise ConfigError(f"{path}: names no stage; give one or more of {', '.join(STAGES)}")
    root = Path(str(data.get("output_dir") or default_output_dir("pipeline", "", fallback="")))
    start = str(data.get("model") or DEFAULT_MODEL)
    sections = {}
    for name in asked:
        section = data[name] if data[name] is not None else {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {name} must be a mapping of that stage's settings")
        section = {str(key).replace("-", "_"): value for key, value in section.items()}
        if "output_dir" in section:
            raise ConfigError(f"{path}: {name}: output_dir is the pipeline's ({root}/{name}); set output_dir")
        sections[name] = section

    stages: list[Stage] = []
    policy, policy_from = start, ()

    def settings(name: str, model: str) -> dict[str, Any]:
        section = sections[name]
        if "model_name_or_path" not in section and "model" not in section:
            section = {**section, "model_name_or_path": model}
        return {**section, "output_dir": str(root / name)}

    if "sft" in sections:
        config = load_settings(SFTConfig, None, settings("sft", policy), source=f"{path}: sft")
        stages.append(Stage("sft", root / "sft", config, ()))
        policy, policy_from = str(root / "sft" / FINAL_MODEL), ("sft",)
    if "reward_model" in sections:
        values = settings("reward_model", policy)
        config = load_settings(RewardModelConfig, None, values, source=f"{path}: reward_model")
        uses = policy_from if config.model_name_or_path == policy else ()
        stages.append(Stage("reward_model", root / "reward_model", config, uses))
    if "grpo" in sections:
        config = load_config(None, settings("grpo", policy), source=f"{path}: grpo", base=resumed_base)
        uses = policy_from if config.model_name_or_path == policy else ()
        if "reward_model" in sections:
            scored = with_reward_model(config, str(root / "reward_model" / FINAL_MODEL))
            uses = (*uses, "reward_model") if scored != config else uses
            config = scored
        stages.append(Stage("grpo", root / "grpo", config, uses))
    return stages


def with_reward_model(config: GRPOConfig, model: str) -> GRPOConfig:
    """``config`` scoring with the reward model at ``model``: filling in a reward_model entry that names no
    model, or added as one more reward function."""
    entries = list(config.reward_funcs)
    weights = config.reward_weights
    slots = [
        i
        for i, entry in enumerate(entries)
        if entry == "reward_model" or (isinstance(entry, dict) and entry["name"] == "reward_model")
    ]
    unfilled = [i for i in slots if not isinstance(entries[i], dict) or "model" not in entries[i]]
    for i in unfilled:
        entry = entries[i]
        entries[i] = {**(entry if isinstance(entry, dict) else {"name": "reward_model"}), "model": model}
    if not slots:
        entries.append({"name": "reward_model", "model": model})
        weights = None if weights is None else [*weights, 1.0]
    return dataclasses.replace(config, reward_funcs=entries, reward_weights=weights)


def settings_of(stage: Stage) -> dict[str, Any]:
    """The stage's settings as plain JSON data, as its record keeps them."""
    return json.loads(json.dumps(to_dict(stage.config)))  # (without secrets: a judge's api_key)


def record_of(stage: Stage, finished: dict[str, Stage]) -> dict[str, Any]:
    """What a finished stage is known by: its settings and the runs of the stages it used (each finished
    stage's record carries a fresh id, so a stage that ran again is a new input even with equal results)."""
    inputs = {name: (saved_record(finished[name]) or {}).get("run") for name in stage.inputs}
    return {"settings": settings_of(stage), "inputs": inputs}


def saved_record(stage: Stage) -> dict[str, Any] | None:
    """The record a finished stage left in its folder (None: not finished, or the record is damaged)."""
    try:
        return json.loads((stage.directory / STAGE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def changed_setting(stage: Stage, saved: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """The first setting that ``stage`` finished with and would now run with otherwise, said as an error
    would say it. GRPO's settings that a run can continue under (a larger max_steps, …) do not count."""
    from grpo.cli.recipes import RESUMABLE_CHANGES

    # A setting the record does not name did not exist yet: that stage ran with its default.
    defaults = json.loads(json.dumps(field_defaults(type(stage.config))))
    before = defaults | saved.get("settings", {})
    ignored = RESUMABLE_CHANGES if stage.name == "grpo" else frozenset()
    changed = [name for name in settings if name not in ignored and before.get(name) != settings[name]]
    return (
        f"{changed[0]}: {before.get(changed[0])!r} there, {settings[changed[0]]!r} now" if changed else None
    )


def finished_summary(stage: Stage) -> dict[str, Any]:
    """The summary.json of a stage that finished earlier; a missing or damaged one is a RunFilesError."""
    path = stage.directory / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = "missing" if isinstance(error, FileNotFoundError) else f"damaged, {type(error).__name__}"
        raise RunFilesError(
            f"{path}: {reason}; remove {stage.directory} to run the {stage.name} stage again"
        ) from None
    if not isinstance(summary, dict):
        raise RunFilesError(f"{path}: damaged (not a JSON object); remove {stage.directory} to run it again")
    return summary


def refuse_changed(stage: Stage, what: str) -> ConfigError:
    return ConfigError(
        f"{stage.directory}: the {stage.name} stage finished with other inputs ({what}); remove that folder "
        "to run it again, or choose another output_dir"
    )


def run_stage(stage: Stage, console: Console) -> dict[str, Any]:
    if stage.name == "sft":
        from grpo.train.sft import run_sft

        return run_sft(stage.config, console)  # type: ignore[arg-type]
    if stage.name == "reward_model":
        from grpo.train.reward_model import run_reward_model

        return run_reward_model(stage.config, console)  # type: ignore[arg-type]
    from grpo.cli.recipes import run_training

    return run_training(stage.config, console)  # type: ignore[arg-type]


def run_pipeline(path: str | Path, console: Console) -> dict[str, Any]:
    """Run the stages of the pipeline file ``path`` that have not finished yet; returns every stage's
    summary, also written to ``output_dir/pipeline.json``."""
    started = time.perf_counter()
    stages = plan(path)
    root = stages[0].directory.parent
    # A finished stage whose settings have changed stops the pipeline before anything runs.
    for stage in stages:
        saved = saved_record(stage)
        if saved is not None:
            what = changed_setting(stage, saved, settings_of(stage))
            if what is not None:
                raise refuse_changed(stage, what)
    check_output_dir(root, f"{path}: output_dir")
    finished: dict[str, Stage] = {}
    summaries: dict[str, Any] = {}
    for number, stage in enumerate(stages, start=1):
        record = record_of(stage, finished)
        header = f"[bold]pipeline[/] stage {number}/{len(stages)}: {stage.name}"
        saved = saved_record(stage)
        if saved is not None and {key: saved.get(key) for key in record} == record:
            console.print(f"{header}: finished earlier, in {stage.directory}")
            summaries[stage.name] = finished_summary(stage)
        elif saved is not None and saved.get("inputs") != record["inputs"]:
            raise refuse_changed(stage, "the stages it used have run again since")
        else:  # not started, stopped part-way (GRPO continues from its checkpoint), or longer now
            console.print(f"{header} → {stage.directory}")
            summaries[stage.name] = run_stage(stage, console)
            write_json_atomic(stage.directory / STAGE_RECORD, {**record, "run": uuid.uuid4().hex})
        finished[stage.name] = stage
    result = {
        "output_dir": str(root),
        "stages": [stage.name for stage in stages],
        "wall_seconds": round(time.perf_counter() - started, 1),
        **summaries,
    }
    write_json_atomic(root / "pipeline.json", result)
    console.print(f"pipeline files: {root}")
    return result
