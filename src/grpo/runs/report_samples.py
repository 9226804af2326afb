"""report.html's "Samples" section: the completions that samples.jsonl logged, step by step, searchable.

Each logged step (at most :data:`SAMPLE_STEPS_SHOWN` of them, spread over the run) is a table of its
samples: the prompt as the model saw it, the completion, each reward's score, the total reward and the
advantage. A multi-turn sample (one whose record holds ``messages``: see
:func:`grpo.agents.episode.episode_fields`) shows its whole trajectory instead of the completion: every
message in order, the model's own turns set apart from tool results and the environment's messages, with
the episode's counts (turns, tool calls, tool errors, malformed calls, stopped at max_turns) and what
failed. Every piece of text is escaped; the page's search box (:data:`grpo.runs.page.SCRIPT`) searches a
row's whole text, trajectories included.
"""

from __future__ import annotations

import math
from typing import Any

from grpo.runs.layout import SAMPLES_FILE
from grpo.runs.page import esc, fmt, html_table, is_number

# Logged steps whose samples the page shows, spread over the run (all are in samples.jsonl): enough to
# follow a run, few enough for a page that opens at once.
SAMPLE_STEPS_SHOWN = 50

# How each role of a trajectory's messages is labelled: the model's turns, tools' results, and the user
# messages that an environment writes (its first observation, its answers to the model's turns).
ROLE_LABELS = {"assistant": "model", "tool": "tool", "user": "environment"}


def samples_section(samples: list[dict[str, Any]] | None) -> str:
    """The section's HTML from samples.jsonl's lines (None: no such file, no section)."""
    if samples is None:
        return ""
    lines = [line for line in samples if isinstance(line.get("samples"), list)]
    if not lines:
        return '<p class="muted">No samples were logged (log_completions = 0).</p>'
    shown = spread(lines, SAMPLE_STEPS_SHOWN)
    names: list[str] = []
    for line in shown:
        for sample in line["samples"]:
            for name in (sample.get("rewards") if isinstance(sample, dict) else None) or {}:
                if name not in names:
                    names.append(name)
    total = sum(len(line["samples"]) for line in shown)
    note = (
        f"{len(shown)} of the {len(lines)} logged steps are shown (all are in {SAMPLES_FILE}). "
        if len(shown) < len(lines)
        else ""
    )
    multi_turn = any(isinstance(s, dict) and "messages" in s for line in shown for s in line["samples"])
    trajectories = (
        " A multi-turn sample shows its whole trajectory: the model's turns, the tools' results and the "
        "environment's messages, in order, with the episode's counts."
        if multi_turn
        else ""
    )
    parts = [
        f'<p class="muted">{esc(note)}Each step shows a few of its sampled completions, spread over its '
        "groups: the prompt as the model saw it, the completion, each reward function's score, the total "
        f"reward and the advantage (positive: made more likely; negative: less).{esc(trajectories)}</p>",
        '<div class="search"><input type="search" id="sample-search" '
        'placeholder="Search prompts, completions and trajectories…" aria-label="Search the samples">'
        f' <span id="sample-count" class="muted">{total} samples</span></div>',
    ]
    for index, line in enumerate(shown):
        samples_of_step = [s for s in line["samples"] if isinstance(s, dict)]
        rewards = [s["reward"] for s in samples_of_step if is_number(s.get("reward"))]
        mean = f" · mean reward {fmt(sum(rewards) / len(rewards), 3)}" if rewards else ""
        rows = [sample_row(sample, names) for sample in samples_of_step]
        header = ["group", "prompt", "completion", *names, "reward", "advantage"]
        table = html_table(header, rows, "samples", row_cls="sample")
        is_open = " open" if index in (0, len(shown) - 1) else ""
        parts.append(
            f'<details class="step" data-step="{fmt(line["step"])}"{is_open}><summary>step '
            f"{fmt(line['step'])} · {len(samples_of_step)} samples{mean}</summary>{table}</details>"
        )
    return "\n".join(parts)


def sample_row(sample: dict[str, Any], names: list[str]) -> list[str]:
    """A sample's cells (HTML): group, prompt, completion or trajectory with its badges, rewards, total,
    advantage."""
    rewards = sample.get("rewards") if isinstance(sample.get("rewards"), dict) else {}
    badges = [f"{fmt(sample.get('length'))} tokens"] if is_number(sample.get("length")) else []
    badges += [flag for flag in ("truncated", "skipped") if sample.get(flag) is True]
    advantage = sample.get("advantage")
    sign = ""
    if is_number(advantage) and math.isfinite(advantage) and round(advantage, 3) != 0:
        sign = "pos" if advantage > 0 else "neg"
    messages = sample.get("messages")
    if isinstance(messages, list):
        shown = trajectory_html(messages) + "".join(
            f'<span class="badge episode">{esc(badge)}</span>' for badge in episode_badges(sample)
        )
        shown += errors_html(sample.get("errors"))
    else:
        shown = f'<pre class="completion">{esc(sample.get("completion", ""))}</pre>'
    return [
        fmt(sample.get("group")),
        f'<pre class="prompt">{esc(sample.get("prompt", ""))}</pre>',
        shown + "".join(f'<span class="badge">{esc(badge)}</span>' for badge in badges),
        *(f'<span class="num">{fmt(rewards.get(name), 3)}</span>' for name in names),
        f'<span class="num"><b>{fmt(sample.get("reward"), 3)}</b></span>',
        f'<span class="num {sign}">{fixed(advantage)}</span>',
    ]


def trajectory_html(messages: list[Any]) -> str:
    """A trajectory's messages in order, each under its role's label (a tool's result with the tool's
    name); the model's turns numbered."""
    items, turn = [], 0
    for message in messages:
        if not isinstance(message, dict):
            message = {"role": "?", "content": message}
        role = str(message.get("role", "?"))
        label = ROLE_LABELS.get(role, role)
        if role == "assistant":
            turn += 1
            label = f"{label} · turn {turn}"
        elif role == "tool" and message.get("name") is not None:
            label = f"{label} · {message['name']}"
        kind = role if role in ROLE_LABELS else "other"
        content = message.get("content", "")
        items.append(
            f'<div class="msg msg-{kind}"><span class="role">{esc(label)}</span>'
            f'<pre class="msg-text">{esc("" if content is None else content)}</pre></div>'
        )
    return f'<div class="trajectory">{"".join(items)}</div>'


def episode_badges(sample: dict[str, Any]) -> list[str]:
    """An episode's counts, as short phrases: turns, tool calls, tool errors, and (when any) malformed calls
    and a stop at max_turns."""
    badges = []
    for key, one, many in (("turns", "turn", "turns"), ("tool_calls", "tool call", "tool calls")):
        if is_number(sample.get(key)):
            badges.append(f"{fmt(sample[key])} {one if sample[key] == 1 else many}")
    if is_number(sample.get("tool_errors")):
        badges.append(f"{fmt(sample['tool_errors'])} tool error{'' if sample['tool_errors'] == 1 else 's'}")
    if is_number(sample.get("malformed_calls")) and sample["malformed_calls"] > 0:
        badges.append(f"{fmt(sample['malformed_calls'])} malformed call(s)")
    if sample.get("stopped_at_max_turns") is True:
        badges.append("stopped at max_turns")
    return badges


def errors_html(errors: Any) -> str:
    """What failed in the episode (tools, the environment), one item each; nothing when nothing did."""
    if not isinstance(errors, list) or not errors:
        return ""
    return '<ul class="episode-errors">' + "".join(f"<li>{esc(error)}</li>" for error in errors) + "</ul>"


def fixed(value: Any) -> str:
    """Three decimals (an advantage of −1.5e−7 is 0.000)."""
    if not is_number(value) or not math.isfinite(value):
        return fmt(value)
    return f"{round(value, 3) + 0.0:.3f}"  # + 0.0 turns −0.0 into 0.0


def spread(items: list[Any], count: int) -> list[Any]:
    """At most ``count`` of ``items``, evenly spaced, the first and the last always among them."""
    if len(items) <= count:
        return items
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in picks]
