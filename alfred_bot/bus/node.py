"""A node's part of the event bus and of the shared pacing: built by `install`, run by the app.

`install(app)` is called by the app factory (no I/O): without a Redis URL it does nothing at all.
With one it turns the store's feed on (so the very first write already leaves its entry), gives
the sender the pacing shared through Redis, and adds the lifecycle that runs the relay (every
role: on PostgreSQL one node publishes at a time) and the `alfred-outbox` consumer (sending
roles only: `all`, `worker`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from alfred_bot import api, keys
from alfred_bot.bus.consumer import BLOCK, Answer, OutboxConsumer
from alfred_bot.bus.health import BUS
from alfred_bot.bus.relay import Relay
from alfred_bot.cluster import SENDING_ROLES
from alfred_bot.config import RedisConfig, redis_url
from alfred_bot.outbound.redis import SharedPacing
from alfred_bot.outbound.sender import Sender
from alfred_bot.security import url_where
from alfred_bot.store import Store, StoreError

log = logging.getLogger("alfred.bus")


def bus_client(url: str) -> Redis:
    """The bus's own client: no driver retries (the loops back off themselves) and a read timeout
    above the consumer's blocking read."""
    client: Redis = Redis.from_url(
        url, socket_timeout=BLOCK + 2, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    return client




class Bus:
    """The relay, the consumer (sending roles) and the shared pacing of one node."""

    def __init__(self, app: web.Application, url: str, cfg: RedisConfig) -> None:
        self._app = app
        self._url = url
        self.cfg = cfg
        self.store: Store = app[keys.STORE]
        self.sender: Sender = app[keys.SENDER]
        self.role: str = app[keys.ROLE]
        self.client = bus_client(url)
        self.relay = Relay(self.store.feed, self.client, cfg)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        sending = self.role in SENDING_ROLES
        self.consumer = OutboxConsumer(self.client, cfg, self.submit, name=name) if sending else None

    async def submit(self, body: Any) -> Answer:
        """One bus request through the API's own send (`api.queue_send`): its status and JSON."""
        response = await api.queue_send(self._app, body)
        answer = msgspec.json.decode(response.body) if isinstance(response.body, bytes) else {}
        return response.status, answer if isinstance(answer, dict) else {}

    async def start(self) -> None:
        log.info("event bus on Redis %s (streams %s, %s)", url_where(self._url), self.cfg.ingest_stream,
                 self.cfg.outbox_stream)  # fmt: skip
        pacing = self.sender.pacing
        if pacing is not None and self.role not in SENDING_ROLES:
            # a web node sends nothing (it must not count as a node booking in Redis), but an
            # operator's resume through its API must reach every node: the pause board only
            await pacing.pauses.start()
        self.relay.start()
        if self.consumer is not None:
            self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.relay.stop()
        await self.client.aclose()

    async def health(self) -> dict[str, Any]:
        """The `redis` section of `/healthz` and `/status.json` (counts and states only)."""
        try:
            backlog, oldest = await self.store.feed.backlog()
        except StoreError:
            backlog, oldest = None, None
        pacing = _pacing(self.sender)
        consumer = self.consumer
        relay_down = self.relay.down_since is not None
        degraded = relay_down or pacing.get("degraded", False) or (consumer is not None and consumer.down_since)
        return {
            "status": "degraded" if degraded else "ok",
            "pacing": pacing,
            "relay": {
                "backlog": backlog,
                "oldest_seconds": None if oldest is None else round(max(0.0, time.time() - oldest), 3),
                "published": self.relay.published,
                "failures": self.relay.failures,
                "down_since": self.relay.down_since,
            },
            "consumer": None if consumer is None else {**consumer.counts, "down_since": consumer.down_since},
        }


def _pacing(sender: Sender) -> dict[str, Any]:
    """Shared or fallback (Redis away: each node on its equal share), and since when."""
    pacing = sender.pacing
    if pacing is None:
        return {"mode": "local"}
    since = pacing.link.degraded_since  # monotonic: said as wall time
    return {
        "mode": "fallback" if pacing.degraded else "shared",
        "degraded": pacing.degraded,
        "degraded_since": None if since is None else round(time.time() - (time.monotonic() - since), 3),
        "nodes_on_redis": pacing.on_redis,
        "lanes": sender.lane_modes(),
    }


def install(app: web.Application) -> None:
    """Wire the bus into `app` when a Redis URL is configured (see the module docstring)."""
    cfg = app[keys.CONFIG]
    url = redis_url(cfg)
    if url is None:
        return
    store: Store = app[keys.STORE]
    store.feed.on = True

    def senders() -> int:
        view = app.get(keys.CLUSTER)
        return 1 if view is None else view.senders

    node = getattr(store, "node", None)
    pacing = SharedPacing.from_url(url, share=senders, node=getattr(node, "id", ""))
    app[keys.SENDER].share_pacing(pacing)
    app[BUS] = Bus(app, url, cfg.redis)
    app.cleanup_ctx.append(_bus_ctx)


async def _bus_ctx(app: web.Application) -> AsyncIterator[None]:
    bus = app[BUS]
    await bus.start()
    yield
    await bus.stop()
