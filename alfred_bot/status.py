"""What the status page, `/status.json` and `python main.py status` show: one collector for all three.

Rates over the last minute come from `meters.Meters` (fed by the webhook and the sender), send
latencies and errors by code from `metrics.Metrics`, the rest from the store. Phone numbers are
masked here, once, so no view can forget to; names and texts are left raw for the view to escape.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from alfred_bot import __version__, keys
from alfred_bot.privacy import mask

DAY = 86400.0
RECENT = 20
EXCERPT = 80


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


def _tenant(app: web.Application, name: str, outbox: dict[str, int], delivery: dict[str, int] | None) -> dict[str, Any]:
    cfg, sender, meters, metrics = app[keys.CONFIG], app[keys.SENDER], app[keys.METERS], app[keys.METRICS]
    pause = sender.pauses.get(name)
    return {
        "name": name,
        "handler": cfg.handler_for(name),
        "rate_limit": cfg.outbound.rate_per_second,
        "inbound_per_minute": meters.inbound[name].last_minute(),
        "outbound_per_minute": meters.outbound[name].last_minute(),
        "queue": sender.queue_depths().get(name, 0),
        "outbox": outbox,
        "latency_ms": metrics.latency_ms(name),
        "errors_by_code": dict(metrics.errors_by_code.get(name, {})),
        "paused": {"kind": pause.kind, "reason": pause.reason, "code": pause.code, "since": pause.since}
        if pause
        else None,
        "delivery_24h": _delivery(delivery),
    }


async def _lists(app: web.Application) -> dict[str, list[dict[str, Any]]]:
    store = app[keys.STORE]
    failures = await store.recent_failures(RECENT)
    for row in failures:
        row["from"] = mask(row["from"] or "")
        row["text"] = (row["text"] or "")[:EXCERPT]
    dead = await store.dead_letters(RECENT)
    for row in dead:
        row["to"] = mask(row.pop("to"))
    return {"recent_failures": failures, "dead_letters": dead}


async def collect(app: web.Application) -> dict[str, Any]:
    """The whole picture as JSON-ready data: numbers masked, names and texts raw (views escape them)."""
    cfg, store = app[keys.CONFIG], app[keys.STORE]
    dispatcher, sender = app[keys.DISPATCHER], app[keys.SENDER]
    store_ok = await store.healthy()
    by_tenant = await store.outbox_by_tenant() if store_ok else {}
    delivery = await store.delivery(time.time() - DAY) if store_ok else {}
    draining = app[keys.DRAINING].is_set()
    ok = store_ok and dispatcher.running and sender.running and not draining
    return {
        "status": "ok" if ok else ("draining" if draining else "unavailable"),
        "mode": app[keys.SECRETS].mode,
        "version": __version__,
        "uptime_seconds": round(time.time() - app[keys.STARTED_AT], 1),
        "draining": draining,
        "tenants": [_tenant(app, name, by_tenant.get(name, {}), delivery.get(name)) for name in cfg.tenants],
        "queues": {
            "dispatch": dispatcher.queue.qsize(),
            "dispatch_size": dispatcher.queue.maxsize,
            "send": sender.queued,
        },
        **(await _lists(app) if store_ok else {"recent_failures": [], "dead_letters": []}),
        "dispatcher": dict(dispatcher.counts),
        "sender": dict(sender.counts),
        "orchestrator": dict(app[keys.ORCHESTRATOR].counts),
    }
