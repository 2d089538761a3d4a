"""Operator endpoints: `/healthz` (open) and `/api/*` (Bearer `ALFRED_API_TOKEN`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from alfred_bot import __version__, keys
from alfred_bot.security import bearer, token_ok

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 1000


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def error(status: int, message: str) -> web.Response:
    """Every API error is JSON with one `error` line (never a secret, never a traceback)."""
    return json_response({"error": message}, status)


@web.middleware
async def api_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard `/api/*` with a constant-time Bearer token check; unset token refuses everyone."""
    if request.path.startswith("/api/"):
        expected = request.app[keys.SECRETS].api_token
        if expected is None:
            return error(401, "the API is disabled: set ALFRED_API_TOKEN to enable it")
        if not token_ok(bearer(request.headers.get("Authorization")), expected):
            return error(401, "missing or wrong bearer token")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """200 while the store answers and handler workers run; 503 otherwise (for probes)."""
    app = request.app
    dispatcher = app[keys.DISPATCHER]
    store = app[keys.STORE]
    store_ok = await store.healthy()
    ok = store_ok and dispatcher.running
    stats: dict[str, int] = dict(app[keys.STATS].items())
    body = {
        "status": "ok" if ok else "unavailable",
        "mode": app[keys.SECRETS].mode,
        "version": __version__,
        "uptime_seconds": round(time.time() - app[keys.STARTED_AT], 1),
        "store": {"status": "ok" if store_ok else "unavailable", **store.stats()},
        "dispatcher": {
            "running": dispatcher.running,
            "queue": dispatcher.queue.qsize(),
            "queue_size": dispatcher.queue.maxsize,
            "backlog": dispatcher.backlog,
            **dispatcher.counts,
        },
        "webhook": stats,
    }
    return json_response(body, 200 if ok else 503)


def _limit(request: web.Request, default: int = 50) -> int | web.Response:
    raw = request.query.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        return error(400, "limit: must be an integer")
    if not 1 <= limit <= MAX_LIMIT:
        return error(400, f"limit: must be between 1 and {MAX_LIMIT}")
    return limit


async def inbound(request: web.Request) -> web.Response:
    """The newest received messages, newest first."""
    limit = _limit(request)
    if isinstance(limit, web.Response):
        return limit
    return json_response(await request.app[keys.STORE].recent_inbound(limit))
