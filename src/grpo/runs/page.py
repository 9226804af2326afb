"""The HTML of grpo's self-contained pages (a run's report.html, a comparison's): the page around its
sections, with its style, navigation, script and Content-Security-Policy, and the helpers that escape and
format what goes into it.

:func:`html_page` inlines :data:`STYLE` and :data:`SCRIPT` and allows no other script (the policy names
the script's hash) and nothing loaded from anywhere. :func:`esc` makes any text safe to place in the page;
:func:`html_table` escapes its header and takes cells already escaped; :func:`fmt` and :func:`pct` format
numbers for display.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Iterable
from typing import Any


def esc(value: Any) -> str:
    """Text made safe to place in HTML, between tags or in an attribute."""
    return html.escape(str(value), quote=True)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value)}"
    return f"{value:.{digits}g}"


def pct(value: Any) -> str:
    return f"{value:.1%}" if is_number(value) and math.isfinite(value) else "—"


def html_table(header: list[str] | None, rows: Iterable[list[str]], cls: str, row_cls: str = "") -> str:
    """A table; ``header`` is escaped here, the cells must be HTML already (escaped by the caller)."""
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    tr = f'<tr class="{row_cls}">' if row_cls else "<tr>"
    body = "\n".join(tr + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>\n{body}\n</tbody></table>'


def html_page(
    title: str, heading: str, name: str, subtitle: str, sections: list[tuple[str, str, str]]
) -> str:
    """The report's self-contained page around ``sections`` — (anchor, title, HTML body) each, an empty
    body left out — with its style, navigation, script and Content-Security-Policy. ``title``, ``heading``,
    ``name`` and ``subtitle`` are plain text."""
    present = [(key, section_title, body) for key, section_title, body in sections if body]
    nav = " ".join(f'<a href="#{key}">{esc(section_title)}</a>' for key, section_title, _ in present)
    body = "\n".join(
        f'<section id="{key}">\n<h2>{esc(section_title)}</h2>\n{content}\n</section>'
        for key, section_title, content in present
    )
    policy = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()}'"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{esc(heading)} <span class="name">{esc(name)}</span></h1>
<p class="muted">{esc(subtitle)}</p>
<nav>{nav}</nav>
</header>
<main>
{body}
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""


STYLE = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --panel: #f6f8fa; --ok: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header, main { max-width: 1280px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 16px; border-bottom: 1px solid var(--line); }
h1 { font-size: 24px; margin: 8px 0 0; } h1 .name { font-weight: 400; }
h2 { font-size: 19px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
nav { margin: 8px 0 12px; } nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
a { color: #0969da; }
.muted { color: var(--muted); } .ok { color: var(--ok); font-weight: 600; }
.finding { background: #fff8c5; border-left: 4px solid #d4a72c; padding: 8px 12px; margin: 8px 0;
  border-radius: 0 6px 6px 0; }
.finding.cleared { background: var(--panel); border-left-color: var(--line); }
table { border-collapse: collapse; margin: 6px 0; }
th, td { text-align: left; vertical-align: top; padding: 4px 10px; border-bottom: 1px solid var(--line); }
th { background: var(--panel); font-weight: 600; }
table.numbers td, .num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: var(--ok); } .neg { color: var(--bad); }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
pre.prompt { max-height: 9em; overflow: auto; color: var(--muted); max-width: 34ch; }
pre.completion { min-width: 30ch; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
figure.plot { margin: 0; padding: 8px; border: 1px solid var(--line); border-radius: 8px; }
figure.plot figcaption { font-weight: 600; margin: 0 0 4px 4px; }
figure.plot svg { display: block; width: 100%; height: auto; }
.search { position: sticky; top: 0; background: #fff; padding: 8px 0; z-index: 1; }
#sample-search { font: inherit; width: min(520px, 100%); padding: 6px 10px; border: 1px solid var(--line);
  border-radius: 6px; }
details.step { border: 1px solid var(--line); border-radius: 8px; margin: 8px 0; overflow-x: auto; }
details.step > summary { cursor: pointer; padding: 6px 12px; background: var(--panel); font-weight: 600; }
details.step table { margin: 0; width: 100%; }
.badge { display: inline-block; font-size: 11px; padding: 0 7px; margin: 4px 4px 0 0; border-radius: 10px;
  background: #eaeef2; color: var(--muted); }
table.config td:first-child { white-space: nowrap; }
.trajectory { display: flex; flex-direction: column; gap: 4px; min-width: 30ch; }
.msg { border: 1px solid var(--line); border-left-width: 4px; border-radius: 0 6px 6px 0;
  padding: 2px 8px 4px; }
.msg .role { display: block; font-size: 11px; font-weight: 600; letter-spacing: .03em;
  text-transform: uppercase; color: var(--muted); }
.msg-assistant { background: #fff; border-left-color: #0969da; }
.msg-tool { background: #fff8c5; border-left-color: #d4a72c; margin-left: 3ch; }
.msg-user { background: #dafbe1; border-left-color: #1a7f37; margin-left: 3ch; }
.msg-other { background: var(--panel); margin-left: 3ch; }
.badge.episode { background: #ddf4ff; color: #0969da; }
ul.episode-errors { margin: 4px 0 0; padding-left: 18px; color: var(--bad); font-size: 13px; }
"""


# The sample search: hide the rows that do not contain the query (anywhere in the row: prompt, completion,
# a trajectory's messages), and the steps left without rows.
SCRIPT = """
(function () {
  var box = document.getElementById("sample-search");
  if (!box) { return; }
  var count = document.getElementById("sample-count");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#samples tr.sample"));
  var steps = Array.prototype.slice.call(document.querySelectorAll("#samples details.step"));
  var texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  function filter() {
    var query = box.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (row, i) {
      var hit = query === "" || texts[i].indexOf(query) !== -1;
      row.hidden = !hit;
      if (hit) { shown += 1; }
    });
    steps.forEach(function (step) {
      var any = step.querySelector("tr.sample:not([hidden])") !== null;
      step.hidden = !any;
      if (query !== "" && any) { step.open = true; }
    });
    count.textContent = query === "" ? rows.length + " samples" : shown + " of " + rows.length + " samples";
  }
  box.addEventListener("input", filter);
  filter();
})();
"""
