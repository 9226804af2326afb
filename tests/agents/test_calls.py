"""Reading tool calls from assistant turns: the hermes, Llama 3 and response-template formats on realistic
text (what a 135M model writes included), malformed markup counted and never raised, and picking a format
from a chat template (excerpts modelled on Qwen2.5's and Llama 3.1's tool handling)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CHAT_TEMPLATE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from grpo.agents.calls import (
    HermesFormat,
    Llama3Format,
    ParsedTurn,
    ToolCall,
    call_format_for,
    renders_tools,
)

DATA = Path(__file__).parent / "data"
ADD_SCHEMA = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two whole numbers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "description": "The first number."},
                "b": {"type": "integer", "description": "The second number."},
            },
            "required": ["a", "b"],
        },
    },
}

# Qwen2.5's tool handling, shortened: tools listed in the system message, calls as <tool_call> JSON.
QWEN_TEMPLATE = (DATA / "qwen2.5_tools_excerpt.jinja").read_text(encoding="utf-8")

# Llama 3.1's JSON tool calling, shortened: tools in the first user message, {"name", "parameters"} calls.
LLAMA_TEMPLATE = (DATA / "llama3.1_tools_excerpt.jinja").read_text(encoding="utf-8")

# A response template (transformers' parse_response) for the hermes format.
HERMES_RESPONSE_TEMPLATE = {
    "start_anchor": "<|im_start|>assistant\n",
    "defaults": {"role": "assistant"},
    "fields": {
        "content": {},
        "tool_calls": {
            "open": "<tool_call>",
            "close": "</tool_call>",
            "content": "json",
            "repeats": True,
            "transform": {"type": "function", "function": "{content}"},
        },
    },
}

HERMES = HermesFormat()


def turn(content: str, *calls: tuple[str, dict], malformed: tuple[str, ...] = ()) -> ParsedTurn:
    return ParsedTurn(content, [ToolCall(name, arguments) for name, arguments in calls], list(malformed))


# --- hermes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 5.", turn("The answer is 5.")),
        (
            'Let me add them.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
            turn("Let me add them.", ("add", {"a": 2, "b": 3})),
        ),
        (
            '<tool_call>  {"name" : "add" ,\n "arguments": {"a": 1, "b": 2} }  </tool_call>  ',
            turn("", ("add", {"a": 1, "b": 2})),
        ),
        (
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>',
            turn("", ("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})),
        ),
        (  # the closing tag left out at the end of the turn: the JSON is complete, so it counts
            'Calling.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n',
            turn("Calling.", ("add", {"a": 1, "b": 2})),
        ),
        (  # arguments as a JSON string, as some models write them
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>',
            turn("", ("add", {"a": 1, "b": 2})),
        ),
        ('<tool_call>{"name": "now"}</tool_call>', turn("", ("now", {}))),
        ('<tool_call>{"name": "now", "arguments": null}</tool_call>', turn("", ("now", {}))),
        (  # OpenAI's nesting, and Llama's "parameters"
            '<tool_call>{"type": "function", "function": {"name": "add", "parameters": {"a": 1}}}'
            "</tool_call>",
            turn("", ("add", {"a": 1})),
        ),
        (
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> so the sum is <answer>3</answer>',
            turn("so the sum is <answer>3</answer>", ("add", {"a": 1})),
        ),
    ],
)
def test_hermes_reads_the_calls_and_the_text_around_them(text, expected):
    assert HERMES.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": }}</tool_call>', "not valid JSON"),
        ("<tool_call>add(1, 2)</tool_call>", "not valid JSON"),
        ("<tool_call>{'name': 'add'}</tool_call>", "not valid JSON"),
        ('<tool_call>{"arguments": {"a": 1}}</tool_call>', "no 'name'"),
        ('<tool_call>{"name": "", "arguments": {}}</tool_call>', "no 'name'"),
        ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "arguments is not an object"),
        ('<tool_call>{"name": "add", "arguments": "a=1"}</tool_call>', "arguments is not valid JSON"),
        ('<tool_call>["add", 1, 2]</tool_call>', "not a JSON object"),
        ('<tool_call>{"name": "add"} and more</tool_call>', "text after the JSON object"),
        ("<tool_call>\n\n</tool_call>", "empty <tool_call>"),
        ('<tool_call>{"name": "add", "arguments": {"a": 1', "not valid JSON, and no </tool_call>"),
        ('<tool_call>{"name": "add"} then I wait', "no </tool_call>"),
    ],
)
def test_hermes_lists_unreadable_markup_with_a_short_reason_and_drops_it_from_the_content(text, reason):
    parsed = HERMES.parse(f"Thinking. {text}")
    assert parsed == turn("Thinking.", malformed=(reason,))


def test_a_bad_call_does_not_spoil_a_good_one_beside_it():
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 5, "b": 6}}'
    )
    assert HERMES.parse(text) == turn(
        "", ("add", {"a": 1, "b": 2}), ("add", {"a": 5, "b": 6}), malformed=("not valid JSON",)
    )


def test_an_open_block_before_another_one_is_read_up_to_it():
    text = '<tool_call>{"name": "a"}\n<tool_call>{"name": "b"}</tool_call>'
    assert HERMES.parse(text) == turn("", ("a", {}), ("b", {}))


FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    '{"name": "add"',
    ', "arguments": ',
    '{"a": 1}',
    '"{\\"a\\": 1}"',
    "}",
    "{",
    "[",
    "]",
    "null",
    "\n",
    " ",
    "text",
    "<|python_tag|>",
    ";",
    '"',
    "\\",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14))
def test_parsing_never_raises_and_every_call_has_an_object_of_arguments(pieces):
    text = "".join(pieces)
    for call_format in (HERMES, Llama3Format()):
        parsed = call_format.parse(text)
        assert all(isinstance(call.arguments, dict) and call.name for call in parsed.calls)
        assert all(isinstance(reason, str) and reason for reason in parsed.malformed)
        assert "<tool_call>" not in parsed.content or call_format is not HERMES


# --- llama 3 ----------------------------------------------------------------------------------------------
LLAMA = Llama3Format()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 5.", turn("The answer is 5.")),
        ('{"name": "add", "parameters": {"a": 2, "b": 3}}', turn("", ("add", {"a": 2, "b": 3}))),
        (
            '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}<|eom_id|>',
            turn("", ("add", {"a": 2, "b": 3})),
        ),
        ('  \n{"name": "add", "arguments": {"a": 1, "b": 1}}\n', turn("", ("add", {"a": 1, "b": 1}))),
        (
            '{"name": "add", "parameters": {"a": 1, "b": 2}}; '
            '{"name": "add", "parameters": {"a": 3, "b": 4}}',
            turn("", ("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})),
        ),
        ('{"name": "now", "parameters": {}}', turn("", ("now", {}))),
        ('{"name": "add", "parameters": {"a": 1, "b": 2', turn("", malformed=("not valid JSON",))),
        ('{"answer": 5}', turn("", malformed=("no 'name'",))),
        ("<|python_tag|>add(1, 2)", turn("add(1, 2)", malformed=("not a JSON object",))),
        ('{"name": "add", "parameters": {"a": 1}} I called it.', turn("I called it.", ("add", {"a": 1}))),
    ],
)
def test_llama3_reads_a_turn_that_is_a_json_call(text, expected):
    assert LLAMA.parse(text) == expected


# --- picking a format from the chat template -----------------------------------------------------------
@pytest.fixture()
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def render(tokenizer, tools=None) -> str:
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_a_qwen_style_template_is_hermes_and_lists_the_tools_itself(tokenizer):
    tokenizer.chat_template = QWEN_TEMPLATE
    call_format = call_format_for(tokenizer)
    assert isinstance(call_format, HermesFormat) and call_format.name == "hermes"
    assert renders_tools(tokenizer) and call_format.system_prompt([ADD_SCHEMA]) is None
    assert json.dumps(ADD_SCHEMA) in render(tokenizer, [ADD_SCHEMA])  # (the excerpt does render tools=)
    # What the template writes for an assistant's call reads back as that call.
    chat = [
        {"role": "user", "content": "What is 2 + 3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}],
        },
    ]
    written = tokenizer.apply_chat_template(chat, tools=[ADD_SCHEMA], tokenize=False)
    assistant = written.split("<|im_start|>assistant")[-1].removesuffix("<|im_end|>\n")
    assert call_format.parse(assistant) == turn("", ("add", {"a": 2}))


def test_a_llama_style_template_is_llama3_and_lists_the_tools_itself(tokenizer):
    tokenizer.chat_template = LLAMA_TEMPLATE
    call_format = call_format_for(tokenizer)
    assert isinstance(call_format, Llama3Format) and call_format.name == "llama3"
    assert renders_tools(tokenizer) and call_format.system_prompt([ADD_SCHEMA]) is None
    assert '"name": "add"' in render(tokenizer, [ADD_SCHEMA])
    chat = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    ]
    written = tokenizer.apply_chat_template(chat, tools=[ADD_SCHEMA], tokenize=False)
    assistant = written.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[-1]
    assert call_format.parse(assistant) == turn("", ("add", {"a": 2, "b": 3}))


def test_the_python_tag_alone_marks_a_llama3_template(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE + "{% if builtin_tools %}<|python_tag|>{% endif %}"
    call_format = call_format_for(tokenizer)
    assert call_format.name == "llama3" and not renders_tools(tokenizer)
    prompt = call_format.system_prompt([ADD_SCHEMA])
    assert '"parameters": {<arguments>}' in prompt and json.dumps(ADD_SCHEMA["function"]) in prompt


def test_a_template_without_tool_support_gets_the_fallback_and_its_system_prompt(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE  # plain ChatML, as SmolLM2's
    call_format = call_format_for(tokenizer)
    assert call_format.name == "fallback" and not renders_tools(tokenizer)
    assert json.dumps(ADD_SCHEMA) not in render(tokenizer, [ADD_SCHEMA])
    second = {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": {}}}
    assert call_format.system_prompt([ADD_SCHEMA, second]) == (
        "You can call these tools:\n<tools>\n"
        f"{json.dumps(ADD_SCHEMA['function'])}\n{json.dumps(second['function'])}\n</tools>\n"
        'To call a tool, write <tool_call>{"name": <tool name>, "arguments": {<arguments>}}</tool_call> '
        "and wait for its result."
    )
    assert call_format.system_prompt([]) is None
    assert call_format.parse('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>').calls


def test_a_template_that_writes_tool_call_but_never_reads_tools_shows_them_in_the_system_prompt(tokenizer):
    # "tools" appears only inside a string: the template does not render tools=.
    tokenizer.chat_template = CHAT_TEMPLATE + "{{ '<tool_call> tools </tool_call>' if false else '' }}"
    call_format = call_format_for(tokenizer)
    assert call_format.name == "hermes" and not renders_tools(tokenizer)
    assert "<tools>" in call_format.system_prompt([ADD_SCHEMA])


def test_a_template_with_generation_blocks_and_named_templates_is_read(tokenizer):
    with_tools = "{% generation %}{{ tools | length }}{% endgeneration %}" + CHAT_TEMPLATE
    tokenizer.chat_template = {"default": CHAT_TEMPLATE, "tool_use": with_tools}
    assert renders_tools(tokenizer)
    tokenizer.chat_template = {"default": CHAT_TEMPLATE}
    assert not renders_tools(tokenizer)
    tokenizer.chat_template = None
    assert not renders_tools(tokenizer) and call_format_for(tokenizer).name == "fallback"


def test_a_response_template_is_used_when_the_tokenizer_has_one(tokenizer):
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.response_template = HERMES_RESPONSE_TEMPLATE
    call_format = call_format_for(tokenizer, tools=[ADD_SCHEMA])
    assert call_format.name == "response_template" and call_format.system_prompt([ADD_SCHEMA]) is None
    text = 'Adding.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": "3"}}\n</tool_call>'
    assert call_format.parse(text) == turn(
        "Adding.", ("add", {"a": 2, "b": 3})
    )  # "3" cast to the schema's int
    assert call_format.parse("It is 5.") == turn("It is 5.")
    broken = call_format.parse('Adding. <tool_call>{"name": "add", "arguments": {"a": 2</tool_call>')
    assert (
        broken.calls == [] and len(broken.malformed) == 1 and broken.malformed[0].startswith("unreadable (")
    )
    assert "\n" not in broken.malformed[0]
