"""Recipes behind the CLI: a whole training run and a standalone evaluation, with their files."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from grpo.agents.rollout import Agent, check_agent_inputs
from grpo.config.compatibility import check_processes
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import field_defaults, read_yaml, to_dict
from grpo.data.prompts import Row, load_rows, render_prompt
from grpo.data.tasks import DEFAULT_EVAL_SPLIT, TASKS
from grpo.errors import CheckpointError, ConfigError, DataError
from grpo.files import check_output_dir, remove_leftovers, write_json_atomic, write_text_atomic
from grpo.models.checkpoint import (
    check_weight_dtypes,
    latest_checkpoint,
    load_weights,
    read_trainer_state,
)
from grpo.models.loading import (
    load_causal_lm,
    parameter_counts,
    pick_dtype,
    resolve_model,
    save_final_model,
    weight_dtypes,
    wrap_lora,
)
from grpo.models.policy import load_policy
from grpo.rewards import Reward, build_rewards
from grpo.rewards.core import reward_code_files
from grpo.rollout.backends import DefaultBackend
from grpo.runs.eval import evaluate
from grpo.runs.layout import (
    CONFIG_FILE,
    EVAL_BEFORE_FILE,
    EVAL_GLOB,
    EVAL_STEP_GLOB,
    EVAL_STEP_PREFIX,
    FINAL_MODEL,
    METRICS_FILE,
    SUMMARY_FILE,
    default_output_dir,
    eval_file,
)
from grpo.runs.report import report_line
from grpo.runs.resume import check_reward_files, is_run_directory, record_reward_files
from grpo.train import distributed, sharding
from grpo.train.common import peak_memory_mb, seed_everything, step_progress
from grpo.train.grpo import GRPOTrainer
from grpo.train.ppo import PPOTrainer


def eval_rows_for(config: GRPOConfig) -> list[Row] | None:
    if config.eval_dataset is not None:
        rows = load_rows(config.eval_dataset, DEFAULT_EVAL_SPLIT)
    elif config.dataset in TASKS:
        rows = load_rows(config.dataset, DEFAULT_EVAL_SPLIT)
    else:
        return None
    return rows[: config.eval_max_samples] if config.eval_max_samples else rows


def check_reward_columns(rows: list[Row], rewards: list[Reward], where: str) -> None:
    """Every row has the columns the reward functions declare they read; say which row lacks one."""
    for reward in rewards:
        for column in reward.required_columns:
            for number, row in enumerate(rows, start=1):
                if row.get(column) is None:
                    raise DataError(
                        f"{where}: row {number}: missing field {column!r} (the {reward.name} reward needs it)"
                    )


def check_prompts(
    rows: list[Row], tokenizer: Any, limit: int, where: str, model: str, agent: Agent | None = None
) -> None:
    """Every prompt renders with this tokenizer and fits in ``limit`` tokens; else name the row. With an
    ``agent`` (the run's tools or environment), the prompts are rendered as its episodes start."""
    for number, row in enumerate(rows, start=1):
        try:
            text = agent.prompt_text(row) if agent else render_prompt(row["prompt"], tokenizer)
        except DataError as error:
            raise DataError(f"{where}: row {number}: {error} ({model})") from None
        length = len(tokenizer(text, add_special_tokens=False).input_ids)
        if length > limit:
            raise DataError(
                f"{where}: row {number}: the prompt has {length} tokens, "
                f"more than max_prompt_length = {limit}"
            )


# Settings that may differ when a run continues from its checkpoint: they change what is logged, saved or
# scored, or how long the run goes on, not what any step computes.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "logging_steps",
        "save_steps",
        "save_minutes",
        "save_total_limit",
        "eval_steps",
        "eval_on_start",
        "eval_max_samples",
        "eval_check_samples",
        "eval_dataset",
        "num_threads",
        "output_dir",
        "resume_from_checkpoint",
        "max_nonfinite_updates",
        "log_completions",
        "report_to",
    }
)


def checkpoint_to_resume(config: GRPOConfig, output_dir: Path) -> Path | None:
    """The checkpoint this run continues from: the one asked for, or the newest in its output directory
    when that holds a run with the same settings (a different run there is an error, not overwritten).
    None when the run starts from step 0, a run directory asked for that has no checkpoint yet included."""
    if config.resume_from_checkpoint:
        asked = Path(config.resume_from_checkpoint)
        checkpoint = latest_checkpoint(asked)
        if checkpoint is not None:
            return checkpoint
        if not is_run_directory(asked):
            raise CheckpointError(f"{asked}: no checkpoint to resume from")
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        recorded = read_trainer_state(checkpoint).get("config") or {}
    elif is_run_directory(output_dir):  # a run that started here and has no checkpoint yet
        recorded = read_yaml(output_dir / CONFIG_FILE)
    else:
        return None
    # A setting the run does not name did not exist yet: that run had its default.
    saved, current = field_defaults(GRPOConfig) | recorded, to_dict(config)
    # (dtype is compared as this machine resolves it, once the model is loaded: check_weight_dtypes)
    same = RESUMABLE_CHANGES | {"dtype"}
    changed = [name for name in current if name not in same and saved.get(name) != current[name]]
    if changed:
        name = changed[0]
        difference = f"{name}: {saved.get(name)!r} there, {current[name]!r} now"
        if checkpoint is None:  # (starting it again with other settings would overwrite it)
            raise ConfigError(
                f"{output_dir}: holds a run with other settings and no checkpoint yet ({difference}); start "
                "it again with its own settings or choose another --output-dir"
            )
        raise ConfigError(
            f"{output_dir}: holds {checkpoint.name} of a run with other settings ({difference}); continue it "
            f"with --resume {output_dir} (its settings, yours on top) or choose another --output-dir"
        )
    return checkpoint


@dataclass(frozen=True)
class RunInputs:
    """What a run reads before its model, checked."""

    train_rows: list[Row]
    eval_rows: list[Row] | None
    rewards: list[Reward]
    model_path: str
    resume_from: Path | None  # the checkpoint the run continues from


def code_entries(config: GRPOConfig) -> list[Any]:
    """The entries whose code decides what a run optimises: its rewards, tools and environment."""
    return [*config.reward_funcs, *config.tools, *([config.environment] if config.environment else [])]


def checked_inputs(config: GRPOConfig, output_dir: Path) -> RunInputs:
    """The run's rows, rewards, model and checkpoint, everything that can be wrong with the input checked
    before anything is written or the model loads (`grpo train` and `grpo doctor`); a GRPOError names it."""
    train_rows = load_rows(config.dataset, "train")
    eval_rows = eval_rows_for(config)
    resume_from = checkpoint_to_resume(config, output_dir)
    # The reward code a run started with is the code it goes on with, from a checkpoint or from step 0
    # (checked before the files are imported, so that a file that is gone is named as such).
    check_reward_files(resume_from.parent if resume_from else output_dir, code_entries(config))
    if config.acts:
        datasets = [(config.dataset, train_rows), (config.eval_dataset or config.dataset, eval_rows or [])]
        check_agent_inputs(config.tools, config.environment, datasets)
    rewards = build_rewards(config.reward_funcs, config.reward_weights)
    check_reward_columns(train_rows, rewards, config.dataset)
    if eval_rows is not None:
        check_reward_columns(eval_rows, rewards, config.eval_dataset or config.dataset)
    return RunInputs(train_rows, eval_rows, rewards, resolve_model(config.model_name_or_path), resume_from)


def run_training(config: GRPOConfig, console: Console) -> dict[str, Any]:
    """A whole GRPO (or PPO, RLOO, …) run, in this process or as one rank of ``torchrun``/``accelerate
    launch`` (grpo.train.distributed): every rank trains, the first one writes the run's files and prints."""
    ranks = distributed.ranks_from_environment()
    check_processes(config, ranks.world_size)
    if ranks.distributed:
        distributed.init(ranks)
        if not ranks.is_main:
            console = Console(quiet=True)
    try:
        return _run_training(config, console, ranks)
    finally:
        distributed.shutdown()


def _run_training(config: GRPOConfig, console: Console, ranks: distributed.Ranks) -> dict[str, Any]:
    started = time.perf_counter()
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir("", config.dataset)
    if ranks.distributed and not config.output_dir:
        output_dir = Path(ranks.gather(str(output_dir))[0])  # rank 0's time stamp
    if ranks.is_main:
        remove_leftovers(output_dir)
    ranks.barrier()
    inputs = checked_inputs(config, output_dir)
    train_rows, eval_rows, rewards = inputs.train_rows, inputs.eval_rows, inputs.rewards
    model_path, resume_from = inputs.model_path, inputs.resume_from
    check_output_dir(output_dir)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)

    models, tokenizer = load_policy(config, model_path)
    if resume_from is not None:
        check_weight_dtypes(resume_from, models.policy)  # before this run writes anything
    models.to(ranks.device)
    agent = Agent.of_run(config, tokenizer)  # (checked here, and what the held-out scoring samples with)
    check_prompts(train_rows, tokenizer, config.max_prompt_length, config.dataset, model_path, agent)
    policy = models.policy
    ranks.broadcast_(p for p in policy.parameters() if p.requires_grad)  # one initialisation for all
    eval_backend = None
    if config.fsdp:
        if resume_from is not None:
            load_weights(resume_from, policy)  # a checkpoint holds whole weights: before sharding
        sharding.shard(policy, ranks)
        if models.reference_model is not None:
            sharding.shard(models.reference_model, ranks)
        eval_backend = DefaultBackend(policy, keep_going=ranks.any)
    config = dataclasses.replace(config, output_dir=str(output_dir))
    if resume_from is None and ranks.is_main:
        for stale in [
            output_dir / METRICS_FILE,
            *output_dir.glob(EVAL_GLOB),
            output_dir / SUMMARY_FILE,
        ]:
            stale.unlink(missing_ok=True)  # files of an earlier attempt that never reached a checkpoint
    if ranks.is_main:
        write_text_atomic(output_dir / CONFIG_FILE, yaml.safe_dump(to_dict(config), sort_keys=False))
        record_reward_files(output_dir, reward_code_files(code_entries(config)))  # as checked, if resumed
    ranks.barrier()
    if resume_from is None and config.resume_from_checkpoint:
        console.print(
            f"{config.resume_from_checkpoint} has no checkpoint yet: starting from step 0 "
            "(the run is seeded, so the result is the same)"
        )
    verb = f"continuing from {resume_from}" if resume_from else "training"
    weights = f"{config.model_name_or_path} ({weight_dtypes(policy)})"
    console.print(f"[bold]grpo[/] {verb}: {weights} on {config.dataset} → {output_dir}")
    if ranks.distributed:
        console.print(
            f"{ranks.world_size} processes × {config.prompts_per_step} prompts per step "
            f"= {ranks.world_size * config.prompts_per_step} prompts × {config.num_generations} completions"
        )

    def held_out(tag: str, limit: int = 0) -> dict[str, float] | None:
        # Every rank evaluates (greedy, so alike), the first one writes. ``limit``: the first rows only.
        if eval_rows is None:
            return None
        summary, records = evaluate(
            policy,
            tokenizer,
            eval_rows[:limit] if limit else eval_rows,
            rewards,
            max_completion_length=config.max_completion_length,
            max_prompt_length=config.max_prompt_length,
            backend=eval_backend,
            agent=agent,
        )
        if ranks.is_main:
            write_json_atomic(output_dir / eval_file(tag), {"summary": summary, "rows": records})
        console.print(f"held-out ({tag}): solved {summary['solved']:.1%} of {len(records)}")
        return summary

    evaluated_before = (output_dir / EVAL_BEFORE_FILE).is_file()
    ranks.barrier()  # every rank has looked before the first one writes it
    if config.eval_on_start and not evaluated_before:
        held_out("before")
    trainer_class = PPOTrainer if config.algorithm == "ppo" else GRPOTrainer
    trainer = trainer_class(
        config,
        models,
        tokenizer,
        rewards,
        train_rows,
        output_dir,
        notify=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
        ranks=ranks,
    )
    if resume_from is not None:
        trainer.resume(resume_from)
    with step_progress(console, config.max_steps, trainer.step, "sampling…") as show:

        def report(step: int, metrics: dict[str, float]) -> None:
            info = (
                f"reward {metrics['reward']:.2f}  kl {metrics.get('kl', 0.0):.4f}  "
                f"{metrics['step_time']:.1f}s/step"
            )
            show(step, info, log_line=step % config.logging_steps == 0)
            if config.eval_steps and step % config.eval_steps == 0 and step < config.max_steps:
                held_out(f"step{step}", config.eval_check_samples)

        history = trainer.train(progress=report)
    after = held_out("after")
    final = policy
    if config.fsdp:  # a whole copy, from the shards gathered on the first rank
        state = sharding.full_state(policy)
        if ranks.is_main:
            final = whole_model(config, model_path, state)
    if not ranks.is_main:
        return {}
    save_final_model(final, tokenizer, output_dir / FINAL_MODEL)
    summary = run_summary(output_dir, history, after)
    # What the method holds: the policy, a frozen reference copy (full fine-tuning), PPO's value head.
    summary |= parameter_counts(policy, models.reference_model, getattr(trainer, "value_head", None))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    console.print(report_line(output_dir), markup=False, highlight=False)
    console.print(f"run files: {output_dir}")
    before = summary["held_out_solved_before"]
    if before is not None and after:
        console.print(
            f"held-out solved (right answer in the asked format): {before:.1%} → {after['solved']:.1%}"
        )
        for subset, (subset_before, subset_after) in summary["held_out_subsets"].items():
            was = f"{subset_before:.1%}" if subset_before is not None else "–"
            console.print(f"  {subset}: {was} → {subset_after:.1%}", markup=False, highlight=False)
    return summary


def whole_model(config: GRPOConfig, model_path: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded policy (with its adapters under LoRA) holding ``state``, on the CPU."""
    model = load_causal_lm(model_path, pick_dtype(config.dtype, trained=not config.use_lora))
    if config.use_lora:
        model = wrap_lora(model, config)
    model.load_state_dict(state)
    return model


def run_summary(
    output_dir: Path, history: list[dict[str, float]], after: dict[str, float] | None
) -> dict[str, Any]:
    """The run's headline figures, from its logged metrics and evaluation files (so that a resumed run
    reports the whole run, not only its last part)."""

    def scores(path: Path) -> dict[str, float] | None:
        return json.loads(path.read_text())["summary"] if path.is_file() else None

    last_step = int(history[-1]["step"]) if history else 0
    during = sorted(
        (int(path.stem.removeprefix(EVAL_STEP_PREFIX)), path)
        for path in output_dir.glob(EVAL_STEP_GLOB)
        if path.stem.removeprefix(EVAL_STEP_PREFIX).isdigit()
    )
    before = scores(output_dir / EVAL_BEFORE_FILE)
    step_times = [m["step_time"] for m in history]
    window = max(1, min(5, len(history) // 4))
    return {
        "output_dir": str(output_dir),
        "final_model": str(output_dir / FINAL_MODEL),
        "steps": last_step,
        "seconds_per_step_median": statistics.median(step_times) if step_times else None,
        "peak_memory_mb": round(peak_memory_mb()),
        "reward_first_steps": statistics.mean(m["reward"] for m in history[:window]) if history else None,
        "reward_last_steps": statistics.mean(m["reward"] for m in history[-window:]) if history else None,
        "kl_last_steps": statistics.mean(m.get("kl", 0.0) for m in history[-window:]) if history else None,
        "held_out_solved_before": before["solved"] if before else None,
        "held_out_solved_after": after["solved"] if after else None,
        "held_out_during": [{"step": step, **scores(path)} for step, path in during if step <= last_step],
        # each subset of the held-out rows (a "subset" column), before → after
        "held_out_subsets": {
            key.removeprefix("solved/"): [(before or {}).get(key), value]
            for key, value in (after or {}).items()
            if key.startswith("solved/")
        },
    }
