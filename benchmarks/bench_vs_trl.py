"""grpo against TRL's GRPOTrainer: each at its defaults on the same work, then parity rows, in one invocation.

    .venv/bin/pip install -e '.[bench]'        # TRL, for the benchmark only
    .venv/bin/python benchmarks/bench_vs_trl.py              # the defaults table and the parity rows

The work, the same for both: the default model (SmolLM2-135M-Instruct), 4 prompts × 8 completions × at most
128 tokens a step, the same story prompts in the same order (no shuffling), one cheap reward, β = 0.04 (so a
reference model is used), loss_type "grpo", learning rate 1e-6, LoRA r = 16 / α = 32 on all linear layers or
full fine-tuning, μ = 1 or 2. A "step" is one generation batch and its μ optimizer passes, for both.

The first table holds each framework as a user gets it: grpo's defaults (``GRPOConfig()``; ``dtype: auto``)
against TRL's (``trl.GRPOConfig()``: gradient checkpointing on, bf16 mixed precision, micro-batches of 8).
Parity rows (``--rows``) then change one thing on one side to match the other: gradient checkpointing on for
both, off for both, float32 for both, bfloat16 for both (LoRA over a bfloat16 base: left out where grpo's
``auto`` is that already, on a CPU with native bfloat16), and grpo's lean memory settings against TRL given
grpo's allocator (a fixed glibc mmap threshold and ``malloc_trim`` after sampling, after scoring and
around each optimizer step, as ``release_memory`` does). TRL's learning rate is held constant, as grpo's is.

Every (framework, settings) pair runs in a fresh process, the frameworks alternating within each repeat. Peak
memory is every page a run adds: the peak of a memory cgroup of the worker's own (anonymous memory, page cache
of the files it writes or maps afresh such as offloaded weights, kernel memory), with the model's files and
the libraries read once beforehand so that neither side is charged for pages both share. Where no cgroup can
be made, the peak of resident memory plus the cached pages of every writable shared file mapping, sampled
every 20 ms. The JSON says which, and keeps ru_maxrss beside it. Training FLOPs count useful work only:
completion tokens through μ forward and backward passes and one reference forward, no recomputation.

It prints the tables as Markdown, per step both sides' loss, KL and reward, this machine's limits (matmul
FLOP/s in float32 and bfloat16, copy bandwidth) and where each defaults row stands against the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import itertools
import json
import mmap
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

PROMPTS_PER_STEP, GROUP, COMPLETION_TOKENS, BETA, LEARNING_RATE = 4, 8, 128, 0.04, 1e-6
LORA = {"r": 16, "alpha": 32}  # grpo's defaults (lora_r, lora_alpha), given to TRL's peft config
CONFIGS = {
    f"{mode}-mu{mu}": {"use_lora": mode == "lora", "mu": mu} for mode in ("lora", "full") for mu in (1, 2)
}

# What each side runs with, besides the work. "defaults" is the framework as it ships.
GRPO_VARIANTS = {
    "defaults": {"lora": {}, "full": {}},
    "checkpointing": {"lora": {"gradient_checkpointing": True}, "full": {"gradient_checkpointing": True}},
    "float32": {"lora": {"dtype": "float32"}, "full": {"dtype": "float32"}},
    # LoRA over a bfloat16 base, float32 adapters: TRL's bf16 mixed precision for a LoRA run. (Full
    # fine-tuning in bfloat16 would be bfloat16 master weights, not TRL's mixed precision: no such row.)
    "bfloat16": {"lora": {"dtype": "bfloat16"}},
    # The lean settings a user short of memory would pick (docs/performance.md).
    "lean": {
        "lora": {"per_device_train_batch_size": 4, "release_memory": True, "offload_reference": True},
        "full": {"per_device_train_batch_size": 4, "release_memory": True, "offload_reference": True,
                 "gradient_checkpointing": True},
    },
}  # fmt: skip
TRL_VARIANTS = {
    "defaults": {},
    "no-checkpointing": {"gradient_checkpointing": False},
    "float32": {"bf16": False},
    "grpo-allocator": {"allocator": "grpo"},
}
ROW_KINDS = {  # name → (label, grpo variant, TRL variant)
    "defaults": ("defaults", "defaults", "defaults"),
    "checkpointing-on": ("checkpointing on, both", "checkpointing", "defaults"),
    "checkpointing-off": ("checkpointing off, both", "defaults", "no-checkpointing"),
    "float32": ("float32, both", "float32", "float32"),
    "bfloat16": ("bfloat16, both", "bfloat16", "defaults"),
    "lean": ("grpo lean; TRL with grpo's allocator", "lean", "grpo-allocator"),
}
TARGETS = {"time": 0.35, "memory": 0.5, "training": 0.60, "decoding": 0.50}
TOPICS = ["a lighthouse", "a lost key", "the first snow", "a robot chef", "a night train", "an old map",
          "a talking cat", "a quiet library", "a storm at sea", "a garden on the moon", "a broken clock",
          "a market day", "a paper boat", "a mountain village", "a secret door", "a summer fair"]  # fmt: skip


def rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Write a short story about {t}."}]} for t in TOPICS]


def variety_reward(prompts, completions, **_):
    """Cheap and varied, so that groups carry a signal and neither side skips work."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t.split())) / max(1, len(t.split())) for t in texts]


# --- memory ----------------------------------------------------------------------------------------------
class MemoryCgroup:
    """A memory cgroup of one worker's own, made inside this process's own (v2 where the memory controller
    is on, else v1): its peak counts every page charged to the worker, resident or cached."""

    def __init__(self, path: Path, peak_file: str):
        self.path, self.peak_file = path, peak_file

    @staticmethod
    def places() -> list[tuple[Path, str]]:
        """Where this process's memory cgroup is, with the file that holds a cgroup's peak."""
        places = []
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "memory":
                places.append((Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.max_usage_in_bytes"))
            elif controllers == "":
                for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                    places.append((Path(root) / path.lstrip("/"), "memory.peak"))
        return places

    @classmethod
    def create(cls, name: str) -> MemoryCgroup | None:
        for parent, peak_file in cls.places():
            try:
                (parent / name).mkdir()
            except OSError:
                continue
            if (parent / name / peak_file).exists():
                return cls(parent / name, peak_file)
            (parent / name).rmdir()
        return None

    def command(self, command: list[str]) -> list[str]:
        """``command`` started inside this cgroup: a shell moves itself in, then becomes the command."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *command]

    def peak_bytes(self) -> int:
        return int((self.path / self.peak_file).read_text())

    @property
    def kind(self) -> str:
        version = "v1" if self.peak_file.endswith("bytes") else "v2"
        return f"cgroup {version} {self.peak_file}"

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def read_once(paths: list[Path]) -> None:
    """Bring files into the page cache from this process, so that the workers are not charged for them."""
    for path in paths:
        for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            with contextlib.suppress(OSError), open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


class ResidentSampler(threading.Thread):
    """In a worker: the peak of resident memory (sampled every 20 ms) plus the pages of writable shared file
    mappings (offloaded weights) that sit in the page cache without being resident (counted every second)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.stopped = threading.Event()
        self.libc = ctypes.CDLL(None, use_errno=True)

    def run(self) -> None:
        cached_only = 0
        for tick in itertools.count():
            if self.stopped.wait(0.02):
                return
            if tick % 50 == 0:
                cached_only = self.cached_only()
            self.peak = max(self.peak, self.resident() + cached_only)

    def sample(self) -> int:
        return self.resident() + self.cached_only()

    @staticmethod
    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE

    def cached_only(self) -> int:
        total, mapping = 0, None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                start, end = (int(x, 16) for x in fields[0].split("-"))
                writable_shared_file = fields[1].startswith("rw") and fields[1][3] == "s" and len(fields) > 5
                mapping = (start, end) if writable_shared_file else None
            elif mapping and fields[0] == "Rss:":
                total += self.cached(*mapping, resident_kb=fields[1]) - int(fields[1]) * 1024
        return max(0, total)

    def cached(self, start: int, end: int, resident_kb: str) -> int:
        """Bytes of [start, end) in the page cache (mincore)."""
        vector = (ctypes.c_ubyte * ((end - start) // mmap.PAGESIZE))()
        if self.libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vector) != 0:
            return int(resident_kb) * 1024  # unknown: as resident, so that it adds nothing
        return sum(byte & 1 for byte in bytes(vector)) * mmap.PAGESIZE


# --- workers (one process each) --------------------------------------------------------------------------
def run_grpo(model_dir: str, config: dict, settings: dict, steps: int, warmup: int) -> dict:
    from grpo.config.grpo import GRPOConfig
    from grpo.models.policy import load_policy
    from grpo.rewards import Reward
    from grpo.train.distributed import Ranks
    from grpo.train.grpo import GRPOTrainer

    micro_batch = settings.get("per_device_train_batch_size", GRPOConfig().per_device_train_batch_size)
    cfg = GRPOConfig(
        model_name_or_path=model_dir, use_lora=config["use_lora"], num_iterations=config["mu"],
        num_generations=GROUP, gradient_accumulation_steps=PROMPTS_PER_STEP * GROUP // micro_batch,
        max_completion_length=COMPLETION_TOKENS, beta=BETA, loss_type="grpo", learning_rate=LEARNING_RATE,
        max_steps=steps + warmup, warmup_steps=0, seed=0, shuffle_dataset=False, **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    models, tokenizer = load_policy(cfg, model_dir)
    models.to(Ranks().device)  # the GPU when there is one (benchmarks/gpu_check.py)
    trainer = GRPOTrainer(
        cfg, models, tokenizer, [Reward("variety", variety_reward)], rows(), Path(tempfile.mkdtemp())
    )
    metrics = [trainer.train_step() for _ in range(steps + warmup)]
    timed = metrics[warmup:]
    return {
        "compute_dtype": str(next(models.policy.parameters()).dtype).removeprefix("torch."),
        "step_times": [m["step_time"] for m in timed],
        "generation_times": [m["generation_time"] for m in timed],
        "mean_lengths": [m["completions/mean_length"] for m in timed],
        # Equal work: every step, timed or not, on the same prompts as TRL's.
        "reward": [m["reward"] for m in metrics],
        "kl": [m["kl"] for m in metrics],
        "loss": [m["loss"] for m in metrics],
    }


def trimmed(function, release):
    """``function``, then ``release()``."""

    def call(*a, **k):
        out = function(*a, **k)
        release()
        return out

    return call


def run_trl(model_dir: str, config: dict, settings: dict, steps: int, warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.accel.memory import MAPPED_BLOCK_MB, map_blocks_from, release_free_memory

    settings = dict(settings)
    allocator = settings.pop("allocator", None)
    micro_batch = GRPOConfig.__dataclass_fields__["per_device_train_batch_size"].default
    mu = config["mu"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=PROMPTS_PER_STEP * GROUP // micro_batch, num_generations=GROUP,
        num_iterations=mu, max_completion_length=COMPLETION_TOKENS, beta=BETA, loss_type="grpo",
        learning_rate=LEARNING_RATE, max_steps=(steps + warmup) * mu, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0, shuffle_dataset=False, lr_scheduler_type="constant",
        **settings,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=variety_reward, args=args,
        train_dataset=Dataset.from_list(rows() * 8), peft_config=peft_config if config["use_lora"] else None,
    )  # fmt: skip
    generation_times: list[float] = []
    generated_tokens: list[int] = []
    original_generate = trainer._generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        out = original_generate(*a, **k)
        generation_times.append(time.perf_counter() - started)
        generated_tokens.append(sum(len(ids) for ids in out[1]))  # (prompt ids, completion ids, ...)
        return out

    trainer._generate = timed_generate
    if allocator == "grpo":  # what grpo's release_memory does: big blocks mapped alone, trims between phases
        map_blocks_from(MAPPED_BLOCK_MB)
        for phase in ("_generate", "_generate_and_score_completions"):  # after sampling, after scoring
            setattr(trainer, phase, trimmed(getattr(trainer, phase), release_free_memory))
    marks: list[float] = []
    step_logs: list[dict] = []

    class StepClock(TrainerCallback):
        def on_pre_optimizer_step(self, *_, **__):
            if allocator == "grpo":
                release_free_memory()

        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())
            if allocator == "grpo":
                release_free_memory()

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:  # one entry per optimizer step (logging_steps=1)
                step_logs.append({k: float(v) for k, v in logs.items() if k in ("loss", "kl", "reward")})

    trainer.add_callback(StepClock())
    started = time.perf_counter()
    trainer.train()
    ends = [started, *marks[mu - 1 :: mu]]  # one generation batch = μ optimizer steps
    step_times = [b - a for a, b in itertools.pairwise(ends)][warmup:]
    by_step = [step_logs[i * mu : (i + 1) * mu] for i in range(steps + warmup)]
    return {
        "compute_dtype": "bfloat16 autocast" if args.bf16 else "float32",
        "step_times": step_times,
        "generation_times": generation_times[warmup:],
        "mean_lengths": [t / (PROMPTS_PER_STEP * GROUP) for t in generated_tokens][warmup:],
        "reward": [next((e["reward"] for e in step if "reward" in e), float("nan")) for step in by_step],
        "kl": [statistics.fmean(e.get("kl", float("nan")) for e in step) for step in by_step],
        "loss": [statistics.fmean(e["loss"] for e in step) for step in by_step],
    }


def worker(job: dict) -> None:
    sampler = ResidentSampler()
    if job["sample_memory"]:  # (under a cgroup it would only take the GIL from the run)
        sampler.start()
    run = run_grpo if job["framework"] == "grpo" else run_trl
    mode = "lora" if CONFIGS[job["config"]]["use_lora"] else "full"
    variants = GRPO_VARIANTS if job["framework"] == "grpo" else TRL_VARIANTS
    settings = variants[job["variant"]][mode] if job["framework"] == "grpo" else variants[job["variant"]]
    result = run(job["model"], CONFIGS[job["config"]], settings, job["steps"], job["warmup"])
    if job["sample_memory"]:
        sampler.stopped.set()
        sampler.join()
        result["sampled_peak_mb"] = max(sampler.peak, sampler.sample()) / 2**20
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(job["out"]).write_text(json.dumps(result))


def run_worker(job: dict, env: dict) -> dict:
    """One worker in a fresh process (in a memory cgroup of its own where one can be made)."""
    cgroup = MemoryCgroup.create(f"grpo-bench-{os.getpid()}-{time.monotonic_ns()}")
    job = {**job, "sample_memory": cgroup is None}
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    try:
        subprocess.run(cgroup.command(command) if cgroup else command, check=True, env=env)
        result = json.loads(Path(job["out"]).read_text())
        if cgroup:
            result["peak_mb"], result["memory_measure"] = cgroup.peak_bytes() / 2**20, cgroup.kind
        else:
            result["peak_mb"] = result["sampled_peak_mb"]
            result["memory_measure"] = "sampled resident + cached pages of writable shared file mappings"
        return result
    finally:
        if cgroup:
            cgroup.remove()


# --- machine ---------------------------------------------------------------------------------------------
def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """The faster of PyTorch's default BLAS and oneDNN on a square product (on an AMD CPU, MKL's float32
    kernels reach half of oneDNN's: grpo.accel.onednn)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
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


def machine_facts(model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cpu = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Flags"):
                cpu[key.strip()] = value.strip()
    flags = set(cpu.pop("Flags", "").split())
    cpu["flags"] = sorted(
        flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}
    )
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    return {
        "date": str(date.today()),
        "params": sum(p.numel() for p in model.parameters()),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("torch", "transformers", "peft", "trl", "accelerate", "grpo")
        },
        "python": platform.python_version(),
        "matmul_flops": {
            "float32": matmul_flops(torch.float32),
            **({"bfloat16": matmul_flops(torch.bfloat16)} if native_bf16 else {}),
        },
        "bandwidth": memory_bandwidth(),
    }


# --- driver ----------------------------------------------------------------------------------------------
def resolved_settings(variant: str, mode: str) -> dict:
    """A grpo variant's settings with ``dtype`` as this machine resolves it (auto: bfloat16 for a LoRA
    run's frozen base on a CPU with native bfloat16, else float32)."""
    from grpo.models.loading import pick_dtype

    settings = dict(GRPO_VARIANTS[variant][mode])
    dtype = pick_dtype(settings.get("dtype", "auto"), trained=mode == "full")
    return settings | {"dtype": str(dtype).removeprefix("torch.")}


def plan(configs: list[str], parity: list[str], kinds: list[str]) -> list[tuple[str, str, str, str]]:
    """The rows to compare: (label, config, grpo variant, TRL variant). A grpo variant that resolves here to
    the settings of one before it (bfloat16 where auto is bfloat16 already) runs as that one, and a row that
    then repeats an earlier row is left out."""
    table = [("defaults", name, "defaults", "defaults") for name in configs]
    for name in parity:
        mode = "lora" if CONFIGS[name]["use_lora"] else "full"
        for kind in kinds:
            label, grpo_variant, trl_variant = ROW_KINDS[kind]
            if mode not in GRPO_VARIANTS[grpo_variant]:
                continue
            settings = resolved_settings(grpo_variant, mode)
            grpo_variant = next(v for v in GRPO_VARIANTS if mode in GRPO_VARIANTS[v]
                                and resolved_settings(v, mode) == settings)  # fmt: skip
            if not any(row[1:] == (name, grpo_variant, trl_variant) for row in table):
                table.append((label, name, grpo_variant, trl_variant))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework and settings, alternating")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="configurations of the defaults table")
    parser.add_argument(
        "--parity", default="lora-mu1,full-mu1", help="configurations of the parity rows ('' for none)"
    )
    parity_rows = ",".join(kind for kind in ROW_KINDS if kind != "defaults")
    parser.add_argument("--rows", default=parity_rows, help="which parity rows (ROW_KINDS)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/last_run.json"))
    parser.add_argument(
        "--huge-pages", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 for both frameworks"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first step also times each side's setup")
    if args.worker:
        worker(json.loads(args.worker))
        return

    from grpo.models.loading import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    # The model's and the libraries' files, read into the page cache from here: neither side is charged
    # for pages both share, whichever touches them first.
    import datasets
    import peft
    import pyarrow
    import transformers
    import trl

    import grpo

    libraries = [torch, transformers, trl, peft, datasets, pyarrow, grpo]
    read_once([Path(model_dir), *(Path(module.__file__).parent for module in libraries)])
    kinds = [kind for kind in args.rows.split(",") if kind]
    if unknown := [kind for kind in kinds if kind not in ROW_KINDS or kind == "defaults"]:
        parser.error(f"--rows: no parity row {unknown[0]!r}; there are: {parity_rows}")
    table = plan([c for c in args.configs.split(",") if c], [c for c in args.parity.split(",") if c], kinds)
    results: dict[str, dict] = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "THP_MEM_ALLOC_ENABLE": str(int(args.huge_pages))}
    for repeat in range(args.repeats):
        # Row by row, each grpo run next to its TRL one: grpo first in even repeats, TRL first in odd ones.
        pairs = [(("grpo", name, g), ("trl", name, t)) for _, name, g, t in table]
        pairs = pairs if repeat % 2 == 0 else [pair[::-1] for pair in pairs]
        order = list(dict.fromkeys(run for pair in pairs for run in pair))
        for index, (framework, name, variant) in enumerate(order):
            key = f"{framework}/{name}/{variant}"
            print(f"[{repeat + 1}/{args.repeats}, {index + 1}/{len(order)}] {key} …", flush=True)
            out = Path(tempfile.mkdtemp()) / "result.json"
            job = {"framework": framework, "config": name, "variant": variant, "model": model_dir,
                   "steps": args.steps, "warmup": args.warmup, "out": str(out)}  # fmt: skip
            run = run_worker(job, env)
            slot = results.setdefault(key, {})
            for field, value in run.items():
                slot.setdefault(field, []).append(value)
            args.output.write_text(json.dumps({"partial": True, "rows": table, "results": results}))

    facts = machine_facts(model_dir)
    report = summarise(table, results, facts, args)
    print(report)
    args.output.write_text(json.dumps({"facts": facts, "rows": table, "results": results,
                                       "huge_pages": args.huge_pages, "steps": args.steps,
                                       "warmup": args.warmup, "repeats": args.repeats, "report": report},
                                      indent=1))  # fmt: skip


# --- report ----------------------------------------------------------------------------------------------
def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def flat(run: dict, field: str) -> list[float]:
    return [v for repeat in run[field] for v in repeat]


def peak_flops(facts: dict, compute_dtype: str) -> float:
    flops = facts["matmul_flops"]
    return (
        flops.get("bfloat16", flops["float32"]) if compute_dtype.startswith("bfloat16") else flops["float32"]
    )


def summarise(table: list, results: dict, facts: dict, args: argparse.Namespace) -> str:
    per_step = PROMPTS_PER_STEP * GROUP
    per_token_flops = 2 * facts["params"]  # a generated token goes through all weights, tied head included
    versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
    measure = next(iter(results.values()))["memory_measure"][0]
    lines = [
        f"date {facts['date']}; {facts['cpu'].get('Model name', platform.machine())}, "
        f"{facts['cpu'].get('CPU(s)', os.cpu_count())} CPUs ({' '.join(facts['cpu']['flags'])}), "
        f"{facts['threads']} threads; {versions}",
        f"work: {PROMPTS_PER_STEP} prompts × {GROUP} completions × ≤{COMPLETION_TOKENS} tokens, beta {BETA}, "
        f"loss grpo, LoRA r {LORA['r']} or full; THP_MEM_ALLOC_ENABLE={int(args.huge_pages)}; "
        f"{args.steps} timed steps after {args.warmup} × {args.repeats} repeats, alternating; "
        f"median (min–max); peak memory: {measure}, the highest of the repeats",
        "",
        "| row | config | grpo s/step | TRL s/step | time ratio | grpo peak MB | TRL peak MB | memory ratio "
        "| grpo gen tok/s | TRL gen tok/s | grpo / TRL mean length | grpo / TRL dtype |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    work_lines = ["", "Equal work, every step (warm-up first): reward, KL, loss, grpo | TRL", ""]
    limit_lines = [""]
    seen_work = set()
    for label, name, grpo_variant, trl_variant in table:
        runs = {"grpo": results[f"grpo/{name}/{grpo_variant}"], "trl": results[f"trl/{name}/{trl_variant}"]}
        step = {k: flat(v, "step_times") for k, v in runs.items()}
        median = {k: statistics.median(v) for k, v in step.items()}
        peak = {k: max(v["peak_mb"]) for k, v in runs.items()}
        generation = {k: statistics.median(flat(v, "generation_times")) for k, v in runs.items()}
        length = {k: statistics.median(flat(v, "mean_lengths")) for k, v in runs.items()}
        tokens_per_s = {k: length[k] * per_step / generation[k] for k in runs}
        dtype = {k: v["compute_dtype"][0] for k, v in runs.items()}
        lines.append(
            f"| {label} | {name} | {spread(step['grpo'])} | {spread(step['trl'])} "
            f"| **{median['grpo'] / median['trl']:.2f}** | {peak['grpo']:.0f} | {peak['trl']:.0f} "
            f"| **{peak['grpo'] / peak['trl']:.2f}** "
            f"| {tokens_per_s['grpo']:.0f} | {tokens_per_s['trl']:.0f} "
            f"| {length['grpo']:.0f} / {length['trl']:.0f} | {dtype['grpo']} / {dtype['trl']} |"
        )
        for k, run in runs.items():
            key = (k, name, grpo_variant if k == "grpo" else trl_variant)
            if key in seen_work:
                continue
            seen_work.add(key)
            repeats = [zip(run["reward"][i], run["kl"][i], run["loss"][i]) for i in range(len(run["reward"]))]
            cells = [" / ".join(f"{r:.3f} {kl:.4f} {loss:+.4f}" for r, kl, loss in s) for s in zip(*repeats)]
            work_lines.append(f"- {k} {name} {key[2]}: " + "; ".join(cells))
        if label != "defaults":
            continue
        mu, backward = CONFIGS[name]["mu"], 1 if CONFIGS[name]["use_lora"] else 2
        reached = []
        for k in runs:
            # Useful work: μ × (forward + backward) plus the reference forward; recomputation not counted.
            work = length[k] * per_step * per_token_flops * ((1 + backward) * mu + 1)
            flops = peak_flops(facts, dtype[k])
            training = work / (median[k] - generation[k]) / flops
            # A decoding step reads every weight once for the batch, and computes 2P FLOPs per row.
            weight_bytes = facts["params"] * (2 if dtype[k] == "bfloat16" else 4)  # autocast reads float32
            bound = min(flops / per_token_flops, facts["bandwidth"] * per_step / weight_bytes)
            decoding = tokens_per_s[k] / bound
            reached.append((k, training, decoding))
        (_, training, decoding), (_, trl_training, trl_decoding) = reached
        marks = {
            "time": median["grpo"] / median["trl"] <= TARGETS["time"],
            "memory": peak["grpo"] / peak["trl"] <= TARGETS["memory"],
            "training": training >= TARGETS["training"],
            "decoding": decoding >= TARGETS["decoding"],
        }
        limit_lines.append(
            f"- {name}: time {median['grpo'] / median['trl']:.2f}× {'✓' if marks['time'] else '✗'} (≤ "
            f"{TARGETS['time']}), memory {peak['grpo'] / peak['trl']:.2f}× {'✓' if marks['memory'] else '✗'} "
            f"(≤ {TARGETS['memory']}), training {training:.0%} of the matmul peak "
            f"{'✓' if marks['training'] else '✗'} (TRL {trl_training:.0%}), decoding {decoding:.0%} of the "
            f"batch bound {'✓' if marks['decoding'] else '✗'} (TRL {trl_decoding:.0%})"
        )
    flops = facts["matmul_flops"]
    lines += [
        "",
        "Machine: matmul "
        + ", ".join(f"{v / 1e9:.0f} GFLOP/s in {k}" for k, v in flops.items())
        + f" (2048², the faster of BLAS and oneDNN), copy bandwidth {facts['bandwidth'] / 1e9:.1f} GB/s. "
        f"Model: {facts['params'] / 1e6:.0f}M parameters. Training and decoding are measured against the "
        "peak of the dtype each side computes in.",
        *limit_lines,
        *work_lines,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
