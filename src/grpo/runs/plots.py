"""Line plots as inline SVG for grpo's HTML pages: the metrics of a run (report.html) and the curves of a
comparison (`grpo compare`).

:func:`plot_svg` draws with matplotlib, imported when the first plot is drawn rather than with this module,
and returns an ``<svg>`` element with its text drawn as paths, so the page needs no fonts.
"""

from __future__ import annotations

import io
from typing import Any

# A plotted line: (label, x values, y values).
Series = tuple[str, list[float], list[float]]


def plot_svg(
    plot_id: str,
    series: list[Series],
    ylabel: str,
    markers: bool = False,
    xlabel: str = "step",
    styles: list[dict[str, Any]] | None = None,
) -> str:
    """A line plot as an inline <svg> element: text drawn as paths (no fonts needed), its element ids
    prefixed with ``plot_id`` so that several plots on one page never share one. ``styles``: matplotlib
    line settings per series (colour, line style, width), over the defaults (the first series thicker)."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": plot_id, "font.size": 9}):
        figure = Figure(figsize=(6.4, 3.0), layout="constrained")
        axes = figure.add_subplot()
        few = max(len(xs) for _, xs, _ in series) <= 30
        for number, (label, xs, ys) in enumerate(series):
            style = {
                "linewidth": 2.0 if number == 0 else 1.3,
                "marker": "o" if markers or few else None,
                "markersize": 4 if markers or few else 0,
                **(styles[number] if styles else {}),
            }
            axes.plot(xs, ys, label=label, **style)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        if xlabel == "step":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
        if len(series) > 1:
            axes.legend(fontsize=8, frameon=False)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    prefix = f"{plot_id}-"
    return (
        svg.replace(' id="', f' id="{prefix}')
        .replace('href="#', f'href="#{prefix}')
        .replace("url(#", f"url(#{prefix}")
    )
