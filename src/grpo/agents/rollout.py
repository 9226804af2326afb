"""Sampling multi-turn trajectories: a group of G episodes per prompt, decoded together as one batch.

:class:`Agent` holds a run's tools and environment class and what its model's chat template makes of
them. :meth:`Agent.sample` starts an episode per trajectory (resetting its environment with the row),
decodes every trajectory's turns in one batch through the default backend
(:meth:`grpo.rollout.backends.DefaultBackend.sample_turns`), and between a trajectory's turns feeds it
what its episode answered, written as the chat template writes it. The result is a
:class:`~grpo.rollout.batch.Rollout` like any other: one token sequence per trajectory, whose
``loss_mask`` keeps only the model's own tokens, and whose ``episodes`` keep the conversations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grpo.agents.calls import call_format_for
from grpo.agents.environments import load_environment
from grpo.agents.episode import Episode, EpisodeRecord
from grpo.agents.render import Continuations, render, with_system_text
from grpo.agents.tools import (
    Tool,
    call_in_thread,
    check_unique_names,
    load_tools,
    public_method_names,
    tool_schema,
)
from grpo.data.prompts import Row
from grpo.errors import DataError
from grpo.rollout.backends import DefaultBackend
from grpo.rollout.batch import Rollout
from grpo.rollout.generate import stop_token_ids, tokenize_prompts


class Agent:
    """What a run's episodes act on — ``tools`` and an ``environment`` class (either may be absent) — and
    how ``tokenizer``'s chat template shows them and reads the model's calls."""

    def __init__(
        self,
        tools: list[Tool],
        environment: type | None,
        tokenizer: Any,
        *,
        max_turns: int,
        tool_timeout: float | None,
    ):
        self.tools, self.environment, self.tokenizer = tools, environment, tokenizer
        self.max_turns, self.tool_timeout = max_turns, tool_timeout
        methods = class_tools(environment)
        check_unique_names([*tools, *methods])
        self.schemas = [tool.schema for tool in [*tools, *methods]]
        self.call_format = call_format_for(tokenizer, self.schemas)
        self.system_text = self.call_format.system_prompt(self.schemas)
        # The tools reach the template as tools= where it renders them, else the system message shows them.
        self.template_tools = self.schemas if self.call_format.tools_in_template else None
        roles = (["tool"] if self.schemas else []) + (["user"] if hasattr(environment, "step") else [])
        ends = [tokenizer.decode([i]) for i in stop_token_ids(None, tokenizer)]
        self.continuations = Continuations(tokenizer, self.template_tools, roles, ends)

    @classmethod
    def load(cls, tools: Sequence[str], environment: str | None, tokenizer: Any, **settings: Any) -> Agent:
        """The agent of ``tools`` and ``environment`` entries (ConfigError naming a bad one)."""
        return cls(load_tools(tools), environment and load_environment(environment), tokenizer, **settings)

    @classmethod
    def of_run(cls, settings: Any, tokenizer: Any) -> Agent | None:
        """The agent of a run's settings (GRPOConfig's tools, environment, max_turns and tool_timeout), or
        None when it has neither tools nor an environment."""
        if not settings.tools and settings.environment is None:
            return None
        return cls.load(
            settings.tools,
            settings.environment,
            tokenizer,
            max_turns=settings.max_turns,
            tool_timeout=settings.tool_timeout or None,
        )

    def prompt_messages(self, row: Row, where: str = "dataset") -> list[dict]:
        """The row's chat messages, with the tools block in the system message where the template has no
        place for tools."""
        if not isinstance(row["prompt"], list):  # (check_agent_inputs names the row before a run starts)
            raise DataError(f"{where}: an agent's prompts must be chat messages, got a string prompt")
        return with_system_text(row["prompt"], self.system_text)

    def prompt_text(self, row: Row) -> str:
        """The row's prompt as the model reads it before its first turn (without an observation)."""
        return render(self.tokenizer, self.prompt_messages(row), self.template_tools, generation_prompt=True)

    def new_episode(self) -> Episode:
        """An episode with its own environment instance; one whose construction fails goes without (the
        failure counted), as every other failure of the user's code during a run."""
        if self.environment is None:
            return Episode(self.tools, self.call_format, self.max_turns, self.tool_timeout)
        what = f"the environment's {self.environment.__name__}()"
        made, instance = call_in_thread(self.environment, {}, self.tool_timeout, what)
        failed = not made or isinstance(instance, BaseException)
        failure = f"{what} raised {instance!r}" if made else instance
        instance = None if failed else instance
        episode = Episode(self.tools, self.call_format, self.max_turns, self.tool_timeout, instance)
        if failed:
            episode.environment_failed(failure)
        return episode

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def sample(
        self,
        backend: DefaultBackend,
        rows: list[Row],
        *,
        num_generations: int,
        max_completion_length: int,
        max_prompt_length: int,
        stop_ids: list[int],
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        **sampling: Any,
    ) -> Rollout:
        """``num_generations`` episodes per row, each at most ``max_completion_length`` tokens after its
        prompt (turns, tool results and observations together); ``sampling``: temperature, top_p, top_k,
        greedy."""
        g, tokenizer = num_generations, self.tokenizer
        episodes = [self.new_episode() for _ in range(len(rows) * g)]
        observations = [episode.start(rows[i // g]) for i, episode in enumerate(episodes)]
        prompts, first_feeds = [], []
        for index, row in enumerate(rows):
            messages = self.prompt_messages(row)
            group = observations[index * g : (index + 1) * g]
            if all(observation is None for observation in group):
                prompts.append(self.prompt_text(row))
                first_feeds += [[] for _ in group]
                continue
            # Each trajectory's own first observation follows the shared prompt, as a user message.
            prompts.append(render(tokenizer, messages, self.template_tools, generation_prompt=False))
            for episode, observation in zip(episodes[index * g :], group):
                said = [] if observation is None else [{"role": "user", "content": observation}]
                episode.record.messages.extend(said)
                first_feeds.append(self.encode(self.continuations.first_turn(messages, said)))
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, max_prompt_length)

        def turn_ends(indices: list[int], turns: list[list[int]], last: bool) -> list[list[int] | None]:
            feeds: list[list[int] | None] = []
            for index, turn in zip(indices, turns):
                text = tokenizer.decode(turn, skip_special_tokens=True)
                raw = tokenizer.decode(turn[:-1], skip_special_tokens=False)  # (call markup may be special)
                answers = episodes[index].respond(text, raw, act=not last)
                if not answers:  # (ended; or, at the last position, [] for an episode that would go on)
                    feeds.append(answers)
                else:
                    end = tokenizer.decode(turn[-1:], skip_special_tokens=False)
                    feeds.append(self.encode(self.continuations.after_turn(answers, end)))
            return feeds

        decoded = backend.sample_turns(
            prompt_ids,
            prompt_mask,
            num_generations=g,
            max_new_tokens=max_completion_length,
            stop_ids=stop_ids,
            pad_id=tokenizer.pad_token_id,
            seeds=seeds,
            batch_size=batch_size,
            turn_ends=turn_ends,
            first_feeds=first_feeds if any(first_feeds) else None,
            **sampling,
        )
        width = decoded.tokens.shape[1]
        completion_mask = (torch.arange(width).unsqueeze(0) < decoded.lengths.unsqueeze(1)).long()
        records = [episode.record for episode in episodes]
        for record, tokens, sampled in zip(records, decoded.tokens, decoded.sampled):
            record_cut_turn(record, tokens, sampled, tokenizer)
        return Rollout(
            prompt_ids,
            prompt_mask,
            decoded.tokens,
            completion_mask,
            ~decoded.ended,
            [record.final_answer for record in records],
            g,
            decoded.logps,
            tokenizer.pad_token_id,
            (decoded.sampled & completion_mask.bool()).long(),
            records,
        )


def record_cut_turn(
    record: EpisodeRecord, tokens: torch.Tensor, sampled: torch.Tensor, tokenizer: Any
) -> None:
    """A trajectory cut at max_completion_length in the middle of a turn: that turn's text, as far as it
    got, is its last assistant message. (Each turn is a run of sampled tokens; fed text separates them.)"""
    starts = (sampled & ~torch.cat([sampled.new_zeros(1), sampled[:-1]])).nonzero().flatten().tolist()
    if len(starts) <= record.turns:  # every turn finished and was recorded
        return
    last = sampled.nonzero().flatten()[-1].item()
    text = tokenizer.decode(tokens[starts[-1] : last + 1].tolist(), skip_special_tokens=True)
    record.messages.append({"role": "assistant", "content": text})
    record.turns += 1


def check_agent_inputs(
    tools: Sequence[str], environment: str | None, datasets: Sequence[tuple[str, list[Row]]]
) -> None:
    """Before the model loads: the tools and environment entries load and pass their checks, and every
    row of ``datasets`` ((source, rows) pairs) has chat-message prompts. A ConfigError or DataError names
    the first problem."""
    environment_class = load_environment(environment) if environment is not None else None
    check_unique_names([*load_tools(tools), *class_tools(environment_class)])
    for where, rows in datasets:
        for number, row in enumerate(rows, start=1):
            if not isinstance(row["prompt"], list):
                raise DataError(
                    f"{where}: row {number}: field 'prompt' must be chat messages for a run with tools or "
                    "an environment (tool results are chat messages too)"
                )


def class_tools(environment: type | None) -> list[Tool]:
    """An environment class's tools (its public methods, unbound), for their schemas and names."""
    names = [] if environment is None else public_method_names(environment)
    return [
        Tool(
            name,
            getattr(environment, name),
            tool_schema(getattr(environment, name)),
            f"{environment.__name__}.{name}",
        )
        for name in names
    ]
