"""The PostgreSQL store: any number of Alfred nodes sharing one database.

asyncpg's pool gives each call a connection; every write is one transaction, committed with
`synchronous_commit = on` before the call returns (the 200-after-commit promise). Any failure of
the driver or the network becomes `StoreError`, which the webhook answers with 503 so Meta
retries; the pool replaces dead connections by itself, so the store recovers as soon as the
database is back. Besides the pool, a node keeps a heartbeat task (its `nodes` row, its inbox
leases) and one LISTEN connection for cross-node wake-ups (`alfred_bot.store.postgres.cluster`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import asyncpg

from alfred_bot.parse import InboundItem, ParsedBody, StatusItem
from alfred_bot.security import url_where
from alfred_bot.store.base import (
    ArchiveBatch,
    Completion,
    NodeInfo,
    OutboxJob,
    OutboxRow,
    PendingMessage,
    ReceiptSweeps,
    Settlement,
    StoreError,
)
from alfred_bot.store.postgres import cluster, inbox, outbox, retention, schema
from alfred_bot.store.postgres.campaigns import PostgresCampaigns, PostgresTemplates
from alfred_bot.store.postgres.cluster import DRIVER_ERRORS, Heartbeat, Holdings, Listener
from alfred_bot.store.postgres.dialogs import PostgresDialogs
from alfred_bot.store.postgres.feed import PostgresFeed
from alfred_bot.store.postgres.queries import ForwardedQueries
from alfred_bot.store.postgres.reads import PostgresReads
from alfred_bot.store.postgres.text import safe, safe_struct
from alfred_bot.store.sqlite.cluster import this_node

log = logging.getLogger("alfred.store")

T = TypeVar("T")
Op = Callable[[asyncpg.Connection], Awaitable[T]]




def _settings(read_only: bool) -> dict[str, str]:
    settings = {"synchronous_commit": "on", "application_name": "alfred"}
    if read_only:  # the server refuses writes too, not only this class
        settings["default_transaction_read_only"] = "on"
    return settings


class PostgresStore(ForwardedQueries):
    """A `Store` on PostgreSQL (see the module docstring).

    `read_only=True` is for the operator's commands beside running nodes: no migration, no
    heartbeat, no LISTEN; every write raises `StoreError`. `takeover_seconds`: how long after its
    last heartbeat a node's leases pass to the others (heartbeats come three times as often)."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
        node: NodeInfo | None = None,
        pool_size: int = 10,
        takeover_seconds: float = 15.0,
    ) -> None:
        self.url = url
        self.read_only = read_only
        self.node = node or this_node()
        self.pool_size = pool_size
        self.takeover_seconds = takeover_seconds
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._counts = {"writes": 0, "errors": 0, "reconnects": 0}
        self.dialogs = PostgresDialogs(self)
        self.campaigns, self.templates = PostgresCampaigns(self), PostgresTemplates(self)
        self.feed = PostgresFeed(self)
        self._heartbeat = Heartbeat(self._beat, takeover_seconds / 3)
        self._holdings, self._sweeps = Holdings(), ReceiptSweeps()
        self._listener = Listener(url, takeover_seconds / 3, self._reconnected)

    shared = True  # other nodes use the same database

    async def open(self) -> None:
        """Connect, migrate (under the advisory lock), announce this node, start listening.
        Every failure is a `StoreError` naming the database (never its password)."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, timeout=5, command_timeout=30,
                server_settings=_settings(self.read_only),
            )  # fmt: skip
            async with self._pool.acquire() as proxy:
                conn = cast(asyncpg.Connection, proxy)
                await (schema.check_version(conn) if self.read_only else schema.migrate(conn))
            if not self.read_only:
                await self._beat()  # listed in `nodes` (and alive) from the first moment
        except DRIVER_ERRORS as exc:
            await self._drop_pool()
            raise StoreError(f"cannot open PostgreSQL {url_where(self.url)}: {exc}") from exc
        except StoreError as exc:
            await self._drop_pool()
            raise StoreError(f"PostgreSQL {url_where(self.url)}: {exc}") from exc
        self._reads = PostgresReads(self._pool, self._clock)
        if not self.read_only:
            self._heartbeat.start()
            await self._listener.start_and_wait(5.0)

    async def _drop_pool(self) -> None:
        pool, self._pool, self._reads = self._pool, None, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except DRIVER_ERRORS:  # TimeoutError among them
                pool.terminate()

    async def close(self) -> None:
        """Stop the tasks, tell the others this node left (its taken messages go back at once)."""
        await self._heartbeat.stop()
        await self._listener.stop()
        if self._pool is not None and not self.read_only:
            try:
                await self._write(lambda c: cluster.leave(c, self.node, self._clock(), self.takeover_seconds))
            except StoreError as exc:
                log.warning("could not mark node %s stopped: %s", self.node.id, exc)
        await self._drop_pool()

    def _reconnected(self) -> None:
        self._counts["reconnects"] += 1

    async def _beat(self) -> None:
        held = self._holdings.seqs()
        await self._write(lambda c: cluster.beat(c, self.node, self._clock(), self.takeover_seconds, held))

    async def _run(self, op: Op[T], *, write: bool) -> T:
        if write and self.read_only:
            raise StoreError(f"PostgreSQL {url_where(self.url)} is open read-only")
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            async with self._pool.acquire() as proxy, proxy.transaction():
                # a pool's proxy is a Connection at run time (asyncpg's metaclass), not to the stubs
                result = await op(cast(asyncpg.Connection, proxy))
        except DRIVER_ERRORS as exc:
            self._counts["errors"] += 1
            raise StoreError(f"database {'write' if write else 'read'} failed: {exc}") from exc
        self._counts["writes"] += write
        return result

    async def _write(self, op: Op[T]) -> T:
        return await self._run(op, write=True)

    async def _read(self, op: Op[T]) -> T:
        return await self._run(op, write=False)

    def stats(self) -> dict[str, int]:
        pool = self._pool
        sizes = {"pool": pool.get_size(), "pool_idle": pool.get_idle_size()} if pool is not None else {}
        return {**self._counts, **sizes}

    async def healthy(self) -> bool:
        if self._pool is None:
            return False
        try:
            await asyncio.wait_for(self._pool.fetchval("SELECT 1"), 2.0)
        except DRIVER_ERRORS:  # TimeoutError among them
            return False
        return True

    # Inbox and Cluster

    async def ingest(self, body: ParsedBody) -> list[InboundItem | StatusItem]:
        if not len(body):
            return []
        now = self._clock()
        return await self._write(lambda c: inbox.ingest(c, body, now, feed=self.feed.on))

    async def pending(self, after_seq: int, limit: int) -> list[PendingMessage]:
        return inbox.decoded(await self._read(lambda c: c.fetch(inbox.PENDING, after_seq, limit)))

    async def complete(self, done: Completion) -> bool:
        now, kept = self._clock(), safe_struct(done)
        finished = await self._write(lambda c: inbox.complete(c, kept, now, feed=self.feed.on))
        self._holdings.drop(done.event_id, done.phone_number_id)  # held (renewed) until written
        return finished

    async def release(self, event_id: str, phone_number_id: str) -> None:
        self._holdings.drop(event_id, phone_number_id)
        await self._write(lambda c: inbox.release(c, self.node.id, event_id, phone_number_id))

    async def take(self, limit: int) -> list[PendingMessage]:
        now, lease = self._clock(), self.takeover_seconds
        taken = await self._write(
            lambda c: inbox.take(c, self.node.id, limit, now=now, lease=lease, dead_before=now - lease)
        )
        return self._holdings.add(taken)

    async def nodes(self) -> list[dict[str, Any]]:
        now = self._clock()
        return await self._read(lambda c: cluster.nodes(c, now, self.takeover_seconds))

    def watch(self, on_inbox: Callable[[], None], on_outbox: Callable[[], None]) -> None:
        self._listener.watch(on_inbox, on_outbox)

    # Outbox

    async def enqueue(self, rows: list[OutboxRow]) -> list[str]:
        now, rows = self._clock(), [safe_struct(r) for r in rows]
        return await self._write(lambda c: outbox.enqueue(c, rows, now, feed=self.feed.on))

    async def claim(
        self,
        now: float,
        quotas: dict[str, int],
        lease: float,
        held: frozenset[str],
        *,
        receipts: Mapping[str, int] | None = None,
        receipt_max_age: float | None = None,
    ) -> list[OutboxJob]:
        dead_before, sweep = now - self.takeover_seconds, self._sweeps.due(now)
        return await self._write(
            lambda c: outbox.claim(
                c, now, quotas, lease, held, receipts=receipts, receipt_max_age=receipt_max_age,
                node=self.node.id, dead_before=dead_before, sweep=sweep,
            )
        )  # fmt: skip

    async def settle(self, result: Settlement, now: float) -> None:
        result = safe_struct(result)  # Meta's error texts may carry NUL, which PostgreSQL text refuses
        await self._write(lambda c: outbox.settle(c, result, now, feed=self.feed.on))

    async def next_due(self, tenants: frozenset[str]) -> float | None:
        return await self._read(lambda c: outbox.next_due(c, tenants))

    async def retry_dead(self, ids: list[str] | None, now: float) -> int:
        ids = None if ids is None else [safe(i) for i in ids]
        return await self._write(lambda c: outbox.retry_dead(c, ids, now))

    # Maintenance: retention

    async def scrub(self, key: bytes, cutoff: float, only: Mapping[str, Sequence[str | int]] | None = None) -> int:
        return await self._write(lambda c: retention.scrub_batch(c, key, cutoff, only))

    async def archive_batch(self, cutoff: float, limit: int) -> ArchiveBatch:
        return await self._read(lambda c: retention.archive_batch(c, cutoff, limit))

    async def purge(self, cutoff: float) -> int:
        return await self._write(lambda c: retention.delete_batch(c, cutoff))
