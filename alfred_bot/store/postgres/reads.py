"""The PostgreSQL store's read models (the `Queries` role): plain SELECTs on the pool, each on
whichever connection is free, beside the writers (MVCC: a read never waits for a write).

The same answers and dict shapes as `alfred_bot.store.sqlite.reads`, whose row helpers it reuses;
where SQLite orders by rowid this orders by `seq`, and text is compared byte-wise (`COLLATE "C"`)
as SQLite does, whatever the database's locale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg

from alfred_bot.store.base import StoreError
from alfred_bot.store.postgres import activity as per_minute
from alfred_bot.store.postgres import outbox
from alfred_bot.store.postgres.cluster import DRIVER_ERRORS
from alfred_bot.store.postgres.inbox import SAME_USER
from alfred_bot.store.sqlite import events as event_log
from alfred_bot.store.sqlite import inbox
from alfred_bot.store.sqlite.outbox import payload_json
from alfred_bot.store.sqlite.reads import conversation_item

_RECENT = (
    'SELECT event_id AS id, tenant, sender AS "from", user_id, name, type, timestamp, text, context_id, state, '
    "error, received_at, parse_error, errors, raw FROM inbox ORDER BY seq DESC LIMIT $1"
)
_OPTED_OUT = f"SELECT 1 FROM optouts WHERE tenant = $1 AND {SAME_USER.format(col='user_id')} LIMIT 1"
_LAST_INBOUND = (
    "SELECT GREATEST((SELECT MAX(timestamp) FROM inbox WHERE tenant = $1 AND sender = $2 AND type <> 'system'), "
    "(SELECT MAX(timestamp) FROM inbox WHERE tenant = $1 AND user_id = $2 AND type <> 'system'))"
)
#: Both directions, each leg limited; merged and cut in Python (as the SQLite engine does).
_CONVERSATION = """
(SELECT 'in' AS direction, type, text, received_at AS at, NULL AS state, NULL::bytea AS payload, seq FROM inbox
 WHERE tenant = $1 AND sender = $2 ORDER BY seq DESC LIMIT $3)
UNION ALL
(SELECT 'in', type, text, received_at, NULL, NULL, seq FROM inbox
 WHERE tenant = $1 AND user_id = $2 AND sender IS NULL ORDER BY seq DESC LIMIT $3)
UNION ALL
(SELECT 'out', type, NULL, created_at, state, payload, seq FROM outbox
 WHERE tenant = $1 AND recipient = $2 AND type <> 'read' ORDER BY seq DESC LIMIT $3)
"""
_EVENTS = (
    "SELECT field, tenant, phone_number_id, waba_id, time, received_at, raw FROM events "
    "WHERE ($1::text IS NULL OR field = $1) AND ($2::text IS NULL OR tenant = $2) "
    "ORDER BY received_at DESC, seq DESC LIMIT $3"
)
_DEAD = (
    'SELECT id, tenant, recipient AS "to", type, attempts, error_code, error_message, error_details, '
    "error_fbtrace_id, needs_template, created_at FROM outbox WHERE state = 'failed' "
    "AND ($1::text IS NULL OR tenant = $1) ORDER BY created_at DESC, seq DESC LIMIT $2"
)
_AUDIT = (
    "SELECT at, tenant, outbox_id, type, recipient, http_status, error_code, fbtrace_id, latency_ms, "
    "outcome, trace_id FROM audit WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR outbox_id = $2) "
    "ORDER BY seq DESC LIMIT $3"
)


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A failed read (database down, pool closed, query refused) is a `StoreError`, as every store's."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise StoreError(f"read failed: {exc}") from exc


def _row(record: asyncpg.Record) -> Any:
    """The SQLite engine's row helpers read a row by column name (and `dict(row)`): a Record does both."""
    return record


class PostgresReads:
    """Every `Queries` read (and the outbox's two), on a pool the store opened and will close."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._clock = clock

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        with _reading():
            return list(await self._pool.fetch(sql, *args))

    async def _value(self, sql: str, *args: Any) -> Any:
        rows = await self._fetch(sql, *args)
        return rows[0][0] if rows else None

    async def message(self, outbox_id: str) -> dict[str, Any] | None:
        with _reading():
            return await outbox.message(self._pool, outbox_id)

    async def message_by_key(self, idem_key: str) -> dict[str, Any] | None:
        with _reading():
            return await outbox.message_by_key(self._pool, idem_key)

    async def recent_inbound(self, limit: int) -> list[dict[str, Any]]:
        return [inbox.recent(_row(row)) for row in await self._fetch(_RECENT, limit)]

    async def last_inbound(self, tenant: str, user: str) -> int | None:
        value = await self._value(_LAST_INBOUND, tenant, user)
        return int(value) if value else None

    async def opted_out(self, tenant: str, user: str) -> bool:
        return bool(await self._fetch(_OPTED_OUT, tenant, user))

    async def marketing_stopped(self, tenant: str, user: str) -> bool:
        value = await self._value(
            "SELECT value FROM preferences WHERE tenant = $1 AND user_id = $2 AND category = $3",
            tenant,
            user,
            event_log.MARKETING,
        )
        return bool(value == "stop")

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        return {row[0]: int(row[1]) for row in rows}

    async def outbox_by_tenant(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for tenant, state, count in await self._fetch("SELECT tenant, state, COUNT(*) FROM outbox GROUP BY 1, 2"):
            result.setdefault(tenant, {})[state] = int(count)
        return result

    async def delivery(self, since: float) -> dict[str, dict[str, int]]:
        rows = await self._fetch(
            "SELECT tenant, COUNT(*), COUNT(delivered_at), COUNT(read_at) FROM outbox "
            "WHERE sent_at >= $1 AND type <> 'read' GROUP BY tenant",
            since,
        )
        return {t: {"sent": int(n), "delivered": int(d), "read": int(r)} for t, n, d, r in rows}

    async def activity(self, since: float, minutes: int) -> dict[str, list[dict[str, Any]]]:
        return await per_minute.read(self._fetch, since, minutes)

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            'SELECT event_id AS id, tenant, sender AS "from", name, text, error, handled_at AS at '
            "FROM inbox WHERE state = 'failed' ORDER BY seq DESC LIMIT $1",
            limit,
        )
        return [dict(row) for row in rows]

    async def events(self, limit: int, field: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        return [event_log.as_json(_row(row)) for row in await self._fetch(_EVENTS, field, tenant, limit)]

    async def rejected(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT what, reason, received_at FROM rejected ORDER BY seq DESC LIMIT $1", limit)
        return [dict(row) for row in rows]

    async def replies_to(self, tenant: str, event_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            'SELECT id, recipient AS "to", type, state, payload FROM outbox WHERE tenant = $1 AND source_event_id = $2 '
            'ORDER BY idem_key COLLATE "C", seq',
            tenant,
            event_id,
        )
        return [{**dict(row), "payload": payload_json(row["payload"])} for row in rows]

    async def conversation(self, tenant: str, user: str, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(_CONVERSATION, tenant, user, limit)
        # both clocks are ours (received_at, created_at); within one instant, inbound first, then insertion order
        ordered = sorted(rows, key=lambda row: (row["at"], row["direction"] == "out", row["seq"]))
        return [conversation_item(_row(row)) for row in ordered][-limit:]

    async def dead_letters(self, limit: int, tenant: str | None = None) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_DEAD, tenant, limit)]

    async def audit(self, limit: int, tenant: str | None = None, outbox_id: str | None = None) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_AUDIT, tenant, outbox_id, limit)]
