"""The connection to Redis as pacing sees it: up or degraded, and back on its own.

Why one object: the limiter, the pair budgets and the pause board of a process all talk to one
Redis. When it goes away they must all fall back at once, say so once (not once per send: at
1,000 msg/s a log line per send is 1,000 lines a second), and come back together, after each
part has caught up (the limiter replays the starts it made alone before its next shared booking,
the pause board writes what it changed meanwhile). `degraded` is what /healthz and the status
page show.

Why no retries in the driver: redis-py 6 retries a failed command three times with backoff by
default, which would stall a send for seconds while Redis is down. Here a failed command fails
at once, the caller uses its fallback, and one task reconnects with backoff (50 ms doubling to
`backoff_cap`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from alfred_bot import tasks

log = logging.getLogger("alfred.redis")

#: What "Redis is not answering" looks like: refused or reset connections, timeouts, a server
#: still loading its AOF, an out-of-memory or read-only answer. `OSError` covers the socket itself.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

#: An argument of a script call (redis-py sends each as a string).
Arg = str | int | float

#: The first pause between reconnection attempts (seconds); it doubles up to `backoff_cap`.
FIRST_BACKOFF = 0.05


def connect(url: str, *, timeout: float = 0.5, connections: int = 64) -> Redis:
    """A client for `url` that fails fast (no retries, `timeout` s per command) with a bounded pool.

    A blocking pool of `connections`: hundreds of workers booking at once wait a moment for a
    connection instead of opening hundreds of sockets (or failing with "Too many connections").
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)  # closing the client closes its pool


class RedisLink:
    """One Redis client, whether it answers, and the work to do when it comes back."""

    def __init__(
        self,
        client: Redis,
        *,
        backoff_cap: float = 1.0,
        timeout: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.backoff_cap = backoff_cap
        self.timeout = timeout  # the client's command timeout: how long one reconnect attempt can take
        self._clock = clock
        self.degraded = False
        self.degraded_since: float | None = None
        self.healthy = asyncio.Event()
        self.healthy.set()
        self._down: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnecting: asyncio.Task[None] | None = None

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Call `callback` (synchronously) the moment Redis is found down."""
        self._down.append(callback)

    def failed(self, exc: BaseException) -> None:
        """A command failed: fall back everywhere, log it once, start reconnecting."""
        if self.degraded:
            return
        self.degraded = True
        self.degraded_since = self._clock()
        self.healthy.clear()
        log.error("Redis unreachable (%s): each node paces alone on its share of the rate until it is back", exc)
        for callback in self._down:
            callback()
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="alfred-redis-reconnect")

    async def _reconnect(self) -> None:
        pause = FIRST_BACKOFF
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.backoff_cap)
            try:
                await self.client.connection_pool.disconnect()  # every pooled socket died with the server
                await self.client.ping()
            except REDIS_ERRORS as exc:
                log.debug("Redis still unreachable: %s", exc)
                continue
            break
        down_for = self._clock() - (self.degraded_since or self._clock())
        self.degraded, self.degraded_since = False, None
        self.healthy.set()
        log.warning("Redis reachable again after %.1f s: pacing is shared by every node again", down_for)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background (fire and forget; a Redis error in it degrades the link)."""
        task = asyncio.get_running_loop().create_task(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except REDIS_ERRORS as exc:
            self.failed(exc)

    async def settled(self) -> None:
        """Wait for the background writes started so far (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Finish background writes, stop reconnecting, close the client."""
        await self.settled()
        await tasks.cancel(self._reconnecting)  # cancelled again if a driver call swallows it
        await self.client.aclose()
