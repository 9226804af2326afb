"""The built-in agent task "calculator": sums and products too large to work out in the head, with the tools
`add` and `multiply` to call.

A question is ``What is a + b?`` (a, b in 100–999) or ``What is a * b?`` (a, b in 10–99), half of each. The
model must call the right tool with the question's numbers, read the result from the tool message and give it
inside ``<answer></answer>`` tags, as two worked example trajectories in the prompt show (an addition, then a
multiplication). Measured on the default model, SmolLM2-135M-Instruct, before any training: it never gets the
answer right without a call, sampling (temperature 1) solves about one episode in six, greedy decoding about
half (it often calls a tool that does not exist, "divide" for a product): room to learn in both. With one
worked example the model copied the example's last turn (an answer, no call) in 32 of 32 samples; with two
additions only, greedy decoding solved every question, so nothing was left to learn.

The tools are spec strings in ``grpo.config.tasks.TASK_SETTINGS`` so that grpo.data need not import
grpo.agents; the system message here holds only the task's instruction, and the agent code appends the block
that shows the model its tools and the call format.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from grpo.errors import DataError

CALCULATOR_SYSTEM = (
    "Use a tool to work out the answer, then give the final number inside <answer></answer> tags."
)


CALCULATOR_TOOLS = ["grpo.data.agent_tasks:add", "grpo.data.agent_tasks:multiply"]


CALCULATOR_SIZES = {"train": 2000, "test": 200}


# The worked examples (operator, a, b), in the prompt in this order, and never asked.
CALCULATOR_EXAMPLES = (("+", 358, 467), ("*", 37, 46))


# Each operator's tool and the range of its terms: large enough that the model rarely answers right unaided.
OPERATIONS = {"+": ("add", 100, 999), "*": ("multiply", 10, 99)}


def _integer(value: Any, name: str) -> int:
    """``value`` as an int: an int, or a string of one (models sometimes quote numbers); else TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    try:
        return int(value)
    except ValueError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(_integer(a, "a") + _integer(b, "b"))


def multiply(a: int, b: int) -> str:
    """Multiply two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(_integer(a, "a") * _integer(b, "b"))


TOOL_FUNCTIONS = {"add": add, "multiply": multiply}


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """A tool call as the model writes it in the fallback format: ``<tool_call>{json}</tool_call>``."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def calculator_question(operator: str, a: int, b: int) -> str:
    """The user's question for ``a operator b``."""
    return f"What is {a} {operator} {b}?"


def calculator_answer(operator: str, a: int, b: int) -> int:
    """The right answer to ``a operator b``."""
    return a + b if operator == "+" else a * b


def worked_example(operator: str, a: int, b: int) -> list[dict[str, str]]:
    """One solved episode: the question, the assistant's tool call, the tool's result, the answer."""
    name = OPERATIONS[operator][0]
    result = str(calculator_answer(operator, a, b))
    return [
        {"role": "user", "content": calculator_question(operator, a, b)},
        {"role": "assistant", "content": tool_call_text(name, {"a": a, "b": b})},
        {"role": "tool", "name": name, "content": result},
        {"role": "assistant", "content": f"<answer>{result}</answer>"},
    ]


def calculator_prompt(operator: str, a: int, b: int) -> list[dict[str, str]]:
    """The chat messages of a question: the instruction, the worked examples, then the question."""
    messages = [{"role": "system", "content": CALCULATOR_SYSTEM}]
    for example in CALCULATOR_EXAMPLES:
        messages.extend(worked_example(*example))
    return [*messages, {"role": "user", "content": calculator_question(operator, a, b)}]


def calculator_questions(count: int) -> list[tuple[str, int, int]]:
    """``count`` distinct seeded questions (operator, a, b), none of them a worked example; + and * alternate
    at random, half of each on average."""
    rng = random.Random(2718)
    seen, questions = set(CALCULATOR_EXAMPLES), []
    while len(questions) < count:
        operator = rng.choice(sorted(OPERATIONS))
        _, low, high = OPERATIONS[operator]
        question = (operator, rng.randint(low, high), rng.randint(low, high))
        if question not in seen:
            seen.add(question)
            questions.append(question)
    return questions


def calculator(split: str) -> list[dict[str, Any]]:
    """Rows {"prompt": chat messages, "answer": "<number>"}; the held-out ("test") split shares no question
    with train."""
    if split not in CALCULATOR_SIZES:
        raise DataError(f"calculator: no split {split!r} ({', '.join(CALCULATOR_SIZES)})")
    questions = calculator_questions(sum(CALCULATOR_SIZES.values()))
    held_out = CALCULATOR_SIZES["test"]
    chosen = questions[:held_out] if split == "test" else questions[held_out:]
    return [
        {"prompt": calculator_prompt(*question), "answer": str(calculator_answer(*question))}
        for question in chosen
    ]


ANSWER_NUMBER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>\s*$")  # the last thing said


def exact_answer(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
    """The calculator task's accuracy: 1.0 when the final assistant message's ``<answer>`` holds the right
    integer, digits only, as the last thing said, else 0.0. (The general ``accuracy`` reward once scored
    ``<answer>16 * 52</answer>`` as 832 through math-verify — GRPO found that within seven steps, and the
    policy stopped calling tools; it refuses expressions now, but reads answers anywhere in the text.)"""
    scores = []
    for completion, expected in zip(completions, answer):
        said = [m for m in completion if m.get("role") == "assistant"] if isinstance(completion, list) else []
        text = said[-1].get("content", "") if said else (completion if isinstance(completion, str) else "")
        found = ANSWER_NUMBER.search(text)
        scores.append(float(found is not None and int(found.group(1)) == int(expected)))
    return scores


exact_answer.required_columns = ("answer",)
