"""The built-in agent task "calculator": seeded, disjoint splits of sums and products with the right answers,
worked examples that call the task's own tools, tools that load as an agent's tools, and its registration."""

from __future__ import annotations

import json
import re

import pytest
from transformers.utils import get_json_schema

from grpo.agents.tools import call_tool, load_tools
from grpo.config.tasks import TASK_SETTINGS
from grpo.data.agent_tasks import (
    CALCULATOR_EXAMPLES,
    CALCULATOR_TOOLS,
    TOOL_FUNCTIONS,
    add,
    calculator,
    exact_answer,
    multiply,
)
from grpo.data.tasks import COMPLETION_LENGTHS, TASKS
from grpo.errors import DataError
from grpo.rewards import build_rewards
from grpo.rewards.core import score_groups

QUESTION = re.compile(r"What is (\d+) ([+*]) (\d+)\?")
CALL = re.compile(r"<tool_call>(.*)</tool_call>")
SPLITS = ["train", "test"]


def question(row: dict) -> tuple[str, int, int]:
    a, operator, b = QUESTION.fullmatch(row["prompt"][-1]["content"]).groups()
    return operator, int(a), int(b)


@pytest.mark.parametrize("split", SPLITS)
def test_rows_ask_sums_and_products_of_numbers_in_range_with_the_right_answer(split):
    rows = calculator(split)
    assert len(rows) == {"train": 2000, "test": 200}[split]
    operators = []
    for row in rows:
        operator, a, b = question(row)
        operators.append(operator)
        low, high = (100, 999) if operator == "+" else (10, 99)
        assert low <= a <= high and low <= b <= high
        assert row["answer"] == str(a + b if operator == "+" else a * b)
    assert 0.4 < operators.count("+") / len(rows) < 0.6, "about half sums, half products"


def test_splits_are_deterministic_distinct_disjoint_and_never_ask_a_worked_example():
    train, test = ([question(row) for row in calculator(split)] for split in SPLITS)
    assert [question(row) for row in calculator("train")] == train
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert not set(CALCULATOR_EXAMPLES) & (set(train) | set(test))


def test_the_prompt_is_the_instruction_then_worked_examples_that_call_the_tasks_tools():
    prompt = calculator("test")[0]["prompt"]
    assert prompt[0]["role"] == "system" and "<answer></answer>" in prompt[0]["content"]
    assert "<tools>" not in prompt[0]["content"], "the agent code adds the tools block"
    assert [m["role"] for m in prompt[1:]] == ["user", "assistant", "tool", "assistant"] * 2 + ["user"]
    for start, (operator, a, b) in zip((1, 5), CALCULATOR_EXAMPLES):
        asked, called, result, answered = prompt[start : start + 4]
        assert asked["content"] == f"What is {a} {operator} {b}?"
        call = json.loads(CALL.fullmatch(called["content"]).group(1))
        assert call["arguments"] == {"a": a, "b": b}
        assert result["name"] == call["name"]
        assert result["content"] == TOOL_FUNCTIONS[call["name"]](**call["arguments"])
        assert answered["content"] == f"<answer>{result['content']}</answer>"
    assert calculator("train")[0]["prompt"][:-1] == prompt[:-1], "the same examples before every question"


def test_a_worked_answer_gets_full_marks_and_a_wrong_one_does_not():
    rows = calculator("test")[:4]
    right = [f"<answer>{row['answer']}</answer>" for row in rows]
    wrong = [f"<answer>{int(row['answer']) + 1}</answer>" for row in rows]
    values = score_groups(build_rewards(["accuracy", "format"]), rows * 2, right + wrong).values.tolist()
    assert values == [[1.0, 1.0]] * 4 + [[0.0, 1.0]] * 4


def test_the_tools_compute_return_strings_and_accept_quoted_integers():
    assert add(358, 467) == "825" and multiply(37, 46) == "1702"
    assert add("12", 3) == "15" and multiply(-4, "25") == "-100"


@pytest.mark.parametrize("value", [1.5, "twelve", None, True, [1]])
def test_the_tools_refuse_what_is_not_an_integer(value):
    for tool in (add, multiply):
        with pytest.raises(TypeError, match="a must be an integer"):
            tool(value, 1)


@pytest.mark.parametrize("tool", [add, multiply])
def test_the_tools_have_a_json_schema_with_two_required_integers(tool):
    schema = get_json_schema(tool)["function"]
    assert schema["name"] == tool.__name__
    assert schema["parameters"]["required"] == ["a", "b"]
    assert {p["type"] for p in schema["parameters"]["properties"].values()} == {"integer"}


def test_the_task_is_registered_with_its_tools_as_specs_an_agent_loads():
    assert TASKS["calculator"] is calculator
    assert COMPLETION_LENGTHS["calculator"] >= 64, "one call, the result and the answer: about 60 tokens"
    assert TASK_SETTINGS["calculator"]["tools"] == CALCULATOR_TOOLS
    tools = load_tools(TASK_SETTINGS["calculator"]["tools"])
    assert [tool.name for tool in tools] == ["add", "multiply"]
    outcome = call_tool(tools[1], {"a": 37, "b": 46}, timeout=5)
    assert (outcome.text, outcome.error) == ("1702", None)
    assert call_tool(tools[0], {"a": "x", "b": 1}, timeout=5).error is not None


def test_an_unknown_split_is_a_data_error_naming_the_task():
    with pytest.raises(DataError, match="calculator: no split 'validation'"):
        calculator("validation")


def trajectory(final: str) -> list[dict]:
    """An episode's messages after the prompt: a call, its result, then ``final`` as the last turn."""
    return [
        {"role": "assistant", "content": '<tool_call>{"name": "multiply", "arguments": {"a": 16, "b": 52}}'},
        {"role": "tool", "name": "multiply", "content": "832"},
        {"role": "assistant", "content": final},
    ]


@pytest.mark.parametrize(
    ("final", "score"),
    [
        ("<answer>832</answer>", 1.0),
        ("The tool says so.\n<answer> 832 </answer>\n", 1.0),
        ("<answer>833</answer>", 0.0),
        ("<answer>16 * 52</answer>", 0.0),  # what the general accuracy reward let GRPO get away with
        ("<answer>832.0</answer>", 0.0),
        ("<answer>832</answer> and that is all", 0.0),
        ("832", 0.0),
    ],
)
def test_exact_answer_wants_the_integer_alone_in_the_last_turns_answer_tags(final, score):
    row = {"prompt": calculator("test")[0]["prompt"], "answer": "832"}
    assert exact_answer([row["prompt"]], [trajectory(final)], [row["answer"]]) == [score]
    assert exact_answer([row["prompt"]], [final], [row["answer"]]) == [score], "a one-turn completion too"


def test_exact_answer_reads_the_last_assistant_turn_only():
    right_then_wrong = [
        {"role": "assistant", "content": "<answer>832</answer>"},
        *trajectory("<answer>1</answer>"),
    ]
    no_turn: list[dict] = []
    assert exact_answer([None, None], [right_then_wrong, no_turn], ["832", "832"]) == [0.0, 0.0]


def test_an_expression_in_the_answer_tags_scores_nothing_under_the_general_accuracy_reward_either():
    """It once did (math-verify evaluated 16 * 52 to 832): GRPO found that within seven steps."""
    rows = [{"prompt": calculator("test")[0]["prompt"], "answer": "832"}]
    values = score_groups(build_rewards(["accuracy"]), rows, [trajectory("<answer>16 * 52</answer>")]).values
    assert values.tolist() == [[0.0]]
