"""grpo on a CUDA GPU: seconds per step and peak GPU memory for the benchmark's settings, and one whole
`grpo train` run through the CLI.

The default model's weights cannot travel to the GPU machine, so this builds SmolLM2-135M-Instruct's
architecture with random weights from its config (in ``--config-dir``: config.json and tokenizer files);
random weights rarely sample the end-of-sequence token, so completions run to the length limit as the
benchmark's stories do on the CPU.

    python benchmarks/gpu_check.py --config-dir .devicekit/smollm2-config --output gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_trl import GROUP, PROMPTS_PER_STEP, run_grpo


def random_model(config_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    target = Path(tempfile.mkdtemp()) / "smollm2-random"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(target)
    for file in config_dir.iterdir():
        if file.name != "config.json":
            shutil.copy(file, target / file.name)
    return target


def timed_steps(model_dir: Path, use_lora: bool, steps: int, warmup: int) -> dict:
    """The CPU benchmark's grpo worker on the GPU, with its peak GPU memory."""
    from grpo.models.loading import pick_dtype

    torch.cuda.reset_peak_memory_stats()
    run = run_grpo(str(model_dir), {"use_lora": use_lora, "num_iterations": 1}, steps, warmup)
    length, generation = statistics.median(run["mean_lengths"]), statistics.median(run["generation_times"])
    return {
        "dtype": str(pick_dtype("auto")),
        "seconds_per_step": statistics.median(run["step_times"]),
        "generation_seconds": generation,
        "mean_length": length,
        "decode_tokens_per_second": length * PROMPTS_PER_STEP * GROUP / generation,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        "step_times": run["step_times"],
    }


def cli_run(model_dir: Path, output: Path) -> dict:
    command = [sys.executable, "-m", "grpo", "train", "--model", str(model_dir), "--max-steps", "3",
               "--eval-max-samples", "16", "--output-dir", str(output)]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    return {
        "returncode": result.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "tail": (result.stdout + result.stderr)[-3000:],
        "files": sorted(p.name for p in output.iterdir()) if output.is_dir() else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    facts = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    model_dir = random_model(args.config_dir)
    report: dict = {"facts": facts}
    for name, lora in (("lora-mu1", True), ("full-mu1", False)):
        report[name] = timed_steps(model_dir, lora, args.steps, warmup=1)
        print(name, json.dumps(report[name]), flush=True)
    report["cli"] = cli_run(model_dir, Path(tempfile.mkdtemp()) / "run")
    print("cli", report["cli"]["returncode"], report["cli"]["seconds"], report["cli"]["files"], flush=True)
    print(report["cli"]["tail"][-1500:])
    args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
