"""The weights' dtype: "auto" on a CPU with and without native bfloat16; LoRA over a bfloat16 base (float32
adapters, merged in float32)."""

from __future__ import annotations

import pytest
import torch
from cli_args import base_args
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from grpo.cli.main import app
from grpo.config.grpo import GRPOConfig
from grpo.errors import ConfigError
from grpo.models.loading import NATIVE_BF16_ENV, pick_dtype, save_final_model, weight_dtypes
from grpo.models.policy import load_policy

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="auto is bfloat16 on a GPU that supports it")


@cpu_only
def test_auto_is_float32_on_a_cpu_without_native_bfloat16(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert pick_dtype("auto", trained=False) is torch.float32
    assert pick_dtype("auto", trained=True) is torch.float32


@cpu_only
def test_auto_keeps_only_frozen_weights_in_bfloat16_on_a_cpu_that_has_it(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert pick_dtype("auto", trained=False) is torch.bfloat16
    assert pick_dtype("auto") is torch.float32  # trained weights: no float32 master copy to round into


@cpu_only
def test_the_override_takes_0_or_1_only(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    for trained in (False, True):
        with pytest.raises(ConfigError, match=NATIVE_BF16_ENV):
            pick_dtype("auto", trained=trained)


@cpu_only
@pytest.mark.parametrize("use_lora", [True, False])
def test_auto_on_a_native_bfloat16_cpu_keeps_what_is_trained_in_float32(tiny_model, monkeypatch, use_lora):
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    models, _ = load_policy(GRPOConfig(model_name_or_path=str(tiny_model), use_lora=use_lora, beta=0.04))
    frozen = {p.dtype for p in models.policy.parameters() if not p.requires_grad}
    assert {p.dtype for p in models.policy.parameters() if p.requires_grad} == {torch.float32}
    assert frozen == ({torch.bfloat16} if use_lora else set())
    if not use_lora:
        assert {p.dtype for p in models.reference_model.parameters()} == {torch.float32}
    assert weight_dtypes(models.policy) == ("bfloat16, trained float32" if use_lora else "float32")


@cpu_only
def test_a_bad_override_stops_a_run_with_one_line(tiny_model, tiny_dataset, tmp_path, reward_file):
    args = base_args(tiny_model, tiny_dataset, tmp_path / "run", reward_file)
    result = CliRunner().invoke(app, ["train", *args], env={NATIVE_BF16_ENV: "on"})
    assert result.exit_code == 2, result.output
    assert f"{NATIVE_BF16_ENV}='on'" in result.output and "Traceback" not in result.output


def test_named_dtypes_are_taken_as_they_are():
    assert pick_dtype("float32") is torch.float32
    assert pick_dtype("bfloat16") is torch.bfloat16


def bfloat16_lora(tiny_model):
    return load_policy(GRPOConfig(model_name_or_path=str(tiny_model), dtype="bfloat16"))


def test_lora_over_a_bfloat16_base_trains_float32_adapters(tiny_model):
    models, _ = bfloat16_lora(tiny_model)
    assert {p.dtype for p in models.policy.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in models.policy.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_adapters_merge_into_a_bfloat16_base_in_float32(tiny_model, tmp_path):
    models, tokenizer = bfloat16_lora(tiny_model)
    with torch.no_grad():
        for name, parameter in models.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1e-3)  # an update far below a bfloat16 weight's resolution
    layer = models.policy.base_model.model.model.layers[0].self_attn.q_proj
    update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = layer.base_layer.weight.float() + update
    save_final_model(models.policy, tokenizer, tmp_path / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").model.layers[0].self_attn.q_proj.weight
    assert merged.dtype is torch.float32
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    # A merge in bfloat16 would have lost most of the update: what this test guards against.
    rounded = (layer.base_layer.weight + update.bfloat16()).float()
    assert (rounded - expected).abs().max() > 1e-5


def test_a_run_trains_over_a_bfloat16_base(tiny_model, tiny_dataset, tmp_path, reward_file):
    output = tmp_path / "run"
    args = [*base_args(tiny_model, tiny_dataset, output, reward_file), "--max-steps", "2", "--beta", "0.04"]
    result = CliRunner().invoke(app, ["train", *args, "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "(bfloat16, trained float32)" in result.output  # the run says what it computes in
    final = AutoModelForCausalLM.from_pretrained(output / "final_model")
    assert {p.dtype for p in final.parameters()} == {torch.float32}
