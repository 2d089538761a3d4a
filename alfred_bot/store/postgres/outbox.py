"""Outbox writes on PostgreSQL: functions the engine runs on a connection inside one transaction.

The rules are the SQLite engine's (`alfred_bot.store.sqlite.outbox` explains them): the lease
lives in `due_at`, settles are conditional on the claim's attempt count, statuses only move a row
forward, read receipts are best-effort. What changes is that several nodes claim at once:

- Rows are locked with `FOR UPDATE SKIP LOCKED`, so two nodes never lease the same row, and a
  claim never waits for another node's claim.
- A user's rows go out one at a time across nodes: a row is claimable only when no older row of
  its user is pending and no other row of its user is leased right now (stricter than SQLite, where
  commit order is row order: here a row numbered earlier can commit later, and a dead letter queued
  again can be older than a row in flight; either waits for the lease to end). Both nodes could see
  the same user's state from before the other's claim, so a claim takes a per-user advisory lock
  (`pg_try_advisory_xact_lock`: a user another node is claiming right now is skipped, not waited
  for) and re-checks the rule in a new statement, whose snapshot sees every claim committed before
  it got the lock.
- A claim first ends the leases of other nodes whose heartbeat is older than `dead_before` (their
  `sending` rows become due now), so their rows go to a live node long before the lease would run
  out (takeover). A late settle from the dead node changes nothing: the takeover counted a new attempt.
- A status and the settle that records its wamid can commit on two nodes at once; both take an
  advisory lock on (tenant, wamid) before reading the other's table, so a status that arrives
  before our own HTTP answer is never lost between them.

Every time comes from the store's clock (`now`), never the database's. `message` and
`message_by_key` only read: they accept a pool as well as a connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from alfred_bot.models import Status
from alfred_bot.store.base import OutboxJob, OutboxRow, Settlement
from alfred_bot.store.postgres import feed as feed_log
from alfred_bot.store.sqlite.outbox import RANK, scheduled

#: A connection of its own or one lent by the pool: the engine runs these functions on either.
Conn = asyncpg.Connection | PoolConnectionProxy

#: Where a node hears that sends were queued (LISTEN/NOTIFY; delivered only if the transaction commits).
CHANNEL = "alfred_outbox"

PENDING = "state IN ('queued', 'sending')"
RECEIPT = "type = 'read'"

#: Parameters in `OutboxRow`'s field order (each field is a column), then the time: `(*astuple(row), now)`.
_FIELDS = OutboxRow.__struct_fields__
_INSERT = f"""
INSERT INTO outbox ({", ".join(_FIELDS)}, created_at, due_at, state)
VALUES ({", ".join(f"${n}" for n in range(1, len(_FIELDS) + 4))})
ON CONFLICT (tenant, idem_key) DO NOTHING
"""
_IDS = """
SELECT o.tenant, o.idem_key, o.id FROM outbox o
JOIN unnest($1::text[], $2::text[]) AS k(tenant, idem_key) ON o.tenant = k.tenant AND o.idem_key = k.idem_key
"""


async def insert_rows(conn: Conn, rows: Sequence[OutboxRow], now: float, *, feed: bool = False) -> None:
    """Queue rows; a (tenant, idem_key) seen before keeps its first row (a handler re-run sends nothing twice)."""
    values = [(*msgspec.structs.astuple(r), now, max(now, r.send_at or now), scheduled(r, now)) for r in rows]
    await conn.executemany(_INSERT, values)
    if feed:  # the event bus: one "queued" entry per row inserted, in this transaction
        await feed_log.queued(conn, rows, now)


async def notify(conn: Conn) -> None:
    """Wake every node's senders when this transaction commits."""
    await conn.execute(f"NOTIFY {CHANNEL}")


async def enqueue(conn: Conn, rows: list[OutboxRow], now: float, *, feed: bool = False) -> list[str]:
    """Insert rows; for an idem_key the tenant used before, return the first row's id instead."""
    if not rows:
        return []
    await insert_rows(conn, rows, now, feed=feed)
    found = await conn.fetch(_IDS, [r.tenant for r in rows], [r.idem_key for r in rows])
    ids = {(f["tenant"], f["idem_key"]): f["id"] for f in found}
    await notify(conn)
    return [ids[(r.tenant, r.idem_key)] for r in rows]


#: Leases of other nodes whose heartbeat stopped before `$4` end now (this node, `$3`, is alive): their
#: rows are due at once for any node, instead of when the lease would have run out (takeover).
_RELEASE = """
UPDATE outbox SET due_at = $2 WHERE id IN (
    SELECT o.id FROM outbox o JOIN nodes n ON n.id = o.owner
    WHERE o.state = 'sending' AND o.due_at > $2 AND o.tenant = ANY($1::text[]) AND n.id <> $3 AND n.seen_at < $4
    FOR UPDATE OF o SKIP LOCKED)
"""
#: $1 tenant, $2 now, $3 held ids.
_CLAIMABLE = f"o.tenant = $1 AND o.{PENDING} AND o.due_at <= $2 AND NOT o.id = ANY($3::text[])"
#: The user's oldest pending row, and none of the user's rows leased right now, whatever its age: a
#: row inserted by a transaction that committed late must not go out beside one in flight.
_FIRST_OF_USER = (
    f"NOT o.{RECEIPT} AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.tenant = o.tenant AND e.recipient = o.recipient "
    f"AND e.{PENDING} AND NOT e.{RECEIPT} AND e.id <> o.id "
    # a user's rows go one at a time in (priority, seq) order: a reply never waits for the user's
    # campaign send, and never leaves beside it; a row in flight holds back every other row
    "AND ((e.priority < o.priority OR (e.priority = o.priority AND e.seq < o.seq)) "
    "OR (e.state = 'sending' AND e.due_at > $2)))"
)
#: A scheduled send's age (`outbound.max_age_seconds`) counts from its `send_at`, not from when it was queued.
_JOB = (
    "seq, id, tenant, recipient, type, payload, attempts, GREATEST(created_at, COALESCE(send_at, 0)) AS created_at, "
    "trace_id, origin_at"
)
#: $5 this node, $6 the lease's end.
_LEASE = "UPDATE outbox o SET state = 'sending', owner = $5, attempts = o.attempts + 1, due_at = $6 WHERE "
#: Candidates in claim order, row-locked (skipping rows other nodes hold), then per-user locked. The
#: order is the index's (`outbox_claim`), so the scan stops at the quota instead of sorting a backlog.
_PICK = f"""
WITH c AS MATERIALIZED (
    SELECT o.id, o.recipient FROM outbox o WHERE {_CLAIMABLE} AND {_FIRST_OF_USER}
    ORDER BY o.priority, o.due_at LIMIT $4 FOR UPDATE SKIP LOCKED)
SELECT id FROM c WHERE pg_try_advisory_xact_lock(hashtextextended('user:' || $1::text || ':' || c.recipient, 0))
"""
#: The same rules again, in a snapshot taken after the user locks: a claim committed meanwhile counts.
_TAKE = f"{_LEASE}o.id = ANY($4::text[]) AND {_CLAIMABLE} AND {_FIRST_OF_USER} RETURNING {_JOB}"
_TAKE_RECEIPTS = (
    f"{_LEASE}o.id IN (SELECT o.id FROM outbox o WHERE {_CLAIMABLE} AND o.{RECEIPT} "
    f"ORDER BY o.seq DESC LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING {_JOB}"
)
_DROP = "UPDATE outbox SET state = 'dropped', owner = NULL, error_message = $2 WHERE state = 'queued' AND id IN ("
_SUPERSEDED = (
    f"{_DROP}SELECT o.id FROM outbox o WHERE o.tenant = $1 AND o.state = 'queued' AND o.{RECEIPT} "
    f"AND EXISTS (SELECT 1 FROM outbox n WHERE n.tenant = o.tenant AND n.recipient = o.recipient AND n.{PENDING} "
    f"AND n.{RECEIPT} AND n.seq > o.seq) FOR UPDATE SKIP LOCKED) RETURNING {_JOB}"
)
_STALE = (
    f"{_DROP}SELECT o.id FROM outbox o WHERE o.tenant = $1 AND o.state = 'queued' AND o.{RECEIPT} "
    f"AND o.created_at < $3 FOR UPDATE SKIP LOCKED) RETURNING {_JOB}"
)


class _Claim(msgspec.Struct, frozen=True, kw_only=True):
    """One claim's fixed arguments: `rules` are the SQL parameters $1..$3, `lease` $5 and $6."""

    now: float
    held: list[str]
    node: str
    until: float

    def rules(self, tenant: str) -> tuple[Any, ...]:
        return (tenant, self.now, self.held)

    @property
    def lease(self) -> tuple[Any, ...]:
        return (self.node, self.until)


def _job(r: asyncpg.Record, dropped: str | None = None) -> OutboxJob:
    return OutboxJob(
        r["id"],
        r["tenant"],
        r["recipient"],
        r["type"],
        r["payload"],
        r["attempts"],
        r["created_at"],
        r["trace_id"],
        r["origin_at"],
        dropped,
    )


async def claim(
    conn: Conn,
    now: float,
    quotas: dict[str, int],
    lease: float,
    held: frozenset[str],
    *,
    receipts: Mapping[str, int] | None,
    receipt_max_age: float | None,
    node: str,
    dead_before: float,
    sweep: bool = True,
) -> list[OutboxJob]:
    """Lease due rows per tenant as `Outbox.claim` says; rows other nodes are claiming are skipped, and
    rows leased by a node whose heartbeat is older than `dead_before` are taken over. Receipts are
    dropped before every claim of receipts, otherwise only when `sweep` (`ReceiptSweeps`)."""
    spec = _Claim(now=now, held=sorted(held), node=node, until=now + lease)
    await conn.execute(_RELEASE, list(quotas), now, node, dead_before)
    jobs: list[OutboxJob] = []
    for tenant, quota in quotas.items():
        claimed = await _claim_rows(conn, spec, tenant, quota) if quota > 0 else []
        jobs.extend(claimed)
        room = receipts.get(tenant, 0) if receipts is not None else quota - len(claimed)
        if room > 0 or sweep:
            jobs.extend(await _drop_receipts(conn, tenant, now, receipt_max_age))
        if room > 0:
            rows = await conn.fetch(_TAKE_RECEIPTS, *spec.rules(tenant), room, *spec.lease)
            jobs.extend(_job(r) for r in sorted(rows, key=lambda r: -r["seq"]))
    return jobs


async def _claim_rows(conn: Conn, spec: _Claim, tenant: str, quota: int) -> list[OutboxJob]:
    picked = [r["id"] for r in await conn.fetch(_PICK, *spec.rules(tenant), quota)]
    if not picked:
        return []
    rows = await conn.fetch(_TAKE, *spec.rules(tenant), picked, *spec.lease)
    return [_job(r) for r in sorted(rows, key=lambda r: r["seq"])]


async def _drop_receipts(conn: Conn, tenant: str, now: float, max_age: float | None) -> list[OutboxJob]:
    """Drop queued receipts a newer receipt of the same user makes pointless, then those older than
    `max_age` s; each comes back as a notice (`dropped` set)."""
    superseded = await conn.fetch(_SUPERSEDED, tenant, "superseded by a newer read receipt")
    stale = [] if max_age is None else await conn.fetch(_STALE, tenant, "stale read receipt", now - max_age)
    return [_job(r, "superseded") for r in superseded] + [_job(r, "stale") for r in stale]


_LEASED = "state = 'sending' AND attempts = $2"
_CLEAR = (
    "owner = NULL, error_code = $3, error_message = $4, error_details = $5, error_fbtrace_id = $6, "
    "error_http_status = $7"
)


def _wamid_lock(tenant: str, wamid: str) -> str:
    """Serialises a status and the settle recording its wamid (see the module docstring)."""
    return f"pg_advisory_xact_lock(hashtextextended('wamid:' || {tenant} || ':' || {wamid}, 0))"


_WAMID_LOCK = f"SELECT {_wamid_lock('$1::text', '$2::text')}"
#: The lock is taken as the row is recorded: the replay that follows reads in a snapshot after it.
_SETTLE_SENT = (
    "UPDATE outbox SET state = 'sent', wamid = $3, sent_at = $4, owner = NULL, error_code = NULL, "
    "error_message = NULL, error_details = NULL, error_fbtrace_id = NULL, error_http_status = NULL "
    f"WHERE id = $1 AND {_LEASED} RETURNING tenant, {_wamid_lock('tenant', '$3::text')}"
)
_SETTLE_QUEUED = (
    f"UPDATE outbox SET state = 'queued', due_at = $8, attempts = attempts - $9, {_CLEAR} "
    f"WHERE id = $1 AND {_LEASED} RETURNING seq, tenant, recipient"
)
_SETTLE_DROPPED = f"UPDATE outbox SET state = 'dropped', {_CLEAR} WHERE id = $1 AND {_LEASED}"
_SETTLE_FAILED = f"UPDATE outbox SET state = 'failed', needs_template = $8, {_CLEAR} WHERE id = $1 AND {_LEASED}"
_DEFER = (
    f"UPDATE outbox SET due_at = $4 WHERE tenant = $1 AND recipient = $2 AND {PENDING} AND state = 'queued' "
    "AND seq > $3 AND due_at < $4"
)
_AUDIT = """
INSERT INTO audit (at, tenant, outbox_id, type, recipient, http_status, error_code, fbtrace_id, latency_ms, outcome,
                   trace_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, (SELECT trace_id FROM outbox WHERE id = $3))
"""


def _error_values(r: Settlement) -> tuple[Any, ...]:
    return (r.id, r.attempts, r.error_code, r.error_message, r.error_details, r.error_fbtrace_id, r.error_http_status)


async def settle(conn: Conn, r: Settlement, now: float, *, feed: bool = False) -> None:
    """Record one send's end (and its audit entry); ignored unless the row is still leased by that claim."""
    if r.audit is not None:
        a = r.audit
        await conn.execute(
            _AUDIT,
            now,
            a.tenant,
            r.id,
            a.type,
            a.recipient,
            a.http_status,
            a.error_code,
            a.fbtrace_id,
            a.latency_ms,
            a.outcome,
        )
    if r.state == "sent":
        await _settle_sent(conn, r, now, feed)
    elif r.state == "queued":
        await _settle_queued(conn, r, now)
    elif r.state == "dropped":
        await conn.execute(_SETTLE_DROPPED, *_error_values(r))
    elif await conn.execute(_SETTLE_FAILED, *_error_values(r), int(r.needs_template)) == "UPDATE 1" and feed:
        await feed_log.outcome(conn, r.id, "failed", now)


async def _settle_sent(conn: Conn, r: Settlement, now: float, feed: bool = False) -> None:
    row = await conn.fetchrow(_SETTLE_SENT, r.id, r.attempts, r.wamid, now)
    if row is not None and feed:
        await feed_log.outcome(conn, r.id, "sent", now)
    if row is not None and r.wamid:
        await _replay_statuses(conn, row["tenant"], r.wamid, feed=feed)


async def _settle_queued(conn: Conn, r: Settlement, now: float) -> None:
    due = r.due_at if r.due_at is not None else now
    row = await conn.fetchrow(_SETTLE_QUEUED, *_error_values(r), due, int(r.refund))
    if row is not None and due > now:
        # the user's later rows wait for this one anyway: due no earlier than it (see the SQLite engine)
        await conn.execute(_DEFER, row["tenant"], row["recipient"], row["seq"], due)


async def _replay_statuses(conn: Conn, tenant: str, wamid: str, *, feed: bool = False) -> None:
    """Statuses can arrive before we recorded the wamid: apply those this tenant's number got."""
    rows = await conn.fetch(
        "SELECT status, timestamp, error_code FROM statuses WHERE wamid = $1 AND tenant = $2", wamid, tenant
    )
    for s in rows:
        error = (s["error_code"], None, None)
        await _advance(conn, tenant, wamid, s["status"], at=float(s["timestamp"]), error=error, feed=feed)


async def apply_status(conn: Conn, tenant: str, status: Status, *, feed: bool = False) -> None:
    """Move the tenant's outbox row with this wamid forward; a `failed` status fails a row not yet
    delivered. Scoped by tenant: a body signed for one number can never touch another's sends."""
    error = status.errors[0] if status.errors else None
    details = error.error_data.details if error and error.error_data else None
    fields = (error.code, error.message or error.title, details) if error else (None, None, None)
    await conn.execute(_WAMID_LOCK, tenant, status.id)
    await _advance(conn, tenant, status.id, status.status, at=float(status.timestamp), error=fields, feed=feed)


def _move(current: str, kind: str, state: str) -> Literal["fail", "advance"] | None:
    """What a status does to a row: `played` exists only for audio, `failed` only before delivery,
    the rest only forward (webhooks arrive out of order); a failed row stays failed."""
    if current == "failed" or (state == "played" and kind != "audio"):
        return None
    if state == "failed":
        return "fail" if RANK.get(current, 0) <= RANK["sent"] else None
    return "advance" if RANK.get(state, 0) > RANK.get(current, 0) else None


_FAIL = (
    "UPDATE outbox SET state = 'failed', owner = NULL, error_code = $2, error_message = $3, error_details = $4, "
    "needs_template = $5 WHERE id = $1"
)
#: `read` and `played` imply delivered: stamp what is missing, keep the first stamp.
_ADVANCE = """
UPDATE outbox SET state = $2,
    delivered_at = CASE WHEN $2 IN ('delivered', 'read', 'played') THEN COALESCE(delivered_at, $3)
                   ELSE delivered_at END,
    read_at = CASE WHEN $2 IN ('read', 'played') THEN COALESCE(read_at, $3) ELSE read_at END
WHERE id = $1
"""


async def _advance(
    conn: Conn, tenant: str, wamid: str, state: str, *, at: float, error: tuple[Any, ...], feed: bool = False
) -> None:
    row = await conn.fetchrow(
        "SELECT id, state, type FROM outbox WHERE wamid = $1 AND tenant = $2 LIMIT 1 FOR UPDATE", wamid, tenant
    )
    if row is None:
        return
    move = _move(row["state"], row["type"], state)
    if move == "fail":
        code, message, details = error
        await conn.execute(_FAIL, row["id"], code, message, details, int(code in (131047, 470)))
    elif move == "advance":
        await conn.execute(_ADVANCE, row["id"], state, at)
    if move is not None and feed:  # the event bus: failed / delivered / read / played
        await feed_log.outcome(conn, row["id"], "failed" if move == "fail" else state, at)


_RETRY = (
    "UPDATE outbox SET state = 'queued', owner = NULL, due_at = $1, attempts = 0, error_code = NULL, "
    "error_message = NULL, error_details = NULL, error_fbtrace_id = NULL, error_http_status = NULL, "
    "needs_template = 0 WHERE state = 'failed'"
)


async def retry_dead(conn: Conn, ids: list[str] | None, now: float) -> int:
    """Give failed sends a fresh start (queued, due now, attempts and error cleared); how many."""
    if ids is None:
        done = await conn.execute(_RETRY, now)
    else:
        done = await conn.execute(f"{_RETRY} AND id = ANY($2::text[])", now, ids)
    count = int(done.split()[-1])
    if count:
        await notify(conn)
    return count


async def next_due(conn: Conn, tenants: frozenset[str]) -> float | None:
    """When the next send of these tenants becomes due (a lease's end for a row in flight)."""
    due = await conn.fetchval(
        f"SELECT MIN(due_at) FROM outbox WHERE tenant = ANY($1::text[]) AND {PENDING}", sorted(tenants)
    )
    return None if due is None else float(due)


_MESSAGE = (
    'SELECT id, tenant, recipient AS "to", type, state, attempts, wamid, error_code, error_message, error_details, '
    "error_fbtrace_id, needs_template, created_at, sent_at, delivered_at, read_at, send_at FROM outbox"
)


async def message(conn: Conn | asyncpg.Pool, outbox_id: str) -> dict[str, Any] | None:
    """One outbox row as the API shows it, or None."""
    row = await conn.fetchrow(f"{_MESSAGE} WHERE id = $1", outbox_id)
    return None if row is None else dict(row)


async def message_by_key(conn: Conn | asyncpg.Pool, idem_key: str) -> dict[str, Any] | None:
    """Keys are unique per tenant; the API's keys name their tenant (`api:<tenant>:<key>`): the first row."""
    row = await conn.fetchrow(f"{_MESSAGE} WHERE idem_key = $1 ORDER BY seq LIMIT 1", idem_key)
    return None if row is None else dict(row)
