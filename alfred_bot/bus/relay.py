"""The relay: feed rows (committed with the writes they describe) to Redis Streams, then deleted.

`alfred-ingest` gets every accepted message, status and event, `alfred-events` every send
outcome, each as one entry with a field `event` holding the JSON (see README "The event bus").

Why this order (XADD, then delete): a crash or a Redis outage between the commit and the XADD
only delays an entry; a crash between the XADD and the delete publishes it again on the next
pass. So entries are at-least-once and consumers dedupe by `dedupe_id`. While Redis is away the
rows wait in the database (the backlog is in `/healthz`), and the relay retries with backoff.
On PostgreSQL every node runs a relay but only one publishes at a time (the store's lock), so
entries keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis

from alfred_bot import tasks
from alfred_bot.config import RedisConfig
from alfred_bot.outbound.redis import REDIS_ERRORS
from alfred_bot.store import StoreError
from alfred_bot.store.base import Feed, FeedEntry

log = logging.getLogger("alfred.bus")

#: Redis away, or the database: the relay waits and tries again.
ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, StoreError)
#: Rows per pass (one pipeline of XADDs, one delete).
BATCH = 500
#: Seconds between two looks at an empty feed.
POLL = 0.05
#: The longest pause between two attempts while Redis or the database is away (seconds).
BACKOFF_CAP = 2.0


class Relay:
    """Publishes the feed; `published`, `failures` and `down_since` are for `/healthz`."""

    def __init__(
        self,
        feed: Feed,
        client: Redis,
        cfg: RedisConfig,
        *,
        batch: int = BATCH,
        poll: float = POLL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._feed = feed
        self._client = client
        self._streams = {"ingest": cfg.ingest_stream, "events": cfg.events_stream}
        self._maxlen = cfg.maxlen
        self._batch = batch
        self._poll = poll
        self._clock = clock
        self.published = 0
        self.failures = 0
        self.down_since: float | None = None  # wall time of the first failure of the current outage
        self._task: asyncio.Task[None] | None = None

    async def publish(self, entries: list[FeedEntry]) -> None:
        """XADD every entry (one pipeline), each to its stream, trimmed with `MAXLEN ~`."""
        pipe = self._client.pipeline(transaction=False)
        for entry in entries:
            stream = self._streams.get(entry.stream, self._streams["events"])
            pipe.xadd(stream, {"event": entry.body}, maxlen=self._maxlen, approximate=True)
        await pipe.execute()

    async def pass_once(self) -> int:
        """Publish one batch; how many entries (0: nothing to do, or another node is relaying)."""
        count = await self._feed.relay(self.publish, self._batch)
        self.published += count
        if self.down_since is not None:
            log.warning("event bus relay: publishing again after %.1f s", self._clock() - self.down_since)
            self.down_since = None
        return count

    async def run(self) -> None:
        """Publish until cancelled; errors back off (50 ms doubling to 2 s) and are logged once per outage."""
        pause = self._poll
        while True:
            try:
                count = await self.pass_once()
            except Exception as exc:  # noqa: BLE001 (Redis or the database away, or a bug: the rows wait)
                self._failed(exc)
                pause = min(max(pause * 2, 0.05), BACKOFF_CAP)
                await asyncio.sleep(pause)
                continue
            pause = self._poll
            if count < self._batch:
                await asyncio.sleep(self._poll if count == 0 else 0)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if not isinstance(exc, ERRORS):
            log.error("event bus relay: unexpected error; retrying", exc_info=exc)
        if self.down_since is None:
            self.down_since = self._clock()
            log.error("event bus relay: cannot publish (%s); entries wait in the database, nothing is lost", exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="alfred-bus-relay")

    async def stop(self, grace: float = 2.0) -> None:
        """Stop; one last pass first (bounded by `grace`), so what was just committed goes out now
        rather than at the next start (it would not be lost either way)."""
        task, self._task = self._task, None
        await tasks.cancel(task)
        with contextlib.suppress(*ERRORS, TimeoutError):
            async with asyncio.timeout(grace):
                while await self.pass_once() == self._batch:
                    pass
