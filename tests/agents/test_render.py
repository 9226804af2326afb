"""What is fed between turns (grpo.agents.render): the chat template's own text after a turn, read so that
templates that rewrite the turn before (Qwen3) or close it with another token (Llama 3.1) still work, and
templates that cannot hold an episode refused in one line."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from grpo.agents.render import PROBE_REPLY, Continuations
from grpo.errors import ConfigError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Qwen3's: the last assistant message gets an empty thinking block, earlier ones do not.
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Llama 3.1's: turns close with <|eot_id|> (the model ends a call with <|eom_id|>).
LLAMA = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
)
ALTERNATING = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
TOOL = [{"role": "tool", "name": "add", "content": "5"}]


@pytest.fixture()
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_chatml_feeds_the_newline_after_the_sampled_end_then_the_tool_message(tokenizer):
    tokenizer.chat_template = CHATML
    text = Continuations(tokenizer, None, ["tool"], ["<|im_end|>"]).after_turn(TOOL, "<|im_end|>")
    assert text == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_rewrites_the_turn_before_still_continues(tokenizer):
    tokenizer.chat_template = THINKING
    text = Continuations(tokenizer, None, ["tool"], ["<|im_end|>"]).after_turn(TOOL, "<|im_end|>")
    assert text == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"


def test_the_templates_closing_token_is_dropped_for_whichever_end_token_was_sampled(tokenizer):
    tokenizer.chat_template = LLAMA
    continuations = Continuations(tokenizer, None, ["tool"], ["<|eot_id|>", "<|eom_id|>"])
    for sampled in ("<|eom_id|>", "<|eot_id|>"):
        text = continuations.after_turn(TOOL, sampled)
        tool = "<|start_header_id|>tool<|end_header_id|>\n\n5<|eot_id|>"
        assert text == tool + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_templates_that_cannot_hold_an_episode_are_refused_in_one_line(tokenizer):
    tokenizer.chat_template = ALTERNATING
    with pytest.raises(
        ConfigError,
        match=r"^the chat template cannot render the turns user → assistant → tool \(Conversation roles must",
    ):
        Continuations(tokenizer, None, ["tool"], [])
    Continuations(
        tokenizer, None, [], []
    )  # (an environment that only answers through step needs no tool role)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="need a chat template"):
        Continuations(tokenizer, None, ["user"], [])


def test_the_probe_reply_is_not_in_a_template_by_chance(tokenizer):
    tokenizer.chat_template = CHATML
    assert PROBE_REPLY not in tokenizer.apply_chat_template(TOOL, tokenize=False)
