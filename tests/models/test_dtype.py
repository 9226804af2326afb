"""The weights' dtype: "auto" on a CPU; LoRA over a bfloat16 base (float32 adapters, merged in float32)."""

from __future__ import annotations

import pytest
import torch
from cli_args import base_args
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from grpo.cli.main import app
from grpo.config.grpo import GRPOConfig
from grpo.models.loading import pick_dtype, save_final_model
from grpo.models.policy import load_policy


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is bfloat16 on a GPU that supports it")
def test_auto_is_float32_on_a_cpu():
    assert pick_dtype("auto") is torch.float32


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
    final = AutoModelForCausalLM.from_pretrained(output / "final_model")
    assert {p.dtype for p in final.parameters()} == {torch.float32}
