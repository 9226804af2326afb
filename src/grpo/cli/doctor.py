"""`grpo doctor`: a `grpo train` run checked before it starts, without training it.

Train's settings and input checked as train checks them (grpo.cli.recipes); how a step divides into groups,
micro-batches, sampling rounds, processes and epochs; one step measured on the trainer the run would build
(grpo.train.preflight) for the time per step and the peak memory; and that step's groups scored, to say
whether GRPO has anything to learn from. Nothing is written into the output directory. Exit code 0: the run
looks able to learn; 1: at least :data:`ALIKE_LIMIT` of the groups score alike; 2: bad input (one line).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from grpo.agents.rollout import Agent
from grpo.cli.recipes import RunInputs, check_prompts, checked_inputs
from grpo.config.compatibility import check_processes
from grpo.config.grpo import GRPOConfig
from grpo.data.prompts import Row
from grpo.errors import ConfigError
from grpo.files import check_output_dir
from grpo.models.policy import load_policy
from grpo.runs.layout import default_output_dir
from grpo.train import preflight
from grpo.train.common import seed_everything
from grpo.train.distributed import Ranks, ranks_from_environment
from grpo.train.grpo import GRPOTrainer
from grpo.train.ppo import PPOTrainer
from grpo.train.preflight import LearningSignal, StepEstimate

ALIKE_LIMIT = 0.9  # this share of the groups scoring alike, or more: no learning signal to speak of (exit 1)
MOSTLY_TRUNCATED = 0.5  # this share of completions cut at max_completion_length: the limit is too short
# When no single reward explains it: each prompt's completions are too much alike, or all-or-nothing.
ALIKE_WITHIN_PROMPTS = "raise temperature or num_generations, or add a reward for partial success"
OK, NOTE, PROBLEM, MEASURED = "✓", "!", "✗", " "


def row(mark: str, label: str, text: str) -> str:
    """A line of the report: a mark (✓ fine, ! worth knowing, ✗ a problem, blank: measured), a label, text."""
    return f"{mark} {label:<10} {text}"


def run_doctor(config: GRPOConfig, console: Console) -> int:
    """Check the run ``config`` describes and print the report on stdout; return the exit code."""
    world_size = ranks_from_environment().world_size
    inputs = checked_inputs_untouched(config, world_size)
    console.print("grpo doctor: measuring one step on this machine…")
    estimate, steps_left = measure_a_step(config, inputs, console)
    signal = preflight.learning_signal(estimate.batch, [reward.name for reward in inputs.rewards])
    verdict, code = judge(signal, config)
    how = [config.algorithm, "LoRA" if config.use_lora else "full fine-tuning"]
    how += [f"from {inputs.resume_from}"] if inputs.resume_from is not None else []
    report = [
        f"grpo doctor: {config.model_name_or_path} on {config.dataset} ({', '.join(how)})",
        row(OK, "settings", "valid, as train checks them: every setting, the rows' reward columns, prompts"),
        batch_line(config),
        sampling_line(config),
        data_line(config, len(inputs.train_rows), world_size),
        held_out_line(config, inputs.eval_rows, estimate.held_out_per_row),
        *estimate_lines(estimate, steps_left),
        *signal_lines(signal, config),
        verdict,
    ]
    print("\n".join(report))
    return code


def checked_inputs_untouched(config: GRPOConfig, world_size: int) -> RunInputs:
    """The run's inputs checked as train checks them (grpo.cli.recipes.checked_inputs), its output directory
    too, but nothing created; bad input raises a GRPOError naming it."""
    check_processes(config, world_size)
    if config.fsdp:
        raise ConfigError("fsdp: grpo doctor measures one process holding the whole model; drop --fsdp")
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir("", config.dataset)
    check_output_dir(output_dir, create=False)
    return checked_inputs(config, output_dir)


def measure_a_step(config: GRPOConfig, inputs: RunInputs, console: Console) -> tuple[StepEstimate, int]:
    """Load the model and build the trainer as train does (its parts' files in a temporary directory), then
    measure the next step and a batch of held-out scoring on it (grpo.train.preflight); the estimate and the
    steps the run has left."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)  # as train does: the same adapters, so the run's own first groups
    models, tokenizer = load_policy(config, inputs.model_path)
    models.to(Ranks().device)
    agent = Agent.of_run(config, tokenizer)
    check_prompts(
        inputs.train_rows, tokenizer, config.max_prompt_length, config.dataset, inputs.model_path, agent
    )
    trainer_class = PPOTrainer if config.algorithm == "ppo" else GRPOTrainer
    with tempfile.TemporaryDirectory(prefix="grpo-doctor-") as scratch:
        trainer = trainer_class(
            config, models, tokenizer, inputs.rewards, inputs.train_rows, Path(scratch),
            notify=lambda message: console.print(message, markup=False, highlight=False),
        )  # fmt: skip
        if inputs.resume_from is not None:
            trainer.resume(inputs.resume_from)
        estimate = preflight.estimate_step(trainer, inputs.eval_rows)
        trainer.close()
    return estimate, config.max_steps - trainer.step


def batch_line(c: GRPOConfig) -> str:
    """How a step's completions divide into groups and micro-batches (validate refused what cannot)."""
    size, micro_batches = c.per_device_train_batch_size, c.gradient_accumulation_steps
    return row(
        OK,
        "batch",
        f"{size} × {micro_batches} = {c.generation_batch} completions a step: {c.prompts_per_step} prompts × "
        f"{c.num_generations}, in {micro_batches} micro-batches of {size}",
    )


def sampling_line(c: GRPOConfig) -> str:
    """How a step's completions are sampled: whole groups at a time, as the default backend does."""
    size, g = c.generation_batch_size, c.num_generations
    prompts_at_once = min(c.prompts_per_step, max(1, (size or c.generation_batch) // g))
    at_once = prompts_at_once * g
    if size is not None and size % g:
        text = f"generation_batch_size {size} is not a multiple of num_generations {g}: {at_once} at once"
        return row(PROBLEM, "sampling", text)
    rounds = math.ceil(c.prompts_per_step / prompts_at_once)
    if rounds == 1:
        return row(OK, "sampling", f"all {c.generation_batch} completions at once")
    last = (c.prompts_per_step - (rounds - 1) * prompts_at_once) * g
    tail = f", the last of {last}" if last != at_once else ""
    return row(OK, "sampling", f"{c.generation_batch} completions in {rounds} rounds of {at_once}{tail}")


def data_line(c: GRPOConfig, rows: int, world_size: int) -> str:
    """The prompts a step takes (every process's) against the training rows: epochs, rows left out."""
    per_step = c.prompts_per_step * world_size
    processes = f" ({world_size} processes × {c.prompts_per_step})" if world_size > 1 else ""
    if rows < per_step:
        text = f"{rows} rows, fewer than the {per_step} prompts a step takes{processes}: steps repeat rows"
        return row(PROBLEM, "data", text)
    per_epoch, left = divmod(rows, per_step)
    text = (
        f"{rows:,} rows, {per_step} prompts a step{processes}: {per_epoch:,} steps an epoch; "
        f"{c.max_steps} steps = {c.max_steps / per_epoch:.2g} epochs"
    )
    if not c.shuffle_dataset and c.max_steps <= per_epoch:
        return row(OK, "data", f"{text}; read in order: rows 1–{c.max_steps * per_step:,}")
    if not left:
        return row(OK, "data", text)
    if not c.shuffle_dataset:
        return row(PROBLEM, "data", f"{text}; the last {left} rows are never trained on (no shuffle_dataset)")
    return row(NOTE, "data", f"{text}; {left} rows left out of each epoch (others each epoch)")


def held_out_line(c: GRPOConfig, eval_rows: list[Row] | None, seconds_per_row: float | None) -> str:
    """What the held-out scoring covers and costs, and whether the reward-hacking check gets checks."""
    if eval_rows is None or seconds_per_row is None:
        return row(NOTE, "held-out", "none (a dataset file without eval_dataset): no score, no hacking check")
    count = len(eval_rows)
    checked = min(c.eval_check_samples or count, count)
    checks = (c.max_steps - 1) // c.eval_steps if c.eval_steps else 0  # at each multiple before the end
    scored = count * (1 + c.eval_on_start) + checks * checked
    cost = f"; ≈ {scored * seconds_per_row / 60:.1f} min for these {scored} rows"
    when = "before and after" if c.eval_on_start else "after (no eval_on_start)"
    if not checks:
        return row(NOTE, "held-out", f"{count} rows {when}; no check during training (eval_steps){cost}")
    return row(OK, "held-out", f"{count} rows {when}; the first {checked} every {c.eval_steps} steps{cost}")


def estimate_lines(e: StepEstimate, steps: int) -> list[str]:
    """The time a step takes and the peak memory, from the phases measured once, each with its sum
    (docs/doctor.md says how the phases are measured)."""
    rounds = f" ({e.batch.sampling_rounds} rounds)" if e.batch.sampling_rounds > 1 else ""
    total = f"≈ {e.step_seconds:.1f} s a step, {e.step_seconds * steps / 60:.1f} min for {steps} steps"
    parts = (
        f"= sampling {e.sampling:.2f} s{rounds} + log-probs without gradients {e.log_probs:.2f} s + "
        f"{e.num_iterations} × ({e.micro_batches} × {e.micro_batch:.2f} s forward+backward + "
        f"{e.update:.3f} s AdamW update)"
    )
    memory = (
        f"≈ {e.peak_mb:,.0f} MB peak = {e.measured_peak_mb:,.0f} MB measured + "
        f"{e.optimizer_state_mb:,.0f} MB of AdamW moments"
    )
    return [
        row(MEASURED, "time", f"{total} (held-out scoring apart)"),
        row(MEASURED, "", parts),
        row(MEASURED, "memory", memory),
    ]


def signal_lines(signal: LearningSignal, c: GRPOConfig) -> list[str]:
    """Each reward's range and mean over the sampled completions, the groups alike, the truncated share."""
    width = max(len(r.name) for r in signal.rewards)
    lines = []
    for number, r in enumerate(signal.rewards):
        failed = f"  ({r.failures} failed)" if r.failures else ""
        scores = f"{r.name:<{width}}  min {r.min:5.2f}  max {r.max:5.2f}  mean {r.mean:5.2f}{failed}"
        lines.append(row(MEASURED, "" if number else "rewards", scores))
    alike = f"{signal.alike} of {signal.groups} groups ({signal.alike / signal.groups:.0%})"
    lines.append(row(MEASURED, "alike", f"{alike} gave every completion the same total reward"))
    cut = signal.truncated / signal.completions
    text = f"{signal.truncated} of {signal.completions} completions ({cut:.0%}) cut at max_completion_length"
    lines.append(row(MEASURED, "truncated", f"{text} {c.max_completion_length}"))
    return lines


def judge(signal: LearningSignal, c: GRPOConfig) -> tuple[str, int]:
    """The verdict line and the exit code: 1 when at least ALIKE_LIMIT of the groups score alike."""
    advice = advise(signal, c)
    if signal.alike >= ALIKE_LIMIT * signal.groups:
        text = f"{signal.alike} of {signal.groups} groups score alike: GRPO will learn almost nothing; "
        return row(PROBLEM, "verdict", text + (advice or ALIKE_WITHIN_PROMPTS)), 1
    text = f"{signal.groups - signal.alike} of {signal.groups} groups carry a learning signal"
    if advice:
        return row(NOTE, "verdict", f"{text}; but {advice}"), 0
    return row(OK, "verdict", f"{text}: GRPO has something to learn from"), 0


def advise(signal: LearningSignal, c: GRPOConfig) -> str | None:
    """What to change for the likeliest cause of a weak signal seen in the sample; None if none stands out."""
    functions = [r for r in signal.rewards if r.name != "total"]
    fixed = [r for r in functions if r.constant and r.max != 0]
    if fixed:  # a reward that pays alike whatever is written: most likely a mistake in it
        return f"{fixed[0].name} gave {fixed[0].max:g} to every completion: it cannot tell them apart"
    if signal.truncated >= MOSTLY_TRUNCATED * signal.completions:
        return f"most completions are cut at max_completion_length {c.max_completion_length}: raise it"
    never_earned = [r.name for r in functions if r.constant]
    if never_earned:
        return (
            f"{', '.join(never_earned)} gave 0 to every completion: add a reward the model can partly earn "
            "(such as format) or a worked example to the prompt"
        )
    return None
