"""Events (every webhook field other than messages and statuses) and the users' marketing
preferences they carry, as functions run on the writer thread or on the reader.

Events are kept whole, unknown fields too: Meta adds fields, and an operator must be able to read
what arrived (`GET /api/events`). A `user_preferences` event also updates the `preferences` table
(latest by Meta's own timestamp wins, whatever order the webhooks arrive in), which campaigns ask
through `Store.marketing_stopped`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from alfred_bot.parse import EventItem

_INSERT_EVENT = """
INSERT INTO events (key, field, tenant, phone_number_id, waba_id, raw, received_at, time)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING
"""
#: Latest wins by Meta's timestamp; on a tie the later arrival wins.
_UPSERT_PREFERENCE = """
INSERT INTO preferences (tenant, user, category, value, detail, timestamp, received_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(tenant, user, category) DO UPDATE SET value = excluded.value, detail = excluded.detail,
    timestamp = excluded.timestamp, received_at = excluded.received_at
WHERE excluded.timestamp >= preferences.timestamp
"""
MARKETING = "marketing_messages"


class _Preference(msgspec.Struct):
    """One item of `value.user_preferences[]` (Meta: Webhooks > user_preferences reference)."""

    wa_id: str | None = None
    user_id: str | None = None  # username-only users (2026) may come without a wa_id
    category: str | None = None
    value: str | None = None
    detail: str | None = None
    timestamp: int | str | None = None


class _Preferences(msgspec.Struct):
    user_preferences: list[_Preference] = []


_preferences = msgspec.json.Decoder(_Preferences)


def insert(conn: sqlite3.Connection, events: Sequence[EventItem], now: float) -> None:
    """Store new events; a new `user_preferences` event also records each user's choice."""
    for event in events:
        row = (event.key, event.field, event.tenant, event.phone_number_id, event.waba_id, event.raw, now, event.time)
        fresh = conn.execute(_INSERT_EVENT, row).rowcount == 1
        if fresh and event.field == "user_preferences" and event.tenant is not None:
            conn.executemany(_UPSERT_PREFERENCE, preference_rows(event, event.tenant, now))


def _timestamp(value: int | str | None) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def preference_rows(event: EventItem, tenant: str, now: float) -> list[tuple[Any, ...]]:
    """Usable items only: a user, a value; the time is Meta's, else the entry's, else ours."""
    try:
        items = _preferences.decode(event.raw).user_preferences
    except (msgspec.ValidationError, msgspec.DecodeError):
        return []  # the event itself is kept: an operator can still read it
    rows = []
    for p in items:
        user = p.wa_id or p.user_id
        if not user or not p.value:
            continue
        at = _timestamp(p.timestamp) or event.time or int(now)
        rows.append((tenant, user, p.category or MARKETING, p.value, p.detail, at, now))
    return rows


def query(limit: int, field: str | None, tenant: str | None) -> tuple[str, tuple[Any, ...]]:
    """The newest events first, optionally of one field and/or one tenant."""
    where, params = [], []
    for column, wanted in (("field", field), ("tenant", tenant)):
        if wanted is not None:
            where.append(f"{column} = ?")
            params.append(wanted)
    sql = "SELECT field, tenant, phone_number_id, waba_id, time, received_at, raw FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + " ORDER BY received_at DESC, rowid DESC LIMIT ?", (*params, limit)


def as_json(row: sqlite3.Row) -> dict[str, Any]:
    """One event for the API; `value` is the decoded JSON (None once retention removed it)."""
    item = {k: row[k] for k in ("field", "tenant", "phone_number_id", "waba_id", "time", "received_at")}
    try:
        item["value"] = msgspec.json.decode(row["raw"]) if row["raw"] else None
    except msgspec.DecodeError:
        item["value"] = None
    return item
