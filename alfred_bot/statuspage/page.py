"""The status page: `GET /` shows what `/status.json` holds, for a person, at a glance.

The page is rendered on the server from the same `collect(app)` as `/status.json`, so it is useful
without JavaScript (and from `curl`); `static/status.js` then polls `/status.json` and redraws the
numbers in place. The data is normalised here (`view`) so a key the collector does not (yet) send
shows as "—" instead of breaking the page, and the template runs with `StrictUndefined` so a typo in
it fails the tests instead of rendering blank.

Each tenant card carries three inline-SVG charts (the last hour per minute, the p95 reply latency,
the 24-hour rates) whose shapes `charts` computes; `status.js` computes the same shapes on each poll.

Everything a user or Meta wrote (profile names, texts, error messages) is autoescaped, and bidi or
control characters in it are made visible (`‹U+202E›`) so they cannot reorder the text around them.
The page sends a Content-Security-Policy that allows only this origin's script and style, so even a
missed escape could not run a script.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from alfred_bot.statuspage import charts
from alfred_bot.statuspage.activity import RECENT_ACTIVITY, RecentActivity

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STATIC = Path(__file__).resolve().parents[2] / "static"
POLL_MS = 3000

#: The outbox states in the order a message goes through them; others follow alphabetically.
STATES = ("queued", "sending", "sent", "delivered", "read", "played", "failed", "dropped")

#: Short names of the Graph API error codes an operator meets most (shown beside the number).
GRAPH_CODES: dict[str, str] = {
    "0": "auth exception",
    "1": "unknown API error",
    "2": "API service unavailable",
    "3": "capability or permission",
    "4": "app rate limit",
    "10": "permission denied",
    "100": "invalid parameter",
    "190": "access token invalid or expired",
    "368": "blocked for policy violations",
    "470": "outside the 24 h window",
    "80007": "WABA rate limit",
    "130429": "throughput limit",
    "131000": "unknown error",
    "131005": "access denied",
    "131008": "required parameter missing",
    "131009": "parameter value invalid",
    "131016": "service unavailable",
    "131021": "recipient is the sender",
    "131026": "message undeliverable",
    "131031": "account locked",
    "131042": "payment problem",
    "131047": "re-engagement: 24 h window closed",
    "131048": "spam rate limit",
    "131049": "not delivered (ecosystem engagement)",
    "131051": "unsupported message type",
    "131052": "media download error",
    "131053": "media upload error",
    "131056": "pair rate limit",
    "131057": "account in maintenance",
    "132000": "template parameter count",
    "132001": "template does not exist",
    "132005": "template text too long",
    "132007": "template format policy",
    "132012": "template parameter format",
    "132015": "template paused",
    "132016": "template disabled",
    "133004": "server temporarily unavailable",
    "133010": "number not registered",
}

FAILURE_KEYS = ("id", "tenant", "from", "name", "text", "error", "at")
ATTENTION_KEYS = ("tenant", "field", "kind", "time", "received_at", "waba_id", "detail")
DEAD_LETTER_KEYS = ("id", "tenant", "to", "type", "attempts", "error_code", "error_message", "created_at")
PAUSE_KEYS = ("kind", "reason", "code", "since")

#: Control and bidi-formatting characters: shown as `‹U+XXXX›` so a name cannot flip the line.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]")

#: Only this origin's script and style; no inline script, no framing, no form posts anywhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def setup(app: web.Application) -> None:
    """Register the template engine, its filters, `/static/` and the page's headers on `app`
    (the routes themselves are in `routes`)."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # the default of jinja2.Environment is OFF
        undefined=jinja2.StrictUndefined,
        filters=FILTERS,
    )
    app.router.add_static("/static/", STATIC, name="alfred_static", append_version=True)
    app[RECENT_ACTIVITY] = RecentActivity()
    app.on_response_prepare.append(_harden)


async def _harden(request: web.Request, response: web.StreamResponse) -> None:
    """Security headers on the page, nosniff on its static files (nothing else is touched)."""
    if request.path == "/":
        response.headers.update(SECURITY_HEADERS)
    elif request.path.startswith("/static/"):
        response.headers["X-Content-Type-Options"] = "nosniff"


# ------------------------------------------------------------------------------------ view


def view(data: Mapping[str, Any]) -> dict[str, Any]:
    """`collect()`'s dict with every key the template reads present (missing → None or empty)."""
    queues = _dict(data.get("queues"))
    return {
        "status": str(data.get("status") or "unavailable"),
        "detailed": data.get("view") == "detailed",
        "mode": str(data.get("mode") or "unknown"),
        "version": str(data.get("version") or "?"),
        "uptime_seconds": _num(data.get("uptime_seconds")),
        "draining": bool(data.get("draining")),
        "redis": _redis(data.get("redis")),
        "queues": {k: _num(queues.get(k)) for k in ("dispatch", "dispatch_size", "send")},
        "role": str(data.get("role") or "all"),
        "nodes": [_node(n) for n in _list(data.get("nodes"))],
        "tenants": [tenant_view(t) for t in _list(data.get("tenants"))],
        "campaigns": [campaign_view(c) for c in _list(data.get("campaigns"))],
        "failures": [_pick(f, FAILURE_KEYS) for f in _list(data.get("recent_failures"))],
        "dead_letters": [_pick(d, DEAD_LETTER_KEYS) for d in _list(data.get("dead_letters"))],
        "attention": [_pick(a, ATTENTION_KEYS) for a in _list(data.get("attention"))],
        "counters": {k: _dict(data.get(k)) for k in ("dispatcher", "sender", "orchestrator")},
        "graph_codes": GRAPH_CODES,
        "poll_ms": POLL_MS,
    }


def _redis(raw: Any) -> str | None:
    """`ok` / `degraded` when Redis is configured (degraded: each node paces on its equal share
    and bus entries wait in the database), None without Redis."""
    return None if not isinstance(raw, dict) else ("ok" if raw.get("status") == "ok" else "degraded")


def _node(raw: Any) -> dict[str, Any]:
    n = _dict(raw)
    return {"alive": n.get("alive") is True, "role": str(n.get("role") or "?")}


def tenant_view(raw: Any) -> dict[str, Any]:
    """One tenant card's values, with the outbound load against its limit worked out."""
    t = _dict(raw)
    rate, outbound = _num(t.get("rate_limit")), _num(t.get("outbound_per_minute"))
    latency, delivery, pause = _dict(t.get("latency_ms")), _dict(t.get("delivery_24h")), t.get("paused")
    return {
        "name": str(t.get("name", "?")),
        "handler": str(t["handler"]) if t.get("handler") else None,  # detailed view only
        "rate_limit": rate,
        "inbound_per_minute": _num(t.get("inbound_per_minute")),
        "outbound_per_minute": outbound,
        "limit_per_minute": rate * 60 if rate is not None else None,
        "load": min(1.0, outbound / (rate * 60)) if rate and outbound is not None else None,
        "queue": _num(t.get("queue")),
        "outbox": ordered_states(_dict(t.get("outbox"))),
        "latency": {"p50": _num(latency.get("p50")), "p95": _num(latency.get("p95"))},
        "errors": sorted(_dict(t.get("errors_by_code")).items(), key=lambda kv: (-_int(kv[1]), str(kv[0]))),
        "paused": _pick(pause, PAUSE_KEYS) if pause else None,
        "delivery": {k: _num(delivery.get(k)) for k in ("sent", "delivered", "read", "delivered_ratio", "read_ratio")},
        "charts": charts_of(_list(t.get("activity")), delivery),
    }


def charts_of(activity: list[Any], delivery: Mapping[str, Any]) -> dict[str, Any]:
    """The tenant's three charts (see `charts`): the points as sent, unreadable ones as empty minutes."""
    points = [_dict(p) for p in activity]
    return {
        "counts": charts.counts_chart(points),
        "latency": charts.latency_chart(points),
        "rates": charts.rates_chart(delivery.get("delivered_ratio"), delivery.get("read_ratio")),
    }


CAMPAIGN_COUNTS = ("queued", "sent", "delivered", "read", "failed", "skipped", "cancelled")


def campaign_view(raw: Any) -> dict[str, Any]:
    """One running campaign's row (name, id and template only in the detailed view)."""
    c = _dict(raw)
    counts = _dict(c.get("counts"))
    return {
        **{k: c.get(k) for k in ("id", "name", "template", "tenant", "state", "created_at", "send_at")},
        **{k: _num(c.get(k)) for k in ("total", "done", "progress", "delivered_ratio", "read_ratio")},
        "counts": {k: _int(counts.get(k)) for k in CAMPAIGN_COUNTS},
    }


def ordered_states(outbox: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Outbox counts in lifecycle order, so the chips do not jump around between updates."""
    known = [(s, _int(outbox[s])) for s in STATES if s in outbox]
    return known + sorted((str(s), _int(n)) for s, n in outbox.items() if s not in STATES)


def _pick(value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Exactly `keys` of a mapping (absent → None): the template can read them all."""
    source = _dict(value)
    return {k: source.get(k) for k in keys}


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int:
    number = _num(value)
    return int(number) if number is not None else 0


# --------------------------------------------------------------------------------- filters


def visible(value: Any) -> str:
    """Text with control and bidi characters replaced by a visible `‹U+XXXX›` (escaped later)."""
    if value is None:
        return ""
    return _INVISIBLE.sub(lambda m: f"‹U+{ord(m.group()):04X}›", str(value))


def count(value: Any) -> str:
    """An integer with thousands separators, or a dash when the collector did not send it."""
    number = _num(value)
    return "—" if number is None else f"{round(number):,}"


def millis(value: Any) -> str:
    """A latency in milliseconds (unit left to the page): one decimal below 10, whole numbers above."""
    number = _num(value)
    if number is None:
        return "—"
    return f"{number:.1f}" if number < 10 else f"{number:,.0f}"


def percent(value: Any) -> str:
    """A ratio 0..1 as a percentage, or a dash when there is nothing to divide."""
    number = _num(value)
    return "—" if number is None else f"{number * 100:.1f}%"


def duration(value: Any) -> str:
    """Seconds as the two largest units (`3 d 4 h`, `12 m 5 s`)."""
    number = _num(value)
    if number is None:
        return "—"
    seconds = int(number)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    for big, big_unit, small, small_unit in ((days, "d", hours, "h"), (hours, "h", minutes, "m")):
        if big:
            return f"{big} {big_unit} {small} {small_unit}"
    return f"{minutes} m {secs} s" if minutes else f"{secs} s"


def utc(value: Any) -> str:
    """A Unix time as `YYYY-MM-DD HH:MM:SS` UTC (the page states the zone once)."""
    number = _num(value)
    if number is None:
        return "—"
    return dt.datetime.fromtimestamp(number, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def code_name(code: Any) -> str:
    """The short name of a Graph API error code ("" when unknown)."""
    return GRAPH_CODES.get(str(code), "")


FILTERS = {
    "visible": visible,
    "count": count,
    "ms": millis,
    "pct": percent,
    "duration": duration,
    "utc": utc,
    "code_name": code_name,
}
