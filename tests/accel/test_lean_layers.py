"""grpo.accel.lean_layers.make_lean swaps two pieces of a Llama-family forward for ones that keep less for
the backward pass (grouped attention read in place, the gated MLP without silu(gate)): same results, fewer
saved bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from grpo.accel import lean_layers
from grpo.models.loading import load_causal_lm


def saved_bytes_and_grads(model, ids, mask):
    """Bytes of the distinct tensors autograd keeps for the backward pass (the weights not counted), the
    logits, and every weight's gradient."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return sum(saved.values()), logits.detach(), grads


@pytest.fixture()
def batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: transformers then passes a mask to the attention
    return ids, mask


def test_make_lean_routes_attention_and_mlps(tiny_model):
    model = lean_layers.make_lean(load_causal_lm(str(tiny_model), torch.float32))
    assert model.config._attn_implementation == lean_layers.GROUPED_SDPA
    assert all(layer.mlp.forward.__func__ is lean_layers._gated_mlp_forward for layer in model.model.layers)


def test_same_logits_and_gradients_as_transformers(tiny_model, batch):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    ours = lean_layers.make_lean(load_causal_lm(str(tiny_model), torch.float32))
    assert plain.config.num_key_value_heads < plain.config.num_attention_heads  # grouped heads
    plain_saved, plain_logits, plain_grads = saved_bytes_and_grads(plain, *batch)
    ours_saved, ours_logits, ours_grads = saved_bytes_and_grads(ours, *batch)
    torch.testing.assert_close(ours_logits, plain_logits, rtol=0, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert ours_saved < plain_saved


def four_query_heads_per_key_head() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).float()


def test_each_change_keeps_what_it_should_not(batch):
    """The gated MLP keeps one (rows, intermediate) activation less per layer; grouped attention keeps the
    keys and values once instead of once per query head that reads them."""
    model = four_query_heads_per_key_head()
    config, (batch_size, width) = model.config, batch[0].shape
    rows = batch_size * width
    plain_saved = saved_bytes_and_grads(model, *batch)[0]
    assert lean_layers.lean_gated_mlps(model) == config.num_hidden_layers
    gated_saved = saved_bytes_and_grads(model, *batch)[0]
    assert plain_saved - gated_saved == config.num_hidden_layers * rows * config.intermediate_size * 4
    lean_layers.register_grouped_attention()
    model.set_attn_implementation(lean_layers.GROUPED_SDPA)
    grouped_saved = saved_bytes_and_grads(model, *batch)[0]
    head_dim = config.hidden_size // config.num_attention_heads
    repeats = config.num_attention_heads - config.num_key_value_heads
    assert gated_saved - grouped_saved >= config.num_hidden_layers * 2 * rows * repeats * head_dim * 4


def test_gated_mlp_gradients_are_autograds_bit_for_bit():
    torch.manual_seed(1)
    gate, up = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    grad = torch.randn(5, 7)
    out = lean_layers._GatedSiLU.apply(gate, up)
    expected = torch.nn.functional.silu(gate) * up
    assert torch.equal(out, expected)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            torch.autograd.grad(out, (gate, up), grad), torch.autograd.grad(expected, (gate, up), grad)
        )
    )
