"""DPO: the loss against values worked out by hand, log-probs against a plain forward, settings, and runs on
the tiny model that must learn a preference the data makes obvious, leave the reference alone, and write
nothing when the input is bad."""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from grpo.algo.preference_losses import dpo_loss
from grpo.config.loading import load_settings
from grpo.config.stages import DPOConfig
from grpo.errors import ConfigError, DataError
from grpo.models.loading import load_causal_lm, load_tokenizer
from grpo.models.policy import load_policy
from grpo.rollout.scoring import completion_logps
from grpo.train.dpo import (
    DPOTrainer,
    EncodedPair,
    PairBatch,
    encode_pairs,
    fit_to_length,
    run_dpo,
    sequence_logps,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- the loss ----------------------------------------------------------------------------------------------


def test_dpo_loss_matches_values_worked_out_by_hand():
    # Pair 1: the policy moved +0.5 on chosen and −0.5 on rejected: rewards 0.05 and −0.05, margin 0.1.
    # Pair 2: it moved the wrong way by 1 on rejected: rewards 0 and 0.1, margin −0.1.
    loss, metrics = dpo_loss(t(-1.0, -2.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0), beta=0.1)
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.1))) / 2  # −log σ(m) = log(1 + e^−m)
    assert loss.item() == pytest.approx(expected)
    assert metrics["rewards/chosen"] == pytest.approx((0.05 + 0.0) / 2)
    assert metrics["rewards/rejected"] == pytest.approx((-0.05 + 0.1) / 2)
    assert metrics["rewards/margin"] == pytest.approx(0.0)
    assert metrics["rewards/accuracy"] == 0.5


def test_label_smoothing_mixes_in_the_loss_of_the_opposite_preference():
    loss, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * math.log1p(math.exp(-0.1)) + 0.2 * math.log1p(math.exp(0.1)))


def test_equal_policy_and_reference_give_log_2_and_no_accuracy():
    loss, metrics = dpo_loss(t(-3.0, -1.0), t(-2.0, -5.0), t(-3.0, -1.0), t(-2.0, -5.0), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["rewards/accuracy"] == 0.0  # a margin of exactly 0 prefers neither answer


def test_the_gradient_raises_the_chosen_answer_and_lowers_the_rejected_one():
    chosen, rejected = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    loss, _ = dpo_loss(chosen, rejected, t(-1.5), t(-1.5), beta=0.1)
    loss.backward()
    # d(−log σ(m))/dm = −σ(−m), and m = β (chosen − rejected) + const.
    slope = 0.1 / (1 + math.exp(0.1))
    assert chosen.grad.item() == pytest.approx(-slope)
    assert rejected.grad.item() == pytest.approx(slope)


def test_with_label_smoothing_the_gradient_vanishes_at_a_finite_margin():
    # (1 − ε) σ(−m) = ε σ(m) at m = log((1 − ε) / ε): there cDPO stops pushing the margin up.
    epsilon = 0.1
    margin = math.log((1 - epsilon) / epsilon)
    chosen = t(margin).requires_grad_()
    loss, _ = dpo_loss(chosen, t(0.0), t(0.0), t(0.0), beta=1.0, label_smoothing=epsilon)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(0.0, abs=1e-12)


# --- settings ----------------------------------------------------------------------------------------------


def test_defaults_validate():
    DPOConfig().validate()


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"max_length": 1}, "max_length"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"num_train_epochs": 0.0}, "num_train_epochs"),
        ({"max_steps": -1}, "max_steps"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"lr_scheduler_type": "cosine_with_min_lr"}, "lr_scheduler_type"),
        ({"dtype": "int8"}, "dtype"),
        ({"dataset": "pairs.jsonl", "eval_dataset": "held.jsonl", "eval_fraction": 0.1}, "eval_fraction"),
        ({"eval_fraction": 0.1}, "eval_fraction"),  # hh-rlhf has its own test split
    ],
)
def test_a_value_that_cannot_work_is_a_config_error_naming_the_field(settings, field):
    with pytest.raises(ConfigError, match=field):
        DPOConfig(**settings).validate()


def test_a_yaml_file_then_overrides_with_kebab_case_and_the_model_alias(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("model: my-model\nbeta: 0.2\nuse-lora: false\nmax_steps: 3\n")
    config = load_settings(
        DPOConfig, path, {"max-steps": "7", "learning_rate": "1e-6", "eval_dataset": "none"}
    )
    assert config.model_name_or_path == "my-model" and config.beta == 0.2 and config.use_lora is False
    assert config.max_steps == 7 and config.learning_rate == 1e-6 and config.eval_dataset is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"betta": 0.1}, "unknown setting 'betta'; did you mean 'beta'"),
        ({"beta": "high"}, "command line: beta must be a number, got 'high'"),
        ({"use_lora": "maybe"}, "use_lora must be true or false"),
        ({"dataset": None}, "dataset must not be empty"),
    ],
)
def test_a_bad_setting_names_itself(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(DPOConfig, None, overrides)


# --- pairs as tokens ---------------------------------------------------------------------------------------


def test_a_long_pair_loses_its_prompt_start_first_then_its_answer_ends():
    prompt, short, long = list(range(100)), [1, 2, 3], list(range(50))
    assert fit_to_length(prompt, short, short, 20) == (prompt[-17:], short, short)
    assert fit_to_length(prompt, short, long, 20) == (prompt[-10:], short, long[:10])  # half kept
    assert fit_to_length(prompt[:5], short, long, 20) == (prompt[:5], short, long[:15])
    assert fit_to_length(prompt[:5], short, short, 20) == (prompt[:5], short, short)


def test_summed_log_probs_are_those_of_a_plain_forward_over_prompt_answer_and_eos(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), torch.float32).eval()
    rows = [
        {"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "chosen": "7", "rejected": "3 + 4 = 8"},
        {"prompt": "A plain prompt, longer than the other", "chosen": "the answer is 12", "rejected": "1"},
    ]
    pairs = encode_pairs(rows, tokenizer, max_length=512, where="rows")
    batch = PairBatch.of(pairs, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        chosen, rejected = sequence_logps(functools.partial(completion_logps, model), batch)

    def plain(prompt_text: str, answer: str) -> float:
        prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
        ids = torch.tensor(
            [prompt + tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
        )
        with torch.no_grad():
            logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return logps[len(prompt) - 1 :].sum().item()

    chat = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    expected = [
        [plain(chat, "7"), plain(chat, "3 + 4 = 8")],
        [plain(rows[1]["prompt"], a) for a in ("the answer is 12", "1")],
    ]
    torch.testing.assert_close(
        torch.stack([chosen, rejected], dim=1), torch.tensor(expected), rtol=1e-5, atol=1e-5
    )


# --- training on the tiny model ----------------------------------------------------------------------------


def preference_rows(count: int) -> list[dict]:
    """Pairs whose chosen answer always uses the tags and whose rejected answer never does: any model that
    learns the preference at all gets held-out pairs right."""
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": f"<answer>{a + b}</answer>",
            "rejected": f"the answer is {a + b + 1}",
        }
        for a, b in [(a, b) for a in range(10) for b in range(10)][:count]
    ]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def run_settings(tiny_model: Path, tmp_path: Path, **settings) -> DPOConfig:
    tmp_path.mkdir(exist_ok=True)
    if "dataset" not in settings:
        settings = {"dataset": str(write_rows(tmp_path / "pairs.jsonl", preference_rows(40))), **settings}
    values = {
        "model_name_or_path": str(tiny_model),
        "eval_fraction": 0.25,
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 12,
        "learning_rate": 2e-2,
        "warmup_ratio": 0.0,
        "beta": 0.5,
        "seed": 3,
        **settings,
    }
    config = DPOConfig(**values)
    config.validate()
    return config


@pytest.mark.parametrize(
    "settings",
    [{}, {"use_lora": False, "learning_rate": 3e-3, "precompute_ref_log_probs": True, "logging_steps": 2}],
    ids=["lora", "full-precomputed-reference"],
)
def test_a_run_learns_the_preference_and_writes_a_loadable_model(tiny_model, tmp_path, settings):
    from transformers import AutoModelForCausalLM

    summary = run_dpo(run_settings(tiny_model, tmp_path, **settings), quiet())
    output = tmp_path / "run"
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    every = settings.get("logging_steps", 1)
    assert [m["step"] for m in lines] == list(range(every, 13, every))
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
        "grad_norm",
    ):
        assert key in lines[0], key
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.1, [m["loss"] for m in lines]
    assert summary["held_out_loss_before"] == pytest.approx(math.log(2))
    assert summary["held_out_accuracy_before"] == 0.0  # the policy starts as the reference: margins are 0
    assert summary["held_out_accuracy_after"] > 0.5
    assert summary["held_out_loss_after"] < math.log(2)
    assert (summary["train_pairs"], summary["eval_pairs"], summary["steps"]) == (30, 10, 12)
    assert json.loads((output / "summary.json").read_text()) == summary

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(output / "final_model").state_dict()
    changed = [name for name in base if not torch.equal(base[name], trained[name])]
    assert len(changed) >= len(base) // 2, f"only {changed} changed"
    assert not list(output.rglob("*.bin")) and not list(output.rglob("*.pt")), "nothing pickled"


def make_trainer(tiny_model: Path, tmp_path: Path, **settings) -> DPOTrainer:
    config = run_settings(tiny_model, tmp_path, **settings)
    torch.manual_seed(config.seed)
    models, tokenizer = load_policy(config, str(tiny_model))
    pairs = encode_pairs(preference_rows(40), tokenizer, config.max_length, "rows")
    return DPOTrainer(config, models, tokenizer, pairs[:32], pairs[32:], tmp_path)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora-adapters-off", "full-frozen-copy"])
def test_training_moves_the_policy_and_leaves_the_reference_alone(tiny_model, tmp_path, use_lora):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny_model, tmp_path, use_lora=use_lora, max_steps=3, learning_rate=1e-2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(ids).logits
    trainer.train()
    trainer.policy.eval()
    with torch.no_grad():
        with trainer.models.reference() as reference:
            assert (reference is trainer.policy) is use_lora
            reference_after = reference(ids).logits
        policy_after = trainer.policy(ids).logits
    torch.testing.assert_close(reference_after, base, rtol=0, atol=0)
    assert not torch.allclose(policy_after, base, atol=1e-4)


def test_a_precomputed_reference_gives_the_same_steps_and_frees_the_frozen_copy(tiny_model, tmp_path):
    on_the_fly = make_trainer(tiny_model, tmp_path / "a", use_lora=False, max_steps=2, learning_rate=1e-3)
    precomputed = make_trainer(
        tiny_model,
        tmp_path / "b",
        use_lora=False,
        max_steps=2,
        learning_rate=1e-3,
        precompute_ref_log_probs=True,
    )
    assert not precomputed.models.needs_reference
    a, b = on_the_fly.train(), precomputed.train()
    for key in ("loss", "rewards/margin", "grad_norm"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4, abs=1e-6), key


# --- bad input ---------------------------------------------------------------------------------------------


GOOD = {"prompt": "Say hi", "chosen": "hi", "rejected": "no"}


@pytest.mark.parametrize(
    ("bad_row", "file", "message"),
    [
        ({"prompt": "Say hi", "chosen": "hi"}, "pairs.jsonl", r"pairs\.jsonl: row 2: field 'rejected'"),
        (
            {"prompt": "Say hi", "chosen": "hi", "rejected": "hi"},
            "pairs.jsonl",
            r"pairs\.jsonl: row 2: .*same",
        ),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "held.jsonl", r"held\.jsonl: row 2"),
    ],
)
def test_a_bad_pair_is_a_data_error_naming_file_and_row_and_nothing_is_written(
    tiny_model, tmp_path, bad_row, file, message
):
    pairs = write_rows(tmp_path / "pairs.jsonl", [GOOD, GOOD])
    held = write_rows(tmp_path / "held.jsonl", [GOOD, GOOD])
    write_rows(tmp_path / file, [GOOD, bad_row])
    config = run_settings(tiny_model, tmp_path, dataset=str(pairs), eval_fraction=0.0, eval_dataset=str(held))
    with pytest.raises(DataError, match=message):
        run_dpo(config, quiet())
    assert not (tmp_path / "run").exists()


def test_an_eval_fraction_that_leaves_nothing_to_train_on_is_a_data_error(tiny_model, tmp_path):
    pairs = write_rows(tmp_path / "one.jsonl", [GOOD])
    config = run_settings(tiny_model, tmp_path, dataset=str(pairs), eval_fraction=0.5)
    with pytest.raises(DataError, match=r"one\.jsonl: eval_fraction = 0\.5 of 1 pairs leaves none"):
        run_dpo(config, quiet())
    assert not (tmp_path / "run").exists()


def test_encoded_answers_end_with_the_end_of_sequence_token(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    (pair,) = encode_pairs([GOOD], tokenizer, max_length=512, where="rows")
    assert isinstance(pair, EncodedPair) and not pair.truncated
    assert pair.chosen[-1] == pair.rejected[-1] == tokenizer.eos_token_id
    (cut,) = encode_pairs([{**GOOD, "chosen": "hi " * 40}], tokenizer, max_length=16, where="rows")
    assert cut.truncated and len(cut.prompt) + len(cut.chosen) <= 16
