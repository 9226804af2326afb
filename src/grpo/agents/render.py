"""Conversations as the chat template writes them: an agent's prompt (its tools shown the template's way, or
in the system message where the template has no place for them), and the text that continues a trajectory
after a turn (tool results, an environment's answer, the next assistant header).

A trajectory is one token sequence: the model's own tokens as it sampled them, and between its turns the
text the template would have written there. That text is the difference between the template's rendering
of the conversation with the new messages and without them, so it is right for any template that only
appends when a conversation grows.
"""

from __future__ import annotations

from typing import Any

from grpo.errors import ConfigError

PROBE_REPLY = "PROBE-REPLY-7f3a"  # an assistant message no template or tool result writes by chance
PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": PROBE_REPLY}]


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
    """``messages`` through the chat template, with ``tools`` (JSON schemas) where the template shows them;
    a template that cannot render them is a ConfigError naming the roles."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("tools and environments need a chat template, and the model's tokenizer has none")
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as error:  # jinja2's TemplateError, or the template's own raise_exception()
        roles = " → ".join(m["role"] for m in messages)
        raise ConfigError(f"the chat template cannot render the turns {roles} ({error})") from None


def with_system_text(messages: list[dict], text: str | None) -> list[dict]:
    """``messages`` with ``text`` appended to the system message (or in a new one first)."""
    if not text:
        return list(messages)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def appended(tokenizer: Any, messages: list[dict], new: list[dict], tools: list[dict] | None) -> str:
    """The text the template adds after ``messages`` (rendered as a finished conversation) for the
    ``new`` messages and the next assistant header."""
    before = render(tokenizer, messages, tools, generation_prompt=False)
    after = render(tokenizer, messages + new, tools, generation_prompt=True)
    if not after.startswith(before):
        raise ConfigError(
            "the chat template rewrites earlier turns when a conversation grows, so a trajectory cannot be "
            "one token sequence: use a model whose template only appends turns"
        )
    return after[len(before) :]


class Continuations:
    """The text to feed a trajectory after an assistant turn: what closes the turn in the template beyond the
    end-of-turn token the model sampled (ChatML's newline), then the new messages and the next assistant
    header. ``roles`` are those the episodes add after a turn ("tool", "user"), each checked once here, so
    that a template that cannot render them is refused before training starts. ``end_texts`` are the texts
    of the tokens that end a turn."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None, roles: list[str], end_texts: list[str]):
        self.tokenizer, self.tools = tokenizer, tools
        self.end_texts = sorted(end_texts, key=len, reverse=True)
        for role in roles:
            self.after_turn([{"role": role, "name": "probe", "content": "1"}], "")

    def after_turn(self, new: list[dict], end_token_text: str) -> str:
        """The text after an assistant turn that ended with the token ``end_token_text``: read from the
        conversation rendered with ``new`` (so that a template that rewrites the turn before, as Qwen3 drops
        its empty thinking block, still gives what follows it)."""
        after = render(self.tokenizer, [*PROBE, *new], self.tools, generation_prompt=True)
        following = after[after.index(PROBE_REPLY) + len(PROBE_REPLY) :]
        # The model sampled a token that ends its turn; the template's own closing token is dropped for it,
        # whichever ending token it is (Llama 3.1 ends calls with <|eom_id|>, its template with <|eot_id|>).
        for text in [end_token_text, *self.end_texts]:
            if text and following.startswith(text):
                return following[len(text) :]
        return following

    def first_turn(self, prompt: list[dict], observation: list[dict]) -> str:
        """The text between a prompt (rendered without its assistant header) and the first turn: an
        environment's first observation, as a user message, and the assistant header."""
        return appended(self.tokenizer, prompt, observation, self.tools)
