"""The event bus feed on SQLite (issue 16): rows written in the writer's transaction, relayed later.

Why a table and not an XADD right after the commit: a crash or a Redis outage between the commit
and the XADD would lose the entry. A feed row commits with the write it describes, and the relay
(`alfred_bot.bus.relay`) publishes and deletes rows afterwards: late, never lost, at worst twice
(a crash between the XADD and the delete), so consumers dedupe by `dedupe_id`.

The JSON of the `alfred-ingest` entries is built here, engine-neutral (the PostgreSQL feed uses
the same functions); a send outcome's JSON is built by SQL from the outbox row itself (one
statement, no round trip to read the row first), in each engine's dialect, with the same keys.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from alfred_bot.parse import EventItem, InboundItem, ParsedBody, StatusItem
from alfred_bot.store.base import FeedEntry, OutboxRow
from alfred_bot.store.sqlite import inbox


class _Engine(Protocol):
    """What the feed uses of `SqliteStore` (the reader and the group-commit writer)."""

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]: ...

    async def _write(self, op: Any) -> Any: ...

INGEST = "ingest"
EVENTS = "events"
_INSERT = "INSERT INTO feed (stream, body, created_at) VALUES (?, ?, ?)"


def _json(raw: bytes) -> Any:
    """Meta's object as it arrived (None if it somehow is not JSON: the typed fields remain)."""
    try:
        return msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        return None


def message_entry(item: InboundItem, now: float) -> dict[str, Any]:
    """An accepted message: the fields `/api/inbound` shows, plus Meta's message object."""
    r = inbox.row(item, now)
    msg = item.message
    return {
        "kind": "message",
        "dedupe_id": f"message:{item.phone_number_id}:{msg.id}",
        "tenant_id": item.tenant,
        "trace_id": item.trace_id or None,
        "id": msg.id,
        "phone_number_id": item.phone_number_id,
        "from": r[3],
        "user_id": r[4],
        "name": r[6],
        "type": msg.type,
        "timestamp": msg.timestamp,
        "text": msg.text,
        "context_id": r[10],
        "state": r[12],
        "error": r[13],
        "received_at": now,
        "parse_error": item.parse_error,
        "errors": msgspec.json.decode(r[17]) if r[17] else [],
        "edited_id": getattr(msg, "edited_id", None),
        "revoked_id": getattr(msg, "revoked_id", None),
        "call_permission": getattr(msg, "call_permission_response", None),
        "flow_response": getattr(msg, "flow_response", None),
        "message": _json(item.raw),
    }


def status_entry(item: StatusItem, trace_id: str | None, now: float) -> dict[str, Any]:
    """An accepted delivery status, with the trace of the send it is about (when known)."""
    s = item.status
    errors = [msgspec.structs.asdict(e) for e in s.errors or []]
    return {
        "kind": "status",
        "dedupe_id": f"status:{item.key}",
        "tenant_id": item.tenant,
        "trace_id": trace_id,
        "id": s.id,
        "phone_number_id": item.phone_number_id,
        "status": s.status,
        "timestamp": s.timestamp,
        "recipient_id": s.recipient_id,
        "recipient_user_id": s.recipient_user_id,
        "errors": errors,
        "received_at": now,
        "raw": _json(item.raw),
    }


def event_entry(item: EventItem, now: float) -> dict[str, Any]:
    """Any other webhook field (template status, quality, account, preferences, unknown ones)."""
    return {
        "kind": "event",
        "dedupe_id": f"event:{item.key}",
        "tenant_id": item.tenant,
        "trace_id": None,
        "field": item.field,
        "phone_number_id": item.phone_number_id,
        "waba_id": item.waba_id,
        "time": item.time,
        "received_at": now,
        "value": _json(item.raw),
    }


def ingest_rows(
    messages: Iterable[InboundItem],
    statuses: Iterable[tuple[StatusItem, str | None]],
    events: Iterable[EventItem],
    now: float,
) -> list[tuple[str, str, float]]:
    """Feed rows for the new items of one body (only those with a tenant: every entry names one)."""
    bodies = [message_entry(m, now) for m in messages if m.tenant is not None]
    bodies += [status_entry(s, trace, now) for s, trace in statuses if s.tenant is not None]
    bodies += [event_entry(e, now) for e in events if e.tenant is not None]
    return [(INGEST, msgspec.json.encode(b).decode(), now) for b in bodies]


def unseen(items: Sequence[Any], key: Callable[[Any], Any], seen: set[Any]) -> list[Any]:
    """Items whose key is not in `seen` (already stored), each once (a body may repeat one)."""
    fresh = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            fresh.append(item)
    return fresh


def _stored(conn: sqlite3.Connection, sql: str, keys: Iterable[tuple[Any, ...]]) -> set[Any]:
    return {k for k in keys if conn.execute(sql, k).fetchone() is not None}


def ingest(conn: sqlite3.Connection, body: ParsedBody, now: float) -> None:
    """Before the body is stored: a feed row for each item not stored yet (same transaction)."""
    msg_key = lambda m: (m.message.id, m.phone_number_id)  # noqa: E731
    messages = unseen(body.messages, msg_key, _stored(conn, _HAS_MESSAGE, map(msg_key, body.messages)))
    statuses = unseen(body.statuses, lambda s: s.key, {k for (k,) in _stored(conn, _HAS_STATUS, _keys(body.statuses))})
    events = unseen(body.events, lambda e: e.key, {k for (k,) in _stored(conn, _HAS_EVENT, _keys(body.events))})
    traced = [(s, _trace(conn, s)) for s in statuses]
    conn.executemany(_INSERT, ingest_rows(messages, traced, events, now))


_HAS_MESSAGE = "SELECT 1 FROM inbox WHERE event_id = ? AND phone_number_id = ?"
_HAS_STATUS = "SELECT 1 FROM statuses WHERE key = ?"
_HAS_EVENT = "SELECT 1 FROM events WHERE key = ?"


def _keys(items: Sequence[StatusItem] | Sequence[EventItem]) -> list[tuple[str]]:
    return [(i.key,) for i in items]


def _trace(conn: sqlite3.Connection, item: StatusItem) -> str | None:
    found = conn.execute(
        "SELECT trace_id FROM outbox WHERE wamid = ? AND tenant = ?", (item.status.id, item.tenant)
    ).fetchone()
    return None if found is None else found[0]


#: A send's outcome as JSON, from its outbox row: ?1 the state (NULL: the row's own), ?2 now.
#: The request's idempotency key is the API's / bus's own (`api:<tenant>:<key>` → `<key>`).
_OUTCOME = """
INSERT INTO feed (stream, body, created_at)
SELECT 'events', json_object(
    'kind', 'send', 'dedupe_id', 'send:' || id || ':' || COALESCE(?1, state), 'tenant_id', tenant,
    'trace_id', trace_id, 'outbox_id', id,
    'idempotency_key', CASE WHEN substr(idem_key, 1, length(tenant) + 5) = 'api:' || tenant || ':'
                            THEN substr(idem_key, length(tenant) + 6) END,
    'to', recipient, 'type', type, 'state', COALESCE(?1, state), 'wamid', wamid, 'attempts', attempts,
    'error', CASE WHEN COALESCE(?1, state) = 'failed' THEN json_object(
        'code', error_code, 'message', error_message, 'details', error_details, 'fbtrace_id', error_fbtrace_id,
        'http_status', error_http_status, 'needs_template', json(CASE WHEN needs_template THEN 'true' ELSE 'false' END))
        END,
    'reply_to', source_event_id, 'campaign_id', campaign_id, 'at', ?2), ?2
FROM outbox WHERE type != 'read' AND """


def outcome(conn: sqlite3.Connection, outbox_id: str, state: str, now: float) -> None:
    """A send reached `state` (sent, failed, delivered, read, played): a row for `alfred-events`."""
    conn.execute(f"{_OUTCOME}id = ?3", (state, now, outbox_id))


def queued(conn: sqlite3.Connection, rows: Sequence[OutboxRow], now: float) -> None:
    """Rows just inserted, queued or scheduled (a key seen before inserted nothing, and its row
    has another id: no entry)."""
    conn.executemany(
        f"{_OUTCOME}id = ?3 AND created_at = ?2", [(None, now, r.id) for r in rows]
    )


class SqliteFeed:
    """`Feed` on SQLite: one process, so one relay; rows are read on the reader, deleted by the writer."""

    def __init__(self, store: _Engine) -> None:
        self._store = store
        self.on = False

    async def relay(self, publish: Callable[[list[FeedEntry]], Awaitable[None]], limit: int) -> int:
        rows = await self._store._fetch("SELECT seq, stream, body FROM feed ORDER BY seq LIMIT ?", (limit,))
        if not rows:
            return 0
        entries = [FeedEntry(int(r[0]), r[1], r[2].encode()) for r in rows]
        await publish(entries)
        seqs = [(e.seq,) for e in entries]
        await self._store._write(lambda conn: conn.executemany("DELETE FROM feed WHERE seq = ?", seqs))
        return len(entries)

    async def backlog(self) -> tuple[int, float | None]:
        rows = await self._store._fetch("SELECT COUNT(*), MIN(created_at) FROM feed", ())
        return int(rows[0][0]), rows[0][1]
