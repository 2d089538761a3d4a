"""What the status page, `/status.json` and `python main.py status` show: one collector for all three.

Rates over the last minute, send latencies, errors by code and every counter come from the one
`telemetry.Telemetry` object, the rest from the store. `health` is what `/healthz` and
`/status.json` both answer with ("ok / draining / unavailable", decided by `telemetry.health_status`). Phone numbers are
masked here, once, so no view can forget to; names and texts are left raw for the view to escape.

Two views. The **open** one (no token: anyone who can reach the port) holds counts and states only:
no profile names, texts, handler or Graph error texts, pause reasons, message ids or phone numbers.
Not even masked numbers: a country code and the last digits, with a time, are enough to tell who
wrote to a clinic. The **detailed** one needs the API token (`Authorization: Bearer` or
`X-API-Key`, as `/api/*`); a missing or wrong token simply gets the open view. Fields are kept by
allow-list, so a field added to a store row later stays out of the open view until chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from alfred_bot import __version__, keys
from alfred_bot.bus.health import redis_health
from alfred_bot.privacy import mask
from alfred_bot.security import api_token_of, token_ok
from alfred_bot.statuspage import attention, campaigns
from alfred_bot.statuspage.activity import RECENT_ACTIVITY, RecentActivity
from alfred_bot.telemetry import HealthStatus, health_status

RECENT = 20
EXCERPT = 80
EVENTS_PER_FIELD = 100  # newest events read per field to find those needing a person
EVENTS_PER_TENANT = 10

#: What the open view keeps of a failure, a dead letter and a pause (allow-lists).
OPEN_FAILURE = ("tenant", "at")
OPEN_DEAD_LETTER = ("tenant", "type", "attempts", "error_code", "created_at")
OPEN_PAUSE = ("kind", "code", "since")
OPEN_NODE = ("role", "version", "alive", "seen_at", "started_at")


@dataclass(frozen=True)
class Health:
    """The app's state for probes and the status page."""

    status: HealthStatus
    store_ok: bool
    draining: bool


async def health(app: web.Application) -> Health:
    """Ask the store, the workers and the shutdown flag; the one verdict every view shows."""
    store_ok = await app[keys.STORE].healthy()
    draining = app[keys.DRAINING].is_set()
    running = app[keys.ROLE] == "web" or (app[keys.DISPATCHER].running and app[keys.SENDER].running)
    return Health(health_status(store_ok=store_ok, workers_running=running, draining=draining), store_ok, draining)


def authorized(request: web.Request) -> bool:
    """True when the request carries the API token: it may see the detailed view."""
    return token_ok(api_token_of(request.headers), request.app[keys.SECRETS].api_token)


def _only(row: dict[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
    return {k: row.get(k) for k in keep}


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 3) if whole else None


def _delivery(counts: dict[str, int] | None) -> dict[str, Any]:
    sent = (counts or {}).get("sent", 0)
    delivered, read = (counts or {}).get("delivered", 0), (counts or {}).get("read", 0)
    return {
        "sent": sent,
        "delivered": delivered,
        "read": read,
        "delivered_ratio": _ratio(delivered, sent),
        "read_ratio": _ratio(read, sent),
    }


def _tenant(
    app: web.Application,
    name: str,
    outbox: dict[str, int],
    delivery: dict[str, int] | None,
    *,
    activity: list[dict[str, Any]],
    detailed: bool,
) -> dict[str, Any]:
    cfg, sender, telemetry = app[keys.CONFIG], app[keys.SENDER], app[keys.TELEMETRY]
    lanes = app[keys.DISPATCHER].queue
    pause = sender.pauses.get(name)
    paused = {"kind": pause.kind, "reason": pause.reason, "code": pause.code, "since": pause.since} if pause else None
    inbound, outbound = telemetry.per_minute(name)
    return {
        "name": name,
        **({"handler": cfg.handler_for(name)} if detailed else {}),
        "rate_limit": cfg.outbound.rate_per_second,
        "inbound_per_minute": inbound,
        "outbound_per_minute": outbound,
        "queue": sender.queue_depths().get(name, 0),
        "dispatch": {"queued": lanes.depths().get(name, 0), "busy": lanes.busy().get(name, 0)},
        "outbox": outbox,
        "latency_ms": telemetry.latency_ms(name),
        "errors_by_code": telemetry.errors_by_code(name),
        "paused": (paused if detailed else _only(paused, OPEN_PAUSE)) if paused else None,
        "delivery_24h": _delivery(delivery),
        "activity": activity,  # the last hour per minute, from the store: counts and latencies only
    }


async def _lists(app: web.Application, detailed: bool) -> dict[str, list[dict[str, Any]]]:
    store = app[keys.STORE]
    failures = await store.recent_failures(RECENT)
    dead = await store.dead_letters(RECENT)
    if not detailed:
        return {
            "recent_failures": [_only(row, OPEN_FAILURE) for row in failures],
            "dead_letters": [_only(row, OPEN_DEAD_LETTER) for row in dead],
        }
    for row in failures:
        row["from"] = mask(row["from"] or "")
        row["text"] = (row["text"] or "")[:EXCERPT]
    for row in dead:
        row["to"] = mask(row.pop("to"))
    return {"recent_failures": failures, "dead_letters": dead}


def _newest(event: dict[str, Any]) -> tuple[float, float]:
    received = float(event.get("received_at") or 0)
    return float(event.get("time") or received), received


async def _attention(app: web.Application, detailed: bool) -> list[dict[str, Any]]:
    """The latest account, template and quality events that need a person (see `attention`)."""
    store = app[keys.STORE]
    events: list[dict[str, Any]] = []
    for field in attention.FIELDS:
        events += await store.events(EVENTS_PER_FIELD, field=field)
    # newest by Meta's trigger time (a late redelivery must not supersede a newer event), then arrival
    events.sort(key=_newest, reverse=True)
    rows = attention.needing_a_person(events, EVENTS_PER_TENANT)
    return rows if detailed else [_only(row, attention.OPEN_KEYS) for row in rows]


async def _nodes(app: web.Application, detailed: bool) -> list[dict[str, Any]]:
    """Every node on the database (this one alone on SQLite); host names and ids need the token."""
    view = app.get(keys.CLUSTER)
    nodes = view.nodes if view is not None else await app[keys.STORE].nodes()
    return [dict(n) if detailed else _only(n, OPEN_NODE) for n in nodes]


async def collect(app: web.Application, *, detailed: bool = False) -> dict[str, Any]:
    """The whole picture as JSON-ready data: numbers masked, names and texts raw (views escape them).

    Without `detailed` only counts and states (the open view, see the module docstring)."""
    cfg, store, telemetry = app[keys.CONFIG], app[keys.STORE], app[keys.TELEMETRY]
    dispatcher, sender = app[keys.DISPATCHER], app[keys.SENDER]
    state = await health(app)
    store_ok = state.store_ok
    by_tenant = await store.outbox_by_tenant() if store_ok else {}
    recent = app.get(RECENT_ACTIVITY) or RecentActivity()
    delivery = await recent.delivery(store, time.time()) if store_ok else {}
    activity = await recent.read(store, time.time(), cfg.tenants) if store_ok else {}
    return {
        "status": state.status,
        "view": "detailed" if detailed else "open",
        "mode": app[keys.SECRETS].mode,
        "version": __version__,
        "uptime_seconds": round(time.time() - app[keys.STARTED_AT], 1),
        "draining": state.draining,
        "role": app[keys.ROLE],
        "nodes": await _nodes(app, detailed) if store_ok else [],
        "tenants": [
            _tenant(
                app,
                name,
                by_tenant.get(name, {}),
                delivery.get(name),
                activity=activity.get(name, []),
                detailed=detailed,
            )
            for name in cfg.tenants
        ],
        "campaigns": await campaigns.under_way(store, detailed) if store_ok else [],
        "queues": {
            "dispatch": dispatcher.queue.qsize(),
            "dispatch_size": dispatcher.queue.maxsize,
            "send": sender.queued,
        },
        **(await _lists(app, detailed) if store_ok else {"recent_failures": [], "dead_letters": []}),
        "attention": await _attention(app, detailed) if store_ok else [],
        "dispatcher": dict(telemetry.dispatch),
        "sender": dict(telemetry.sender),
        "orchestrator": dict(telemetry.orchestrator),
        **({"redis": redis} if (redis := await redis_health(app)) is not None else {}),
    }
