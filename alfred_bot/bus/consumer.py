"""The `alfred-outbox` consumer: any agent on the bus asks for a send, Alfred queues it durably.

Every sending node (`all`, `worker`) reads the stream in the consumer group `alfred` (XREADGROUP):
each entry goes to one node. An entry's field `message` holds the same JSON body as
`POST /api/messages` (optional `tenant`, `idempotency_key`, `send_at`); it is judged by the API's
own function (`api.queue_send`, injected here as `submit`), so a request is valid on the bus
exactly when it is valid on the API.

- valid: the outbox row is committed, THEN the entry is acknowledged (XACK). A crash between the
  two leaves the entry pending; it is delivered again (to this node after a restart, or to another
  through XAUTOCLAIM once idle for `claim_idle_seconds`) and queues nothing new: the idempotency
  key (default: the entry id) names the same row. So each request is sent once across all nodes.
- invalid (not JSON, not an object, refused by the API's checks): XADD to `alfred-outbox-dead`
  (the original fields, plus `reason`, `field`, `http_status`, `entry_id`), then XACK.
- the database is down (the API would answer 503): not acknowledged; retried from this
  consumer's pending list until it can be stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from alfred_bot import tasks
from alfred_bot.config import RedisConfig
from alfred_bot.outbound.redis import REDIS_ERRORS

log = logging.getLogger("alfred.bus")

#: What the API answered a request: HTTP status and its JSON body.
Answer = tuple[int, dict[str, Any]]
Submit = Callable[[Any], Awaitable[Answer]]
Fields = dict[bytes, bytes]

#: Entries read at once, and how long one read blocks (seconds).
COUNT = 50
BLOCK = 1.0
#: Pause after a request the store could not take yet, or after a Redis error (seconds, doubling).
RETRY = 0.2
BACKOFF_CAP = 2.0
#: Consumers idle this long with nothing pending are removed from the group (dead nodes' names).
FORGET_IDLE_MS = 3600 * 1000


class NotStored(Exception):
    """The store could not take a valid request now (503): leave the entry pending."""


class OutboxConsumer:
    """Reads `alfred-outbox` as `name` in the group; `counts` are for `/healthz`."""

    def __init__(self, client: Redis, cfg: RedisConfig, submit: Submit, *, name: str, block: float = BLOCK) -> None:
        self._client = client
        self._stream = cfg.outbox_stream
        self._dead = cfg.dead_stream
        self._group = cfg.group
        self._maxlen = cfg.maxlen
        self._idle_ms = int(cfg.claim_idle_seconds * 1000)
        self._submit = submit
        self.name = name
        self._block_ms = int(block * 1000)
        self.counts = {"received": 0, "queued": 0, "dead": 0, "retried": 0, "reclaimed": 0}
        self.down_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ one entry

    async def handle(self, entry_id: bytes, fields: Fields) -> None:
        """Queue one request durably, or dead-letter it; then acknowledge (see the module docstring)."""
        self.counts["received"] += 1
        body, problem = _request(entry_id, fields)
        if problem is None:
            status, answer = await self._submit(body)
            if status >= 500:
                raise NotStored(str(answer.get("error", status)))
            if status < 300:
                self.counts["queued"] += 1
                await self._client.xack(self._stream, self._group, entry_id)
                return
            problem = (str(answer.get("error", f"refused ({status})")), str(answer.get("field", "")), status)
        await self._bury(entry_id, fields, problem)

    async def _bury(self, entry_id: bytes, fields: Fields, problem: tuple[str, str, int]) -> None:
        reason, field, status = problem
        dead: dict[Any, Any] = {**fields, "reason": reason, "field": field, "http_status": status}
        dead["entry_id"] = entry_id
        await self._client.xadd(self._dead, dead, maxlen=self._maxlen, approximate=True)
        await self._client.xack(self._stream, self._group, entry_id)
        self.counts["dead"] += 1
        log.warning("bus request %s refused (%s): moved to %s", entry_id.decode(errors="replace"), reason, self._dead)

    # ------------------------------------------------------------------ the loop

    async def ensure_group(self) -> None:
        """Create the group (from the stream's first entry: requests written before Alfred first
        started are served too) unless it exists."""
        try:
            await self._client.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Consume until cancelled; Redis errors back off and are logged once per outage."""
        pause = RETRY
        while True:
            try:
                await self.ensure_group()  # again after an outage: a restarted Redis may have lost it
                await self._consume()
            except REDIS_ERRORS as exc:
                if self.down_since is None:  # a new outage: its backoff starts small again
                    self.down_since, pause = time.time(), RETRY
                    log.error("event bus: cannot read %s (%s); requests wait in Redis", self._stream, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, BACKOFF_CAP)
            except Exception:  # a bug must not end the consumer silently: entries stay pending
                self.down_since = self.down_since or time.time()
                log.exception("event bus consumer failed; retrying in %.0f s", BACKOFF_CAP)
                await asyncio.sleep(BACKOFF_CAP)

    async def _consume(self) -> None:
        own = True  # first this consumer's own pending entries (a restart, a retry), then new ones
        next_claim = 0.0
        while True:
            if time.monotonic() >= next_claim:
                await self.reclaim()
                next_claim = time.monotonic() + self._idle_ms / 2000
            entries = await self._read("0" if own else ">")
            if self.down_since is not None:
                log.warning("event bus: reading %s again after %.1f s", self._stream, time.time() - self.down_since)
                self.down_since = None
            if own and not entries:
                own = False
            if not await self._handle_all(entries):
                own = True
                self.counts["retried"] += 1
                await asyncio.sleep(RETRY)

    async def _read(self, start: str) -> list[tuple[bytes, Fields]]:
        block = None if start == "0" else self._block_ms
        found = await self._client.xreadgroup(self._group, self.name, {self._stream: start}, count=COUNT, block=block)
        entries = [(entry_id, fields) for _, items in found or [] for entry_id, fields in items]
        gone = [entry_id for entry_id, fields in entries if not fields]  # trimmed away while pending
        if gone:
            await self._client.xack(self._stream, self._group, *gone)
        return [(entry_id, fields) for entry_id, fields in entries if fields]

    async def _handle_all(self, entries: list[tuple[bytes, Fields]]) -> bool:
        """Handle entries in order; False at the first one the store could not take (it stays pending)."""
        for entry_id, fields in entries:
            try:
                await self.handle(entry_id, fields)
            except NotStored as exc:
                log.warning("bus request %s not queued yet (%s): retrying", entry_id.decode(errors="replace"), exc)
                return False
            except REDIS_ERRORS:
                raise
            except Exception as exc:  # a bug must neither stop the consumer nor lose the request
                log.exception("bus request %s could not be handled", entry_id.decode(errors="replace"))
                await self._bury(entry_id, fields, (f"internal error ({type(exc).__name__})", "", 500))
        return True

    async def reclaim(self) -> None:
        """Take over entries another consumer (a dead node) held for `claim_idle_seconds` (XAUTOCLAIM),
        handle them, and forget long-idle consumers with nothing pending."""
        start = "0-0"
        while True:
            answer = await self._client.xautoclaim(
                self._stream, self._group, self.name, self._idle_ms, start_id=start, count=COUNT
            )
            start, claimed = answer[0], [(i, f) for i, f in answer[1] if f]
            self.counts["reclaimed"] += len(claimed)
            if not await self._handle_all(claimed):
                return
            if start in (b"0-0", "0-0"):
                break
        await self._forget_dead()

    async def _forget_dead(self) -> None:
        for consumer in await self._client.xinfo_consumers(self._stream, self._group):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != self.name and consumer["pending"] == 0 and consumer["idle"] > FORGET_IDLE_MS:
                await self._client.xgroup_delconsumer(self._stream, self._group, name)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="alfred-bus-outbox")

    async def stop(self) -> None:
        """Stop reading; an entry being handled is either acknowledged or stays pending (never lost)."""
        task, self._task = self._task, None
        await tasks.cancel(task)


def _request(entry_id: bytes, fields: Fields) -> tuple[Any, tuple[str, str, int] | None]:
    """The entry's request body (its `message` JSON, the key defaulting to the entry id), or why not."""
    raw = fields.get(b"message")
    if raw is None:
        return None, ("message: the entry has no `message` field", "message", 400)
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None, ("message: not valid JSON", "message", 400)
    if isinstance(body, dict) and body.get("idempotency_key") is None:
        body["idempotency_key"] = entry_id.decode()  # a redelivered entry names the same row
    return body, None
