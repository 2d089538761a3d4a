"""The event bus feed on PostgreSQL: the same rows and JSON as `alfred_bot.store.sqlite.feed`.

Rows are written inside the caller's transaction (ingest, complete, enqueue, settle, statuses).
Several nodes relay: one at a time (a transaction-scoped advisory lock, tried, never waited for),
so entries leave in `seq` order. A transaction that committed after a higher `seq` was published
is published by the next batch (only the rows published are deleted, never "everything below"):
order follows the commits as the relay sees them, nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from alfred_bot.parse import ParsedBody, StatusItem
from alfred_bot.store.base import FeedEntry, OutboxRow
from alfred_bot.store.postgres.text import safe
from alfred_bot.store.sqlite.feed import ingest_rows, unseen

T = TypeVar("T")


class _Engine(Protocol):
    """What the feed uses of `PostgresStore`: one transaction per call."""

    async def _write(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T: ...

    async def _read(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T: ...

Conn = asyncpg.Connection | PoolConnectionProxy
_INSERT = "INSERT INTO feed (stream, body, created_at) VALUES ($1, $2, $3)"
_HAS_MESSAGES = """
SELECT event_id, phone_number_id FROM inbox i
JOIN unnest($1::text[], $2::text[]) AS k(e, p) ON i.event_id = k.e AND i.phone_number_id = k.p
"""
_TRACES = "SELECT wamid, tenant, trace_id FROM outbox WHERE wamid = ANY($1::text[])"
#: The relay's lock: one node publishes at a time (keeps the order).
_RELAY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended('alfred:feed-relay', 0))"


async def _stored_keys(conn: Conn, table: str, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    rows = await conn.fetch(f"SELECT key FROM {table} WHERE key = ANY($1::text[])", keys)
    return {r["key"] for r in rows}


async def ingest(conn: Conn, body: ParsedBody, now: float) -> None:
    """Before the body is stored: a feed row for each item not stored yet (same transaction).

    Two nodes storing the same redelivery at once may both publish it: consumers dedupe by id."""
    seen_messages: set[Any] = set()
    if body.messages:
        found = await conn.fetch(
            _HAS_MESSAGES, [safe(m.message.id) for m in body.messages], [safe(m.phone_number_id) for m in body.messages]
        )
        seen_messages = {(r["event_id"], r["phone_number_id"]) for r in found}
    messages = unseen(body.messages, lambda m: (safe(m.message.id), safe(m.phone_number_id)), seen_messages)
    seen_statuses = await _stored_keys(conn, "statuses", [safe(s.key) for s in body.statuses])
    statuses = unseen(body.statuses, lambda s: safe(s.key), seen_statuses)
    seen_events = await _stored_keys(conn, "events", [safe(e.key) for e in body.events])
    events = unseen(body.events, lambda e: safe(e.key), seen_events)
    traces = await _traces(conn, statuses)
    rows = ingest_rows(messages, [(s, traces.get((s.status.id, s.tenant))) for s in statuses], events, now)
    if rows:
        await conn.executemany(_INSERT, rows)


async def _traces(conn: Conn, statuses: Sequence[StatusItem]) -> dict[tuple[str, str | None], str | None]:
    if not statuses:
        return {}
    rows = await conn.fetch(_TRACES, [safe(s.status.id) for s in statuses])
    return {(r["wamid"], r["tenant"]): r["trace_id"] for r in rows}


#: A send's outcome as JSON from its outbox row (the keys of the SQLite engine's `_OUTCOME`):
#: $1 the state (NULL: the row's own), $2 now.
_OUTCOME = """
INSERT INTO feed (stream, body, created_at)
SELECT 'events', json_build_object(
    'kind', 'send', 'dedupe_id', 'send:' || id || ':' || COALESCE($1::text, state), 'tenant_id', tenant,
    'trace_id', trace_id, 'outbox_id', id,
    'idempotency_key', CASE WHEN left(idem_key, length(tenant) + 5) = 'api:' || tenant || ':'
                            THEN substr(idem_key, length(tenant) + 6) END,
    'to', recipient, 'type', type, 'state', COALESCE($1::text, state), 'wamid', wamid, 'attempts', attempts,
    'error', CASE WHEN COALESCE($1::text, state) = 'failed' THEN json_build_object(
        'code', error_code, 'message', error_message, 'details', error_details, 'fbtrace_id', error_fbtrace_id,
        'http_status', error_http_status, 'needs_template', needs_template <> 0) END,
    'reply_to', source_event_id, 'campaign_id', campaign_id, 'at', $2::float8)::text, $2::float8
FROM outbox WHERE type <> 'read' AND """


async def outcome(conn: Conn, outbox_id: str, state: str, now: float) -> None:
    """A send reached `state` (sent, failed, delivered, read, played): a row for `alfred-events`."""
    await conn.execute(f"{_OUTCOME}id = $3", state, now, outbox_id)


async def queued(conn: Conn, rows: Sequence[OutboxRow], now: float) -> None:
    """Rows just inserted, queued or scheduled (a key seen before inserted nothing, and its row
    has another id: no entry)."""
    await conn.executemany(
        f"{_OUTCOME}id = $3 AND created_at = $2", [(None, now, r.id) for r in rows]
    )


class _PublishFailed(Exception):
    """`publish` raised (its error is the cause): not a database error, so not a `StoreError`."""


class PostgresFeed:
    """`Feed` on PostgreSQL: rows read, published and deleted in one transaction, one node at a time."""

    def __init__(self, store: _Engine) -> None:
        self._store = store
        self.on = False

    async def relay(self, publish: Callable[[list[FeedEntry]], Awaitable[None]], limit: int) -> int:
        async def op(conn: asyncpg.Connection) -> int:
            if not await conn.fetchval(_RELAY_LOCK):
                return 0  # another node is relaying
            rows = await conn.fetch("SELECT seq, stream, body FROM feed ORDER BY seq LIMIT $1", limit)
            if not rows:
                return 0
            entries = [FeedEntry(int(r["seq"]), r["stream"], cast(str, r["body"]).encode()) for r in rows]
            try:
                await publish(entries)
            except Exception as exc:  # the transaction rolls back, every row stays
                raise _PublishFailed from exc
            await conn.execute("DELETE FROM feed WHERE seq = ANY($1::bigint[])", [e.seq for e in entries])
            return len(entries)

        try:
            return await self._store._write(op)
        except _PublishFailed as failed:  # the caller sees its own error, not a database one
            raise cast(Exception, failed.__cause__) from None

    async def backlog(self) -> tuple[int, float | None]:
        row = await self._store._read(lambda c: c.fetchrow("SELECT COUNT(*) AS n, MIN(created_at) AS t FROM feed"))
        return (0, None) if row is None else (int(row["n"]), row["t"])
