"""The SQLite store's read models (the `Queries` role, and `recent_inbound`): plain SELECTs on the
reader connection, which WAL lets run beside the group-commit writer.

Kept apart from `sqlite.SqliteStore` (which inherits them) so each class stays one concern:
the store class owns the file, the writer and the lifecycle; this one only reads.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import aiosqlite

from alfred_bot.store.base import StoreError
from alfred_bot.store.sqlite import activity as per_minute
from alfred_bot.store.sqlite import events as event_log
from alfred_bot.store.sqlite import inbox, outbox

_CONVERSATION = """
SELECT * FROM (SELECT 'in' AS direction, type, text, received_at AS at, NULL AS state, NULL AS payload, seq FROM inbox
               WHERE tenant = ? AND sender = ? ORDER BY seq DESC LIMIT ?)
UNION ALL
SELECT * FROM (SELECT 'in', type, text, received_at, NULL, NULL, seq FROM inbox
               WHERE tenant = ? AND user_id = ? AND sender IS NULL ORDER BY seq DESC LIMIT ?)
UNION ALL
SELECT * FROM (SELECT 'out', type, NULL, created_at, state, payload, rowid FROM outbox
               WHERE tenant = ? AND recipient = ? AND type != 'read' ORDER BY rowid DESC LIMIT ?)
"""


def conversation_item(row: sqlite3.Row) -> dict[str, Any]:
    item: dict[str, Any] = {"direction": row["direction"], "type": row["type"], "text": row["text"], "at": row["at"]}
    if row["direction"] == "out":
        item["state"] = row["state"]
        item["text"] = outbox.payload_text(row["payload"], row["type"])
    return item


class SqliteReads:
    """Read queries over `_reader` (opened and closed by the subclass)."""

    _reader: aiosqlite.Connection | None = None

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        if self._reader is None:
            raise StoreError("the store is closed")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"read failed: {exc}") from exc

    async def recent_inbound(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(inbox.RECENT, (limit,))
        return [inbox.recent(row) for row in rows]

    async def message(self, outbox_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(
            'SELECT id, tenant, recipient AS "to", type, state, attempts, wamid, error_code, error_message, '
            "error_details, error_fbtrace_id, needs_template, created_at, sent_at, delivered_at, read_at, send_at "
            "FROM outbox WHERE id = ?",
            (outbox_id,),
        )
        return dict(rows[0]) if rows else None

    async def message_by_key(self, idem_key: str) -> dict[str, Any] | None:
        """Keys are unique per tenant; the API's keys name their tenant (`api:<tenant>:<key>`)."""
        rows = await self._fetch("SELECT id FROM outbox WHERE idem_key = ? ORDER BY rowid LIMIT 1", (idem_key,))
        return await self.message(rows[0][0]) if rows else None

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT state, COUNT(*) FROM outbox GROUP BY state", ())
        return {row[0]: int(row[1]) for row in rows}

    async def outbox_by_tenant(self) -> dict[str, dict[str, int]]:
        rows = await self._fetch("SELECT tenant, state, COUNT(*) FROM outbox GROUP BY tenant, state", ())
        result: dict[str, dict[str, int]] = {}
        for tenant, state, count in rows:
            result.setdefault(tenant, {})[state] = int(count)
        return result

    async def delivery(self, since: float) -> dict[str, dict[str, int]]:
        rows = await self._fetch(
            "SELECT tenant, COUNT(*), COUNT(delivered_at), COUNT(read_at) FROM outbox "
            "WHERE sent_at >= ? AND type != 'read' GROUP BY tenant",
            (since,),
        )
        return {t: {"sent": int(n), "delivered": int(d), "read": int(r)} for t, n, d, r in rows}

    async def activity(self, since: float, minutes: int) -> dict[str, list[dict[str, Any]]]:
        return await per_minute.read(self._fetch, since, minutes)

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            'SELECT event_id AS id, tenant, sender AS "from", name, text, error, handled_at AS at '
            "FROM inbox WHERE state = 'failed' ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [dict(row) for row in rows]

    async def events(self, limit: int, field: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        rows = await self._fetch(*event_log.query(limit, field, tenant))
        return [event_log.as_json(row) for row in rows]

    async def rejected(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT what, reason, received_at FROM rejected ORDER BY rowid DESC LIMIT ?", (limit,))
        return [dict(row) for row in rows]

    async def replies_to(self, tenant: str, event_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            'SELECT id, recipient AS "to", type, state, payload FROM outbox WHERE tenant = ? AND source_event_id = ? '
            "ORDER BY idem_key, rowid",
            (tenant, event_id),
        )
        return [{**dict(row), "payload": outbox.payload_json(row["payload"])} for row in rows]

    async def conversation(self, tenant: str, user: str, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(_CONVERSATION, (tenant, user, limit, tenant, user, limit, tenant, user, limit))
        # both clocks are ours (received_at, created_at); within one instant, insertion order
        ordered = sorted(rows, key=lambda row: (row["at"], row["direction"] == "out", row["seq"]))
        return [conversation_item(row) for row in ordered][-limit:]

    async def dead_letters(self, limit: int, tenant: str | None = None) -> list[dict[str, Any]]:
        rows = await self._fetch(
            'SELECT id, tenant, recipient AS "to", type, attempts, error_code, error_message, error_details, '
            "error_fbtrace_id, needs_template, created_at FROM outbox WHERE state = 'failed' "
            "AND (?1 IS NULL OR tenant = ?1) ORDER BY created_at DESC LIMIT ?2",
            (tenant, limit),
        )
        return [dict(row) for row in rows]

    async def audit(self, limit: int, tenant: str | None = None, outbox_id: str | None = None) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT at, tenant, outbox_id, type, recipient, http_status, error_code, fbtrace_id, latency_ms, "
            "outcome, trace_id FROM audit WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR outbox_id = ?2) "
            "ORDER BY seq DESC LIMIT ?3",
            (tenant, outbox_id, limit),
        )
        return [dict(row) for row in rows]
