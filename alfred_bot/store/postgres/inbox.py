"""Inbox writes on PostgreSQL: ingest, complete (with replies and consent), and per-user leases.

Same rows and the same dedupe as the SQLite engine (a message per (wamid, phone number id), a
status, an event, a rejected item per key); the row values and the decoding of a pending row are
the engine-neutral functions of `alfred_bot.store.sqlite.inbox`, so both engines store and give
back exactly the same thing. Every function runs inside the caller's transaction, and batches a
body's items into one statement per table (`unnest`), so a webhook costs a handful of round trips.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Any, cast

import asyncpg

from alfred_bot.parse import InboundItem, MalformedItem, ParsedBody, StatusItem
from alfred_bot.store.base import Completion, PendingMessage
from alfred_bot.store.postgres import dialogs, outbox
from alfred_bot.store.postgres import events as event_log
from alfred_bot.store.postgres import feed as feed_log
from alfred_bot.store.postgres.text import safe, safe_row
from alfred_bot.store.sqlite import inbox as neutral

log = logging.getLogger("alfred.store")

INBOX_CHANNEL = "alfred_inbox"
OUTBOX_CHANNEL = outbox.CHANNEL

#: Column types, in the order of `neutral.row(...)`: one array per column, inserted in one statement.
_INBOX_TYPES = (
    "text", "text", "text", "text", "text", "text", "text", "text", "bigint", "text", "text", "bytea", "text",
    "text", "float8", "text", "text", "text",
)  # fmt: skip
_INSERT_MESSAGES = f"""
INSERT INTO inbox (event_id, tenant, phone_number_id, sender, user_id, wa_id, name, type, timestamp, text,
                   context_id, raw, state, error, received_at, trace_id, parse_error, errors)
SELECT c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17, c18
FROM unnest({", ".join(f"${n}::{t}[]" for n, t in enumerate(_INBOX_TYPES, 1))})
    WITH ORDINALITY AS t(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17, c18, ord)
ORDER BY ord
ON CONFLICT (event_id, phone_number_id) DO NOTHING
RETURNING event_id, phone_number_id
"""
_INSERT_STATUSES = """
INSERT INTO statuses (key, wamid, tenant, phone_number_id, status, timestamp, recipient_id, error_code, raw,
                      received_at, recipient_user_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
                     $8::bigint[], $9::bytea[], $10::float8[], $11::text[])
ON CONFLICT (key) DO NOTHING
RETURNING key
"""
_INSERT_REJECTED = """
INSERT INTO rejected (key, what, reason, raw, received_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING
"""
_COLUMNS = "seq, tenant, phone_number_id, raw, name, wa_id, user_id, trace_id, received_at, errors, parse_error"
PENDING = f"SELECT {_COLUMNS} FROM inbox WHERE state = 'pending' AND seq > $1 ORDER BY seq LIMIT $2"

#: `$2` or any other id the same person wrote from to tenant `$1` (SQLite's `_SAME_USER`): a phone
#: number and the username id Meta sent beside it address one person, for opt-outs as for the window.
SAME_USER = (
    "({col} = $2 OR {col} IN (SELECT i.sender FROM inbox i WHERE i.tenant = $1 AND i.user_id = $2 "
    "AND i.sender IS NOT NULL) OR {col} IN (SELECT i.user_id FROM inbox i WHERE i.tenant = $1 AND i.sender = $2 "
    "AND i.user_id IS NOT NULL))"
)


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to one list per column, for `unnest` (an empty batch gives empty lists)."""
    return [[r[i] for r in rows] for i in range(width)]


async def _insert_messages(conn: asyncpg.Connection, messages: list[InboundItem], now: float) -> list[InboundItem]:
    """Insert the body's messages; the routed, pending ones not seen before (each once)."""
    if not messages:
        return []
    rows = [safe_row(neutral.row(item, now)) for item in messages]
    inserted = {(r["event_id"], r["phone_number_id"]) for r in await conn.fetch(_INSERT_MESSAGES, *_columns(rows, 18))}
    fresh = []
    for item in messages:
        key = (safe(item.message.id), safe(item.phone_number_id))
        if key in inserted:
            inserted.discard(key)  # a message repeated inside one body is new once
            if neutral.state_of(item)[0] == "pending":
                fresh.append(item)
    return fresh


def _status_row(item: StatusItem, now: float) -> tuple[Any, ...]:
    s = item.status
    code = s.errors[0].code if s.errors else None
    return (
        item.key, s.id, item.tenant, item.phone_number_id, s.status, s.timestamp, s.recipient_id, code, item.raw,
        now, s.recipient_user_id,
    )  # fmt: skip


async def _insert_statuses(
    conn: asyncpg.Connection, statuses: list[StatusItem], now: float, feed: bool = False
) -> list[StatusItem]:
    """Insert new statuses; each new one of a known tenant moves its outbox row forward."""
    if not statuses:
        return []
    rows = [safe_row(_status_row(item, now)) for item in statuses]
    inserted = {r["key"] for r in await conn.fetch(_INSERT_STATUSES, *_columns(rows, 11))}
    fresh = []
    for item in statuses:
        if safe(item.key) in inserted:
            inserted.discard(safe(item.key))
            if item.tenant is not None:
                fresh.append(item)
    # rows are locked in one global order: two bodies with the same wamids in opposite orders
    # would otherwise deadlock (one aborted after a second, a 503, Meta's retry)
    for item in sorted(fresh, key=lambda s: (s.tenant or "", s.status.id)):
        await outbox.apply_status(conn, item.tenant or "", item.status, feed=feed)
    return fresh


async def ingest(
    conn: asyncpg.Connection, body: ParsedBody, now: float, *, feed: bool = False
) -> list[InboundItem | StatusItem]:
    """Store everything in `body` (one transaction: the caller's); the new routed messages and
    statuses. New pending messages wake every node's dispatcher (NOTIFY, delivered at commit)."""
    if feed:  # the event bus: entries for what is new in this body, in this transaction
        await feed_log.ingest(conn, body, now)
    messages = await _insert_messages(conn, body.messages, now)
    fresh: list[InboundItem | StatusItem] = [*messages]
    fresh += await _insert_statuses(conn, body.statuses, now, feed)
    await event_log.insert(conn, body.events, now)
    if body.rejected:
        rejected = [safe_row((r.key, r.what, r.reason[:1000], r.raw, now)) for r in body.rejected]
        await conn.executemany(_INSERT_REJECTED, rejected)
    if messages:
        await conn.execute(f"NOTIFY {INBOX_CHANNEL}")
    return fresh


async def _finish(conn: asyncpg.Connection, done: Completion, now: float) -> bool:
    """Move the pending row to its final state and end its lease; False if it was not pending.

    With the phone number id the row is exact; without it only a wamid no other number used."""
    sets = "state = $1, error = $2, handled_at = $3, owner = NULL, lease_until = NULL"
    if done.phone_number_id is not None:
        where = "event_id = $4 AND phone_number_id = $5"
        params: tuple[Any, ...] = (done.event_id, done.phone_number_id)
    else:
        where = "event_id = $4 AND (SELECT COUNT(*) FROM inbox c WHERE c.event_id = $4) = 1"
        params = (done.event_id,)
    status = await conn.execute(
        f"UPDATE inbox SET {sets} WHERE {where} AND state = 'pending'",
        *safe_row((done.state, done.error, now, *params)),
    )
    return bool(status == "UPDATE 1")


async def complete(conn: asyncpg.Connection, done: Completion, now: float, *, feed: bool = False) -> bool:
    """Finish a pending message, queue its replies and record consent, all in the caller's transaction."""
    if not await _finish(conn, done, now):
        return False
    if done.replies:
        await outbox.insert_rows(conn, done.replies, now, feed=feed)
        await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")
    await dialogs.write(conn, done, now)  # the state goes with the replies, or neither does
    if done.consent == "out":
        await conn.execute(
            "INSERT INTO optouts (tenant, user_id, at) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant, user_id) DO UPDATE SET at = excluded.at",
            safe(done.tenant), safe(done.user), now,
        )  # fmt: skip
        await conn.execute(_SKIP_CAMPAIGN_SENDS, safe(done.tenant), safe(done.user))
    elif done.consent == "in":
        same = SAME_USER.format(col="o.user_id")
        await conn.execute(f"DELETE FROM optouts o WHERE o.tenant = $1 AND {same}", safe(done.tenant), safe(done.user))
    return True


#: A user who opts out is sent nothing more of any campaign (see the SQLite engine's twin).
_SKIP_CAMPAIGN_SENDS = (
    "UPDATE outbox o SET state = 'skipped', error_message = 'the user opted out after this send was queued' "
    "WHERE o.tenant = $1 AND o.campaign_id IS NOT NULL AND o.state IN ('queued', 'scheduled', 'paused', 'sending') "
    "AND o.recipient IN (SELECT $2::text UNION SELECT i.sender FROM inbox i WHERE i.tenant = $1 AND i.user_id = $2 "
    "AND i.sender IS NOT NULL UNION SELECT i.user_id FROM inbox i WHERE i.tenant = $1 AND i.sender = $2 "
    "AND i.user_id IS NOT NULL)"
)


def decoded(rows: Sequence[asyncpg.Record]) -> list[PendingMessage]:
    """Pending rows as the dispatcher's items; a row a newer model refuses is skipped, never blocking."""
    pending: list[PendingMessage] = []
    for row in rows:
        try:
            # `pending_item` reads columns by name only, which an asyncpg Record supports as sqlite3.Row does
            pending.append(PendingMessage(row["seq"], neutral.pending_item(cast(sqlite3.Row, row))))
        except MalformedItem as exc:
            log.error("pending message seq %d cannot be decoded, skipped: %s", row["seq"], exc)
    return pending


#: The oldest pending message of each user (tenant, sender or user id) that no live node holds:
#: a lease counts while it has not run out and its owner still heartbeats. `SKIP LOCKED`: two
#: nodes taking at once never wait for each other, and never both get one message.
#: The plan must not depend on fresh statistics (a burst of inserts outruns autovacuum's ANALYZE):
#: "no older pending message of the same user" is an anti-join probing `inbox_pending_user` (with
#: 10k pending rows 2-4 ms, where `seq = (SELECT min(seq) …)` took 60 ms), and `= ANY(ARRAY(…))`
#: keeps the update on the primary key.
TAKE = f"""
UPDATE inbox SET owner = $1, lease_until = $2
WHERE seq = ANY(ARRAY(
    SELECT h.seq FROM inbox h
    WHERE h.state = 'pending'
      AND NOT EXISTS (SELECT 1 FROM inbox e WHERE e.state = 'pending' AND e.tenant = h.tenant
                   AND COALESCE(e.sender, e.user_id) = COALESCE(h.sender, h.user_id) AND e.seq < h.seq)
      AND (h.owner IS NULL OR h.lease_until IS NULL OR h.lease_until <= $3
           OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = h.owner AND n.seen_at >= $4))
    ORDER BY h.seq
    LIMIT $5
    FOR UPDATE OF h SKIP LOCKED
))
RETURNING {_COLUMNS}
"""


async def take(
    conn: asyncpg.Connection, node: str, limit: int, *, now: float, lease: float, dead_before: float
) -> list[PendingMessage]:
    """Lease up to `limit` users' next messages to `node` until `now + lease`, oldest first."""
    rows = await conn.fetch(TAKE, node, now + lease, now, dead_before, limit)
    return decoded(sorted(rows, key=lambda r: int(r["seq"])))


async def release(conn: asyncpg.Connection, node: str, event_id: str, phone_number_id: str) -> None:
    """End this node's lease on one pending message (see `Cluster.release`)."""
    await conn.execute(
        "UPDATE inbox SET owner = NULL, lease_until = NULL "
        "WHERE event_id = $1 AND phone_number_id = $2 AND owner = $3 AND state = 'pending'",
        safe(event_id),
        safe(phone_number_id),
        node,
    )
