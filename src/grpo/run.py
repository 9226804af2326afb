"""Recipes behind the CLI: a whole training run and a standalone evaluation, with their files."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from grpo import distributed, sharding
from grpo.checkpoint import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE,
    latest_checkpoint,
    load_weights,
    read_trainer_state,
)
from grpo.config import GRPOConfig, field_defaults, to_dict
from grpo.data import Row, load_rows, render_prompt
from grpo.errors import CheckpointError, ConfigError, DataError, ModelError, RunFailed
from grpo.eval import evaluate
from grpo.files import remove_leftovers, write_json_atomic, write_text_atomic
from grpo.generation import DefaultBackend
from grpo.models import (
    load_causal_lm,
    load_policy,
    load_tokenizer,
    parameter_counts,
    pick_dtype,
    refuse_pickled_weights,
    resolve_model,
    save_final_model,
    wrap_lora,
)
from grpo.report import report_line
from grpo.rewards import Reward, RewardSpec, build_rewards
from grpo.tasks import DEFAULT_EVAL_SPLIT, TASKS
from grpo.trainer import METRICS_FILE, GRPOTrainer

FINAL_MODEL = "final_model"


def default_output_dir(config: GRPOConfig) -> Path:
    name = Path(config.dataset).stem or "run"
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def check_prompts(rows: list[Row], tokenizer: Any, limit: int, where: str, model: str) -> None:
    """Every prompt renders with this tokenizer and fits in ``limit`` tokens; else name the row."""
    for number, row in enumerate(rows, start=1):
        try:
            text = render_prompt(row["prompt"], tokenizer)
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
        "save_total_limit",
        "eval_steps",
        "eval_on_start",
        "eval_max_samples",
        "eval_dataset",
        "num_threads",
        "output_dir",
        "resume_from_checkpoint",
        "max_nonfinite_updates",
        "log_completions",
        "report_to",
    }
)


@contextmanager
def step_progress(
    console: Console, total: int, completed: int = 0, info: str = ""
) -> Iterator[Callable[..., None]]:
    """A bar of steps on a terminal, a line per logged step in a log file: yields ``show(step, info,
    log_line=True)``, which moves the bar to ``step`` and, in a log file, writes ``info`` as a line."""
    columns = (
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("steps", total=total, completed=completed, info=info)

        def show(step: int, info: str, log_line: bool = True) -> None:
            progress.update(task, completed=step, info=info)
            if log_line and not console.is_terminal:
                console.print(f"step {step}/{total}  {info}")

        yield show


def apply_update(
    optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float, loss: float, step: int
) -> tuple[float, float]:
    """The supervised stages' optimizer update (SFT, reward model, DPO): clip the accumulated gradient, stop
    the run on a non-finite loss or gradient, step the optimizer and the schedule. Returns the gradient norm
    and the learning rate the update used."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise RunFailed(
            f"step {step}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; "
            "lower learning_rate"
        )
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, learning_rate


def checkpoint_to_resume(config: GRPOConfig, output_dir: Path) -> Path | None:
    """The checkpoint this run continues from: the one asked for, or the newest in its output directory
    when that holds a run with the same settings (a different run there is an error, not overwritten)."""
    if config.resume_from_checkpoint:
        checkpoint = latest_checkpoint(Path(config.resume_from_checkpoint))
        if checkpoint is None:
            raise CheckpointError(f"{config.resume_from_checkpoint}: no checkpoint to resume from")
        return checkpoint
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return None
    # A setting the checkpoint does not name did not exist yet: that run had its default.
    saved = field_defaults(GRPOConfig) | (read_trainer_state(checkpoint).get("config") or {})
    current = to_dict(config)
    changed = [name for name in current if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]]
    if changed:
        name = changed[0]
        raise ConfigError(
            f"{output_dir}: holds {checkpoint.name} of a run with other settings ({name}: "
            f"{saved.get(name)!r} there, {current[name]!r} now); continue it with --resume {output_dir} "
            "(its settings, yours on top) or choose another --output-dir"
        )
    return checkpoint


def run_training(config: GRPOConfig, console: Console) -> dict[str, Any]:
    """A whole GRPO (or PPO, RLOO, …) run, in this process or as one rank of ``torchrun``/``accelerate
    launch`` (grpo.distributed): every rank trains, the first one writes the run's files and prints."""
    ranks = distributed.ranks_from_environment()
    if ranks.distributed:
        if config.algorithm == "ppo":
            raise ConfigError("algorithm: ppo runs in one process only (its critic is not synchronised)")
    elif config.fsdp:
        raise ConfigError(
            "fsdp: shards the model across processes: launch with torchrun --nproc-per-node N (N ≥ 2)"
        )
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
    # Everything that can be wrong with the input is checked before anything is written.
    train_rows = load_rows(config.dataset, "train")
    eval_rows = eval_rows_for(config)
    rewards = build_rewards(config.reward_funcs, config.reward_weights)
    check_reward_columns(train_rows, rewards, config.dataset)
    if eval_rows is not None:
        check_reward_columns(eval_rows, rewards, config.eval_dataset or config.dataset)
    model_path = resolve_model(config.model_name_or_path)
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    if ranks.distributed and not config.output_dir:
        output_dir = Path(ranks.gather(str(output_dir))[0])  # rank 0's time stamp
    if ranks.is_main:
        remove_leftovers(output_dir)
    ranks.barrier()
    resume_from = checkpoint_to_resume(config, output_dir)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)

    models, tokenizer = load_policy(config, model_path)
    models.to(ranks.device)
    check_prompts(train_rows, tokenizer, config.max_prompt_length, config.dataset, model_path)
    policy = models.policy
    ranks.broadcast_(p for p in policy.parameters() if p.requires_grad)  # one initialisation for all
    eval_backend = None
    if config.fsdp:
        if resume_from is not None:
            load_weights(resume_from, policy)  # a checkpoint holds whole weights: before sharding
        sharding.shard(policy, ranks)
        if models.reference_model is not None:
            sharding.shard(models.reference_model, ranks)
        eval_backend = DefaultBackend(policy, fused=False, keep_going=ranks.any)
    config = dataclasses.replace(config, output_dir=str(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None and ranks.is_main:
        for stale in [
            output_dir / METRICS_FILE,
            *output_dir.glob("eval_*.json"),
            output_dir / "summary.json",
        ]:
            stale.unlink(missing_ok=True)  # files of an earlier attempt that never reached a checkpoint
    if ranks.is_main:
        write_text_atomic(output_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    ranks.barrier()
    verb = f"continuing from {resume_from}" if resume_from else "training"
    console.print(f"[bold]grpo[/] {verb}: {config.model_name_or_path} on {config.dataset} → {output_dir}")
    if ranks.distributed:
        console.print(
            f"{ranks.world_size} processes × {config.prompts_per_step} prompts per step "
            f"= {ranks.world_size * config.prompts_per_step} prompts × {config.num_generations} completions"
        )

    def held_out(tag: str) -> dict[str, float] | None:
        # Every rank evaluates (greedy, so alike), the first one writes.
        if eval_rows is None:
            return None
        summary, records = evaluate(
            policy,
            tokenizer,
            eval_rows,
            rewards,
            max_completion_length=config.max_completion_length,
            max_prompt_length=config.max_prompt_length,
            backend=eval_backend,
        )
        if ranks.is_main:
            write_json_atomic(output_dir / f"eval_{tag}.json", {"summary": summary, "rows": records})
        console.print(f"held-out ({tag}): solved {summary['solved']:.1%} of {len(records)}")
        return summary

    evaluated_before = (output_dir / "eval_before.json").is_file()
    ranks.barrier()  # every rank has looked before the first one writes it
    if config.eval_on_start and not evaluated_before:
        held_out("before")
    trainer_class = GRPOTrainer
    if config.algorithm == "ppo":
        from grpo.ppo import PPOTrainer

        trainer_class = PPOTrainer
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
                held_out(f"step{step}")

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
    write_json_atomic(output_dir / "summary.json", summary)
    console.print(report_line(output_dir), markup=False, highlight=False)
    console.print(f"run files: {output_dir}")
    before = summary["held_out_solved_before"]
    if before is not None and after:
        console.print(
            f"held-out solved (right answer in the asked format): {before:.1%} → {after['solved']:.1%}"
        )
    return summary


def whole_model(config: GRPOConfig, model_path: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded policy (with its adapters under LoRA) holding ``state``, on the CPU."""
    model = load_causal_lm(model_path, pick_dtype(config.dtype))
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
        (int(path.stem.removeprefix("eval_step")), path)
        for path in output_dir.glob("eval_step*.json")
        if path.stem.removeprefix("eval_step").isdigit()
    )
    before = scores(output_dir / "eval_before.json")
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
    }


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()


def eval_weights(model: str) -> Path | None:
    """The directory whose weights `grpo eval --model` means: a run directory's final_model, or the newest
    checkpoint of a run that has not finished; a model or checkpoint directory itself; None for a name
    (the default model, a Hub id) or a ``.gguf`` file, which :func:`resolve_model` handles."""
    path = Path(model)
    if not path.is_dir():
        return None
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    if (path / FINAL_MODEL / "config.json").is_file():
        return path / FINAL_MODEL
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None:
        return checkpoint
    raise ModelError(
        f"{path}: not a model, run or checkpoint directory (no config.json, adapter_config.json, "
        f"{FINAL_MODEL}/ or {CHECKPOINT_PREFIX}N/)"
    )


def training_base_model(checkpoint: Path) -> str:
    """The model a checkpoint's run started from, as its trainer_state.json records it."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        base = state["config"]["model_name_or_path"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"{checkpoint / TRAINER_STATE}: damaged (no config.model_name_or_path)"
        ) from None
    return resolve_model(base)


def load_for_eval(model: str) -> tuple[torch.nn.Module, Any, str]:
    """The model `grpo eval --model` names, its tokenizer, and where the weights came from.

    ``model`` is a model directory, a `grpo train` run directory (its final_model; the newest checkpoint
    while the run has not finished), a checkpoint, a ``.gguf`` file or a name. A LoRA checkpoint holds
    adapters: they go on the base model their adapter_config.json names. A full fine-tuning checkpoint
    holds the whole model (config.json and safetensors weights) but no tokenizer: that comes from the model
    the run started from, as its trainer_state.json says.
    """
    path = eval_weights(model)
    if path is None:
        resolved = resolve_model(model)
        return load_causal_lm(resolved, pick_dtype("auto")), load_tokenizer(resolved), resolved
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        refuse_pickled_weights(path, "adapter_model")
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ModelError(f"{path}/adapter_config.json: damaged (not a JSON object)") from None
        if not base:
            raise ModelError(f"{path}: adapter_config.json names no base model")
        base = resolve_model(base)
        tokenizer = load_tokenizer(str(path) if has_tokenizer(path) else base)
        try:
            policy = PeftModel.from_pretrained(load_causal_lm(base, pick_dtype("auto")), path)
        except (OSError, ValueError) as error:
            raise ModelError(f"{path}: cannot load the adapters ({error})") from None
        return policy, tokenizer, str(path)
    resolved = resolve_model(str(path))
    if has_tokenizer(path) or not (path / TRAINER_STATE).is_file():
        tokenizer_source = resolved
    else:
        tokenizer_source = training_base_model(path)
    return load_causal_lm(resolved, pick_dtype("auto")), load_tokenizer(tokenizer_source), resolved


def eval_output_files(output: Path) -> tuple[Path, Path | None]:
    """Where `grpo eval --output` writes: ``results.jsonl`` gets a line per row and ``results.summary.json``
    beside it; ``results.json`` gets one file with both (the format of a run's eval_*.json)."""
    suffix = output.suffix.lower()
    if suffix == ".jsonl":
        return output, output.with_name(f"{output.stem}.summary.json")
    if suffix == ".json":
        return output, None
    raise ConfigError(
        f"--output {output}: must end in .jsonl (a line per row, with a .summary.json beside it) or .json "
        "(one file)"
    )


def run_eval(
    model: str,
    dataset: str,
    split: str,
    reward_funcs: list[RewardSpec],
    *,
    reward_weights: list[float] | None = None,
    num_samples: int,
    temperature: float,
    top_p: float = 1.0,
    ks: list[int] | None = None,
    max_completion_length: int,
    max_samples: int,
    output: Path | None,
    seed: int,
) -> dict[str, Any]:
    """Score ``model`` on a dataset split and write the results to ``output`` (see
    :func:`eval_output_files`); return the summary. Bad input fails before the model loads."""
    rows_file, summary_file = eval_output_files(output) if output is not None else (None, None)
    rows = load_rows(dataset, split)
    rows = rows[:max_samples] if max_samples else rows
    rewards = build_rewards(reward_funcs, reward_weights)
    check_reward_columns(rows, rewards, dataset)
    seed_everything(seed)
    policy, tokenizer, weights = load_for_eval(model)
    summary, records = evaluate(
        policy,
        tokenizer,
        rows,
        rewards,
        max_completion_length=max_completion_length,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        ks=ks or (),
    )
    if rows_file is None:
        return summary
    about = {
        "model": model,
        "weights": weights,
        "dataset": dataset,
        "split": split,
        "rewards": [reward.name for reward in rewards],
        "num_samples": num_samples,
        "greedy": num_samples == 1,
        "temperature": temperature,
        "top_p": top_p,
        "max_completion_length": max_completion_length,
        "seed": seed,
    }
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    if summary_file is None:
        write_json_atomic(rows_file, {**about, "summary": summary, "rows": records})
    else:
        write_text_atomic(rows_file, "".join(json.dumps(record) + "\n" for record in records))
        write_json_atomic(summary_file, {**about, "rows_file": rows_file.name, "summary": summary})
    return summary
