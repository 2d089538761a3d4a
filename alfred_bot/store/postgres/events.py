"""Events (every webhook field other than messages and statuses) and the marketing preferences
they carry, on PostgreSQL: the same rows and rules as `alfred_bot.store.sqlite.events`, whose
engine-neutral reading of a `user_preferences` event both engines use.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from alfred_bot.parse import EventItem
from alfred_bot.store.postgres.text import safe, safe_row
from alfred_bot.store.sqlite import events as neutral

MARKETING = neutral.MARKETING

_INSERT_EVENTS = """
INSERT INTO events (key, field, tenant, phone_number_id, waba_id, raw, received_at, time)
SELECT k, f, t, p, w, r, $7, tm
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $8::bigint[])
    WITH ORDINALITY AS u(k, f, t, p, w, r, tm, ord)
ORDER BY ord
ON CONFLICT (key) DO NOTHING
RETURNING key
"""
#: Latest wins by Meta's timestamp; on a tie the later arrival wins.
_UPSERT_PREFERENCE = """
INSERT INTO preferences (tenant, user_id, category, value, detail, timestamp, received_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (tenant, user_id, category) DO UPDATE SET value = excluded.value, detail = excluded.detail,
    timestamp = excluded.timestamp, received_at = excluded.received_at
WHERE excluded.timestamp >= preferences.timestamp
"""


async def insert(conn: asyncpg.Connection, events: Sequence[EventItem], now: float) -> None:
    """Store new events (one statement); a new `user_preferences` event also records each user's choice."""
    if not events:
        return
    columns = [
        [safe(e.key) for e in events],
        [safe(e.field) for e in events],
        [safe(e.tenant) for e in events],
        [safe(e.phone_number_id) for e in events],
        [safe(e.waba_id) for e in events],
        [e.raw for e in events],
    ]
    inserted = {r["key"] for r in await conn.fetch(_INSERT_EVENTS, *columns, now, [e.time for e in events])}
    for event in events:
        if safe(event.key) not in inserted:
            continue
        inserted.discard(safe(event.key))  # the same event twice in one body is new once
        if event.field == "user_preferences" and event.tenant is not None:
            # engine-neutral: reads the event's JSON into (tenant, user, category, value, detail, at, now) rows
            rows = neutral.preference_rows(event, event.tenant, now)
            if rows:
                await conn.executemany(_UPSERT_PREFERENCE, [safe_row(r) for r in rows])
