"""Outbox writes, as functions run on the writer thread inside a group transaction.

The lease lives in `due_at`: a claim sets `state = 'sending'` and `due_at = now + lease`, so a
row whose process died mid-send becomes claimable again by itself once the lease runs out.
Every settle is conditional on `state = 'sending'` and the claim's attempt count, so a late
answer for a row that has been re-claimed or settled already changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

import msgspec

from alfred_bot.models import Status
from alfred_bot.store.base import OutboxJob, OutboxRow, Settlement
from alfred_bot.store.sqlite import feed as feed_log

#: Delivery progress: a status only ever moves a row forward (webhooks arrive out of order).
RANK = {"queued": 0, "sending": 0, "sent": 1, "delivered": 2, "read": 3, "played": 4}
_STAMP = {"delivered": "delivered_at", "read": "read_at", "played": "read_at"}

_INSERT = """
INSERT INTO outbox (id, idem_key, tenant, recipient, type, payload, due_at, created_at, source_event_id, priority,
                    trace_id, origin_at, send_at, campaign_id, state)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(tenant, idem_key) DO NOTHING
"""
PENDING = "state IN ('queued', 'sending')"
#: A settle applies only to the claim it answers: same row, still leased, same attempt.
_LEASED = "state = 'sending' AND attempts = ?"
_ERRORS = "error_code = ?, error_message = ?, error_details = ?, error_fbtrace_id = ?, error_http_status = ?"


def insert_rows(
    conn: sqlite3.Connection, rows: tuple[OutboxRow, ...] | list[OutboxRow], now: float, *, feed: bool = False
) -> None:
    values = [
        (
            r.id,
            r.idem_key,
            r.tenant,
            r.recipient,
            r.type,
            r.payload,
            max(now, r.send_at or now),
            now,
            r.source_event_id,
            r.priority,
            r.trace_id,
            r.origin_at,
            r.send_at,
            r.campaign_id,
            scheduled(r, now),
        )
        for r in rows
    ]
    conn.executemany(_INSERT, values)
    if feed:  # the event bus: one "queued" entry per row inserted, in this transaction
        feed_log.queued(conn, rows, now)


def scheduled(row: OutboxRow, now: float) -> str:
    """A row to send later waits as `scheduled`, outside the queue (see `OutboxRow.send_at`)."""
    return "scheduled" if row.send_at is not None and row.send_at > now else "queued"


def enqueue(conn: sqlite3.Connection, rows: list[OutboxRow], now: float, *, feed: bool = False) -> list[str]:
    """Insert rows; for an idem_key the tenant used before, return the first row's id instead."""
    insert_rows(conn, rows, now, feed=feed)
    ids = []
    for row in rows:
        found = conn.execute(
            "SELECT id FROM outbox WHERE tenant = ? AND idem_key = ?", (row.tenant, row.idem_key)
        ).fetchone()
        ids.append(found[0])
    return ids


#: A scheduled send's age (`outbound.max_age_seconds`) counts from its `send_at`, not from when it was queued.
_RETURNING = (
    "RETURNING rowid, id, tenant, recipient, type, payload, attempts, MAX(created_at, COALESCE(send_at, 0)), "
    "trace_id, origin_at"
)
_LEASE = "UPDATE outbox SET state = 'sending', attempts = attempts + 1, due_at = ? WHERE id IN ("
#: Read receipts and typing indicators: best-effort, never in a user's line of ordered rows.
RECEIPT = "type = 'read'"


def claim(
    conn: sqlite3.Connection,
    now: float,
    quotas: dict[str, int],
    lease: float,
    held: frozenset[str],
    *,
    receipts: Mapping[str, int] | None = None,
    receipt_max_age: float | None = None,
    sweep: bool = True,
) -> list[OutboxJob]:
    """Lease due rows per tenant: conversation before campaigns, oldest first, and only a user's
    oldest pending row (so a retried or deferred message is never overtaken by a later one).

    Read receipts stand apart (see `Outbox.claim`): superseded and stale ones are dropped here and
    returned as notices (`dropped` set); the rest are leased newest first, after the other rows,
    from `receipts[tenant]` if given, else from what the tenant's quota left. The drops run before
    every claim of receipts, and otherwise only when `sweep` is set (the engine sets it a few times
    a second): under a backlog with no spare budget, claims come many times a second and none of
    them takes a receipt."""
    jobs: list[OutboxJob] = []
    for tenant, quota in quotas.items():
        claimed = _claim_rows(conn, tenant, now, quota, lease=lease, held=held) if quota > 0 else []
        jobs.extend(claimed)
        room = receipts.get(tenant, 0) if receipts is not None else quota - len(claimed)
        if room > 0 or sweep:
            jobs.extend(_drop_receipts(conn, tenant, now, receipt_max_age))
        if room > 0:
            jobs.extend(_claim_receipts(conn, tenant, now, room, lease=lease, held=held))
    return jobs


def _held_sql(held: frozenset[str]) -> str:
    return f"AND o.id NOT IN ({','.join('?' * len(held))})" if held else ""


def _claim_rows(
    conn: sqlite3.Connection, tenant: str, now: float, quota: int, *, lease: float, held: frozenset[str]
) -> list[OutboxJob]:
    rows = conn.execute(
        # `+o.due_at`: keep the planner on outbox_claim (ordered by priority, due_at) instead of
        # sorting every due row of a large backlog through a temp B-tree to take a few.
        f"{_LEASE}SELECT o.id FROM outbox o WHERE o.tenant = ? AND o.{PENDING} AND +o.due_at <= ? "
        f"AND NOT o.{RECEIPT} {_held_sql(held)} "
        f"AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.tenant = o.tenant AND e.recipient = o.recipient "
        # a user's rows go one at a time in (priority, rowid) order: a reply never waits for the
        # user's campaign send, and never leaves beside it; any row in flight holds back all
        f"AND e.{PENDING} AND NOT e.{RECEIPT} AND e.rowid <> o.rowid "
        "AND ((e.priority < o.priority OR (e.priority = o.priority AND e.rowid < o.rowid)) "
        "OR e.state = 'sending')) "
        f"ORDER BY o.priority, o.due_at, o.rowid LIMIT ?) {_RETURNING}",
        (now + lease, tenant, now, *sorted(held), quota),
    ).fetchall()
    rows.sort(key=lambda r: r[0])
    return [OutboxJob(*r[1:]) for r in rows]


def _claim_receipts(
    conn: sqlite3.Connection, tenant: str, now: float, room: int, *, lease: float, held: frozenset[str]
) -> list[OutboxJob]:
    """The newest receipts first: under load the fresh ones are worth sending, the old ones age out."""
    rows = conn.execute(
        f"{_LEASE}SELECT o.id FROM outbox o WHERE o.tenant = ? AND o.{PENDING} AND o.{RECEIPT} "
        f"AND +o.due_at <= ? {_held_sql(held)} ORDER BY o.rowid DESC LIMIT ?) {_RETURNING}",
        (now + lease, tenant, now, *sorted(held), room),
    ).fetchall()
    rows.sort(key=lambda r: -r[0])
    return [OutboxJob(*r[1:]) for r in rows]


def _drop_receipts(conn: sqlite3.Connection, tenant: str, now: float, max_age: float | None) -> list[OutboxJob]:
    """Drop queued receipts a newer receipt of the same user makes pointless (marking the newest
    message read marks the earlier ones), then those older than `max_age` s."""
    superseded = conn.execute(
        "UPDATE outbox SET state = 'dropped', error_message = 'superseded by a newer read receipt' WHERE id IN ("
        f"SELECT o.id FROM outbox o WHERE o.tenant = ? AND o.{PENDING} AND o.state = 'queued' AND o.{RECEIPT} "
        f"AND EXISTS (SELECT 1 FROM outbox n WHERE n.tenant = o.tenant AND n.recipient = o.recipient "
        f"AND n.{PENDING} AND n.{RECEIPT} AND n.rowid > o.rowid)) {_RETURNING}",
        (tenant,),
    ).fetchall()
    stale = []
    if max_age is not None:
        stale = conn.execute(
            "UPDATE outbox SET state = 'dropped', error_message = 'stale read receipt' WHERE id IN ("
            f"SELECT o.id FROM outbox o WHERE o.tenant = ? AND o.{PENDING} AND o.state = 'queued' AND o.{RECEIPT} "
            f"AND o.created_at < ?) {_RETURNING}",
            (tenant, now - max_age),
        ).fetchall()
    notices = [(r, "superseded") for r in superseded] + [(r, "stale") for r in stale]
    return [msgspec.structs.replace(OutboxJob(*r[1:]), dropped=why) for r, why in notices]


def _error_values(r: Settlement) -> tuple[Any, ...]:
    return (r.error_code, r.error_message, r.error_details, r.error_fbtrace_id, r.error_http_status)


_AUDIT = """
INSERT INTO audit (at, tenant, outbox_id, type, recipient, http_status, error_code, fbtrace_id, latency_ms, outcome,
                   trace_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, (SELECT trace_id FROM outbox WHERE id = ?))
"""


def settle(conn: sqlite3.Connection, r: Settlement, now: float, *, feed: bool = False) -> None:
    """Record one send's end (and its audit entry); ignored unless the row is still leased (`sending`)."""
    if r.audit is not None:
        a = r.audit
        conn.execute(
            _AUDIT,
            (now, a.tenant, r.id, a.type, a.recipient, a.http_status, a.error_code, a.fbtrace_id, a.latency_ms,
             a.outcome, r.id),
        )
    if r.state == "sent":
        _settle_sent(conn, r, now, feed)
    elif r.state == "queued":
        due = r.due_at if r.due_at is not None else now
        cur = conn.execute(
            f"UPDATE outbox SET state = 'queued', due_at = ?, attempts = attempts - ?, {_ERRORS} "
            f"WHERE id = ? AND {_LEASED} RETURNING rowid, tenant, recipient",
            (due, int(r.refund), *_error_values(r), r.id, r.attempts),
        ).fetchone()
        if cur is not None and due > now:
            _defer_followers(conn, cur[0], cur[1], cur[2], due)
    elif r.state == "dropped":
        conn.execute(f"UPDATE outbox SET state = 'dropped', {_ERRORS} WHERE id = ? AND {_LEASED}",
                     (*_error_values(r), r.id, r.attempts))
    else:
        failed = conn.execute(
            f"UPDATE outbox SET state = 'failed', needs_template = ?, {_ERRORS} WHERE id = ? AND {_LEASED}",
            (int(r.needs_template), *_error_values(r), r.id, r.attempts),
        ).rowcount
        if failed and feed:
            feed_log.outcome(conn, r.id, "failed", now)


def _settle_sent(conn: sqlite3.Connection, r: Settlement, now: float, feed: bool) -> None:
    sent = conn.execute(
        f"UPDATE outbox SET state = 'sent', wamid = ?, sent_at = ?, {_ERRORS} WHERE id = ? AND {_LEASED} "
        "RETURNING tenant",
        (r.wamid, now, None, None, None, None, None, r.id, r.attempts),
    ).fetchone()
    if sent is not None and feed:  # the event bus: "sent" before any status replayed below
        feed_log.outcome(conn, r.id, "sent", now)
    if sent is not None and r.wamid:
        _replay_statuses(conn, sent[0], r.wamid, feed=feed)


def _defer_followers(conn: sqlite3.Connection, rowid: int, tenant: str, recipient: str, due: float) -> None:
    """A user's later rows wait for the deferred head anyway; make them due no earlier than it, so
    a claim never walks a long run of due-but-blocked rows (the `state IN` term keeps the
    partial index `outbox_user` usable)."""
    conn.execute(
        f"UPDATE outbox SET due_at = ? WHERE tenant = ? AND recipient = ? AND {PENDING} AND state = 'queued' "
        "AND rowid > ? AND due_at < ?",
        (due, tenant, recipient, rowid, due),
    )


def _replay_statuses(conn: sqlite3.Connection, tenant: str, wamid: str, *, feed: bool = False) -> None:
    """Statuses can arrive before we recorded the wamid: apply those this tenant's number got."""
    rows = conn.execute(
        "SELECT status, timestamp, error_code FROM statuses WHERE wamid = ? AND tenant = ?", (wamid, tenant)
    ).fetchall()
    for state, timestamp, code in rows:
        _advance(conn, tenant, wamid, state, at=float(timestamp), error=(code, None, None), feed=feed)


def apply_status(conn: sqlite3.Connection, tenant: str, status: Status, *, feed: bool = False) -> None:
    """Move the tenant's outbox row with this wamid forward; a `failed` status fails a row not yet
    delivered. Scoped by tenant: a body signed for one number can never touch another's sends."""
    error = status.errors[0] if status.errors else None
    details = error.error_data.details if error and error.error_data else None
    fields = (error.code, error.message or error.title, details) if error else (None, None, None)
    _advance(conn, tenant, status.id, status.status, at=float(status.timestamp), error=fields, feed=feed)


def _advance(
    conn: sqlite3.Connection, tenant: str, wamid: str, state: str, *, at: float, error: tuple[Any, ...],
    feed: bool = False,
) -> None:
    row = conn.execute("SELECT id, state, type FROM outbox WHERE wamid = ? AND tenant = ?", (wamid, tenant)).fetchone()
    if row is None:
        return
    outbox_id, current, kind = row
    if current == "failed" or (state == "played" and kind != "audio"):
        return  # `played` exists only for voice/audio messages: it never moves a text sideways
    if state == "failed":
        if RANK.get(current, 0) <= RANK["sent"]:
            _fail(conn, outbox_id, error, at, feed)
        return
    if state not in RANK or RANK[state] <= RANK.get(current, 0):
        return
    stamp = _STAMP.get(state)
    sets = "state = ?, delivered_at = COALESCE(delivered_at, ?)" if stamp else "state = ?"
    params: tuple[Any, ...] = (state, at) if stamp else (state,)
    if stamp == "read_at":
        sets += ", read_at = COALESCE(read_at, ?)"
        params += (at,)
    conn.execute(f"UPDATE outbox SET {sets} WHERE id = ?", (*params, outbox_id))
    if feed:  # the event bus: delivered / read / played
        feed_log.outcome(conn, outbox_id, state, at)


def _fail(conn: sqlite3.Connection, outbox_id: str, error: tuple[Any, ...], at: float, feed: bool) -> None:
    """A `failed` status for a row not yet delivered."""
    code, message, details = error
    conn.execute(
        "UPDATE outbox SET state = 'failed', error_code = ?, error_message = ?, error_details = ?, "
        "needs_template = ? WHERE id = ?",
        (code, message, details, int(code in (131047, 470)), outbox_id),
    )
    if feed:
        feed_log.outcome(conn, outbox_id, "failed", at)


def retry_failed(conn: sqlite3.Connection, ids: list[str] | None, now: float) -> int:
    """Give failed sends a fresh start: queued, due now, attempts and error cleared."""
    reset = (
        "UPDATE outbox SET state = 'queued', due_at = ?, attempts = 0, error_code = NULL, error_message = NULL, "
        "error_details = NULL, error_fbtrace_id = NULL, error_http_status = NULL, needs_template = 0 "
        "WHERE state = 'failed'"
    )
    if ids is None:
        return conn.execute(reset, (now,)).rowcount
    return sum(conn.execute(f"{reset} AND id = ?", (now, outbox_id)).rowcount for outbox_id in ids)


#: Restarts that may find a send in flight and queue it again; the next one makes it a dead letter.
#: Many: kills that land while the same send hangs on a Graph API outage are not its fault (the
#: short crash run, 5 kills in 8 s, found sends in flight at 3 of them); a send that crashes the
#: process itself reaches this within minutes.
FREE_RESTARTS = 10
#: A row still leased: `state IN (...)` first, so that the partial indexes (and not a scan) serve it.
_LEASED_NOW = f"{PENDING} AND state = 'sending'"


def has_orphans(conn: sqlite3.Connection) -> bool:
    """Whether any row is leased (`release_orphans` has work: a read, so a clean start commits nothing)."""
    return conn.execute(f"SELECT 1 FROM outbox WHERE {_LEASED_NOW} LIMIT 1").fetchone() is not None


def release_orphans(conn: sqlite3.Connection, now: float, *, feed: bool = False) -> int:
    """Queue again, due now, every row a previous process left leased; the number of rows.

    Why at open: this process holds the database's lock, so a row still `sending` was claimed by
    a process that is gone (a kill -9 between the Graph API's answer and its settle). Waiting for
    its lease (longer than a Graph call may take) would also hold back the user's later rows, a
    reminder among them, behind a send nobody is making. The attempt is refunded: a crash is not
    the send's failure, and counting it would dead-letter a message after a few restarts (with
    `unknown_max_attempts` = 3, after two kills and one unclear answer). Refunding reuses the dead
    claim's token, which is safe only because its claimer cannot settle any more (the lock again:
    on a shared database a silent node may be alive, so PostgreSQL counts the attempt instead).

    But a send that itself brings the process down (memory, a native crash) would be sent again at
    every restart, and no answer would ever count its attempts: found in flight by more than
    `FREE_RESTARTS` restarts, it becomes a dead letter (`failed`; `dead-letters retry` queues it again).
    """
    poisoned = conn.execute(f"SELECT id FROM outbox WHERE {_LEASED_NOW} AND orphaned >= ?", (FREE_RESTARTS,))
    why = f"Alfred stopped {FREE_RESTARTS + 1} times while sending this: not tried again"
    for (outbox_id,) in poisoned.fetchall():
        _fail(conn, outbox_id, (None, why, None), now, feed)
    sql = (
        "UPDATE outbox SET state = 'queued', due_at = MIN(due_at, ?), orphaned = orphaned + 1, "
        f"attempts = attempts - 1 WHERE {_LEASED_NOW}"
    )
    return conn.execute(sql, (now,)).rowcount


def payload_json(payload: bytes) -> Any:
    """A send's payload as JSON (None once retention scrubbed it, or if it is not JSON)."""
    try:
        return json.loads(payload) if payload else None
    except ValueError:
        return None


def payload_text(payload: bytes, kind: str) -> str | None:
    """The human-readable text of a send (text body, caption, interactive body), for history views."""
    try:
        data = json.loads(payload)
        obj = data.get(kind) if isinstance(data, dict) else None
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    text = obj.get("body") if kind == "text" else obj.get("caption")
    if kind == "interactive" and isinstance(obj.get("body"), dict):
        text = obj["body"].get("text")
    if kind == "template":
        text = f"[template {obj.get('name')}]"
    return text if isinstance(text, str) else None
