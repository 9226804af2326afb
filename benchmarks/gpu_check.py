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
from bench_vs_trl import BETA, COMPLETION_TOKENS, GROUP, MICRO_BATCH, PROMPTS_PER_STEP, rows, variety_reward


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
    from grpo.config import GRPOConfig
    from grpo.models import load_policy
    from grpo.rewards import Reward
    from grpo.trainer import GRPOTrainer

    cfg = GRPOConfig(
        model_name_or_path=str(model_dir), use_lora=use_lora, num_generations=GROUP,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS_PER_STEP * GROUP // MICRO_BATCH,
        max_completion_length=COMPLETION_TOKENS, beta=BETA, loss_type="grpo", learning_rate=1e-6,
        max_steps=steps + warmup, warmup_steps=0, seed=0,
    )  # fmt: skip
    models, tokenizer = load_policy(cfg, str(model_dir))
    models.to(torch.device("cuda"))
    trainer = GRPOTrainer(
        cfg, models, tokenizer, [Reward("variety", variety_reward)], rows(), Path(tempfile.mkdtemp())
    )
    torch.cuda.reset_peak_memory_stats()
    times, generation, lengths = [], [], []
    for i in range(steps + warmup):
        m = trainer.train_step()
        if i >= warmup:
            times.append(m["step_time"])
            generation.append(m["generation_time"])
            lengths.append(m["completions/mean_length"])
    tokens = statistics.median(lengths) * PROMPTS_PER_STEP * GROUP
    return {
        "dtype": str(next(models.policy.parameters()).dtype),
        "seconds_per_step": statistics.median(times),
        "generation_seconds": statistics.median(generation),
        "mean_length": statistics.median(lengths),
        "decode_tokens_per_second": tokens / statistics.median(generation),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        "step_times": times,
    }  # fmt: skip


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
