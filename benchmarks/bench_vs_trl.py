"""grpo against TRL's GRPOTrainer on the same model, data and settings, in one invocation.

    .venv/bin/pip install -e '.[bench]'        # TRL, for the benchmark only
    .venv/bin/python benchmarks/bench_vs_trl.py --steps 3 --warmup 1 --repeats 1

Each (framework, configuration) runs in a fresh process, alternating grpo and TRL, so that peak resident
memory is the process's own. Both train the default model (SmolLM2-135M-Instruct, fp32 on the CPU) on the
same story prompts, which the model answers at length, with one cheap reward, β = 0.04 (so a reference model
is used), loss_type "grpo", 4 prompts × 8 completions × at most 128 tokens per step. A "step" is one
generation batch and its μ optimizer passes, for both. TRL runs with its own defaults for memory (gradient
checkpointing on) in fp32 on the CPU, micro-batches of 8; grpo with its lean settings (LEAN below), or with
its defaults in the "-defaults" configurations. Both run with PyTorch's default allocation, or both with
transparent huge pages for large CPU tensors under --huge-pages (THP_MEM_ALLOC_ENABLE=1, see
grpo.accel.memory).

It prints, per configuration: median seconds per step, peak resident memory, generated tokens per second,
mean completion length, and the ratios grpo/TRL; then this machine's limits (matmul FLOP/s, memory
bandwidth) and how close each framework's generation and training come to them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

# grpo's lean settings, as a user short of memory would pick them: memory given back between phases,
# micro-batches of 4, and the reference's frozen weights offloaded to a mapped file (under LoRA the base
# weights, released layer by layer). Under LoRA without gradient checkpointing (a frozen model's activations
# are small enough); under full fine-tuning with it.
LEAN = {
    "lora": {"per_device_train_batch_size": 4, "release_memory": True, "offload_reference": True},
    "full": {
        "per_device_train_batch_size": 4,
        "release_memory": True,
        "gradient_checkpointing": True,
        "offload_reference": True,
    },
}
CONFIGS = {
    f"{mode}-mu{mu}": {"use_lora": mode == "lora", "num_iterations": mu, "grpo": LEAN[mode]}
    for mode in ("lora", "full")
    for mu in (1, 2)
}
# grpo with its defaults (micro-batches of 8, no checkpointing, memory kept), against TRL's run of the base.
CONFIGS |= {f"{name}-defaults": {**c, "grpo": {}, "trl_as": name} for name, c in list(CONFIGS.items())}
PROMPTS_PER_STEP, GROUP, COMPLETION_TOKENS, MICRO_BATCH, BETA = 4, 8, 128, 8, 0.04
TOPICS = ["a lighthouse", "a lost key", "the first snow", "a robot chef", "a night train", "an old map",
          "a talking cat", "a quiet library", "a storm at sea", "a garden on the moon", "a broken clock",
          "a market day", "a paper boat", "a mountain village", "a secret door", "a summer fair"]  # fmt: skip


def rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Write a short story about {t}."}]} for t in TOPICS]


def variety_reward(prompts, completions, **_):
    """Cheap and varied, so that groups carry a signal and neither side skips work."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t.split())) / max(1, len(t.split())) for t in texts]


# --- workers (one process each) --------------------------------------------------------------------------
def run_grpo(model_dir: str, config: dict, steps: int, warmup: int) -> dict:
    from grpo.config.grpo import GRPOConfig
    from grpo.models.policy import load_policy
    from grpo.rewards import Reward
    from grpo.train.distributed import Ranks
    from grpo.train.grpo import GRPOTrainer

    settings = {"per_device_train_batch_size": MICRO_BATCH, **config.get("grpo", {})}
    cfg = GRPOConfig(
        model_name_or_path=model_dir, use_lora=config["use_lora"], num_iterations=config["num_iterations"],
        num_generations=GROUP,
        gradient_accumulation_steps=PROMPTS_PER_STEP * GROUP // settings["per_device_train_batch_size"],
        max_completion_length=COMPLETION_TOKENS, beta=BETA, loss_type="grpo", learning_rate=1e-6,
        max_steps=steps + warmup, warmup_steps=0, seed=0, **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    models, tokenizer = load_policy(cfg, model_dir)
    models.to(Ranks().device)  # the GPU when there is one (benchmarks/gpu_check.py)
    trainer = GRPOTrainer(
        cfg, models, tokenizer, [Reward("variety", variety_reward)], rows(), Path(tempfile.mkdtemp())
    )
    step_times, gen_times, lengths = [], [], []
    for i in range(steps + warmup):
        m = trainer.train_step()
        if i >= warmup:
            step_times.append(m["step_time"])
            gen_times.append(m["generation_time"])
            lengths.append(m["completions/mean_length"])
    return {"step_times": step_times, "generation_times": gen_times, "mean_lengths": lengths}


def run_trl(model_dir: str, config: dict, steps: int, warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    micro_steps = PROMPTS_PER_STEP * GROUP // MICRO_BATCH
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=micro_steps, num_generations=GROUP,
        num_iterations=config["num_iterations"],
        max_completion_length=COMPLETION_TOKENS, beta=BETA, loss_type="grpo", learning_rate=1e-6,
        max_steps=(steps + warmup) * config["num_iterations"], logging_steps=1, save_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model, reward_funcs=variety_reward, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows() * 8), peft_config=peft_config if config["use_lora"] else None,
    )  # fmt: skip
    generation_times: list[float] = []
    generated_tokens: list[int] = []
    original_generate = trainer._generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        out = original_generate(*a, **k)
        generation_times.append(time.perf_counter() - started)
        # _generate returns prompt ids, completion ids, ...: count the completion tokens.
        completion_ids = out[1]
        generated_tokens.append(sum(len(ids) for ids in completion_ids))
        return out

    trainer._generate = timed_generate
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    trainer.add_callback(StepClock())
    started = time.perf_counter()
    trainer.train()
    mu = config["num_iterations"]
    ends = [started, *marks[mu - 1 :: mu]]  # one generation batch = μ optimizer steps
    step_times = [b - a for a, b in itertools.pairwise(ends)][warmup:]
    lengths = [t / (PROMPTS_PER_STEP * GROUP) for t in generated_tokens][warmup:]
    return {"step_times": step_times, "generation_times": generation_times[warmup:], "mean_lengths": lengths}


def worker(framework: str, model_dir: str, config_name: str, steps: int, warmup: int, out: str) -> None:
    torch.set_num_threads(torch.get_num_threads())
    run = run_grpo if framework == "grpo" else run_trl
    result = run(model_dir, CONFIGS[config_name], steps, warmup)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result))


# --- machine limits --------------------------------------------------------------------------------------
def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """The faster of PyTorch's default BLAS and oneDNN on a square float32 product (on an AMD CPU, MKL's
    kernels reach less than half of oneDNN's: grpo.accel.onednn)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    from grpo.accel import onednn

    products = [lambda: a @ b]
    if onednn.available():
        products.append(lambda: onednn.linear(a, b))
    best = 0.0
    for product in products:
        product()
        started = time.perf_counter()
        for _ in range(repeats):
            product()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def memory_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes moved per second by a large copy (read + write)."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - started)


def model_facts(model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"params": total, "non_embedding_params": total - embedding, "embedding_params": embedding}


# --- driver ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="runs per framework and configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/last_run.json"))
    parser.add_argument(
        "--huge-pages", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 for both frameworks"
    )
    parser.add_argument("--worker", nargs=5, metavar=("FRAMEWORK", "MODEL", "CONFIG", "STEPS", "OUT"))
    args = parser.parse_args()
    if args.worker:
        framework, model_dir, config_name, steps, out = args.worker
        worker(framework, model_dir, config_name, int(steps), args.warmup, out)
        return

    from grpo.models.loading import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    results: dict[str, dict[str, list]] = {}
    for repeat in range(args.repeats):
        for config_name in args.configs.split(","):
            frameworks = ("grpo", "trl") if repeat % 2 == 0 else ("trl", "grpo")
            for framework in frameworks:
                # A grpo variant is compared with TRL's run of its base configuration, run once per repeat.
                name = CONFIGS[config_name].get("trl_as", config_name) if framework == "trl" else config_name
                done = results.get(name, {}).get(framework, {}).get("step_times", [])
                if framework == "trl" and len(done) >= (repeat + 1) * args.steps:
                    continue
                out = Path(tempfile.mkdtemp()) / "result.json"
                command = [sys.executable, __file__, "--warmup", str(args.warmup), "--worker", framework,
                           model_dir, name, str(args.steps), str(out)]  # fmt: skip
                print(f"[{repeat + 1}/{args.repeats}] {name} {framework} …", flush=True)
                env = {
                    **os.environ,
                    "TOKENIZERS_PARALLELISM": "false",
                    "THP_MEM_ALLOC_ENABLE": str(int(args.huge_pages)),
                }
                subprocess.run(command, check=True, env=env)
                run = json.loads(out.read_text())
                slot = results.setdefault(name, {}).setdefault(framework, {})
                for key, value in run.items():
                    slot.setdefault(key, []).extend(value if isinstance(value, list) else [value])

    facts = model_facts(model_dir)
    flops, bandwidth = matmul_flops(), memory_bandwidth()
    report = summarise(results, facts, flops, bandwidth, args.huge_pages)
    print(report)
    args.output.write_text(json.dumps({"results": results, "facts": facts, "matmul_flops": flops,
                                       "bandwidth": bandwidth, "huge_pages": args.huge_pages,
                                       "report": report}, indent=1))  # fmt: skip


def summarise(results: dict, facts: dict, flops: float, bandwidth: float, huge_pages: bool) -> str:
    per_step = PROMPTS_PER_STEP * GROUP
    lines = [
        f"date {date.today()}  machine {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"settings: {PROMPTS_PER_STEP} prompts × {GROUP} completions × ≤{COMPLETION_TOKENS} tokens, "
        f"beta {BETA}, loss grpo, fp32, THP_MEM_ALLOC_ENABLE={int(huge_pages)}; "
        f"TRL micro-batch {MICRO_BATCH} with gradient checkpointing, "
        f"grpo lean: {json.dumps(LEAN)}; medians over timed steps",
        "",
        "| config | grpo s/step | TRL s/step | ratio | grpo peak MB | TRL peak MB | ratio "
        "| grpo gen tok/s | TRL gen tok/s | grpo mean len | TRL mean len |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # Every generated token goes through all weights, the tied LM head included: 2·P FLOPs forward.
    per_token_flops = 2 * facts["params"]
    limits = []
    for name, by_framework in results.items():
        if "grpo" not in by_framework:  # a base configuration only TRL ran
            continue
        runs = {"grpo": by_framework["grpo"], "trl": results[CONFIGS[name].get("trl_as", name)]["trl"]}
        step = {k: statistics.median(v["step_times"]) for k, v in runs.items()}
        generation = {k: statistics.median(v["generation_times"]) for k, v in runs.items()}
        peak = {k: max(v["peak_rss_mb"]) for k, v in runs.items()}
        length = {k: statistics.median(v["mean_lengths"]) for k, v in runs.items()}
        tokens_per_s = {k: length[k] * per_step / generation[k] for k in runs}
        lines.append(
            f"| {name} | {step['grpo']:.1f} | {step['trl']:.1f} | **{step['grpo'] / step['trl']:.2f}** "
            f"| {peak['grpo']:.0f} | {peak['trl']:.0f} | **{peak['grpo'] / peak['trl']:.2f}** "
            f"| {tokens_per_s['grpo']:.0f} | {tokens_per_s['trl']:.0f} "
            f"| {length['grpo']:.0f} | {length['trl']:.0f} |"
        )
        mu = CONFIGS[name]["num_iterations"]
        backward = (
            1 if CONFIGS[name]["use_lora"] else 2
        )  # activation gradients, plus weight gradients if full
        for k in runs:
            # Useful work: μ × (forward + backward) plus the reference forward; recomputation not counted.
            work = length[k] * per_step * per_token_flops * ((1 + backward) * mu + 1)
            rate = work / (step[k] - generation[k])
            limits.append(
                f"- {name} {k}: decoding {tokens_per_s[k]:.0f} tok/s "
                f"= {tokens_per_s[k] / (flops / per_token_flops):.0%} "
                f"of the matmul bound; training {rate / 1e9:.0f} GFLOP/s = {rate / flops:.0%} of matmul peak"
            )
    lines += [
        "",
        f"Machine: matmul {flops / 1e9:.0f} GFLOP/s (fp32, 2048², the faster of BLAS and oneDNN), "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s. "
        f"Model: {facts['params'] / 1e6:.0f}M parameters, {facts['params'] * 4 / 1e6:.0f} MB in fp32.",
        f"Decoding bounds: one sequence ≤ {bandwidth / (facts['params'] * 4):.0f} tok/s "
        f"(all weights read per token); a batch ≤ {flops / per_token_flops:.0f} tok/s (matmul peak).",
        "",
        *limits,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
