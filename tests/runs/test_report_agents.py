"""report.html of a multi-turn run, from a hand-made run directory: each sample's whole trajectory in order,
the model's turns set apart from tool results and environment messages, the episode's counts, everything
escaped, the trajectory inside the row that the search box filters; the "Episodes" chart; the episodes'
numbers in the held-out table. (In a browser: test_report_agents_browser.py.)"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from grpo.runs.page import SCRIPT
from grpo.runs.report import write_report

EVIL_TOOL_RESULT = '<script>alert("tool")</script></pre></div><img src=x onerror=alert(1)>'
EVIL_OBSERVATION = "<b>higher</b> & <style>body{display:none}</style>"
TRAJECTORY = [
    {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'},
    {"role": "tool", "name": "add", "content": EVIL_TOOL_RESULT},
    {"role": "user", "content": EVIL_OBSERVATION},
    {"role": "assistant", "content": "<answer>5</answer>"},
]
EPISODE = {
    "messages": TRAJECTORY,
    "turns": 2,
    "tool_calls": 1,
    "tool_errors": 1,
    "malformed_calls": 2,
    "stopped_at_max_turns": True,
    "errors": ["tool 'add': error: TypeError: add() missing 1 required positional argument: 'b' <i>"],
}
EPISODE_SUMMARY = {
    "episodes/turns_mean": 1.75,
    "episodes/turns_max": 3.0,
    "episodes/tool_calls": 0.5,
    "episodes/tool_errors": 2.0,
    "episodes/well_formed_calls": 0.8,
    "episodes/stopped_at_max_turns": 0.25,
    "episodes/environment_errors": 0.0,
}


VOID = ("img", "meta", "link", "input", "br")


class Elements(HTMLParser):
    """Every element of a page: its tag, attributes, the text directly inside it (unescaped), and the (tag,
    class) of the elements around it."""

    def __init__(self, text: str):
        super().__init__()
        self.open: list[dict] = []
        self.found: list[dict] = []
        self.scripts = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        around = [(e["tag"], e["attrs"].get("class") or "") for e in self.open]
        element = {"tag": tag, "attrs": dict(attrs), "around": around, "text": ""}
        self.found.append(element)
        if tag not in VOID:
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open and self.open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        if self.open:
            self.open[-1]["text"] += data

    def with_class(self, name: str) -> list[dict]:
        return [e for e in self.found if name in (e["attrs"].get("class") or "").split()]


def metrics_line(step: int, multi_turn: bool) -> dict:
    line = {"step": float(step), "reward": 0.1 * step, "rewards/accuracy/mean": 0.1 * step, "loss": 0.01}
    if multi_turn:
        line.update({key: value + 0.1 * step for key, value in EPISODE_SUMMARY.items()})
    return line


def write_run(run: Path, multi_turn: bool = True) -> Path:
    run.mkdir()
    config = {
        "model_name_or_path": "tiny",
        "dataset": "calc.jsonl",
        "tools": ["my_tools.py:add"] if multi_turn else [],
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(metrics_line(s, multi_turn)) + "\n" for s in (1, 2, 3))
    )
    extra = EPISODE_SUMMARY if multi_turn else {}
    for name, solved in (("eval_before.json", 0.25), ("eval_after.json", 0.75)):
        summary = {"rows": 4.0, "solved": solved, "reward/accuracy": solved, **extra}
        (run / name).write_text(json.dumps({"summary": summary, "rows": []}))
    (run / "summary.json").write_text(json.dumps({"steps": 3, "held_out_solved_before": 0.25}))
    base = {
        "group": 0,
        "prompt": "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n",
        "reward": 1.0,
        "advantage": 0.5,
    }
    samples = [
        {**base, "completion": "<answer>5</answer>", "rewards": {"accuracy": 1.0}, "length": 40, **EPISODE},
        {**base, "completion": "plain single turn", "rewards": {"accuracy": 0.0}, "length": 3},
    ]
    if not multi_turn:
        samples = samples[1:]
    (run / "samples.jsonl").write_text(json.dumps({"step": 3, "samples": samples}) + "\n")
    return run


@pytest.fixture()
def page(tmp_path: Path) -> tuple[str, Elements]:
    text = write_report(write_run(tmp_path / "agent-run")).read_text()
    return text, Elements(text)


def test_a_trajectory_shows_every_message_in_order_by_role(page):
    _, elements = page
    (trajectory,) = elements.with_class("trajectory")
    messages = elements.with_class("msg")
    assert [m["attrs"]["class"] for m in messages] == [
        "msg msg-assistant",
        "msg msg-tool",
        "msg msg-user",
        "msg msg-assistant",
    ]
    labels = [e["text"] for e in elements.with_class("role")]
    assert labels == ["model · turn 1", "tool · add", "environment", "model · turn 2"]
    texts = [e["text"] for e in elements.with_class("msg-text")]
    assert texts == [m["content"] for m in TRAJECTORY]  # the exact text, once unescaped
    # The trajectory sits in the completion cell of its sample's row: what the search box searches.
    assert ("tr", "sample") in trajectory["around"]
    # The single-turn sample beside it shows its completion as before.
    assert [e["text"] for e in elements.with_class("completion")] == ["plain single turn"]


def test_the_episode_counts_and_errors_are_shown(page):
    text, elements = page
    badges = [e["text"] for e in elements.with_class("episode")]
    assert badges == ["2 turns", "1 tool call", "1 tool error", "2 malformed call(s)", "stopped at max_turns"]
    (errors,) = elements.with_class("episode-errors")
    assert "missing 1 required positional argument: &#x27;b&#x27; &lt;i&gt;" in text
    assert errors["tag"] == "ul"
    assert "A multi-turn sample shows its whole trajectory" in text


def test_every_message_is_escaped(page):
    text, elements = page
    assert elements.scripts == 1, "the page's own script only"
    inside = [e for e in elements.found if ("div", "trajectory") in e["around"]]
    assert len(inside) == 12 and {e["tag"] for e in inside} == {"div", "span", "pre"}  # 4 × (div, span, pre)
    assert not [e for e in elements.found if e["tag"] in ("img", "i")]
    assert sum(1 for e in elements.found if e["tag"] == "style") == 1 + sum(
        1 for e in elements.found if e["tag"] == "svg"
    )
    assert "&lt;script&gt;alert(&quot;tool&quot;)&lt;/script&gt;&lt;/pre&gt;&lt;/div&gt;&lt;img" in text
    assert "&lt;b&gt;higher&lt;/b&gt; &amp; &lt;style&gt;" in text
    assert SCRIPT in text


def test_the_episodes_chart_and_the_held_out_numbers(page):
    text, elements = page
    figures = [e["attrs"].get("id") for e in elements.found if e["tag"] == "figure"]
    assert "plot-episodes" in figures
    header = re.search(r"<th>held-out at</th>(.*?)</tr>", text).group(1)
    assert header == (
        "<th>solved</th><th>reward/accuracy</th><th>turns (mean)</th><th>tool calls per episode</th>"
        "<th>well-formed calls</th><th>tool errors</th><th>stopped at max_turns</th>"
    )
    after = re.search(r"<td>after training \(step 3\)</td>(.*?)</tr>", text).group(1)
    assert (
        after == "<td>75.0%</td><td>0.75</td><td>1.75</td><td>0.5</td><td>80.0%</td><td>2</td><td>25.0%</td>"
    )


def test_a_single_turn_run_has_no_episode_parts(tmp_path):
    text = write_report(write_run(tmp_path / "plain-run", multi_turn=False)).read_text()
    elements = Elements(text)
    assert not elements.with_class("trajectory") and not elements.with_class("episode")
    assert 'id="plot-episodes"' not in text and "turns (mean)" not in text
    assert "whole trajectory" not in text


def test_a_damaged_trajectory_is_shown_as_far_as_it_goes(tmp_path):
    run = write_run(tmp_path / "odd-run")
    odd = {
        "group": 1,
        "prompt": "p",
        "completion": "c",
        "messages": ["loose text", {"role": "system", "content": None}],
    }
    odd.update(turns="two", tool_calls=None, errors="not a list")
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "samples": [odd]}) + "\n")
    elements = Elements(write_report(run).read_text())
    assert [m["attrs"]["class"] for m in elements.with_class("msg")] == ["msg msg-other", "msg msg-other"]
    assert [e["text"] for e in elements.with_class("role")] == ["?", "system"]
    assert [e["text"] for e in elements.with_class("msg-text")] == ["loose text", ""]
    assert not elements.with_class("episode") and not elements.with_class("episode-errors")
