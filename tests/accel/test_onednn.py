"""Linear layers through oneDNN (grpo.accel.onednn) give F.linear's values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.accel import onednn
from grpo.models.loading import enable_checkpointing

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_in_value_and_gradients(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    weight = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    upstream = torch.randn(3, 5, 24)
    got = onednn.OneDNNLinear.apply(x, weight, b)
    (got * upstream).sum().backward()
    grads = [t.grad.clone() for t in (x, weight, b) if t is not None]
    for t in (x, weight, b):
        if t is not None:
            t.grad = None
    want = torch.nn.functional.linear(x, weight, b)
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want)
    for a, t in zip(grads, [t for t in (x, weight, b) if t is not None], strict=True):
        torch.testing.assert_close(a, t.grad)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_a_routed_model_trains_with_the_same_gradients_under_checkpointing(tiny_model, use_lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    if use_lora:
        plain = get_peft_model(plain, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    enable_checkpointing(plain)  # the recomputation must run the routed layers too
    routed = copy.deepcopy(plain)
    assert onednn.route_linears(routed) > 0
    ids = torch.randint(10, 300, (2, 12))
    results = []
    for model in (plain, routed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-5, rtol=1e-4)


def test_transposed_and_expanded_operands_are_read_right():
    """The products read transposed views in place; any other layout (here a stride-0 gradient from
    ``sum().backward()`` and a strided slice) is copied first."""
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    x = torch.randn(16, 7).t()  # column-major
    torch.testing.assert_close(onednn.linear(x, weight), x @ weight.T)
    torch.testing.assert_close(onednn.linear(x, weight.t()[:, :5].t()), x @ weight[:5].T)
    sliced = torch.randn(7, 32)[:, ::2]
    torch.testing.assert_close(onednn.linear(sliced, weight), sliced @ weight.T)

    x, weight = x.clone().requires_grad_(), weight.requires_grad_()
    onednn.OneDNNLinear.apply(x, weight, None).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(7, 16))
    torch.testing.assert_close(weight.grad, x.sum(0).expand(24, 16))
