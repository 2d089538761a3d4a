"""Conversation state and scheduled sends on PostgreSQL (`store.dialogs`): the SQLite engine's rules
(`alfred_bot.store.sqlite.dialogs`), with several nodes in mind.

Every node with a sending role runs the promoter. A promotion, a window failure and a cancel are
each ONE conditional `UPDATE … WHERE state = 'scheduled'` (or `IN ('scheduled', 'queued')`): under
READ COMMITTED the second of two concurrent updates waits for the first's row lock, then re-checks
the condition on the new row and changes nothing. So two nodes promoting the same due row queue it
once, and a cancel racing a claim either cancels a row no one leased or answers with `sending`.
Promotions NOTIFY every node's senders (delivered at commit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg

from alfred_bot.store.base import Completion, Dialog, DueSend
from alfred_bot.store.postgres import outbox
from alfred_bot.store.postgres.text import safe
from alfred_bot.store.sqlite.outbox import payload_json

T = TypeVar("T")


class Engine(Protocol):
    """What this module uses of `PostgresStore` (named structurally: no import cycle with the engine)."""

    _clock: Callable[[], float]

    async def _read(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T: ...

    async def _write(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T: ...

_UPSERT = """
INSERT INTO dialogs (tenant, user_id, step, data, expires_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (tenant, user_id) DO UPDATE SET step = excluded.step, data = excluded.data,
    expires_at = excluded.expires_at, updated_at = excluded.updated_at
"""
_CANCEL_OWN = (
    "UPDATE outbox SET state = 'cancelled', owner = NULL WHERE tenant = $1 AND recipient = $2 "
    "AND id = ANY($3::text[]) AND state IN ('scheduled', 'queued')"
)
_DUE = (
    "SELECT id, tenant, recipient, type, payload, COALESCE(send_at, due_at) AS send_at FROM outbox "
    "WHERE state = 'scheduled' AND due_at <= $1 ORDER BY due_at LIMIT $2"
)
_READY = (
    "UPDATE outbox SET state = 'queued', due_at = LEAST(due_at, $2) WHERE id = ANY($1::text[]) AND state = 'scheduled'"
)
_LATE = (
    "UPDATE outbox SET state = 'failed', error_message = $2, needs_template = 1 "
    "WHERE id = ANY($1::text[]) AND state = 'scheduled'"
)
_CANCEL = (
    "UPDATE outbox SET state = 'cancelled', owner = NULL WHERE id = $1 AND state IN ('scheduled', 'queued') "
    "RETURNING state"
)


async def write(conn: asyncpg.Connection, done: Completion, now: float) -> None:
    """The completion's state change and cancels, in its transaction (the message was pending).
    `done` went through `safe_struct` already (no NUL in text)."""
    if done.dialog is not None and done.tenant is not None and done.user is not None:
        d = done.dialog
        if d.empty:
            await conn.execute("DELETE FROM dialogs WHERE tenant = $1 AND user_id = $2", done.tenant, done.user)
        else:
            await conn.execute(_UPSERT, done.tenant, done.user, d.step, d.data.decode(), d.expires_at, now)
    if done.cancels:
        await conn.execute(_CANCEL_OWN, done.tenant, done.user, list(done.cancels))


async def _promote(conn: asyncpg.Connection, ready: list[str], late: list[str], error: str, now: float) -> int:
    status = await conn.execute(_READY, ready, now) if ready else "UPDATE 0"
    if late:
        await conn.execute(_LATE, late, error)
    queued = int(status.split()[-1])
    if queued:
        await outbox.notify(conn)
    return queued


async def _cancel(conn: asyncpg.Connection, outbox_id: str) -> str | None:
    changed = await conn.fetchval(_CANCEL, outbox_id)
    if changed is not None:
        return str(changed)
    found = await conn.fetchval("SELECT state FROM outbox WHERE id = $1", outbox_id)
    return None if found is None else str(found)


class PostgresDialogs:
    """`Dialogs` over the engine's `_read` / `_write` (one transaction each)."""

    def __init__(self, store: Engine) -> None:
        self._store = store

    async def get(self, tenant: str, user: str) -> Dialog | None:
        now = self._store._clock()
        row = await self._store._read(
            lambda c: c.fetchrow(
                "SELECT step, data, expires_at FROM dialogs WHERE tenant = $1 AND user_id = $2 "
                "AND (expires_at IS NULL OR expires_at > $3)",
                safe(tenant),
                safe(user),
                now,
            )
        )
        return None if row is None else Dialog(row["step"], str(row["data"]).encode(), row["expires_at"])

    async def due(self, now: float, limit: int) -> list[DueSend]:
        rows = await self._store._read(lambda c: c.fetch(_DUE, now, limit))
        return [
            DueSend(r["id"], r["tenant"], r["recipient"], r["type"], bytes(r["payload"]), float(r["send_at"]))
            for r in rows
        ]

    async def promote(self, ready: Sequence[str], late: Sequence[str], error: str, now: float) -> int:
        if not ready and not late:
            return 0
        ids, failed = [safe(i) for i in ready], [safe(i) for i in late]
        return await self._store._write(lambda c: _promote(c, ids, failed, safe(error), now))

    async def cancel(self, outbox_id: str) -> str | None:
        return await self._store._write(lambda c: _cancel(c, safe(outbox_id)))

    async def scheduled(self, tenant: str, user: str, *, prefix: str = "", limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._store._read(
            lambda c: c.fetch(
                "SELECT id, COALESCE(send_at, due_at) AS send_at, type, payload FROM outbox "
                "WHERE tenant = $1 AND recipient = $2 AND state = 'scheduled' AND left(idem_key, $3) = $4 "
                "ORDER BY due_at, seq LIMIT $5",
                safe(tenant),
                safe(user),
                len(prefix),
                safe(prefix),
                limit,
            )
        )
        return [{"id": r["id"], "send_at": r["send_at"], "type": r["type"], "payload": payload_json(r["payload"])}
                for r in rows]  # fmt: skip

    async def next_at(self) -> float | None:
        due = await self._store._read(lambda c: c.fetchval("SELECT min(due_at) FROM outbox WHERE state = 'scheduled'"))
        return None if due is None else float(due)

    async def purge(self, now: float, idle_before: float | None = None) -> int:
        idle = idle_before or 0.0
        status = await self._store._write(
            lambda c: c.execute("DELETE FROM dialogs WHERE expires_at <= $1 OR updated_at < $2", now, idle)
        )
        return int(status.split()[-1])
