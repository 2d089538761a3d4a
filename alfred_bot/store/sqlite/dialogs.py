"""Conversation state and scheduled sends on SQLite (`store.dialogs`).

The state is written by the completion (`write`, called from the engine's complete op, on the
writer thread inside the group transaction that queues the replies); the rest are reads on the
reader connection and small conditional writes. Every change of a send is conditional on the
row's state at that moment, so a cancel and a promotion of the same row never both apply.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from alfred_bot.store.base import Completion, Dialog, DueSend
from alfred_bot.store.sqlite.outbox import payload_json


class Engine(Protocol):
    """What this module uses of `SqliteStore` (named structurally: no import cycle with the engine)."""

    _clock: Callable[[], float]
    read_only: bool

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]: ...

    async def _write(self, op: Any) -> Any: ...

_UPSERT = """
INSERT INTO dialogs (tenant, user_id, step, data, expires_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(tenant, user_id) DO UPDATE SET step = excluded.step, data = excluded.data,
    expires_at = excluded.expires_at, updated_at = excluded.updated_at
"""
#: Only the user's own sends, and only while nothing has started sending them.
_CANCEL_OWN = (
    "UPDATE outbox SET state = 'cancelled' WHERE tenant = ? AND recipient = ? AND id = ? "
    "AND state IN ('scheduled', 'queued')"
)
_DUE = (
    "SELECT id, tenant, recipient, type, payload, COALESCE(send_at, due_at) FROM outbox "
    "WHERE state = 'scheduled' AND due_at <= ? ORDER BY due_at LIMIT ?"
)
#: Users whose dialog state is kept in memory, most recently used last (see `SqliteDialogs`).
CACHE_USERS = 4096
#: A state larger than this (bytes of JSON) is read from the database each time: the cache stays
#: within a few MB of a small VM's memory.
CACHE_BYTES = 1024

_LATE = (
    "UPDATE outbox SET state = 'failed', error_message = ?, needs_template = 1 WHERE id = ? AND state = 'scheduled'"
)


def write(conn: sqlite3.Connection, done: Completion, now: float) -> None:
    """The completion's state change and cancels (the caller checked the message was pending)."""
    if done.dialog is not None and done.tenant is not None and done.user is not None:
        if done.dialog.empty:
            conn.execute("DELETE FROM dialogs WHERE tenant = ? AND user_id = ?", (done.tenant, done.user))
        else:
            d = done.dialog
            conn.execute(_UPSERT, (done.tenant, done.user, d.step, d.data.decode(), d.expires_at, now))
    for outbox_id in done.cancels:
        conn.execute(_CANCEL_OWN, (done.tenant, done.user, outbox_id))


def _promote(ready: Sequence[str], late: Sequence[str], error: str, now: float) -> Any:
    def op(conn: sqlite3.Connection) -> int:
        queued = 0
        for outbox_id in ready:
            queued += conn.execute(
                "UPDATE outbox SET state = 'queued', due_at = MIN(due_at, ?) WHERE id = ? AND state = 'scheduled'",
                (now, outbox_id),
            ).rowcount
        for outbox_id in late:
            conn.execute(_LATE, (error, outbox_id))
        return queued

    return op


def _cancel(outbox_id: str) -> Any:
    def op(conn: sqlite3.Connection) -> str | None:
        conn.execute("UPDATE outbox SET state = 'cancelled' WHERE id = ? AND state IN ('scheduled', 'queued')",
                     (outbox_id,))  # fmt: skip
        row = conn.execute("SELECT state FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
        return None if row is None else str(row[0])

    return op


class SqliteDialogs:
    """`Dialogs` over the engine's writer (`_write`) and reader (`_fetch`).

    Why a cache: every message reads its user's state before routing, and a read on the reader
    thread costs two thread hops, more than the rest of a simple handler. Only this process writes
    the file (it holds the lock), and only a completion (`remember`, after its commit) or `purge`
    changes a state, so a write-through cache of the recently active users is exact. Expiry is
    checked on every read, from the cached `expires_at`.
    """

    def __init__(self, store: Engine) -> None:
        self._store = store
        self._cache: OrderedDict[tuple[str, str], Dialog | None] = OrderedDict()
        self._changes = 0  # bumped by every write through: a read racing one keeps its answer to itself
        #: Users whose last completion failed or was cancelled: its write may still commit later, so
        #: their state is read from the file until a completion of theirs is known to have committed.
        self._doubtful: set[tuple[str, str]] = set()

    async def get(self, tenant: str, user: str) -> Dialog | None:
        key = (tenant, user)
        if key in self._cache:
            self._cache.move_to_end(key)
            found = self._cache[key]
        else:
            changes = self._changes
            rows = await self._store._fetch(
                "SELECT step, data, expires_at FROM dialogs WHERE tenant = ? AND user_id = ?", (tenant, user)
            )
            found = Dialog(rows[0][0], str(rows[0][1]).encode(), rows[0][2]) if rows else None
            if changes == self._changes and key not in self._doubtful and not self._store.read_only:
                self._keep(key, found)  # (a read-only store reads beside the server that writes)
            elif key in self._cache:
                found = self._cache[key]  # written while we read: the write is newer
        if found is None or (found.expires_at is not None and found.expires_at <= self._store._clock()):
            return None
        return found

    def remember(self, done: Completion) -> None:
        """A completion committed: the cache follows its state (`write` did the file). The writer
        commits in order, so a doubtful earlier write of this user has landed (or failed) by now."""
        if done.tenant is None or done.user is None:
            return
        key = (done.tenant, done.user)
        if key in self._doubtful or done.dialog is not None:
            self._changes += 1  # (only then: a bump keeps every read in flight out of the cache)
            self._doubtful.discard(key)
        if done.dialog is not None:
            self._keep(key, None if done.dialog.empty else done.dialog)

    def forget(self, done: Completion) -> None:
        """A completion failed or was cancelled: its write may commit later, or never; its user's
        state is read from the file until one of their completions is known to have committed."""
        if done.tenant is not None and done.user is not None:
            self._changes += 1
            self._doubtful.add((done.tenant, done.user))
            self._cache.pop((done.tenant, done.user), None)

    def _keep(self, key: tuple[str, str], dialog: Dialog | None) -> None:
        if dialog is not None and len(dialog.data) > CACHE_BYTES:
            self._cache.pop(key, None)
            return
        self._cache[key] = dialog
        self._cache.move_to_end(key)
        if len(self._cache) > CACHE_USERS:
            self._cache.popitem(last=False)

    async def due(self, now: float, limit: int) -> list[DueSend]:
        rows = await self._store._fetch(_DUE, (now, limit))
        return [DueSend(r[0], r[1], r[2], r[3], bytes(r[4]), float(r[5])) for r in rows]

    async def promote(self, ready: Sequence[str], late: Sequence[str], error: str, now: float) -> int:
        if not ready and not late:
            return 0
        result: int = await self._store._write(_promote(list(ready), list(late), error, now))
        return result

    async def cancel(self, outbox_id: str) -> str | None:
        result: str | None = await self._store._write(_cancel(outbox_id))
        return result

    async def scheduled(self, tenant: str, user: str, *, prefix: str = "", limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._store._fetch(
            "SELECT id, COALESCE(send_at, due_at) AS send_at, type, payload FROM outbox "
            "WHERE tenant = ? AND recipient = ? AND state = 'scheduled' AND substr(idem_key, 1, ?) = ? "
            "ORDER BY due_at, rowid LIMIT ?",
            (tenant, user, len(prefix), prefix, limit),
        )
        return [{"id": r[0], "send_at": r[1], "type": r[2], "payload": payload_json(r[3])} for r in rows]

    async def next_at(self) -> float | None:
        rows = await self._store._fetch("SELECT MIN(due_at) FROM outbox WHERE state = 'scheduled'", ())
        return None if rows[0][0] is None else float(rows[0][0])

    async def purge(self, now: float, idle_before: float | None = None) -> int:
        result: int = -1  # unknown until the write answers: cancelled or failed, it may have committed
        try:
            result = await self._store._write(
                lambda conn: conn.execute(
                    "DELETE FROM dialogs WHERE expires_at <= ? OR updated_at < ?", (now, idle_before or 0.0)
                ).rowcount
            )
        finally:
            if result:  # idle states left the file: the cache must not keep them (a read in flight neither)
                self._changes += 1
                self._cache.clear()
        return result
