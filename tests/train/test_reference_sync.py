"""Iterative RL: the reference model becomes the current policy every `ref_model_sync_steps` steps, under
LoRA (a frozen copy of the adapters) and full fine-tuning (a copy of the weights), and survives a resume."""

from __future__ import annotations

import ctypes
import json
import mmap

import pytest
import torch
from cli_args import base_args
from safetensors.torch import load_file
from typer.testing import CliRunner

from grpo.accel import fused
from grpo.accel.offload import MappedParameters, offload_reference
from grpo.cli.main import app
from grpo.config.grpo import GRPOConfig
from grpo.models.loading import trainable_parameters
from grpo.models.policy import load_policy
from grpo.rollout.scoring import completion_logps

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    ("use_lora", "offload"), [(True, False), (False, False), (False, True)], ids=["lora", "full", "offloaded"]
)
def test_after_a_sync_the_reference_is_a_frozen_copy_of_the_policy(tiny_model, use_lora, offload, tmp_path):
    models, _ = load_policy(GRPOConfig(model_name_or_path=str(tiny_model), use_lora=use_lora, beta=0.1))
    if offload:  # the reference's weights in a mapped file, dropped from memory after each use
        base_logits = logits(models.reference_model)
        assert offload_reference(models, tmp_path)
        torch.testing.assert_close(logits(models.reference_model), base_logits)
        reference = models.reference_model
        assert reference.get_input_embeddings().weight is reference.get_output_embeddings().weight  # tied
        assert list(tmp_path.iterdir()) == [], "the file has no name: nothing is left behind"
        mapping = models.release_reference_weights.__self__.map  # the MappedParameters behind it
        start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        for parameter in reference.parameters():  # every weight lives in the mapped file
            assert start <= parameter.data_ptr() < start + len(mapping)
    trainable = set(trainable_parameters(models.policy))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainable_parameters(models.policy).values():
            parameter.add_(torch.randn_like(parameter) * 0.5)  # the policy has moved away from the base
    policy_before = logits(models.policy)
    with models.reference() as reference:
        assert not torch.allclose(logits(reference), policy_before), "the reference is still the base"

    models.sync_reference()
    with models.reference() as reference:
        torch.testing.assert_close(logits(reference), policy_before)
    assert set(trainable_parameters(models.policy)) == trainable, "the copy is frozen, the policy trains on"

    with torch.no_grad():
        for parameter in trainable_parameters(models.policy).values():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    with models.reference() as reference:
        torch.testing.assert_close(logits(reference), policy_before)  # the copy did not follow
        prompt_ids, prompt_mask = IDS[:, :2], torch.ones(1, 2, dtype=torch.long)
        args = (prompt_ids, prompt_mask, torch.zeros(1, dtype=torch.long), IDS[:, 2:], torch.ones(1, 3))
        plain = completion_logps(reference, *args)
        if fused.supports(reference):  # the fused forward folds the reference's adapters, not the policy's
            torch.testing.assert_close(fused.FusedDecoder(reference, 8).completion_logps(*args), plain)
    assert not torch.allclose(logits(models.policy), policy_before)


def train(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def lines(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_syncing_every_step_zeroes_the_kl_at_the_next_and_resumes_exactly(
    use_lora, tiny_model, tiny_dataset, tmp_path, reward_file
):
    def args(output, steps: int, sync: int = 1) -> list[str]:
        return [
            *base_args(tiny_model, tiny_dataset, output, reward_file),
            "--beta",
            "0.1",
            "--max-steps",
            str(steps),
            "--ref-model-sync-steps",
            str(sync),
            "--save-steps",
            "1",
            *([] if use_lora else ["--no-use-lora", "--learning-rate", "1e-3"]),
        ]

    train(args(tmp_path / "straight", 3))
    synced = lines(tmp_path / "straight")
    assert [m["reference_synced"] for m in synced] == [1.0, 1.0, 1.0]
    # μ = 1: a step's first update sees the policy the reference was synced to; only rounding remains.
    assert all(m["kl"] < 1e-7 for m in synced[1:]), [m["kl"] for m in synced]
    train(args(tmp_path / "unsynced", 3, sync=0))
    # The first update has learning rate 0 (warm-up), so the policy first moves in step 2: step 3 shows it.
    assert lines(tmp_path / "unsynced")[2]["kl"] > 1e-5, "without syncing the KL grows"

    train(args(tmp_path / "resumed", 2))
    train(["--resume", str(tmp_path / "resumed"), "--max-steps", "3"])
    timing = {"step_time", "generation_time", "tokens_per_second"}
    strip = [{k: v for k, v in m.items() if k not in timing} for m in lines(tmp_path / "resumed")]
    assert strip == [{k: v for k, v in m.items() if k not in timing} for m in synced]
    weights = "adapter_model.safetensors" if use_lora else "model.safetensors"
    a = load_file(tmp_path / "straight" / "checkpoint-3" / weights)
    b = load_file(tmp_path / "resumed" / "checkpoint-3" / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", ["--use-lora", "--no-use-lora"])
def test_an_offloaded_reference_trains_exactly_as_one_in_memory(
    tiny_model, tiny_dataset, tmp_path, reward_file, lora
):
    """Under LoRA the offloaded weights are the base the policy trains through, released layer by layer."""

    def run(output, *extra: str) -> list[dict]:
        common = [*base_args(tiny_model, tiny_dataset, output, reward_file), lora]
        train([*common, "--beta", "0.1", "--max-steps", "3", "--learning-rate", "1e-3", *extra])
        timing = {"step_time", "generation_time", "tokens_per_second"}
        return [{k: v for k, v in m.items() if k not in timing} for m in lines(output)]

    offloaded = run(tmp_path / "offloaded", "--offload-reference")
    assert offloaded == run(tmp_path / "in-memory")
    assert offloaded[-1]["kl"] > 0  # the reference was used, and the policy moved away from it


def test_mapped_parameters_release_all_or_some_and_keep_their_values(tmp_path):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 5))
    before = {name: p.detach().clone() for name, p in layers.named_parameters()}
    mapped = MappedParameters(layers.parameters(), tmp_path)
    assert all(p.data_ptr() in mapped.regions for p in layers.parameters())
    offsets = sorted(offset for offset, _ in mapped.regions.values())
    assert all(offset % mmap.PAGESIZE == 0 for offset in offsets)  # each can be released alone
    mapped.release([layers[0].weight, torch.zeros(3)])  # a tensor that is not mapped is left alone
    assert all(torch.equal(p, before[name]) for name, p in layers.named_parameters())
    with torch.no_grad():
        layers[1].bias.add_(1.0)  # writes go to the file and survive a release
    mapped.release()
    assert torch.equal(layers[1].bias, before["1.bias"] + 1.0)
    assert torch.equal(layers[0].weight, before["0.weight"])
