"""One trajectory's episode: the conversation after the prompt, the tools and environment it acts on, and
what it counted (turns, tool calls, errors).

:meth:`Episode.respond` takes each assistant turn as the model wrote it and returns the messages that answer
it — tool results, or an environment's next user message — or None when the episode is over: the model
answered without a call (and without an environment ``step`` that answers), an environment's ``step``
returned None, or ``max_turns`` turns were taken. A tool or environment that fails is the episode's
problem: its failure becomes the text the model reads (or ends the episode) and is counted, never raised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from grpo.agents.calls import CallFormat
from grpo.agents.tools import Tool, ToolOutcome, call_in_thread, call_tool, environment_tools


@dataclass
class EpisodeRecord:
    """What an episode leaves for the logs, the report and the rewards."""

    messages: list[dict] = field(default_factory=list)  # after the prompt: assistant, tool and user turns
    turns: int = 0  # assistant turns
    tool_calls: int = 0  # well-formed calls (run, or answered with an error)
    tool_errors: int = 0  # calls that failed: unknown tool, bad arguments, exception, timeout, non-string
    malformed_calls: int = 0  # call markup that could not be read
    environment_errors: int = 0  # reset or step raised or returned something unusable
    stopped_at_max_turns: bool = False  # stopped at max_turns while the model was still acting
    errors: list[str] = field(default_factory=list)  # what failed (tools and environment), in order
    environment: Any = None  # the episode's environment instance (for the rewards; dropped after scoring)

    @property
    def final_answer(self) -> str:
        """The content of the last assistant message ("" before the first)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


class Episode:
    """An episode in progress. ``tools`` are the run's tool functions; an ``environment`` instance adds its
    public methods as tools, and answers turns without calls through its ``step`` when it has one."""

    def __init__(
        self,
        tools: list[Tool],
        call_format: CallFormat,
        max_turns: int,
        tool_timeout: float | None,
        environment: Any = None,
    ):
        self.call_format, self.max_turns, self.timeout = call_format, max_turns, tool_timeout
        self.record = EpisodeRecord(environment=environment)
        own = environment_tools(environment) if environment is not None else []
        self.tools = {tool.name: tool for tool in [*tools, *own]}
        self.step = getattr(environment, "step", None)

    def start(self, row: dict[str, Any]) -> str | None:
        """Reset the environment with the row's columns; its first observation, if it gives one."""
        if self.record.environment is None:
            return None
        reset = self.record.environment.reset
        finished, observation = call_in_thread(reset, row, self.timeout, "the environment's reset")
        if not finished:
            return self.environment_failed(observation)
        if isinstance(observation, BaseException):  # the episode goes on without its observation
            return self.environment_failed(f"reset raised {type(observation).__name__}: {observation}")
        if observation is not None and not isinstance(observation, str):
            return self.environment_failed(f"reset returned {type(observation).__name__}, not a string")
        return observation

    def respond(self, text: str, raw: str | None = None, act: bool = True) -> list[dict] | None:
        """Record the assistant turn ``text``; the messages that answer it, or None when the episode ends.
        Calls are read from ``raw`` (the turn with its special tokens, if they differ). Without ``act`` (no
        room left in the trajectory) nothing runs: an empty list says the episode would have gone on."""
        record = self.record
        record.messages.append({"role": "assistant", "content": text})
        record.turns += 1
        parsed = self.call_format.parse(text if raw is None else raw)
        if not act:
            return [] if parsed.calls or parsed.malformed or self.step is not None else None
        answers = [self.run_call(call.name, call.arguments) for call in parsed.calls]
        for reason in parsed.malformed:  # the model reads why, so that it can write the call again
            record.malformed_calls += 1
            answers.append({"role": "tool", "content": f"error: the tool call could not be read ({reason})"})
        if not answers and self.step is not None:
            answers = self.environment_step(text)
        if answers and record.turns >= self.max_turns:
            record.stopped_at_max_turns = True
            return None
        record.messages.extend(answers)
        return answers or None

    def run_call(self, name: str, arguments: dict[str, Any]) -> dict:
        self.record.tool_calls += 1
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            outcome = ToolOutcome(f"error: there is no tool named {name!r} (tools: {known})", "unknown tool")
        else:
            outcome = call_tool(tool, arguments, self.timeout)
        if outcome.error is not None:
            self.record.tool_errors += 1
            self.record.errors.append(f"tool {name!r}: {outcome.text}")
        return {"role": "tool", "name": name, "content": outcome.text}

    def environment_step(self, text: str) -> list[dict]:
        """The environment's answer to a turn without calls, as a user message; none ends the episode."""
        finished, reply = call_in_thread(self.step, {}, self.timeout, "the environment's step", (text,))
        if not finished:
            self.environment_failed(reply)
            return []
        if isinstance(reply, BaseException):  # the environment's own failure ends the episode
            self.environment_failed(f"step raised {type(reply).__name__}: {reply}")
            return []
        if reply is not None and not isinstance(reply, str):
            self.environment_failed(f"step returned {type(reply).__name__}, not a string or None")
            return []
        return [] if reply is None else [{"role": "user", "content": reply}]

    def environment_failed(self, what: str) -> str:
        """Count and record an environment failure; the text the model reads in its place."""
        self.record.environment_errors += 1
        self.record.errors.append(f"environment: {what}")
        return (
            f"error: the environment's {what}" if not what.startswith("the environment") else f"error: {what}"
        )


def episode_metrics(records: list[EpisodeRecord]) -> dict[str, float]:
    """A step's (or an evaluation's) episodes in numbers: turns (mean, max), tool calls per episode, tool
    errors, the share of call markup that was well formed, the share of episodes stopped at max_turns, and
    environment failures."""
    count = max(1, len(records))
    calls = sum(r.tool_calls for r in records)
    malformed = sum(r.malformed_calls for r in records)
    return {
        "episodes/turns_mean": sum(r.turns for r in records) / count,
        "episodes/turns_max": float(max((r.turns for r in records), default=0)),
        "episodes/tool_calls": calls / count,
        "episodes/tool_errors": float(sum(r.tool_errors for r in records)),
        "episodes/well_formed_calls": calls / (calls + malformed) if calls + malformed else float("nan"),
        "episodes/stopped_at_max_turns": sum(r.stopped_at_max_turns for r in records) / count,
        "episodes/environment_errors": float(sum(r.environment_errors for r in records)),
    }


def episode_fields(record: EpisodeRecord) -> dict:
    """An episode as samples.jsonl and evaluation files keep it: its messages and counts (everything but
    the environment instance); ``EpisodeRecord(**fields)`` reads it back."""
    fields = dataclasses.asdict(dataclasses.replace(record, environment=None))
    del fields["environment"]
    return fields


def reward_arguments(records: list[EpisodeRecord], environments: bool) -> dict[str, list]:
    """What reward functions get of multi-turn episodes: ``completions``, each trajectory's messages, and
    with ``environments`` (a run that has an environment) the instances, so that a reward can read where
    an episode ended. (Without one, no ``environments=``: a TRL reward without ``**kwargs`` still works.)"""
    arguments: dict[str, list] = {"completions": [record.messages for record in records]}
    if environments:
        arguments["environments"] = [record.environment for record in records]
    return arguments
