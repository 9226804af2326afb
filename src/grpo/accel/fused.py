"""A fused, inference-only forward for Llama-family decoders: sampling and the reference log-probs.

transformers' forward is written for every model and every use. For the two places where grpo runs a model
without gradients (sampling, and the reference model's log-probs) this module runs the same arithmetic
faster on a CPU:

- LoRA adapters are folded into the weights once per use, so a token costs no adapter products;
- q/k/v and gate/up are joined into one matrix product each;
- on a CPU the weights are packed once for oneDNN, which runs the thin products of a decoding step about twice
  as fast as the default BLAS on CPUs where it was measured (the LM head especially);
- keys and values live in one buffer sized once, and grouped-query attention attends without repeating heads.

It covers the models whose layers are exactly RMSNorm → attention with rotary positions and grouped heads →
RMSNorm → SiLU-gated MLP, over the whole past (Llama, Mistral and Qwen2 without a sliding window); anything
else keeps transformers' forward. :func:`supports` says which. Tests compare it with transformers' forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grpo.accel import onednn
from grpo.algo.logprobs import token_logps_in_place
from grpo.models.structure import adapter_factors, effective_linear, unwrap
from grpo.rollout.sampling import prompt_positions

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


ROWS_PER_CHUNK = 256  # LM-head rows at a time when scoring: bounds the (rows, vocab) temporary


def supports(model: nn.Module) -> bool:
    """Whether :class:`FusedDecoder` computes exactly what this model's own forward computes."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    if getattr(config, "sliding_window", None) is not None:
        return False
    embeddings = base.get_input_embeddings()
    if not embeddings.weight.dtype.is_floating_point or hasattr(embeddings, "base_layer"):
        return False
    from grpo.models.structure import is_sharded

    if is_sharded(model):  # FSDP: each rank holds slices of the weights, gathered layer by layer
        return False
    for module in base.modules():
        if hasattr(module, "lora_A"):
            if type(module).__name__ != "Linear" or any(getattr(module, "use_dora", {}).values()):
                return False
            if any(getattr(module, "lora_bias", {}).values()):
                return False
    return True


class PackedLinear:
    """``F.linear`` with its weight packed once for oneDNN on a CPU (float32), else plain ``F.linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, pack: bool = True):
        self.packed = (
            pack and weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn.available()
        )
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if self.packed else weight
        self.bias = bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class JoinedLinear:
    """Linear layers that read the same input, as one product of a joined copy of their weights (adapters
    folded in), packed once for oneDNN on a CPU in float32. Returns each layer's output.

    Adapters held in a wider dtype than the weights they adapt (float32 LoRA over a bfloat16 base) stay
    apart, as thin products of their own: folded into a bfloat16 weight, an update below its resolution
    would round away, and sampling would not see what training learned."""

    def __init__(self, modules: list[nn.Module], batch_hint: int, pack: bool = True):
        factors = [adapter_factors(m) for m in modules]
        apart = any(
            a.dtype.itemsize > getattr(m, "base_layer", m).weight.dtype.itemsize
            for m, layer in zip(modules, factors)
            for a, _ in layer
        )
        parts = [effective_linear(m, fold_adapters=not apart) for m in modules]
        weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
        bias = None
        if any(b is not None for _, b in parts):
            bias = torch.cat([b if b is not None else w.new_zeros(len(w)) for w, b in parts])
        self.product = PackedLinear(weight, bias, batch_hint, pack)
        self.sizes = [len(w) for w, _ in parts]
        self.update = LowRankUpdate(factors, self.sizes) if apart else None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.product(x)
        if self.update is not None:
            y = (self.update(x) + y).to(y.dtype)  # summed in the adapters' dtype, as peft does
        return list(y.split(self.sizes, dim=-1))


class LowRankUpdate:
    """The adapters of joined layers as two thin products: x Aᵀ for every adapter at once, then each layer's
    scaled B over its own adapters' columns (a block-diagonal matrix)."""

    def __init__(self, factors: list[list[tuple[torch.Tensor, torch.Tensor]]], sizes: list[int]):
        self.down = torch.cat([a for layer in factors for a, _ in layer])
        self.up = self.down.new_zeros(sum(sizes), len(self.down))
        row = column = 0
        for size, layer in zip(sizes, factors):
            for a, scaled_b in layer:
                self.up[row : row + size, column : column + len(a)] = scaled_b
                column += len(a)
            row += size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)


@dataclass
class FusedLayer:
    input_norm: torch.Tensor
    qkv: JoinedLinear
    out: JoinedLinear
    post_norm: torch.Tensor
    gate_up: JoinedLinear
    down: JoinedLinear


class KVCache:
    """Keys and values of every layer in one buffer per kind: (layers, rows, kv_heads, capacity, head_dim)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int = 0):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def empty(cls, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int, like: torch.Tensor):
        shape = (layers, rows, kv_heads, capacity, head_dim)
        return cls(like.new_empty(shape), like.new_empty(shape))

    def gathered(self, rows: torch.Tensor, capacity: int) -> KVCache:
        """A cache of ``capacity`` positions holding these rows (in this order, repeats allowed)."""
        layers, _, heads, _, dim = self.keys.shape
        new = KVCache.empty(layers, len(rows), heads, capacity, dim, self.keys)
        new.keys[:, :, :, : self.length] = self.keys[:, rows, :, : self.length]
        new.values[:, :, :, : self.length] = self.values[:, rows, :, : self.length]
        new.length = self.length
        return new

    def compacted(self, rows: torch.Tensor) -> KVCache:
        """A cache of these rows (increasing), moved to the front of the same buffers: no second cache in
        memory while rows finish, as :meth:`gathered` would make."""
        for new, old in enumerate(rows.tolist()):
            if new != old:  # old > new: rows not yet moved are never overwritten
                self.keys[:, new, :, : self.length] = self.keys[:, old, :, : self.length]
                self.values[:, new, :, : self.length] = self.values[:, old, :, : self.length]
        return KVCache(self.keys[:, : len(rows)], self.values[:, : len(rows)], self.length)


class FusedDecoder:
    """A model's current weights (adapters folded in), run without autograd.

    Build one per use and drop it before the model's weights change: joined, folded and packed weights are
    copies taken when it is built, the others are the model's own tensors. ``pack`` packs the products'
    weights for oneDNN (``batch_hint``: the rows a product is expected to have), which pays most for the
    thin products of decoding and less for scoring a micro-batch of whole completions.
    ``release`` is given the model's weights behind each product as soon as they are copied, so that weights
    offloaded to a file leave resident memory as their copies arrive
    (:meth:`grpo.models.policy.PolicyAndReference.release_reference`).

    Copies, because reading the model's own weights (LoRA applied as two thin products per layer) was
    measured slower (benchmarks/RESULTS.md).
    """

    @torch.no_grad()
    def __init__(
        self,
        model: nn.Module,
        batch_hint: int = 32,
        pack: bool = True,
        release: Callable[[list[torch.Tensor]], None] | None = None,
    ):
        base = unwrap(model)
        config = base.config
        decoder = base.model
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.embed = decoder.embed_tokens.weight.detach()
        self.rotary = decoder.rotary_emb
        self.final_norm = decoder.norm.weight.detach()

        def products(modules: list[nn.Module]) -> JoinedLinear:
            joined = JoinedLinear(modules, batch_hint, pack)
            if release is not None:
                release([getattr(m, "base_layer", m).weight for m in modules])
            return joined

        self.lm_head = products([base.lm_head])
        self.scaling = getattr(decoder.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.layers = []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                FusedLayer(
                    input_norm=layer.input_layernorm.weight.detach(),
                    qkv=products([attention.q_proj, attention.k_proj, attention.v_proj]),
                    out=products([attention.o_proj]),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=products([mlp.gate_proj, mlp.up_proj]),
                    down=products([mlp.down_proj]),
                )
            )

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache.empty(len(self.layers), rows, self.num_kv_heads, capacity, self.head_dim, self.embed)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, H) of ``input_ids`` (B, T), appended to ``cache``.

        ``positions`` (B, T) are the rotary positions; ``key_mask`` (B, ≥ cache.length + T) is True where a
        cached or new position may be attended to (False on padding). New tokens attend causally.
        """
        batch, width = input_ids.shape
        start, end = cache.length, cache.length + width
        if end > cache.keys.shape[3]:
            raise RuntimeError(f"key/value cache capacity {cache.keys.shape[3]} exceeded")
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        bias = attention_bias(key_mask[:, :end], start, width, x.dtype)
        q_size = self.num_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden_size,), layer.input_norm, self.eps)
            q, k, v = layer.qkv(h)
            q = rotate(q.view(batch, width, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = rotate(k.view(batch, width, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            cache.keys[index, :, :, start:end] = k
            cache.values[index, :, :, start:end] = v.view(batch, width, self.num_kv_heads, -1).transpose(1, 2)
            attended = grouped_attention(
                q, cache.keys[index, :, :, :end], cache.values[index, :, :, :end], bias, self.scaling
            )
            x = x + layer.out(attended.transpose(1, 2).reshape(batch, width, q_size))[0]
            h = F.rms_norm(x, (self.hidden_size,), layer.post_norm, self.eps)
            gate, up = layer.gate_up(h)
            x = x + layer.down(F.silu(gate) * up)[0]
        cache.length = end
        return F.rms_norm(x, (self.hidden_size,), self.final_norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[0]

    @torch.no_grad()
    def completion_logps(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        prompt_index: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """What :func:`grpo.rollout.scoring.completion_logps` computes, without gradients: each prompt run
        once."""

        used, local_index = torch.unique(prompt_index, return_inverse=True)
        prompt_ids, prompt_mask = prompt_ids[used], prompt_mask[used].bool()
        positions = prompt_positions(prompt_mask)
        width = completion_ids.shape[1]
        cache = self.new_cache(len(used), prompt_ids.shape[1])
        last = self.forward(prompt_ids, positions, prompt_mask, cache)[:, -1:]
        logps = [token_logps_in_place(self.logits(last[local_index]), completion_ids[:, :1], temperature)]
        if width > 1:
            cache = cache.gathered(local_index, prompt_ids.shape[1] + width)
            key_mask = torch.cat([prompt_mask[local_index], completion_mask.bool()], dim=1)
            steps = positions[local_index, -1:] + 1 + torch.arange(width - 1, device=positions.device)
            hidden = self.forward(completion_ids[:, :-1], steps, key_mask, cache)
            tokens = completion_ids[:, 1:]
            flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
            chunks = [
                token_logps_in_place(self.logits(h), t, temperature)
                for h, t in zip(flat_hidden.split(ROWS_PER_CHUNK), flat_tokens.split(ROWS_PER_CHUNK))
            ]
            logps.append(torch.cat(chunks).view(tokens.shape))
        return torch.cat(logps, dim=1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half layout that Llama-family checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_bias(key_mask: torch.Tensor, start: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, L): new token t sees cached or new positions ≤ start + t that are not
    padding. A query with nothing to see (a padding position in a prompt) gets a finite, unused row."""
    length = key_mask.shape[1]
    causal = torch.arange(length, device=key_mask.device) <= (
        start + torch.arange(width, device=key_mask.device)
    ).unsqueeze(1)
    allowed = causal.unsqueeze(0) & key_mask.bool().unsqueeze(1)  # (B, T, L)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias.unsqueeze(1)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + bias)·v with q (B, H, T, D), k and v (B, H_kv, L, D), H = groups × H_kv, and
    bias (B, 1, T, L).

    Several tokens at once (prefill, scoring) go through PyTorch's fused attention, which reads each key and
    value head once for its group. One token (a decoding step) does not: there the query heads that share a
    key/value head are stacked along the query axis and take two small products, which on a CPU costs about
    a fifth less than the fused kernel's set-up.
    """
    batch, heads, width, dim = q.shape
    kv_heads = k.shape[1]
    if width > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling, enable_gqa=True)
    stacked = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(stacked, k.transpose(-1, -2)).mul_(scaling).add_(bias)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)  # float32 as transformers, for bf16
    return torch.matmul(weights, v).view(batch, heads, width, dim)


def sampling_decoder(
    model: nn.Module, batch_hint: int, release: Callable[[list[torch.Tensor]], None] | None = None
) -> FusedDecoder | None:
    """A :class:`FusedDecoder` of the model's current weights (copies: decoding's thin products pay for
    them) when it :func:`supports` it, else None."""
    return FusedDecoder(model, batch_hint, release=release) if supports(model) else None


def fused_decoding(
    model: nn.Module, release: Callable[[list[torch.Tensor]], None] | None = None
) -> Callable[[int], Callable[[int], FusedSteps] | None]:
    """A :class:`grpo.rollout.backends.DefaultBackend` ``decoder``: for a batch of ``rows``, the fused
    decoding steps of the model's current weights, or None where the fused decoder does not apply."""

    def for_rows(rows: int) -> Callable[[int], FusedSteps] | None:
        decoder = sampling_decoder(model, rows, release)
        return None if decoder is None else functools.partial(FusedSteps, decoder)

    return for_rows


class FusedSteps:
    """The same steps through a :class:`grpo.accel.fused.FusedDecoder` and its single key/value buffer."""

    def __init__(self, decoder: FusedDecoder, capacity: int):
        self.decoder, self.capacity = decoder, capacity

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.cache = self.decoder.new_cache(len(ids), ids.shape[1])
        return self.decoder.logits(self.decoder.forward(ids, positions, mask.bool(), self.cache)[:, -1])

    def expand(self, repeats: int) -> None:
        rows = torch.arange(self.cache.keys.shape[1], device=self.cache.keys.device)
        self.cache = self.cache.gathered(rows.repeat_interleave(repeats), self.capacity)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache = self.cache.compacted(rows)

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder.forward(tokens, positions, mask.bool(), self.cache)
        return self.decoder.logits(hidden[:, -1])
