"""`grpo eval`: score a model, a run directory or a checkpoint on held-out rows (solved, pass@k, maj@k),
and write its per-row records and summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from grpo.accel.lean_layers import make_lean
from grpo.cli.recipes import check_reward_columns
from grpo.data.prompts import load_rows
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
from grpo.runs.layout import FINAL_MODEL
from grpo.train.common import seed_everything


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
) -> dict[str, Any]:
    """Score ``model`` on a dataset split and write the results to ``output`` (see
    :func:`eval_output_files`); return the summary. Bad input fails before the model loads."""
    rows_file, summary_file = eval_output_files(output) if output is not None else (None, None)
    rows = load_rows(dataset, split)
    rows = rows[:max_samples] if max_samples else rows
    rewards = build_rewards(reward_funcs, reward_weights)
    check_reward_columns(rows, rewards, dataset)
    if rows_file is not None:
        check_output_files((rows_file, summary_file))
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
    if summary_file is None:
        write_json_atomic(rows_file, {**about, "summary": summary, "rows": records})
    else:
        write_text_atomic(rows_file, "".join(json.dumps(record) + "\n" for record in records))
        write_json_atomic(summary_file, {**about, "rows_file": rows_file.name, "summary": summary})
    return summary
