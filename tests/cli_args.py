"""Command-line arguments shared by the tests that run `grpo train` on the tiny model."""

from __future__ import annotations

from pathlib import Path


def base_args(tiny_model: Path, dataset: Path, output: Path, reward_file: Path) -> list[str]:
    return [
        "--model",
        str(tiny_model),
        "--dataset",
        str(dataset),
        "--output-dir",
        str(output),
        "--seed",
        "7",
        "--num-generations",
        "4",
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "2",
        "--max-completion-length",
        "12",
        "--learning-rate",
        "1e-2",
        "--logging-steps",
        "1",
        "--reward-funcs",
        f"accuracy,format,{reward_file}:length_reward",
        "--reward-weights",
        "1,1,1",
    ]
