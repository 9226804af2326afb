"""Reading tool calls from the text of an assistant turn, in the format the model's chat template uses.

Formats (:func:`call_format_for` picks one from the tokenizer):

- ``"response_template"``: the tokenizer carries transformers' ``response_template``; its own
  ``parse_response`` reads the turn.
- ``"hermes"`` (Qwen2.5, Qwen3, SmolLM3, Hermes): once or several times in a turn,
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
- ``"llama3"`` (Llama 3.1-3.3): the whole turn, optionally after ``<|python_tag|>``, is
  ``{"name": ..., "parameters": {...}}``.
- ``"fallback"`` (templates without tool support, such as SmolLM2's): the hermes format, which the system
  prompt (:data:`TOOLS_PROMPT`) shows the model along with the tools' schemas.

Parsing never raises: call markup that cannot be read is listed in ``ParsedTurn.malformed`` with a short
reason, and the rest of the turn still counts.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import meta

from grpo.user_code import one_line

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
LLAMA3_END_TOKENS = ("<|eom_id|>", "<|eot_id|>")
# What a model without a tool-aware template is shown: short, since a 135M model reads it ({tools}: one
# JSON schema per line).
TOOLS_PROMPT = (
    "You can call these tools:\n<tools>\n{tools}\n</tools>\n"
    'To call a tool, write <tool_call>{"name": <tool name>, "arguments": {<arguments>}}</tool_call> '
    "and wait for its result."
)
LLAMA3_TOOLS_PROMPT = (
    "You can call these tools:\n{tools}\n"
    'To call a tool, answer with only {"name": <tool name>, "parameters": {<arguments>}} '
    "and wait for its result."
)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn read: its text without the call markup (stripped), the calls, and one short
    reason per call markup that could not be read."""

    content: str
    calls: list[ToolCall]
    malformed: list[str]


class CallFormat(ABC):
    """How a model writes tool calls: reading them from a turn, and what the system message must say."""

    name: str

    def __init__(self, tools_in_template: bool = False):
        self.tools_in_template = tools_in_template

    @abstractmethod
    def parse(self, text: str) -> ParsedTurn:
        """The turn's content, calls and unreadable call markup."""

    def system_prompt(self, tools: list[dict]) -> str | None:
        """The text for the system message that tells the model its tools (JSON schemas) and how to call
        them; None when the chat template renders ``tools=`` itself, or there are none."""
        if self.tools_in_template or not tools:
            return None
        return tools_prompt(tools)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tools_in_template={self.tools_in_template})"


def tools_prompt(tools: list[dict], template: str = TOOLS_PROMPT) -> str:
    """``template`` with the tools' schemas (the ``function`` part of each), one JSON object per line."""
    lines = "\n".join(json.dumps(schema.get("function", schema)) for schema in tools)
    return template.replace("{tools}", lines)


def read_call(value: Any) -> ToolCall | str:
    """The call a decoded JSON value describes, or a short reason why it is none. ``arguments`` (or
    Llama's ``parameters``) may be missing (no arguments) or a JSON string."""
    if isinstance(value, dict) and "name" not in value and isinstance(value.get("function"), dict):
        value = value["function"]  # OpenAI's {"type": "function", "function": {...}}
    if not isinstance(value, dict):
        return "not a JSON object"
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return "no 'name'"
    arguments = value.get("arguments", value.get("parameters"))
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return "arguments is not valid JSON"
    if not isinstance(arguments, dict):
        return "arguments is not an object"
    return ToolCall(name.strip(), arguments)


def decode_one(body: str) -> tuple[Any, str] | None:
    """The JSON value at the start of ``body`` (after whitespace) and the text after it, or None."""
    stripped = body.lstrip()
    try:
        value, end = _DECODER.raw_decode(stripped)
    except ValueError:
        return None
    return value, stripped[end:]


class HermesFormat(CallFormat):
    """``<tool_call>{json}</tool_call>`` blocks anywhere in the turn. A block left open at the end of the
    turn counts when its JSON is complete."""

    def __init__(self, name: str = "hermes", tools_in_template: bool = False):
        super().__init__(tools_in_template)
        self.name = name

    def parse(self, text: str) -> ParsedTurn:
        content: list[str] = []
        calls: list[ToolCall] = []
        malformed: list[str] = []
        position = 0
        while (start := text.find(CALL_OPEN, position)) >= 0:
            content.append(text[position:start])
            body_start = start + len(CALL_OPEN)
            close = text.find(CALL_CLOSE, body_start)
            next_open = text.find(CALL_OPEN, body_start)
            closed = close >= 0 and (next_open < 0 or close < next_open)
            end = close if closed else (next_open if next_open >= 0 else len(text))
            call = self.read_block(text[body_start:end], closed)
            (calls if isinstance(call, ToolCall) else malformed).append(call)
            position = end + len(CALL_CLOSE) if closed else end
        content.append(text[position:])
        return ParsedTurn("".join(content).strip(), calls, malformed)

    @staticmethod
    def read_block(body: str, closed: bool) -> ToolCall | str:
        """The call inside one ``<tool_call>`` block, or why it is unreadable."""
        if not body.strip():
            return "empty <tool_call>"
        decoded = decode_one(body)
        if decoded is None:
            return "not valid JSON" if closed else "not valid JSON, and no </tool_call>"
        value, rest = decoded
        if rest.strip():
            return "text after the JSON object" if closed else "no </tool_call>"
        return read_call(value)


class Llama3Format(CallFormat):
    """Llama 3.1-3.3 JSON tool calls: the turn (after an optional ``<|python_tag|>``) is a JSON object,
    or several separated by ``;``. Text that does not start with ``{`` is a plain answer."""

    name = "llama3"

    def system_prompt(self, tools: list[dict]) -> str | None:
        if self.tools_in_template or not tools:
            return None
        return tools_prompt(tools, LLAMA3_TOOLS_PROMPT)

    def parse(self, text: str) -> ParsedTurn:
        body = text.strip()
        for token in LLAMA3_END_TOKENS:
            body = body.removesuffix(token).rstrip()
        tagged = body.startswith(PYTHON_TAG)
        body = body.removeprefix(PYTHON_TAG).strip()
        if not body.startswith("{"):
            return ParsedTurn(body, [], ["not a JSON object"] if tagged else [])
        calls: list[ToolCall] = []
        malformed: list[str] = []
        while body.startswith("{"):
            decoded = decode_one(body)
            if decoded is None:
                malformed.append("not valid JSON")
                body = ""
                break
            value, body = decoded
            call = read_call(value)
            (calls if isinstance(call, ToolCall) else malformed).append(call)
            body = body.strip().removeprefix(";").strip()
        return ParsedTurn(body, calls, malformed)


class ResponseTemplateFormat(CallFormat):
    """Calls read by the tokenizer's own ``parse_response`` (transformers' ``response_template``).
    ``tools`` (schemas) let it cast arguments to their declared types."""

    name = "response_template"

    def __init__(self, tokenizer: Any, tools_in_template: bool = False, tools: list[dict] | None = None):
        super().__init__(tools_in_template)
        self.tokenizer = tokenizer
        accepted = inspect.signature(tokenizer.parse_response).parameters
        self.options: dict[str, Any] = {"prefix": ""} if "prefix" in accepted else {}
        if tools and "tools" in accepted:
            self.options["tools"] = tools

    def parse(self, text: str) -> ParsedTurn:
        try:
            message = self.tokenizer.parse_response(text, **self.options)
        except Exception as error:  # a call the template's parser cannot read
            reason = one_line(error).split(" / ")[0][:120]
            return ParsedTurn(text.strip(), [], [f"unreadable ({reason})"])
        content = message.get("content") or ""
        calls: list[ToolCall] = []
        malformed: list[str] = []
        for entry in message.get("tool_calls") or []:
            call = read_call(entry)
            (calls if isinstance(call, ToolCall) else malformed).append(call)
        return ParsedTurn(str(content).strip(), calls, malformed)


# --- picking a format -------------------------------------------------------------------------------------
def template_source(tokenizer: Any) -> str:
    """The chat template the tokenizer uses when given tools ("" when it has none)."""
    try:
        source = tokenizer.get_chat_template(tools=[])
    except Exception:  # no template at all (or not a tokenizer): nothing renders tools
        return ""
    return source if isinstance(source, str) else ""


class GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}`` block (it marks assistant text), read as its plain body."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads it from the class)

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads the ``tools`` variable (so ``tools=`` reaches the
    prompt), judged from the template's syntax tree: a template that only mentions the word does not."""
    source = template_source(tokenizer)
    if not source:
        return False
    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", GenerationTag])
    try:
        return "tools" in meta.find_undeclared_variables(environment.parse(source))
    except jinja2.TemplateSyntaxError:  # (transformers could not render it either)
        return False


def call_format_for(tokenizer: Any, tools: list[dict] | None = None) -> CallFormat:
    """The call format of the tokenizer's chat template: its ``response_template`` if it has one; the
    hermes format when the template writes ``<tool_call>``; Llama 3's JSON calls when it mentions
    ``<|python_tag|>`` or ``"parameters"``; otherwise the fallback (hermes, shown in the system prompt).
    ``tools`` (schemas) only help a response template cast arguments."""
    in_template = renders_tools(tokenizer)
    if getattr(tokenizer, "response_template", None) is not None:
        return ResponseTemplateFormat(tokenizer, in_template, tools)
    source = template_source(tokenizer)
    if CALL_OPEN in source:
        return HermesFormat("hermes", in_template)
    if PYTHON_TAG in source or '"parameters"' in source:
        return Llama3Format(in_template)
    return HermesFormat("fallback", tools_in_template=False)
