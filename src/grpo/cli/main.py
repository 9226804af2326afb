"""The `grpo` command: `grpo train`, `grpo doctor` (a train run checked before it starts), `grpo eval`,
`grpo report`, and the other stages (`sft`, `reward-model`, `dpo`, `pipeline`).

Every field of :class:`grpo.config.grpo.GRPOConfig` is a flag of `grpo train` (``--learning-rate 1e-4``), and
every field of a stage's settings class a flag of its command (:func:`settings_command`), made from the
dataclass's fields and their docstrings so that the flags and their help can never drift from the config.
Bad input ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from grpo.config.grpo import ALIASES, GRPOConfig
from grpo.config.loading import field_defaults, field_docs, load_config, load_settings, switches
from grpo.config.stages import STAGE_ALIASES, DPOConfig, RewardModelConfig, SFTConfig
from grpo.errors import ConfigError, GRPOError, RunInterrupted
from grpo.runs.resume import resumed_base

try:  # recent typer releases carry their own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # typer on the PyPI click
    from click import exceptions as click_errors


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Group Relative Policy Optimization.")


console = Console(stderr=True, soft_wrap=True)  # a log file gets whole lines: paths stay whole


def exits_cleanly_on_bad_input(func: Callable) -> Callable:
    """Bad input (and a diverged run) ends with one line and its exit code; a run stopped by a signal
    says where its checkpoint is and exits with 128 + the signal's number, as a shell expects."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GRPOError as error:
            # One line, whatever a library's message held (some carry newlines).
            print("error: " + " ".join(str(error).split()), file=sys.stderr)
            raise typer.Exit(error.exit_code) from None
        except RunInterrupted as stopped:
            print(str(stopped), file=sys.stderr)
            raise typer.Exit(stopped.exit_code) from None

    return wrapper


def settings_parameters(cls: type, aliases: dict[str, str]) -> list[inspect.Parameter]:
    """``--config`` and one option per field of the settings dataclass ``cls``, as the keyword parameters
    typer makes options of: the field's name in kebab case (and its alias, from ``aliases``), ``--x/--no-x``
    for a true/false field, the field's docstring as its help and its default shown. Every option defaults
    to None, "not given"; a value arrives as the text typed (the settings loader converts it)."""
    alias_of = {field: f"--{alias}" for alias, field in aliases.items()}
    docs, defaults, flags = field_docs(cls), field_defaults(cls), switches(cls)
    help_text = "A YAML file of settings; flags override it."
    params = [
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Path | None,
            default=typer.Option(None, "--config", help=help_text),
        )
    ]
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if name in flags:
            names, annotation = [f"{flag}/--no-{flag[2:]}"], bool | None
        else:
            names, annotation = [flag, *([alias_of[name]] if name in alias_of else [])], str | None
        # (escaped: typer renders help as rich markup, where "[float | None]" would be a tag)
        option = typer.Option(None, *names, help=escape(docs[name]), show_default=str(default))
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)
        )
    return params


def settings_command(
    name: str, cls: type, load: Callable[[Path | None, dict[str, Any]], Any], aliases: dict[str, str]
) -> Callable[[Callable], Callable]:
    """Make the decorated function the command `grpo NAME`, with the options of ``settings_parameters(cls,
    aliases)``; it receives ``load(config_file, the options given)``. Bad input ends the command with one
    line (exits_cleanly_on_bad_input)."""

    def register(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def command(**given: Any) -> Any:
            config_file = given.pop("config_file")
            return run(load(config_file, {key: value for key, value in given.items() if value is not None}))

        # typer's public way to declare a command's options is its callback's signature (typer 0.2x carries
        # a click of its own without click.Option to build them by hand), so `command`, which takes any
        # keywords, declares the ones it takes.
        command.__signature__ = inspect.Signature(settings_parameters(cls, aliases))  # type: ignore[attr-defined]
        app.command(name, help=inspect.getdoc(run))(exits_cleanly_on_bad_input(command))
        return run

    return register


def load_train_config(config_file: Path | None, flags: dict[str, Any]) -> GRPOConfig:
    """`grpo train`'s settings; a run that resumes has its checkpoint's settings under the file and flags."""
    return load_config(config_file, flags, base=resumed_base)


def load_stage_settings(cls: type) -> Callable[[Path | None, dict[str, Any]], Any]:
    return lambda config_file, flags: load_settings(cls, config_file, flags)


@settings_command("train", GRPOConfig, load_train_config, ALIASES)
def train(config: GRPOConfig) -> None:
    """Train a policy with GRPO and score it on the held-out split before and after."""
    from grpo.cli.recipes import run_training

    summary = run_training(config, console)
    if summary:  # (the other ranks of a distributed run return none: the first one reports)
        print(json.dumps(summary, indent=1))


@settings_command("doctor", GRPOConfig, load_train_config, ALIASES)
def doctor(config: GRPOConfig) -> None:
    """Check a `grpo train` run without training: its settings and data, how the batch divides, one step's
    time and peak memory measured here, and whether the sampled groups carry a learning signal (exit 1
    when almost all of them score alike; see docs/doctor.md). Writes nothing into output_dir."""
    from grpo.cli.doctor import run_doctor

    raise typer.Exit(run_doctor(config, console))


@settings_command("sft", SFTConfig, load_stage_settings(SFTConfig), STAGE_ALIASES)
def sft(config: SFTConfig) -> None:
    """Supervised fine-tuning on prompt/completion or chat rows; its final_model is a policy for train."""
    from grpo.train.sft import run_sft

    print(json.dumps(run_sft(config, console), indent=1))


@settings_command("reward-model", RewardModelConfig, load_stage_settings(RewardModelConfig), STAGE_ALIASES)
def reward_model(config: RewardModelConfig) -> None:
    """Train a reward model on preference pairs (Bradley-Terry); its final_model is a reward for train."""
    from grpo.train.reward_model import run_reward_model

    print(json.dumps(run_reward_model(config, console), indent=1))


@settings_command("dpo", DPOConfig, load_stage_settings(DPOConfig), STAGE_ALIASES)
def dpo(config: DPOConfig) -> None:
    """Direct Preference Optimization on preference pairs, offline: no sampling, no reward function."""
    from grpo.train.dpo import run_dpo

    print(json.dumps(run_dpo(config, console), indent=1))


@app.command()
@exits_cleanly_on_bad_input
def pipeline(
    config_file: Annotated[
        Path, typer.Argument(help="A YAML file: output_dir, model, and the stages sft, reward_model, grpo.")
    ],
) -> None:
    """Run SFT → reward model → GRPO (any subset), each stage's model feeding the next; resumable."""
    from grpo.cli.pipeline import run_pipeline

    print(json.dumps(run_pipeline(config_file, console), indent=1))


@app.command()
@exits_cleanly_on_bad_input
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory of `grpo train` (finished or not).")],
) -> None:
    """Rebuild a run's report.html (diagnostics, plots, samples, settings) from its files; prints its path."""
    from grpo.runs.report import write_report

    print(write_report(run_dir))


def parse_ks(text: str | None, num_samples: int) -> list[int]:
    """``--k 1,4,8`` as [1, 4, 8]: whole numbers from 1 to ``num_samples``, or a one-line error."""
    if text is None:
        return []
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--k takes whole numbers separated by commas, such as 1,4,8; got {text!r}"
        ) from None
    for k in ks:
        if not 1 <= k <= num_samples:
            raise ConfigError(
                f"--k {k}: each k must be from 1 to --num-samples ({num_samples}), the samples drawn per row"
            )
    return ks


@app.command()
@exits_cleanly_on_bad_input
def compare(
    config_file: Annotated[
        Path,
        typer.Argument(help="A YAML file: model, dataset, seeds, max_steps, common settings, methods."),
    ],
) -> None:
    """Train several methods on the same task, model, seeds and budget; table, plots and report.html."""
    from grpo.runs.compare import run_comparison

    run_comparison(config_file, console)


@app.command("eval")
@exits_cleanly_on_bad_input
def evaluate_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="A model directory, a run directory (its final_model), a checkpoint (LoRA or full), a "
            ".gguf file, or a name.",
        ),
    ],
    dataset: Annotated[
        str, typer.Option(help="A built-in task (arithmetic, gsm8k), a dataset file, or a `datasets` name.")
    ] = "arithmetic",
    split: Annotated[str, typer.Option(help="The split of a built-in task or `datasets` dataset.")] = "test",
    reward_funcs: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated reward functions (default: the --config file's, else accuracy,format)."
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", help="A run's YAML config: its reward_funcs (kinds with options too) and weights."
        ),
    ] = None,
    num_samples: Annotated[
        int, typer.Option(help="1 = greedy; n > 1 = n samples per row, with pass@k and maj@k.")
    ] = 1,
    k: Annotated[
        str | None,
        typer.Option(
            "--k",
            help="More k for pass@k and maj@k, comma-separated (1,4,8), each at most --num-samples; "
            "k = 1 and k = --num-samples are always reported.",
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature when num_samples > 1.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: the top-p share of probability.")] = 1.0,
    max_completion_length: Annotated[
        int | None,
        typer.Option(
            help="Longest completion, in tokens (default: 256 on gsm8k; with tools or an environment, the "
            "run's or task's, else 256 for a whole trajectory; else 32).",
            show_default=False,
        ),
    ] = None,
    max_samples: Annotated[int, typer.Option(help="Score at most this many rows (0 = all).")] = 0,
    output: Annotated[
        Path | None,
        typer.Option(
            help="results.jsonl: one JSON line per row (prompt, answer, completions, scores, solved, "
            "answers, voted) and results.summary.json beside it; results.json: one file with both."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 42,
    tools: Annotated[
        str | None,
        typer.Option(
            help="Tools for multi-turn episodes, comma-separated path/to/file.py:function or module:function "
            "entries (default: the run's, the --config file's or the agent task's; \"\" for none).",
            show_default=False,
        ),
    ] = None,
    environment: Annotated[
        str | None,
        typer.Option(
            help="An environment class for multi-turn episodes, path/to/file.py:Class or module:Class "
            "(default: the run's, the --config file's or the agent task's; none for none).",
            show_default=False,
        ),
    ] = None,
    max_turns: Annotated[
        int | None,
        typer.Option(
            help="Assistant turns an episode may take (default: the run's or task's, else 4).",
            show_default=False,
        ),
    ] = None,
    tool_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a tool call may take, 0 for no limit (default: the run's or task's, else 10).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Score a model on a dataset with reward functions: solved rate, per-function means, pass@k, maj@k;
    with tools or an environment, on multi-turn episodes (turns, tool calls, well-formed calls)."""
    from grpo.cli.evaluate import default_completion_length, eval_agent_settings, run_eval

    if num_samples < 1:
        raise GRPOError(f"num_samples must be at least 1, got {num_samples}")
    ks = parse_ks(k, num_samples)
    if num_samples > 1 and not temperature > 0:
        raise ConfigError(f"--temperature must be positive to draw {num_samples} samples, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be above 0 and at most 1, got {top_p}")
    rewards: list[Any] = ["accuracy", "format"]
    weights, config = None, None
    if config_file is not None:
        config = load_config(config_file, base=resumed_base)
        rewards, weights = config.reward_funcs, config.reward_weights
    if reward_funcs is not None:
        rewards, weights = reward_funcs.split(","), None
    agent = eval_agent_settings(
        model,
        dataset,
        config,
        tools=tools,
        environment=environment,
        max_turns=max_turns,
        tool_timeout=tool_timeout,
    )
    if max_completion_length is None:
        max_completion_length = default_completion_length(dataset, agent)
    if max_completion_length < 1:
        raise ConfigError(f"--max-completion-length must be at least 1, got {max_completion_length}")
    summary = run_eval(
        model,
        dataset,
        split,
        rewards,
        reward_weights=weights,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        ks=ks,
        max_completion_length=max_completion_length,
        max_samples=max_samples,
        output=output,
        seed=seed,
        agent=agent,
    )
    if output is not None:
        console.print(f"results: {output}")
    print(json.dumps(summary, indent=1))


def quiet_libraries() -> None:
    """Keep the terminal for grpo's own progress: no per-file loading bars or deprecation chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def main() -> None:
    """The `grpo` command. A flag that does not exist or a value its type refuses ends, as all bad input
    does, with one line and exit code 2 (click's own usage box would take six)."""
    quiet_libraries()
    try:
        code = app(prog_name="grpo", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as shown:
        shown.show()  # `grpo` alone: the help
        raise SystemExit(2) from None
    except click_errors.UsageError as error:
        command = error.ctx.command_path if error.ctx is not None else "grpo"
        message = " ".join(error.format_message().split())
        print(f"error: {command}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except typer.Abort:  # (typer has its own since it carries click; older ones re-export click's)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
