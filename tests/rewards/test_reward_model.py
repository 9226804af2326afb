"""Learned reward models: tiny random LlamaForSequenceClassification checkpoints saved to disk, scored through
the ``reward_model`` kind and compared with a plain forward pass of the same tokens."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from grpo.errors import ModelError
from grpo.rewards import core
from grpo.rewards.model import make_reward_model

ASPECTS = ["helpfulness", "correctness", "coherence"]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Give the final number."}, {"role": "user", "content": "Solve 12 + 5"}],
    [{"role": "user", "content": "0 1 2"}],
]
STRING_PROMPTS = ["What is 3 + 4? ", "Solve the sum, then give the final number: 12 + 5 = ", "0 1 2"]
COMPLETIONS = ["3 + 4 = 7 <answer>7</answer>", "the answer is 17", "3 4 5 6 7 8 9 10 11 12 13 14"]


def build_tiny_reward_model(
    directory: Path,
    labels: list[str] | None = None,
    *,
    padding_side: str = "right",
    pad_token: bool = True,
    chat_template: bool = True,
) -> Path:
    """conftest's tiny Llama and tokenizer with a random sequence-classification head instead of the LM head:
    one label, or ``labels`` (named in id2label)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    build_tiny_model(directory)
    config = LlamaConfig.from_pretrained(directory)
    config.architectures = None
    config.num_labels = len(labels) if labels else 1
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = padding_side
    if not pad_token:
        config.pad_token_id = None
        tokenizer.pad_token = None
    if not chat_template:
        tokenizer.chat_template = None
        (directory / "chat_template.jinja").unlink(missing_ok=True)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def manual_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    """The checkpoint's logits for one unpadded sequence, loaded afresh and run the plain way."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def chat_ids(directory: Path, prompt: list[dict], completion: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def string_ids(directory: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)(text)["input_ids"]


@pytest.fixture(scope="module")
def rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def multi_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm3"), ASPECTS)


def as_chat(completions: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "assistant", "content": c}] for c in completions]


def test_chat_prompts_are_scored_through_the_chat_template(rm):
    scores = make_reward_model(model=str(rm), device="cpu")(CHAT_PROMPTS, as_chat(COMPLETIONS))
    expected = [manual_logits(rm, chat_ids(rm, p, c)).item() for p, c in zip(CHAT_PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3  # the random head tells the completions apart


def test_string_prompts_are_continued_by_the_completion(rm):
    scores = make_reward_model(model=str(rm), device="cpu")(STRING_PROMPTS, COMPLETIONS)
    expected = [manual_logits(rm, string_ids(rm, p + c)).item() for p, c in zip(STRING_PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_chat_prompts_without_a_chat_template_become_plain_text(tmp_path):
    directory = build_tiny_reward_model(tmp_path / "rm", chat_template=False)
    scores = make_reward_model(model=str(directory), device="cpu")(CHAT_PROMPTS[1:], as_chat(COMPLETIONS[1:]))
    texts = ["Give the final number.\nSolve 12 + 5\n" + COMPLETIONS[1], "0 1 2\n" + COMPLETIONS[2]]
    expected = [manual_logits(directory, string_ids(directory, text)).item() for text in texts]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_batch_size_does_not_change_the_scores(rm):
    prompts, completions = CHAT_PROMPTS * 3, as_chat(COMPLETIONS + [c[:9] for c in COMPLETIONS] + ["7"] * 3)
    one_at_a_time = make_reward_model(model=str(rm), batch_size=1, device="cpu")(prompts, completions)
    for batch_size in (2, 4, 16):
        scores = make_reward_model(model=str(rm), batch_size=batch_size, device="cpu")(prompts, completions)
        assert scores == pytest.approx(one_at_a_time, abs=1e-5)


@pytest.mark.parametrize("pad_token", [True, False], ids=["pad-token", "no-pad-token"])
def test_the_tokenizers_padding_side_does_not_change_the_scores(tmp_path, pad_token):
    """Rows of different lengths in one batch score as they do alone, whichever side the checkpoint's
    tokenizer pads on, and when it has no pad token at all (eos stands in)."""
    prompts, completions = STRING_PROMPTS, ["7", "the answer is 17 " * 3, COMPLETIONS[2]]
    scores = {}
    for side in ("left", "right"):
        directory = build_tiny_reward_model(tmp_path / side, padding_side=side, pad_token=pad_token)
        scores[side] = make_reward_model(model=str(directory), device="cpu")(prompts, completions)
    expected = [
        manual_logits(directory, string_ids(directory, p + c)).item() for p, c in zip(prompts, completions)
    ]
    assert scores["left"] == pytest.approx(expected, abs=1e-5)
    assert scores["right"] == pytest.approx(expected, abs=1e-5)


def test_long_sequences_lose_the_start_of_the_prompt_and_keep_the_completion(rm):
    prompt = [{"role": "user", "content": "What is 3 + 4? " * 20}]
    (score,) = make_reward_model(model=str(rm), max_length=24, device="cpu")(
        [prompt], as_chat(["7 <answer>7</answer>"])
    )
    ids = chat_ids(rm, prompt, "7 <answer>7</answer>")
    assert len(ids) > 24
    assert score == pytest.approx(manual_logits(rm, ids[-24:]).item(), abs=1e-5)


def test_truncation_keeps_a_leading_bos_token(tmp_path):
    directory = build_tiny_reward_model(tmp_path / "rm")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.bos_token = "<|im_start|>"  # the chat template starts every text with it
    tokenizer.save_pretrained(directory)
    prompt = [{"role": "user", "content": "What is 3 + 4? " * 20}]
    (score,) = make_reward_model(model=str(directory), max_length=24, device="cpu")([prompt], as_chat(["7"]))
    ids = chat_ids(directory, prompt, "7")
    assert ids[0] == tokenizer.bos_token_id
    assert score == pytest.approx(manual_logits(directory, ids[:1] + ids[-23:]).item(), abs=1e-5)


def test_several_labels_score_several_aspects_named_by_id2label(multi_rm):
    func = make_reward_model(model=str(multi_rm), device="cpu")
    assert func.outputs == ASPECTS
    scores = func(CHAT_PROMPTS, as_chat(COMPLETIONS))
    assert list(scores) == ASPECTS
    for row, (prompt, completion) in enumerate(zip(CHAT_PROMPTS, COMPLETIONS)):
        logits = manual_logits(multi_rm, chat_ids(multi_rm, prompt, completion))
        assert [scores[name][row] for name in ASPECTS] == pytest.approx(logits.tolist(), abs=1e-5)


def test_the_outputs_option_renames_the_aspects(multi_rm):
    func = make_reward_model(model=str(multi_rm), outputs=["a", "b", "c"], device="cpu")
    assert list(func(STRING_PROMPTS, COMPLETIONS)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="name each of the 3 labels"):
        make_reward_model(model=str(multi_rm), outputs=["a", "b"], device="cpu")


def test_entries_naming_the_same_model_share_one_copy(rm):
    first = make_reward_model(model=str(rm), device="cpu")
    second = make_reward_model(model=str(rm) + "/", batch_size=2, device="cpu")
    assert first.model is second.model
    assert not first.model.training
    assert not any(p.requires_grad for p in first.model.parameters())


def test_through_build_rewards_and_score(rm, multi_rm, monkeypatch):
    monkeypatch.setitem(core.BUILTIN_KINDS, "reward_model", "grpo.rewards.model:make_reward_model")
    rewards = core.build_rewards(
        [
            {"name": "reward_model", "model": str(rm), "weight": 0.5, "device": "cpu"},
            {
                "name": "reward_model",
                "model": str(multi_rm),
                "weights": {"correctness": 2.0},
                "device": "cpu",
            },
        ]
    )
    assert [(r.name, r.weight) for r in rewards] == [
        ("reward_model", 0.5),
        ("reward_model/helpfulness", 1.0),
        ("reward_model/correctness", 2.0),
        ("reward_model/coherence", 1.0),
    ]
    scores = core.score(rewards, CHAT_PROMPTS, as_chat(COMPLETIONS), {})
    direct = make_reward_model(model=str(multi_rm), device="cpu")(CHAT_PROMPTS, as_chat(COMPLETIONS))
    assert scores.values.shape == (3, 4)
    assert scores.values[:, 2].tolist() == pytest.approx(direct["correctness"], abs=1e-5)
    with pytest.raises(core.RewardError, match="unknown option 'layers'"):
        core.build_rewards([{"name": "reward_model", "model": str(rm), "layers": 2}])


def test_a_directory_with_only_pickled_weights_is_refused(rm, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text((rm / "config.json").read_text())
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelError, match=r"only as pickles \(pytorch_model\.bin\)"):
        make_reward_model(model=str(directory), device="cpu")


@pytest.mark.parametrize("case", ["missing", "no-config"])
def test_a_wrong_path_is_named(tmp_path, case):
    directory = tmp_path / "rm"
    if case == "no-config":
        directory.mkdir()
    with pytest.raises(ModelError, match=f"{re.escape(str(directory))}: .*(not found|no config.json)"):
        make_reward_model(model=str(directory), device="cpu")


def test_a_causal_lm_is_not_taken_for_a_reward_model(tiny_model):
    with pytest.raises(
        ModelError, match=r"no weights for score\.weight.*not a trained sequence-classification"
    ):
        make_reward_model(model=str(tiny_model), device="cpu")


@pytest.mark.parametrize(
    ("option", "message"),
    [({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length"), ({"dtype": "int8"}, "dtype")],
)
def test_bad_options_are_refused_before_loading(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        make_reward_model(model=str(tmp_path / "nothing"), **option)
