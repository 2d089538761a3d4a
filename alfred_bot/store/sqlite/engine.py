"""The embedded SQLite store: WAL, `synchronous=FULL`, one group-commit writer, one reader.

Writes go through `GroupWriter` (our own thread and stdlib sqlite3, so a whole group is one hop);
reads go through an aiosqlite connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import aiosqlite

from alfred_bot.parse import InboundItem, MalformedItem, ParsedBody, StatusItem
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
from alfred_bot.store.sqlite import dialogs, inbox, outbox, retention
from alfred_bot.store.sqlite import events as event_log
from alfred_bot.store.sqlite import feed as feed_log
from alfred_bot.store.sqlite.campaigns import SqliteCampaigns, SqliteTemplates
from alfred_bot.store.sqlite.cluster import TAKE, LoneNode
from alfred_bot.store.sqlite.dialogs import SqliteDialogs
from alfred_bot.store.sqlite.feed import SqliteFeed
from alfred_bot.store.sqlite.reads import SqliteReads
from alfred_bot.store.sqlite.schema import SCHEMA_VERSION, migrate
from alfred_bot.store.sqlite.writer import GroupWriter

log = logging.getLogger("alfred.store")


_INSERT_STATUS = """
INSERT INTO statuses (key, wamid, tenant, phone_number_id, status, timestamp, recipient_id,
                      error_code, raw, received_at, recipient_user_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING
"""
_INSERT_REJECTED = """
INSERT INTO rejected (key, what, reason, raw, received_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING
"""


def connect_writer(path: Path) -> sqlite3.Connection:
    """Open the write connection with the durability settings the 200-after-commit promise needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    migrate(conn)
    return conn


def _lock_database(path: Path) -> IO[bytes]:
    """Hold an exclusive lock beside the database: two processes would both run the handlers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (path.parent / f"{path.name}.lock").open("ab")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StoreError(f"{path} is in use by another Alfred process") from None
    return lock


def _ingest_op(body: ParsedBody, now: float, feed: bool = False) -> Any:
    def op(conn: sqlite3.Connection) -> list[InboundItem | StatusItem]:
        if feed:  # the event bus: entries for what is new in this body, in this transaction
            feed_log.ingest(conn, body, now)
        fresh: list[InboundItem | StatusItem] = []
        for item in body.messages:
            inserted = conn.execute(inbox.INSERT, inbox.row(item, now)).rowcount == 1
            if inserted and inbox.state_of(item)[0] == "pending":
                fresh.append(item)
        for update in body.statuses:
            if conn.execute(_INSERT_STATUS, _status_row(update, now)).rowcount == 1 and update.tenant is not None:
                outbox.apply_status(conn, update.tenant, update.status, feed=feed)
                fresh.append(update)
        event_log.insert(conn, body.events, now)
        if body.rejected:
            conn.executemany(_INSERT_REJECTED, [(r.key, r.what, r.reason[:1000], r.raw, now) for r in body.rejected])
        return fresh

    return op


def _status_row(item: StatusItem, now: float) -> tuple[Any, ...]:
    s = item.status
    code = s.errors[0].code if s.errors else None
    return (
        item.key,
        s.id,
        item.tenant,
        item.phone_number_id,
        s.status,
        s.timestamp,
        s.recipient_id,
        code,
        item.raw,
        now,
        s.recipient_user_id,
    )


#: `user` (?2) or any other id the same person wrote from to this tenant (?1): a phone number and
#: the username id (BSUID) Meta sent beside it address one person, for opt-outs as for the window.
_SAME_USER = (
    "(user = ?2 OR user IN (SELECT sender FROM inbox WHERE tenant = ?1 AND user_id = ?2 AND sender IS NOT NULL) "
    "OR user IN (SELECT user_id FROM inbox WHERE tenant = ?1 AND sender = ?2 AND user_id IS NOT NULL))"
)
#: A user who opts out is sent nothing more of any campaign: their campaign sends not yet done
#: (waiting, or leased: a later retry or requeue must not send them either) become `skipped`, counted
#: so; one already handed to a sender goes out. The ids as one IN list keep `outbox_recipient` in use
#: (and `+user_id` keeps `inbox_sender` on the last one: `IS NOT NULL` would pick a range of `inbox_user`).
_SKIP_CAMPAIGN_SENDS = (
    "UPDATE outbox SET state = 'skipped', error_message = 'the user opted out after this send was queued' "
    "WHERE tenant = ?1 AND campaign_id IS NOT NULL AND state IN ('queued', 'scheduled', 'paused', 'sending') "
    "AND recipient IN (SELECT ?2 UNION SELECT sender FROM inbox WHERE tenant = ?1 AND user_id = ?2 AND sender "
    "IS NOT NULL UNION SELECT user_id FROM inbox WHERE tenant = ?1 AND sender = ?2 AND +user_id IS NOT NULL)"
)


def _complete_op(done: Completion, now: float, feed: bool = False) -> Any:
    def op(conn: sqlite3.Connection) -> bool:
        if not inbox.complete(conn, done.event_id, done.phone_number_id, (done.state, done.error, now)):
            return False
        outbox.insert_rows(conn, done.replies, now, feed=feed)
        dialogs.write(conn, done, now)  # the state goes with the replies, or neither does
        if done.consent == "out":
            conn.execute("INSERT OR REPLACE INTO optouts VALUES (?, ?, ?)", (done.tenant, done.user, now))
            conn.execute(_SKIP_CAMPAIGN_SENDS, (done.tenant, done.user))
        elif done.consent == "in":
            conn.execute(f"DELETE FROM optouts WHERE tenant = ?1 AND {_SAME_USER}", (done.tenant, done.user))
        return True

    return op


#: Both directions of one user's conversation: inbound by phone number or user id, outbound
#: messages (not receipts) by recipient; each leg limited, merged and cut in Python.
def _schema_version(uri: str) -> int:
    """Probe a file read-only with the stdlib driver first: a file that cannot be opened fails
    here, cleanly, instead of inside aiosqlite's thread (whose failed connect can outlive the loop)."""
    conn = sqlite3.connect(uri, uri=True)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _check_version(path: Path, version: int) -> None:
    """A read-only store cannot migrate: an older or newer file is refused with what to do."""
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path} has schema v{version}, this Alfred reads v{SCHEMA_VERSION}: start the server once")


async def _release_orphans(writer: GroupWriter, now: float, feed: bool) -> None:
    """At open: sends a dead process left leased are due again now (`outbox.release_orphans`); a
    clean start (none left) writes nothing."""
    if await writer.read(outbox.has_orphans):
        try:
            orphans: int = await writer.submit(lambda conn: outbox.release_orphans(conn, now, feed=feed))
        except StoreError as exc:  # a full disk must not stop the start: their leases bring them back
            log.error("could not re-queue the sends left in flight (their leases will): %s", exc)
            return
        log.warning("%d sends were in flight when the last process stopped: due again now", orphans)


class SqliteStore(SqliteReads, LoneNode):
    """The default `Store`: one SQLite file, safe against kill -9 and power loss.

    `read_only=True` is for the operator's commands beside a running server: it takes no lock,
    starts no writer and migrates nothing; it only reads, and refuses every write."""

    def __init__(
        self, path: Path, *, clock: Any = time.time, read_only: bool = False, node: NodeInfo | None = None
    ) -> None:
        LoneNode.__init__(self, node, clock)
        self.path = path
        self.read_only = read_only
        self._clock = clock
        self._writer = GroupWriter(lambda: connect_writer(path))
        self._reader: aiosqlite.Connection | None = None
        self._lock: IO[bytes] | None = None
        self.dialogs = SqliteDialogs(self)
        self.campaigns, self.templates = SqliteCampaigns(self), SqliteTemplates(self)
        self.feed = SqliteFeed(self)
        self._sweeps = ReceiptSweeps()

    @property
    def writer(self) -> GroupWriter:
        return self._writer

    async def open(self) -> None:
        """Every failure is a `StoreError` naming the file: callers need not know the driver."""
        try:
            if self.read_only:
                target = f"{self.path.as_uri()}?mode=ro"
                _check_version(self.path, await asyncio.to_thread(_schema_version, target))
                await self._open_reader(target)
                return
            self._lock = _lock_database(self.path)
            await self._writer.start()
            await self._open_reader(str(self.path))
            await _release_orphans(self._writer, self._clock(), self.feed.on)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc

    async def _open_reader(self, target: str) -> None:
        self._reader = await aiosqlite.connect(target, uri=target.startswith("file:"))
        self._reader.row_factory = aiosqlite.Row
        await self._reader.execute("PRAGMA query_only=1")

    async def _write(self, op: Any) -> Any:
        """Submit `op` to the group writer. No await before the submit, here or in the callers
        (`complete`, `settle`, `enqueue`): the sender is woken just before them, and its claim must
        be queued after their write to see it (`claim_after`)."""
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        return await self._writer.submit(op)

    async def close(self) -> None:
        """Even when the writer's close is interrupted, the reader (whose thread would keep the
        interpreter from exiting) and the lock are released."""
        try:
            await self._writer.close()
        finally:
            if self._reader is not None:
                reader, self._reader = self._reader, None
                await reader.close()
            if self._lock is not None:
                self._lock.close()  # closing the descriptor releases the flock
                self._lock = None

    async def ingest(self, body: ParsedBody) -> list[InboundItem | StatusItem]:
        if not len(body):
            return []
        result: list[InboundItem | StatusItem] = await self._write(_ingest_op(body, self._clock(), self.feed.on))
        return result

    async def complete(self, done: Completion) -> bool:
        try:
            result: bool = await self._write(_complete_op(done, self._clock(), self.feed.on))
        except BaseException:
            self.dialogs.forget(done)
            raise
        if result:
            self.dialogs.remember(done)
        if self.taken:  # whether or not it was still pending, it is no longer held
            self.taken.difference_update(await self._seqs(done.event_id, done.phone_number_id))
        return result

    async def release(self, event_id: str, phone_number_id: str) -> None:
        self.taken.difference_update(await self._seqs(event_id, phone_number_id))

    async def _seqs(self, event_id: str, phone_number_id: str | None) -> list[int]:
        sql = "SELECT seq FROM inbox WHERE event_id = ?" + (" AND phone_number_id = ?" if phone_number_id else "")
        params = (event_id, phone_number_id) if phone_number_id else (event_id,)
        return [row[0] for row in await self._fetch(sql, params)]

    async def pending(self, after_seq: int, limit: int) -> list[PendingMessage]:
        return self._decoded(await self._fetch(inbox.PENDING, (after_seq, limit)))

    async def take(self, limit: int) -> list[PendingMessage]:
        rows = await self._fetch(TAKE, (limit + len(self.taken),))
        fresh = [row for row in rows if row["seq"] not in self.taken][:limit]
        self.taken.update(row["seq"] for row in fresh)
        return self._decoded(fresh)

    @staticmethod
    def _decoded(rows: list[sqlite3.Row]) -> list[PendingMessage]:
        pending: list[PendingMessage] = []
        for row in rows:
            try:
                pending.append(PendingMessage(row["seq"], inbox.pending_item(row)))
            except MalformedItem as exc:  # only if a newer model refuses an old row: skip, never block
                log.error("pending message seq %d cannot be decoded, skipped: %s", row["seq"], exc)
        return pending

    async def enqueue(self, rows: list[OutboxRow]) -> list[str]:
        now = self._clock()
        result: list[str] = await self._write(lambda conn: outbox.enqueue(conn, rows, now, feed=self.feed.on))
        return result

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
        sweep = self._sweeps.due(now)
        result: list[OutboxJob] = await self._write(
            lambda conn: outbox.claim(
                conn, now, quotas, lease, held, receipts=receipts, receipt_max_age=receipt_max_age, sweep=sweep
            )
        )
        return result

    async def settle(self, result: Settlement, now: float) -> None:
        await self._write(lambda conn: outbox.settle(conn, result, now, feed=self.feed.on))

    async def next_due(self, tenants: frozenset[str]) -> float | None:
        """On the reader connection: the writer thread is the bottleneck, and WAL lets this run beside it."""
        dues = [
            (await self._fetch(f"SELECT MIN(due_at) FROM outbox WHERE tenant = ? AND {outbox.PENDING}", (t,)))[0][0]
            for t in sorted(tenants)
        ]
        known = [float(d) for d in dues if d is not None]
        return min(known) if known else None

    async def last_inbound(self, tenant: str, user: str) -> int | None:
        rows = await self._fetch(
            "SELECT MAX(COALESCE((SELECT MAX(timestamp) FROM inbox WHERE tenant = ?1 AND sender = ?2 "
            "AND type != 'system'), 0), COALESCE((SELECT MAX(timestamp) FROM inbox WHERE tenant = ?1 "
            "AND user_id = ?2 AND type != 'system'), 0))",
            (tenant, user),
        )
        value = int(rows[0][0])
        return value or None

    async def opted_out(self, tenant: str, user: str) -> bool:
        rows = await self._fetch(f"SELECT 1 FROM optouts WHERE tenant = ?1 AND {_SAME_USER} LIMIT 1", (tenant, user))
        return bool(rows)

    async def marketing_stopped(self, tenant: str, user: str) -> bool:
        rows = await self._fetch(
            "SELECT value FROM preferences WHERE tenant = ? AND user = ? AND category = ?",
            (tenant, user, event_log.MARKETING),
        )
        return bool(rows) and rows[0][0] == "stop"

    async def scrub(self, key: bytes, cutoff: float, only: Mapping[str, Sequence[str | int]] | None = None) -> int:
        result: int = await self._write(lambda conn: retention.scrub_batch(conn, key, cutoff, only))
        return result

    async def archive_batch(self, cutoff: float, limit: int) -> ArchiveBatch:
        return await retention.archive_batch(self._fetch, cutoff, limit)

    async def purge(self, cutoff: float) -> int:
        result: int = await self._write(lambda conn: retention.delete_batch(conn, cutoff))
        return result

    async def retry_dead(self, ids: list[str] | None, now: float) -> int:
        result: int = await self._write(lambda conn: outbox.retry_failed(conn, ids, now))
        return result

    def stats(self) -> dict[str, int]:
        return {"writes": self._writer.writes, "commits": self._writer.groups}

    async def healthy(self) -> bool:
        if not self.read_only and not self._writer.running:
            return False
        try:
            await self._fetch("SELECT 1", ())
        except (sqlite3.Error, StoreError):
            return False
        return True
