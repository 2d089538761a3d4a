"""What `/healthz` and `/status.json` say about Redis (absent when no Redis is configured).

A Redis outage is not a reason to answer 503: every node keeps sending on its equal share of each
number's rate and the feed waits in the database. So the verdict stays "ok" and this section says
what is degraded: `status` is `ok` or `degraded`, and each part tells its own story.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web


class NodeBus(Protocol):
    """A node's event bus as the app sees it (`alfred_bot.bus.node.Bus`)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...


#: The app's event bus (absent without a Redis URL).
BUS = web.AppKey("bus", NodeBus)


async def redis_health(app: web.Application) -> dict[str, Any] | None:
    """The `redis` section of `/healthz` and `/status.json`, or None when Redis is not configured."""
    bus = app.get(BUS)
    return None if bus is None else await bus.health()
