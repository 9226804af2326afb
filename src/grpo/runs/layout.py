"""The files a run leaves in its directory, named in one place, and the two ways grpo reads and appends them.

A run directory (``output_dir``; by default ``runs/<name>-<time>``, see :func:`default_output_dir`) holds::

    config.yaml          the run's settings, as it ran with them
    reward_files.json    the sha256 of each code file behind its rewards, as the run started with them
    metrics.jsonl        one JSON line per logged step
    samples.jsonl        one JSON line per logged step: a few sampled completions with their rewards
    eval_before.json     held-out scores before training (eval_on_start)
    eval_stepN.json      held-out scores at step N (eval_steps)
    eval_after.json      held-out scores after training
    summary.json         the headline figures, written when the run ends
    report.html          the run on one page (grpo.runs.report)
    final_model/         the trained model
    tensorboard/         the metrics as TensorBoard events (report_to: tensorboard)

Every module that writes or reads one of these takes its name from here. :func:`read_jsonl` reads
metrics.jsonl or samples.jsonl back; :func:`append_line` adds a line to one so that a killed process leaves
only whole lines.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

# Where runs go when no output_dir is given.
RUNS_DIR = "runs"

CONFIG_FILE = "config.yaml"
REWARD_FILES_FILE = "reward_files.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
FINAL_MODEL = "final_model"
TENSORBOARD_DIR = "tensorboard"

# Held-out evaluations: eval_before.json, eval_stepN.json (N the step), eval_after.json.
EVAL_BEFORE_FILE = "eval_before.json"
EVAL_AFTER_FILE = "eval_after.json"
EVAL_STEP_PREFIX = "eval_step"
EVAL_STEP_GLOB = f"{EVAL_STEP_PREFIX}*.json"
EVAL_GLOB = "eval_*.json"  # all three kinds


def eval_file(tag: str) -> str:
    """The name of a held-out evaluation file: ``tag`` is "before", "after" or "stepN"."""
    return f"eval_{tag}.json"


def default_output_dir(prefix: str, dataset: str, fallback: str = "run") -> Path:
    """``runs/<prefix>-<dataset's stem>-<YYYYmmdd-HHMMSS>``, the local time now. An empty ``prefix`` is
    left out (``runs/<stem>-<time>``); a dataset without a stem (an empty name) gives ``fallback`` instead,
    and an empty ``fallback`` is left out as well."""
    stem = Path(str(dataset)).stem or fallback
    name = "-".join(part for part in (prefix, stem) if part)
    return Path(RUNS_DIR) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of metrics.jsonl or samples.jsonl (a torn last line is dropped: grpo never writes
    one to metrics.jsonl, and only a crash of the machine could leave one in samples.jsonl)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return lines


def append_line(path: Path, line: str) -> None:
    """Append a line to a file in one write, flushed to disk: a killed process leaves whole lines."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
