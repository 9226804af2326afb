"""Supervised fine-tuning: which tokens are learned, truncation, row and setting checks, the loss under
gradient accumulation, and whole runs on the tiny model whose final model `grpo train` then loads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from sft_data import sums_dataset, write_jsonl

from grpo.config.grpo import GRPOConfig
from grpo.config.loading import field_docs, load_settings
from grpo.config.stages import SFTConfig
from grpo.data.prompts import render_prompt
from grpo.data.sft import (
    IGNORE_INDEX,
    Example,
    collate,
    load_sft_rows,
    prepare_examples,
    tokenize_conversation,
    tokenize_prompt_completion,
    truncate,
)
from grpo.errors import ConfigError, DataError
from grpo.models.loading import load_causal_lm, load_tokenizer
from grpo.models.policy import load_policy
from grpo.train.sft import accumulate_gradients, run_sft

IGN = IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return load_tokenizer(str(tiny_model))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- labels ------------------------------------------------------------------------------------------------
def test_a_prompt_completion_row_learns_the_completion_and_eos_and_nothing_of_the_prompt(tokenizer):
    prompt = [user("What is 3 + 4?")]
    example = tokenize_prompt_completion(prompt, "7", tokenizer)

    prompt_ids = encode(tokenizer, "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    completion_ids = [*encode(tokenizer, "7"), tokenizer.eos_token_id]
    assert prompt_ids == encode(tokenizer, render_prompt(prompt, tokenizer)), "as `grpo train` renders it"
    assert example.input_ids == prompt_ids + completion_ids
    assert example.labels == [IGN] * len(prompt_ids) + completion_ids


def test_a_plain_string_prompt_is_used_as_is(tokenizer):
    example = tokenize_prompt_completion("3 + 4 =", " 7", tokenizer)
    prompt_ids = encode(tokenizer, "3 + 4 =")
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels == [IGN] * len(prompt_ids) + [*encode(tokenizer, " 7"), tokenizer.eos_token_id]


def test_a_two_turn_chat_learns_both_assistant_turns_and_nothing_else(tokenizer):
    messages = [user("Hi"), assistant("Hello"), user("What is 3 + 4?"), assistant("7")]
    example = tokenize_conversation(messages, tokenizer)

    first_prompt = encode(tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    first_turn = encode(tokenizer, "Hello<|im_end|>")
    # The newline the template writes after a turn's end is read, not learned: generation stops before it.
    between = encode(tokenizer, "\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    second_turn = encode(tokenizer, "7<|im_end|>")
    assert example.input_ids == first_prompt + first_turn + between + second_turn
    assert example.labels == [IGN] * len(first_prompt) + first_turn + [IGN] * len(between) + second_turn
    assert tokenizer.decode(example.input_ids) + "\n" == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_a_one_turn_chat_is_the_same_example_as_its_prompt_and_completion(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, user("What is 3 + 4?")]
    assert tokenize_conversation([*prompt, assistant("7")], tokenizer) == tokenize_prompt_completion(
        prompt, "7", tokenizer
    )


def test_labels_never_include_prompt_tokens(tokenizer):
    rows = [{"prompt": [user(f"What is {a} + {a}?")], "completion": f"{2 * a}"} for a in range(12)]
    examples, _ = prepare_examples(rows, tokenizer, max_length=512, where="rows")
    for row, example in zip(rows, examples):
        prompt_length = len(encode(tokenizer, render_prompt(row["prompt"], tokenizer)))
        assert set(example.labels[:prompt_length]) == {IGN}
        assert tokenizer.decode(example.labels[prompt_length:]) == row["completion"] + "<|im_end|>"


# --- truncation --------------------------------------------------------------------------------------------
def test_truncation_drops_prompt_tokens_from_the_left_and_keeps_the_completion():
    example = Example(list(range(10)), [IGN] * 6 + [6, 7, 8, 9])
    assert truncate(example, 10) is example
    assert truncate(example, 7) == Example([3, 4, 5, 6, 7, 8, 9], [IGN, IGN, IGN, 6, 7, 8, 9])
    assert truncate(example, 5) == Example([5, 6, 7, 8, 9], [IGN, 6, 7, 8, 9])


def test_a_completion_too_long_on_its_own_keeps_one_prompt_token_and_loses_its_end():
    example = Example(list(range(10)), [IGN] * 6 + [6, 7, 8, 9])
    assert truncate(example, 4) == Example([5, 6, 7, 8], [IGN, 6, 7, 8])
    assert truncate(example, 2) == Example([5, 6], [IGN, 6])


def test_a_conversation_is_cut_before_its_first_learned_token_like_a_prompt():
    example = Example(list(range(8)), [IGN, IGN, IGN, 3, IGN, IGN, 6, 7])
    assert truncate(example, 6) == Example([2, 3, 4, 5, 6, 7], [IGN, 3, IGN, IGN, 6, 7])


def test_long_rows_are_cut_and_counted(tokenizer):
    rows = [
        {"prompt": "0 1 2 3 4 5 6 7 8 9 " * 20, "completion": " the answer is 7"},
        {"prompt": "3 + 4 =", "completion": " 7"},
    ]
    examples, truncated = prepare_examples(rows, tokenizer, max_length=16, where="rows")
    assert truncated == 1
    assert len(examples[0].input_ids) == 16
    assert tokenizer.decode(examples[0].labels[-examples[0].learned_tokens :]) == " the answer is 7<|im_end|>"
    assert examples[1] == tokenize_prompt_completion("3 + 4 =", " 7", tokenizer)


# --- rows --------------------------------------------------------------------------------------------------
GOOD_ROW = {"prompt": "3 + 4 =", "completion": " 7"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "3 + 4 ="}, "field 'completion' must be a non-empty string"),
        ({"prompt": "3 + 4 =", "completion": " "}, "field 'completion' must be a non-empty string"),
        ({"completion": "7"}, "missing field 'prompt'"),
        ({"prompt": [{"role": "user"}], "completion": "7"}, "field 'prompt' message 0"),
        ({"text": "3 + 4 = 7"}, "expected an object with 'prompt' and 'completion', or with 'messages'"),
        ({"messages": [user("Hi")]}, "field 'messages' has no assistant turn to learn"),
        ({"messages": [user("Hi"), {"role": "assistant", "content": 7}]}, "field 'messages' message 1"),
        ({"messages": "Hi"}, "field 'messages' must be a list of chat messages"),
    ],
)
def test_a_bad_row_is_named_with_its_file_and_number(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROW, bad])
    with pytest.raises(DataError, match=rf"data\.jsonl: row 2: {message}"):
        load_sft_rows(str(path))


def test_a_conversation_the_template_cannot_render_is_named_with_its_row(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROW, {"messages": [user("Hi"), assistant("Hello")]}])
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"data\.jsonl: row 2: roles must alternate"):
        prepare_examples(load_sft_rows(str(path)), tokenizer, 512, str(path))


# --- settings ----------------------------------------------------------------------------------------------
def test_settings_come_from_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("dataset: data.jsonl\nlearning_rate: 1e-3\nnum_train_epochs: 2\nuse_lora: false\n")
    config = load_settings(SFTConfig, path, {"learning-rate": "5e-4", "model": "some/model"})
    assert (config.dataset, config.learning_rate, config.num_train_epochs) == ("data.jsonl", 5e-4, 2.0)
    assert (config.use_lora, config.model_name_or_path, config.max_length) == (False, "some/model", 1024)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"learning_rat": "1e-3"},
            "command line: unknown setting 'learning_rat'; did you mean 'learning_rate'",
        ),
        ({"max_length": "long"}, "command line: max_length must be an integer, got 'long'"),
        ({"dataset": None}, "dataset must not be empty"),
        ({"eval_fraction": "1"}, r"eval_fraction must be in \[0, 1\), got 1.0"),
        ({"lr_scheduler_type": "cosine_with_min_lr"}, "lr_scheduler_type must be one of linear, cosine"),
        ({"max_length": "1"}, "max_length must be at least 2"),
        ({"num_train_epochs": "0"}, "num_train_epochs must be positive when max_steps is 0"),
        ({"learning_rate": "nan"}, "learning_rate must be a finite number"),
    ],
)
def test_a_bad_setting_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(SFTConfig, None, {"dataset": "data.jsonl", **overrides})


def test_every_setting_has_a_docstring():
    fields = SFTConfig.__dataclass_fields__
    docs = field_docs(SFTConfig)
    assert set(docs) == set(fields)
    assert all(docs.values())


# --- the loss ----------------------------------------------------------------------------------------------
def test_the_loss_is_transformers_token_mean_and_accumulation_does_not_change_the_gradient(
    tiny_model, tokenizer
):
    model = load_causal_lm(str(tiny_model), torch.float32)
    rows = [
        {"prompt": [user("What is 3 + 4?")], "completion": "3 + 4 = 7 <answer>7</answer>"},
        {"prompt": "3 + 4 =", "completion": " 7"},
        {"messages": [user("Hi"), assistant("Hello"), user("What is 1 + 2?"), assistant("the answer is 3")]},
        {"prompt": [user("Solve the sum")], "completion": "0 1 2 3 4 5 6 7 8 9 10"},
    ]
    examples, _ = prepare_examples(rows, tokenizer, max_length=512, where="rows")

    # transformers' own loss is each row's mean over its learned tokens; the step's loss weighs every token.
    with torch.no_grad():
        batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
        row_means = [
            model(input_ids=batch["input_ids"][i : i + 1], labels=batch["labels"][i : i + 1]).loss
            for i in range(len(examples))
        ]
    counts = [e.learned_tokens for e in examples]
    expected = sum(m * c for m, c in zip(row_means, counts)) / sum(counts)

    results = []
    for micro_batch_size in (4, 3, 1):
        model.zero_grad()
        loss = accumulate_gradients(model, examples, micro_batch_size, tokenizer.pad_token_id)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results:
        assert loss == pytest.approx(expected.item(), rel=1e-5)
        for grad, reference in zip(grads, results[0][1]):
            torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-4)


# --- whole runs --------------------------------------------------------------------------------------------
def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8]])).logits


def test_a_lora_run_lowers_the_held_out_loss_and_saves_a_model_grpo_train_loads(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "sft"
    config = SFTConfig(
        model_name_or_path=str(tiny_model),
        dataset=str(sums_dataset(tmp_path / "sums.jsonl")),
        eval_fraction=0.2,
        max_steps=20,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=5,
        output_dir=str(output),
    )
    console = quiet()
    summary = run_sft(config, console)

    assert (summary["train_rows"], summary["eval_rows"], summary["steps"]) == (8, 2, 20)
    # Adapters cannot go far on this model: its frozen tied embeddings (std 0.02) after a final RMSNorm
    # keep every logit within about ±0.6, so no output distribution is far from uniform (loss ln 400 ≈ 6).
    # Full fine-tuning, below, moves the embeddings too and goes much lower.
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.4, summary
    assert summary["train_loss_last_steps"] < summary["train_loss_first_steps"] - 0.2, summary
    assert json.loads((output / "summary.json").read_text()) == summary
    assert "held-out loss" in console.file.getvalue()
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "num_tokens", "epoch"} <= lines[
        0
    ].keys()
    assert lines[-1]["loss"] < lines[0]["loss"]

    final = output / "final_model"
    base, tuned = weights(tiny_model), weights(final)
    adapted = [name for name in base if name.endswith("proj.weight")]
    assert adapted and all(not torch.equal(base[name], tuned[name]) for name in adapted), "merged adapters"
    assert all(torch.equal(base[name], tuned[name]) for name in base if name not in adapted)
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not torch.allclose(logits_of(merged), logits_of(AutoModelForCausalLM.from_pretrained(tiny_model)))

    models, tokenizer = load_policy(GRPOConfig(model_name_or_path=str(final)))
    with models.reference() as reference:
        torch.testing.assert_close(logits_of(reference), logits_of(merged))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_a_full_fine_tuning_run_on_conversations_changes_every_weight(tiny_model, tmp_path):
    conversations = [
        {"messages": [user(f"Hi {a}"), assistant("Hello"), user(f"What is {a} + 1?"), assistant("<answer>")]}
        for a in range(6)
    ]
    train_file = write_jsonl(tmp_path / "chats.jsonl", conversations[:4])
    eval_file = write_jsonl(tmp_path / "held_out.jsonl", conversations[4:])
    output = tmp_path / "sft"
    config = SFTConfig(
        model_name_or_path=str(tiny_model),
        dataset=str(train_file),
        eval_dataset=str(eval_file),
        use_lora=False,
        num_train_epochs=10,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.01,
        output_dir=str(output),
    )
    summary = run_sft(config, quiet())

    assert (summary["steps"], summary["epochs"], summary["eval_rows"]) == (20, 10.0, 2)
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"], summary
    base, tuned = weights(tiny_model), weights(output / "final_model")
    assert base.keys() == tuned.keys()
    assert all(not torch.equal(base[name], tuned[name]) for name in base)


def test_bad_input_writes_nothing(tiny_model, tmp_path):
    output = tmp_path / "sft"
    bad_rows = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROW, {"prompt": "3 + 4 ="}])
    with pytest.raises(DataError, match=r"data\.jsonl: row 2"):
        run_sft(
            SFTConfig(model_name_or_path=str(tiny_model), dataset=str(bad_rows), output_dir=str(output)),
            quiet(),
        )
    one_row = write_jsonl(tmp_path / "one.jsonl", [GOOD_ROW])
    with pytest.raises(DataError, match="set eval_fraction to 0"):
        run_sft(
            SFTConfig(model_name_or_path=str(tiny_model), dataset=str(one_row), output_dir=str(output)),
            quiet(),
        )
    with pytest.raises(ConfigError, match="warmup_steps must not be negative"):
        run_sft(SFTConfig(dataset=str(one_row), warmup_steps=-1, output_dir=str(output)), quiet())
    assert not output.exists()
