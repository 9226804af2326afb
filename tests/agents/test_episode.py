"""An episode's turns (grpo.agents.episode): tool calls run and answered, failures read by the model and
counted, environments that answer or end, max_turns."""

from __future__ import annotations

import math

from grpo.agents.calls import HermesFormat
from grpo.agents.episode import Episode, episode_metrics
from grpo.agents.tools import Tool, tool_schema


def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(a + b)


def broken(x: int) -> str:
    """Always fails.

    Args:
        x: Anything.
    """
    raise ValueError("no luck")


TOOLS = [Tool("add", add, tool_schema(add)), Tool("broken", broken, tool_schema(broken))]


def call(name: str, **arguments) -> str:
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def episode(environment=None, max_turns: int = 4) -> Episode:
    return Episode(TOOLS, HermesFormat("fallback"), max_turns, 2.0, environment)


def test_calls_are_run_and_answered_and_an_answer_without_one_ends_the_episode():
    e = episode()
    assert e.respond("Let me add. " + call("add", a=2, b=3)) == [
        {"role": "tool", "name": "add", "content": "5"}
    ]
    assert e.respond("<answer>5</answer>") is None
    r = e.record
    counts = (r.turns, r.tool_calls, r.tool_errors, r.malformed_calls, r.stopped_at_max_turns)
    assert counts == (2, 1, 0, 0, False)
    assert r.final_answer == "<answer>5</answer>" and [m["role"] for m in r.messages] == [
        "assistant",
        "tool",
        "assistant",
    ]


def test_failures_are_what_the_model_reads_and_are_counted():
    e = episode()
    answers = e.respond(
        call("broken", x=1) + call("nope") + call("add", a=1) + "<tool_call>{oops</tool_call>"
    )
    texts = [a["content"] for a in answers]
    assert texts[0] == "error: ValueError: no luck"
    assert texts[1].startswith("error: there is no tool named 'nope' (tools: add, broken)")
    assert "missing a required argument: 'b'" in texts[2]
    assert texts[3].startswith("error: the tool call could not be read (not valid JSON")
    assert (e.record.tool_calls, e.record.tool_errors, e.record.malformed_calls) == (3, 3, 1)
    assert len(e.record.errors) == 3


def test_max_turns_stops_an_episode_that_still_acts():
    e = episode(max_turns=2)
    assert e.respond(call("add", a=1, b=1)) is not None
    assert e.respond(call("add", a=2, b=2)) is None
    assert e.record.stopped_at_max_turns and e.record.turns == 2 and e.record.tool_calls == 2
    assert e.record.messages[-1]["role"] == "assistant"  # the unanswered call is the last message


class Guess:
    def reset(self, secret, **row):
        self.secret, self.guesses = int(secret), 0
        return "Guess a number from 1 to 10."

    def step(self, text):
        self.guesses += 1
        guess = int(text.strip())
        if guess == self.secret:
            return None
        return "Higher." if guess < self.secret else "Lower."

    def give_up(self) -> str:
        """Reveal the number."""
        return str(self.secret)


def test_an_environment_answers_turns_ends_episodes_and_lends_its_methods_as_tools():
    game = Guess()
    e = episode(game)
    assert e.start({"prompt": [], "secret": "7"}) == "Guess a number from 1 to 10."
    assert e.respond("5") == [{"role": "user", "content": "Higher."}]
    assert e.respond(call("give_up")) == [{"role": "tool", "name": "give_up", "content": "7"}]
    assert e.respond("7") is None
    assert game.guesses == 2 and e.record.turns == 3 and e.record.environment_errors == 0


def test_an_environment_that_fails_ends_its_episode_and_is_counted():
    game = Guess()
    e = episode(game)
    e.start({"secret": "7"})
    assert e.respond("not a number") is None
    assert e.record.environment_errors == 1 and "step raised ValueError" in e.record.errors[0]
    failing = episode(Guess())
    assert failing.start({}).startswith("error: the environment's reset raised TypeError")
    assert failing.record.environment_errors == 1


def test_episode_metrics():
    a, b = episode(), episode()
    a.respond(call("add", a=1, b=2))
    a.respond("<tool_call>{bad</tool_call>")
    b.respond("3")
    m = episode_metrics([a.record, b.record])
    assert m["episodes/turns_mean"] == 1.5 and m["episodes/turns_max"] == 2
    assert m["episodes/tool_calls"] == 0.5 and m["episodes/well_formed_calls"] == 0.5
    assert m["episodes/stopped_at_max_turns"] == 0 and m["episodes/tool_errors"] == 0
    assert math.isnan(episode_metrics([b.record])["episodes/well_formed_calls"])


class Slow:
    def reset(self, **row):
        import time

        time.sleep(5)

    def step(self, text):
        import time

        time.sleep(5)


def test_an_environment_that_hangs_is_given_up_on_after_the_timeout():
    import time

    e = Episode(TOOLS, HermesFormat("fallback"), 4, 0.2, Slow())
    started = time.perf_counter()
    assert e.start({}) == "error: the environment's reset timed out after 0.2 s"
    assert e.respond("hello") is None  # its step hangs too: the episode ends
    assert time.perf_counter() - started < 2 and e.record.environment_errors == 2
