"""`grpo eval`: score a model, a run directory or a checkpoint on held-out rows (solved, pass@k, maj@k),
and write its per-row records and summary.

A model that acts — tools or an environment, from ``--tools``/``--environment``, the run it comes from, the
``--config`` file or the built-in agent task (:func:`eval_agent_settings`) — is scored on multi-turn
episodes (:func:`grpo.runs.eval.evaluate` with an :class:`~grpo.agents.rollout.Agent`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.accel.lean_layers import make_lean
from grpo.cli.recipes import check_reward_columns
from grpo.config.grpo import ALIASES, GRPOConfig
from grpo.config.loading import convert, read_yaml
from grpo.config.tasks import TASK_SETTINGS
from grpo.data.prompts import load_rows
from grpo.data.tasks import COMPLETION_LENGTHS
from grpo.errors import CheckpointError, ConfigError, ModelError
from grpo.files import check_output_dir, write_json_atomic, write_text_atomic
from grpo.models.checkpoint import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE,
    latest_checkpoint,
)
from grpo.models.loading import (
    load_causal_lm,
    load_tokenizer,
    pick_dtype,
    refuse_pickled_weights,
    resolve_model,
)
from grpo.rewards import RewardSpec, build_rewards
from grpo.runs.eval import evaluate
from grpo.runs.layout import CONFIG_FILE, FINAL_MODEL
from grpo.train.common import seed_everything

# The settings of a run's (or a task's) episodes that `grpo eval` takes over, and the room for them.
AGENT_FIELDS = ("tools", "environment", "max_turns", "tool_timeout")


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()


def eval_weights(model: str) -> Path | None:
    """The directory whose weights `grpo eval --model` means: a run directory's final_model, or the newest
    checkpoint of a run that has not finished; a model or checkpoint directory itself; None for a name
    (the default model, a Hub id) or a ``.gguf`` file, which :func:`resolve_model` handles."""
    path = Path(model)
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelError(f"{path}: is a file, not a model, run or checkpoint directory or a .gguf file")
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
        return make_lean(load_causal_lm(resolved, pick_dtype("auto"))), load_tokenizer(resolved), resolved
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
            policy = PeftModel.from_pretrained(make_lean(load_causal_lm(base, pick_dtype("auto"))), path)
        except (OSError, ValueError) as error:
            raise ModelError(f"{path}: cannot load the adapters ({error})") from None
        return policy, tokenizer, str(path)
    resolved = resolve_model(str(path))
    if has_tokenizer(path) or not (path / TRAINER_STATE).is_file():
        tokenizer_source = resolved
    else:
        tokenizer_source = training_base_model(path)
    return make_lean(load_causal_lm(resolved, pick_dtype("auto"))), load_tokenizer(tokenizer_source), resolved


@dataclass(frozen=True)
class AgentSettings:
    """What `grpo eval` runs episodes with: tool and environment entries (checked when the run starts),
    the turns an episode may take, a tool call's time limit (0: none), and the room for a whole trajectory
    that the run or task it comes from gives (None: it gives none)."""

    tools: list[str]
    environment: str | None
    max_turns: int
    tool_timeout: float
    max_completion_length: int | None = None


def recorded_settings(model: str) -> tuple[dict[str, Any], str] | None:
    """The settings that the run behind ``model`` recorded, and the file that holds them: a run
    directory's config.yaml (also for its final_model or a checkpoint in it), else a checkpoint's
    trainer_state.json; None for a model that comes from no run."""
    path = Path(model)
    if not path.is_dir():
        return None
    in_run = path.name == FINAL_MODEL or path.name.startswith(CHECKPOINT_PREFIX)
    for directory in (path, path.parent) if in_run else (path,):
        if (directory / CONFIG_FILE).is_file():
            return read_yaml(directory / CONFIG_FILE), str(directory / CONFIG_FILE)
    try:
        saved = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")).get("config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # (no checkpoint; a damaged one is named when it loads)
    return (saved, str(path / TRAINER_STATE)) if isinstance(saved, dict) else None


def agent_layer(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The agent fields (and max_completion_length) that ``settings`` give, converted as `grpo train`
    converts them; none when they give neither tools nor an environment."""
    given = {key: settings[key] for key in (*AGENT_FIELDS, "max_completion_length") if key in settings}
    values = convert(GRPOConfig, given, source, ALIASES)
    return values if values.get("tools") or values.get("environment") else {}


def eval_agent_settings(
    model: str,
    dataset: str,
    config: GRPOConfig | None = None,
    *,
    tools: str | None = None,
    environment: str | None = None,
    max_turns: int | None = None,
    tool_timeout: float | None = None,
) -> AgentSettings | None:
    """The episodes `grpo eval` runs, or None for single completions. Tools, environment and their limits
    come from the built-in agent task ``dataset`` (its TASK_SETTINGS), under those the run behind ``model``
    recorded, under the ``--config`` file's ``config``, under the flags: ``tools`` comma-separated entries
    ("" for none), ``environment`` an entry ("none" for none). Each source that acts replaces the ones
    below it whole; the flags replace single fields. Bad values: ConfigError, one line."""
    values: dict[str, Any] = {}
    layers = [(TASK_SETTINGS.get(dataset, {}), f"task {dataset}"), recorded_settings(model)]
    if config is not None:
        fields = (*AGENT_FIELDS, "max_completion_length")
        layers.append(({key: getattr(config, key) for key in fields}, "--config"))
    for layer in layers:
        if layer is not None:
            values = agent_layer(*layer) or values
    flags = {"tools": tools, "environment": environment}
    values.update(convert(GRPOConfig, {k: v for k, v in flags.items() if v is not None}, "command line"))
    if not values.get("tools") and not values.get("environment"):
        if max_turns is not None or tool_timeout is not None:
            raise ConfigError(
                "--max-turns and --tool-timeout act only on episodes: give --tools or --environment "
                "(or evaluate a run or task that has them)"
            )
        return None
    if max_turns is not None:
        values["max_turns"] = max_turns
    if tool_timeout is not None:
        values["tool_timeout"] = tool_timeout
    settings = AgentSettings(
        tools=[entry.strip() for entry in values.get("tools") or []],
        environment=values.get("environment"),
        max_turns=values.get("max_turns", GRPOConfig.max_turns),
        tool_timeout=values.get("tool_timeout", GRPOConfig.tool_timeout),
        max_completion_length=values.get("max_completion_length"),
    )
    if settings.max_turns < 1:
        raise ConfigError(f"--max-turns must be at least 1, got {settings.max_turns}")
    if settings.tool_timeout < 0:
        raise ConfigError(f"--tool-timeout must be 0 (no limit) or more seconds, got {settings.tool_timeout}")
    return settings


def default_completion_length(dataset: str, agent: AgentSettings | None) -> int:
    """`grpo eval`'s max_completion_length when none is given: the room an agent's run or task gives a
    whole trajectory, else the task's room for an answer (COMPLETION_LENGTHS), else 32 tokens for an
    answer or AGENT_COMPLETION_LENGTH for a whole trajectory."""
    if agent is not None and agent.max_completion_length is not None:
        return agent.max_completion_length
    return COMPLETION_LENGTHS.get(dataset, 32 if agent is None else AGENT_COMPLETION_LENGTH)


# Room for a whole trajectory (turns, tool results) when neither a run nor a task says: a few calls.
AGENT_COMPLETION_LENGTH = 256


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


def check_output_files(files: tuple[Path, Path | None]) -> None:
    """Make sure the results can be written before the model is scored: their directory is usable
    (created if missing) and neither file's name is taken by a directory."""
    rows_file, summary_file = files
    check_output_dir(rows_file.parent, f"--output {rows_file}: its directory")
    for path in (rows_file, summary_file):
        if path is not None and path.is_dir():
            raise ConfigError(f"--output {rows_file}: {path} is a directory; name a file to write")


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
    agent: AgentSettings | None = None,
) -> dict[str, Any]:
    """Score ``model`` on a dataset split and write the results to ``output`` (see
    :func:`eval_output_files`); return the summary. With ``agent``, each sample is an episode with its
    tools and environment. Bad input fails before the model loads."""
    rows_file, summary_file = eval_output_files(output) if output is not None else (None, None)
    rows = load_rows(dataset, split)
    rows = rows[:max_samples] if max_samples else rows
    rewards = build_rewards(reward_funcs, reward_weights)
    check_reward_columns(rows, rewards, dataset)
    if agent is not None:
        from grpo.agents.rollout import check_agent_inputs

        check_agent_inputs(agent.tools, agent.environment, [(dataset, rows)])  # before the model loads
    if rows_file is not None:
        check_output_files((rows_file, summary_file))
    seed_everything(seed)
    policy, tokenizer, weights = load_for_eval(model)
    episodes = None
    if agent is not None:
        from grpo.agents.rollout import Agent

        settings = {"max_turns": agent.max_turns, "tool_timeout": agent.tool_timeout or None}
        episodes = Agent.load(agent.tools, agent.environment, tokenizer, **settings)
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
        agent=episodes,
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
    if agent is not None:
        about.update(tools=agent.tools, environment=agent.environment, max_turns=agent.max_turns)
        about["tool_timeout"] = agent.tool_timeout
    if summary_file is None:
        write_json_atomic(rows_file, {**about, "summary": summary, "rows": records})
    else:
        write_text_atomic(rows_file, "".join(json.dumps(record) + "\n" for record in records))
        write_json_atomic(summary_file, {**about, "rows_file": rows_file.name, "summary": summary})
    return summary
