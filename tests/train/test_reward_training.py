"""Reward-model training: the Bradley-Terry loss by hand, the tiny model learning a preference it can only
learn from the answers' words, its saved model scoring through the reward_model kind as it scored in
training, and bad input refused before anything is written."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import separable_pairs, write_pairs
from rich.console import Console
from safetensors.torch import load_file

from grpo.algo.preference_losses import bradley_terry_loss
from grpo.config.loading import load_settings
from grpo.config.stages import RewardModelConfig
from grpo.errors import ConfigError, DataError
from grpo.rewards.model import make_reward_model
from grpo.train.reward_model import load_train_and_eval_pairs, run_reward_model


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_the_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # Margins +1 and −1: the mean of −log σ(1) = log(1 + e^−1) and −log σ(−1) = log(1 + e).
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)
    assert metrics == {"accuracy": 0.5, "margin": 0.0}
    loss.backward()
    # ∂loss/∂r_chosen = −σ(−margin) / n < 0: a step down the gradient raises the chosen reward and lowers
    # the rejected one, the more so for the pair it gets wrong.
    assert chosen.grad.tolist() == pytest.approx([-sigmoid(-1) / 2, -sigmoid(1) / 2])
    assert rejected.grad.tolist() == pytest.approx([sigmoid(-1) / 2, sigmoid(1) / 2])


def test_the_centering_term_adds_the_mean_squared_sum_of_each_pairs_rewards():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    plain, _ = bradley_terry_loss(chosen, rejected)
    centred, _ = bradley_terry_loss(chosen, rejected, center_coefficient=0.1)
    assert centred.item() == pytest.approx(plain.item() + 0.1 * (3.0**2 + 1.0**2) / 2)


def test_an_overwhelming_margin_gives_a_finite_loss():
    loss, metrics = bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0]))
    assert loss.item() == pytest.approx(1000.0) and metrics["accuracy"] == 0.0


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RewardModelConfig, dict]:
    directory = tmp_path_factory.mktemp("reward-model")
    config = RewardModelConfig(
        model_name_or_path=str(tiny_model),
        dataset=str(separable_pairs(directory / "pairs.jsonl")),
        eval_fraction=0.25,
        learning_rate=1e-2,
        max_steps=36,
        logging_steps=4,
        output_dir=str(directory / "run"),
    )
    return config, run_reward_model(config, quiet())


def test_the_tiny_model_learns_a_separable_preference(trained, tiny_model):
    config, summary = trained
    run = Path(config.output_dir)
    assert (summary["train_pairs"], summary["eval_pairs"], summary["steps"]) == (48, 16, 36)
    assert summary["held_out_accuracy_after"] >= 0.9 > summary["held_out_accuracy_before"]
    assert summary["held_out_margin_after"] > 0
    assert summary["train_loss_last"] < summary["train_loss_first"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert {"loss", "accuracy", "margin", "learning_rate", "grad_norm", "epoch"} <= set(lines[0])
    assert lines[-1]["epoch"] == pytest.approx(36 * 8 / 48)
    assert json.loads((run / "summary.json").read_text()) == summary

    # The backbone changed (LoRA merged into it), and the new head is there with one output.
    final = Path(summary["final_model"])
    weights, base = load_file(final / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[name], base[name])
    assert weights["score.weight"].shape == (1, 32)


def test_the_final_model_is_a_plain_classifier_in_safetensors(trained):
    _, summary = trained
    final = Path(summary["final_model"])
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] is not None and len(config["id2label"]) == 1
    assert not list(final.glob("adapter_*")) and not list(final.glob("*.bin"))
    assert (final / "tokenizer.json").is_file()


def test_the_reward_kind_scores_the_held_out_pairs_as_training_did(trained):
    config, summary = trained
    _, held_out = load_train_and_eval_pairs(config)
    evaluated = json.loads((Path(config.output_dir) / "eval_after.json").read_text())["rows"]
    reward = make_reward_model(model=summary["final_model"], max_length=config.max_length, device="cpu")
    prompts = [pair["prompt"] for pair in held_out]
    chosen = reward(prompts, [[{"role": "assistant", "content": p["chosen"]}] for p in held_out])
    rejected = reward(prompts, [[{"role": "assistant", "content": p["rejected"]}] for p in held_out])
    assert chosen == pytest.approx([row["chosen"] for row in evaluated], abs=1e-4)
    assert rejected == pytest.approx([row["rejected"] for row in evaluated], abs=1e-4)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    assert accuracy == summary["held_out_accuracy_after"]


def test_full_fine_tuning_saves_the_same_kind_of_model(tiny_model, tmp_path):
    config = RewardModelConfig(
        model_name_or_path=str(tiny_model),
        dataset=str(separable_pairs(tmp_path / "pairs.jsonl")),
        use_lora=False,
        learning_rate=1e-3,
        max_steps=2,
        output_dir=str(tmp_path / "run"),
    )
    summary = run_reward_model(config, quiet())
    reward = make_reward_model(model=summary["final_model"], device="cpu")
    assert len(reward(["What is 1 + 1?"], ["the answer is 2"])) == 1


def test_a_pairs_file_with_a_missing_field_names_its_row_and_writes_nothing(tiny_model, tmp_path):
    good = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
    path = write_pairs(tmp_path / "pairs.jsonl", [good, good, {"prompt": "What is 2 + 2?", "chosen": "4"}])
    config = RewardModelConfig(
        model_name_or_path=str(tiny_model), dataset=str(path), output_dir=str(tmp_path / "run")
    )
    with pytest.raises(DataError, match=rf"{path}: row 3: field 'rejected' must be a non-empty string"):
        run_reward_model(config, quiet())
    assert not (tmp_path / "run").exists()


def test_a_file_is_split_into_disjoint_training_and_held_out_pairs(tmp_path):
    path = separable_pairs(tmp_path / "pairs.jsonl")
    config = RewardModelConfig(dataset=str(path), eval_fraction=0.1, max_eval_pairs=0)
    train, held_out = load_train_and_eval_pairs(config)
    assert (len(train), len(held_out)) == (58, 6)  # round(64 × 0.1)
    questions = [{p["prompt"][0]["content"] for p in pairs} for pairs in (train, held_out)]
    assert not questions[0] & questions[1]
    other = RewardModelConfig(dataset=str(path), eval_dataset=str(path), max_train_pairs=10)
    train, held_out = load_train_and_eval_pairs(other)
    assert (len(train), len(held_out)) == (10, 64)


def test_the_built_in_set_is_held_out_by_its_test_split():
    train, held_out = load_train_and_eval_pairs(RewardModelConfig(max_train_pairs=0, max_eval_pairs=0))
    assert len(train) > 2000 and 220 < len(held_out) < 240


def test_settings_come_from_a_file_then_flags(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("model: some/dir\nlearning_rate: 5e-5\nmax_train_pairs: 64\n")
    config = load_settings(RewardModelConfig, path, {"max-train-pairs": "32", "use_lora": "false"})
    assert (config.model_name_or_path, config.learning_rate) == ("some/dir", 5e-5)
    assert (config.max_train_pairs, config.use_lora) == (32, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_fraction": "1"}, r"eval_fraction must be in \[0, 1\)"),
        ({"per_device_train_batch_size": "0"}, "per_device_train_batch_size must be at least 1"),
        ({"lr_scheduler_type": "cosine_with_min_lr"}, "lr_scheduler_type must be one of"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"max_lenght": "64"}, "unknown setting 'max_lenght'; did you mean 'max_length'"),
    ],
)
def test_bad_settings_name_their_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(RewardModelConfig, None, overrides)


@pytest.mark.slow
def test_the_default_model_learns_human_preferences_on_hh_rlhf(tmp_path):
    """The default run: SmolLM2-135M-Instruct with LoRA on the first pairs of the built-in hh-rlhf set."""
    summary = run_reward_model(RewardModelConfig(output_dir=str(tmp_path / "run")), quiet())
    print(json.dumps(summary, indent=1))
    assert summary["eval_pairs"] >= 200
    assert summary["held_out_accuracy_after"] > 0.55
