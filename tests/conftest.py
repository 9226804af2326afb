"""Shared fixtures: a tiny random-weight chat model with its own byte-level tokenizer, built offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from grpo.models.loading import NATIVE_BF16_ENV

# float32 wherever "auto" would pick it, so the tests compute alike on CPUs with and without native bfloat16
# (tests/models/test_dtype.py sets it where it matters; GRPO_CPU_BF16=1 pytest runs them all in bfloat16).
os.environ.setdefault(NATIVE_BF16_ENV, "0")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 3 + 4? 3 + 4 = 7 <answer>7</answer>",
    "Solve the sum, then give the final number inside <answer></answer> tags.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + = ? the answer is",
]


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights and a byte-level BPE tokenizer that has a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def agent_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model taught one tool-calling episode (tests/agent_model.py)."""
    from agent_model import teach_episode

    return teach_episode(build_tiny_model(tmp_path_factory.mktemp("agent-model")))


@pytest.fixture()
def tiny_dataset(tmp_path: Path) -> Path:
    """A JSONL file of chat prompts with answers."""
    path = tmp_path / "sums.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
        for a in range(4)
        for b in range(4)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def separable_pairs(path: Path) -> Path:
    """64 preference pairs on sums whose chosen answer says "the answer is" and whose rejected one does not:
    a preference that only the answers' words, never the prompt or the length, tell apart, and that the
    tiny model learns in a few steps (as a reward model and under DPO)."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": f"the answer is {a + b}",
            "rejected": f"it may be {a * b}" + " ." * (a % 3),
        }
        for a in range(8)
        for b in range(8)
    ]
    return write_pairs(path, rows)


# Random weights never produce the answer format, so the built-in rewards would all be 0 and no group
# would carry a signal; a reward on completion length varies from the first step.
LENGTH_REWARD = """
def length_reward(prompts, completions, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    assert len(columns["answer"]) == len(completions)
    return [min(len(t), 40) / 40 for t in texts]
"""


@pytest.fixture()
def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(LENGTH_REWARD)
    return path
