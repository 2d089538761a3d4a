"""The status page's charts as plain data: what `templates/status.html` draws as inline SVG.

Per tenant three small charts from `/status.json`: the last hour per minute of messages (inbound
as bars, sent and failed as lines, on one count scale), the p95 reply latency per minute (bars on their own
millisecond scale; a minute without replies has no bar, which is not the same as a fast one),
and the 24-hour delivery and read rates (two bars of 0–100 %).

A chart is a dict of shapes and labels (`counts`, `latency`, `rates`); the template only loops
over it. `static/status.js` has the same functions (`countsChart`, `latencyChart`, `ratesChart`)
and must give the same shapes for the same data, coordinate for coordinate: numbers are rounded
with `coord` (floor(10 v + 0.5) / 10, as JavaScript's Math.round) and written as both languages
write the shortest float, so the two cannot drift by a rounding rule. The browser test compares
them. Nothing here is personal data: counts, milliseconds and times only (the open view has them).

No CDN, no script library, no inline style (the page's CSP forbids it): colours and dashes come
from classes in `static/status.css`, which follow the light or dark theme.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

#: The drawing's own units (the SVG scales to the card's width).
WIDTH, HEIGHT = 320, 120
LEFT, RIGHT, TOP, BOTTOM = 38, 8, 10, 22
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
RATE_HEIGHT, RATE_LEFT, RATE_VALUE = 54, 62, 48  # the rates chart: its height, label and value columns
#: The series of the counts chart: (key in a point, legend label).
SERIES = (("inbound", "inbound"), ("sent", "sent"), ("failed", "failed"))
X_TICKS = 5  # time labels along the bottom, oldest to newest


def coord(value: float) -> str:
    """A coordinate rounded to 0.1 as JavaScript's Math.round does, written as JavaScript would."""
    rounded = math.floor(value * 10 + 0.5) / 10
    return str(int(rounded)) if rounded == int(rounded) else repr(rounded)


def nice_max(value: float) -> int:
    """The top of an axis: the smallest of 2, 4, 10, 20, 40, 100, … at or above `value`, so the
    half-way tick is a whole number too."""
    top = 2
    while top < value:
        top = top * 5 // 2 if str(top)[0] == "4" else top * 2
    return top


def hhmm(at: Any) -> str:
    """A minute's start as `HH:MM` UTC (the page states the zone)."""
    return dt.datetime.fromtimestamp(float(at), dt.UTC).strftime("%H:%M") if _is_num(at) else ""


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> float:
    return float(value) if _is_num(value) else 0.0


def _label(value: float) -> str:
    """An axis value as the page writes counts (thousands separators)."""
    return f"{round(value):,}"


def _x(index: int, n: int) -> float:
    return LEFT + (PLOT_W * index / (n - 1) if n > 1 else PLOT_W / 2)


def _y(value: float, top: float) -> float:
    return TOP + PLOT_H * (1 - min(value, top) / top)


def _frame(points: Sequence[Mapping[str, Any]], top: float) -> dict[str, Any]:
    """Grid lines and labels shared by both per-minute charts: 0, half and the top on the left,
    `X_TICKS` times along the bottom."""
    n = len(points)
    ys = [(top * k / 2, _y(top * k / 2, top)) for k in range(3)]
    xs = [math.floor((n - 1) * k / (X_TICKS - 1) + 0.5) for k in range(X_TICKS)] if n > 1 else [0] * min(n, 1)
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "grid": [{"x1": coord(LEFT), "x2": coord(WIDTH - RIGHT), "y": coord(y)} for _, y in ys],
        "y_ticks": [{"x": coord(LEFT - 4), "y": coord(y + 3), "label": _label(v)} for v, y in ys],
        "x_ticks": [
            {"x": coord(_x(i, n)), "y": coord(HEIGHT - 6), "label": hhmm(points[i].get("at")), "anchor": _anchor(k, xs)}
            for k, i in enumerate(xs)
        ],
        "baseline": {"x1": coord(LEFT), "x2": coord(WIDTH - RIGHT), "y": coord(TOP + PLOT_H)},
    }


def _anchor(k: int, ticks: Sequence[int]) -> str:
    """The first time label starts at its tick, the last ends at it, the others are centred on it."""
    if len(ticks) > 1 and k == 0:
        return "start"
    return "end" if len(ticks) > 1 and k == len(ticks) - 1 else "middle"


def _bars(values: Sequence[tuple[int, float]], n: int, top: float) -> list[dict[str, str]]:
    """One bar per (minute index, value), centred on the minute, from the baseline up."""
    width = max(1.0, PLOT_W / max(n, 1) - 1)
    return [
        {
            "x": coord(_x(i, n) - width / 2),
            "y": coord(_y(v, top)),
            "width": coord(width),
            "height": coord(TOP + PLOT_H - _y(v, top)),
        }
        for i, v in values
    ]


def counts_chart(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per minute on one count scale (0 … a nice maximum): inbound as bars, sent and failed as
    lines over them (a line for each, so equal numbers of messages and replies stay visible)."""
    n = len(points)
    totals = {key: sum(int(_num(p.get(key))) for p in points) for key, _ in SERIES}
    peak = max((_num(p.get(key)) for p in points for key, _ in SERIES), default=0.0)
    top = nice_max(peak)
    inbound = [(i, _num(p.get("inbound"))) for i, p in enumerate(points) if _num(p.get("inbound")) > 0]
    lines = []
    for key in ("sent", "failed"):
        steps = [f"{coord(_x(i, n))},{coord(_y(_num(p.get(key)), top))}" for i, p in enumerate(points)]
        lines.append({"key": key, "d": ("M" + " L".join(steps)) if steps else ""})
    legend = [{"key": key, "label": label, "total": totals[key]} for key, label in SERIES]
    return {
        **_frame(points, top),
        "top": top,
        "peak": peak,
        "totals": totals,
        "bars": _bars(inbound, n, top),
        "lines": lines,
        "legend": legend,
    }


def latency_chart(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The p95 reply latency of each minute as a bar on its own millisecond scale; none without replies."""
    n = len(points)
    values = [(i, _num(p.get("p95_ms"))) for i, p in enumerate(points) if _is_num(p.get("p95_ms"))]
    peak = max((v for _, v in values), default=0.0)
    top = nice_max(peak)
    return {
        **_frame(points, top),
        "top": top,
        "peak": peak,
        "bars": _bars(values, n, top),
        "minutes": n,
        "minutes_with_replies": len(values),
    }


def rates_chart(delivered: Any, read: Any) -> dict[str, Any]:
    """The 24-hour delivered and read shares of sent messages as two bars of 0–100 % (None: nothing sent)."""
    track = WIDTH - RATE_LEFT - RATE_VALUE
    rows = []
    for k, (key, ratio) in enumerate((("delivered", delivered), ("read", read))):
        known = _is_num(ratio)
        share = min(1.0, max(0.0, float(ratio))) if known else 0.0
        y = 4 + k * 26
        rows.append(
            {
                "key": key,
                "label": key,
                "y": coord(y),
                "text_y": coord(y + 13),
                "fill": coord(track * share),
                "value": f"{share * 100:.1f}%" if known else "—",
            }
        )
    return {
        "width": WIDTH,
        "height": RATE_HEIGHT,
        "left": coord(RATE_LEFT),
        "label_x": coord(RATE_LEFT - 6),
        "track": coord(track),
        "value_x": coord(WIDTH - RATE_VALUE + 6),
        "rows": rows,
    }
