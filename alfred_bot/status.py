"""What the status page, `/status.json` and `python main.py status` show: one collector for all three.

Rates over the last minute come from `meters.Meters`, fed by the webhook (inbound) and the
sender (outbound).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from alfred_bot import __version__, keys


async def collect(app: web.Application) -> dict[str, Any]:
    """The whole picture as JSON-ready data (phone numbers are not in it; names are not either)."""
    cfg, store = app[keys.CONFIG], app[keys.STORE]
    dispatcher, sender, meters = app[keys.DISPATCHER], app[keys.SENDER], app[keys.METERS]
    store_ok = await store.healthy()
    by_tenant = await store.outbox_by_tenant() if store_ok else {}
    ok = store_ok and dispatcher.running and sender.running
    tenants = []
    for name in cfg.tenants:
        pause = sender.pauses.get(name)
        tenants.append(
            {
                "name": name,
                "handler": cfg.handler_for(name),
                "rate_limit": cfg.outbound.rate_per_second,
                "inbound_per_minute": meters.inbound[name].last_minute(),
                "outbound_per_minute": meters.outbound[name].last_minute(),
                "outbox": by_tenant.get(name, {}),
                "paused": {"kind": pause.kind, "reason": pause.reason, "code": pause.code, "since": pause.since}
                if pause
                else None,
            }
        )
    return {
        "status": "ok" if ok else "unavailable",
        "mode": app[keys.SECRETS].mode,
        "version": __version__,
        "uptime_seconds": round(time.time() - app[keys.STARTED_AT], 1),
        "tenants": tenants,
        "queues": {
            "dispatch": dispatcher.queue.qsize(),
            "dispatch_size": dispatcher.queue.maxsize,
            "send": sender.queued,
        },
        "dispatcher": dict(dispatcher.counts),
        "sender": dict(sender.counts),
        "orchestrator": dict(app[keys.ORCHESTRATOR].counts),
    }
