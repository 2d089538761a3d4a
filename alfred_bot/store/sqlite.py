"""The embedded SQLite store: WAL, `synchronous=FULL`, one group-commit writer, one reader.

Writes go through `GroupWriter` (our own thread and stdlib sqlite3, so a whole group is one hop);
reads go through an aiosqlite connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import time
from pathlib import Path
from typing import IO, Any

import aiosqlite

from alfred_bot.models import Contact, Profile
from alfred_bot.parse import InboundItem, MalformedItem, ParsedBody, StatusItem, decode_message
from alfred_bot.store import outbox, retention
from alfred_bot.store.base import Completion, OutboxJob, OutboxRow, PendingMessage, Settlement, StoreError
from alfred_bot.store.writer import GroupWriter

SCHEMA_VERSION = 2

log = logging.getLogger("alfred.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    tenant TEXT,
    phone_number_id TEXT NOT NULL,
    sender TEXT,
    user_id TEXT,
    wa_id TEXT,
    name TEXT,
    type TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    text TEXT,
    context_id TEXT,
    raw BLOB NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    received_at REAL NOT NULL,
    handled_at REAL,
    trace_id TEXT
);
CREATE INDEX IF NOT EXISTS inbox_pending ON inbox(seq) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS statuses (
    key TEXT PRIMARY KEY,
    wamid TEXT NOT NULL,
    tenant TEXT,
    phone_number_id TEXT NOT NULL,
    status TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    recipient_id TEXT,
    error_code INTEGER,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS statuses_wamid ON statuses(wamid);
CREATE TABLE IF NOT EXISTS events (
    key TEXT PRIMARY KEY,
    field TEXT NOT NULL,
    tenant TEXT,
    phone_number_id TEXT,
    waba_id TEXT,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    key TEXT PRIMARY KEY,
    what TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    idem_key TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    recipient TEXT NOT NULL,
    type TEXT NOT NULL,
    payload BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL,
    created_at REAL NOT NULL,
    source_event_id TEXT,
    wamid TEXT,
    error_code INTEGER,
    error_message TEXT,
    error_details TEXT,
    error_fbtrace_id TEXT,
    error_http_status INTEGER,
    needs_template INTEGER NOT NULL DEFAULT 0,
    sent_at REAL,
    delivered_at REAL,
    read_at REAL,
    trace_id TEXT,
    origin_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(tenant, due_at) WHERE state IN ('queued', 'sending');
CREATE INDEX IF NOT EXISTS outbox_claim ON outbox(tenant, priority, due_at) WHERE state IN ('queued', 'sending');
CREATE INDEX IF NOT EXISTS outbox_user ON outbox(tenant, recipient) WHERE state IN ('queued', 'sending');
CREATE INDEX IF NOT EXISTS outbox_source ON outbox(source_event_id);
CREATE INDEX IF NOT EXISTS outbox_wamid ON outbox(wamid) WHERE wamid IS NOT NULL;
CREATE INDEX IF NOT EXISTS inbox_sender ON inbox(tenant, sender, timestamp);
CREATE INDEX IF NOT EXISTS inbox_user ON inbox(tenant, user_id, timestamp);
CREATE INDEX IF NOT EXISTS outbox_recipient ON outbox(tenant, recipient, created_at);
CREATE INDEX IF NOT EXISTS outbox_failed ON outbox(created_at) WHERE state = 'failed';
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    tenant TEXT NOT NULL,
    outbox_id TEXT NOT NULL,
    type TEXT NOT NULL,
    recipient TEXT NOT NULL,
    http_status INTEGER,
    error_code INTEGER,
    fbtrace_id TEXT,
    latency_ms REAL NOT NULL,
    outcome TEXT NOT NULL,
    trace_id TEXT
);
CREATE INDEX IF NOT EXISTS audit_outbox ON audit(outbox_id);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE INDEX IF NOT EXISTS inbox_received ON inbox(received_at);
CREATE INDEX IF NOT EXISTS inbox_failed ON inbox(seq) WHERE state = 'failed';
CREATE INDEX IF NOT EXISTS outbox_sent ON outbox(sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS statuses_received ON statuses(received_at);
CREATE TABLE IF NOT EXISTS optouts (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (tenant, user)
);
"""

_INSERT_INBOX = """
INSERT INTO inbox (event_id, tenant, phone_number_id, sender, user_id, wa_id, name, type,
                   timestamp, text, context_id, raw, state, received_at, trace_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(event_id) DO NOTHING
"""
_INSERT_STATUS = """
INSERT INTO statuses (key, wamid, tenant, phone_number_id, status, timestamp, recipient_id,
                      error_code, raw, received_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING
"""
_INSERT_EVENT = """
INSERT INTO events (key, field, tenant, phone_number_id, waba_id, raw, received_at)
VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING
"""
_INSERT_REJECTED = """
INSERT INTO rejected (key, what, reason, raw, received_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING
"""


def connect_writer(path: Path) -> sqlite3.Connection:
    """Open the write connection with the durability settings the 200-after-commit promise needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    _migrate(conn)
    return conn


#: Steps from version N-1 to N for columns `CREATE TABLE IF NOT EXISTS` cannot add to old tables.
_MIGRATIONS = {
    2: "ALTER TABLE inbox ADD COLUMN trace_id TEXT; ALTER TABLE outbox ADD COLUMN trace_id TEXT; "
    "ALTER TABLE outbox ADD COLUMN origin_at REAL;",
}


def _migrate(conn: sqlite3.Connection) -> None:
    """Create a new database, or bring an older one forward one version at a time (each atomic)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"database schema v{version} is newer than this Alfred (v{SCHEMA_VERSION})")
    if version == 0:
        conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        return
    for step in range(version + 1, SCHEMA_VERSION + 1):
        log.warning("migrating the database schema to v%d", step)
        conn.executescript(f"BEGIN; {_MIGRATIONS[step]} {_SCHEMA} PRAGMA user_version={step}; COMMIT;")


def _lock_database(path: Path) -> IO[bytes]:
    """Hold an exclusive lock beside the database: two processes would both run the handlers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (path.parent / f"{path.name}.lock").open("ab")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StoreError(f"{path} is in use by another Alfred process") from None
    return lock


def _inbox_row(item: InboundItem, now: float) -> tuple[Any, ...]:
    msg, contact = item.message, item.contact
    return (
        msg.id,
        item.tenant,
        item.phone_number_id,
        msg.from_,
        msg.from_user_id or (contact.user_id if contact else None),
        contact.wa_id if contact else None,
        contact.name if contact else None,
        msg.type,
        msg.timestamp,
        msg.text,
        msg.context.id if msg.context else None,
        item.raw,
        "pending" if item.tenant is not None else "unrouted",
        now,
        item.trace_id or None,
    )


def _ingest_op(body: ParsedBody, now: float) -> Any:
    def op(conn: sqlite3.Connection) -> list[InboundItem | StatusItem]:
        fresh: list[InboundItem | StatusItem] = []
        for item in body.messages:
            inserted = conn.execute(_INSERT_INBOX, _inbox_row(item, now)).rowcount == 1
            if inserted and item.tenant is not None:
                fresh.append(item)
        for update in body.statuses:
            if conn.execute(_INSERT_STATUS, _status_row(update, now)).rowcount == 1 and update.tenant is not None:
                outbox.apply_status(conn, update.status)
                fresh.append(update)
        if body.events:
            events = [(e.key, e.field, e.tenant, e.phone_number_id, e.waba_id, e.raw, now) for e in body.events]
            conn.executemany(_INSERT_EVENT, events)
        if body.rejected:
            conn.executemany(_INSERT_REJECTED, [(r.key, r.what, r.reason[:1000], r.raw, now) for r in body.rejected])
        return fresh

    return op


def _status_row(item: Any, now: float) -> tuple[Any, ...]:
    s = item.status
    code = s.errors[0].code if s.errors else None
    return (
        item.key,
        s.id,
        item.tenant,
        item.phone_number_id,
        s.status,
        s.timestamp,
        s.recipient_id,
        code,
        item.raw,
        now,
    )


def _complete_op(done: Completion, now: float) -> Any:
    def op(conn: sqlite3.Connection) -> bool:
        cur = conn.execute(
            "UPDATE inbox SET state = ?, error = ?, handled_at = ? WHERE event_id = ? AND state = 'pending'",
            (done.state, done.error, now, done.event_id),
        )
        if cur.rowcount == 0:
            return False
        outbox.insert_rows(conn, done.replies, now)
        if done.consent == "out":
            conn.execute("INSERT OR REPLACE INTO optouts VALUES (?, ?, ?)", (done.tenant, done.user, now))
        elif done.consent == "in":
            conn.execute("DELETE FROM optouts WHERE tenant = ? AND user = ?", (done.tenant, done.user))
        return True

    return op


#: Both directions of one user's conversation: inbound by phone number or user id, outbound
#: messages (not receipts) by recipient; each leg limited, merged and cut in Python.
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


def _conversation_item(row: sqlite3.Row) -> dict[str, Any]:
    item: dict[str, Any] = {"direction": row["direction"], "type": row["type"], "text": row["text"], "at": row["at"]}
    if row["direction"] == "out":
        item["state"] = row["state"]
        item["text"] = outbox.payload_text(row["payload"], row["type"])
    return item


def _pending_item(row: sqlite3.Row) -> InboundItem:
    contact = None
    if row["name"] is not None or row["wa_id"] is not None or row["user_id"] is not None:
        profile = Profile(name=row["name"]) if row["name"] is not None else None
        contact = Contact(profile=profile, wa_id=row["wa_id"], user_id=row["user_id"])
    message = decode_message(row["raw"])
    trace = row["trace_id"] or ""
    return InboundItem(row["phone_number_id"], row["tenant"], message, contact, row["raw"], trace, row["received_at"])


class SqliteStore:
    """The default `Store`: one SQLite file, safe against kill -9 and power loss."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = path
        self._clock = clock
        self._writer = GroupWriter(lambda: connect_writer(path))
        self._reader: aiosqlite.Connection | None = None
        self._lock: IO[bytes] | None = None

    @property
    def writer(self) -> GroupWriter:
        return self._writer

    async def open(self) -> None:
        self._lock = _lock_database(self.path)
        await self._writer.start()
        self._reader = await aiosqlite.connect(self.path)
        self._reader.row_factory = aiosqlite.Row
        await self._reader.execute("PRAGMA query_only=1")

    async def close(self) -> None:
        await self._writer.close()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    async def ingest(self, body: ParsedBody) -> list[InboundItem | StatusItem]:
        if not len(body):
            return []
        result: list[InboundItem | StatusItem] = await self._writer.submit(_ingest_op(body, self._clock()))
        return result

    async def complete(self, done: Completion) -> bool:
        result: bool = await self._writer.submit(_complete_op(done, self._clock()))
        return result

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        if self._reader is None:
            raise StoreError("the store is closed")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"read failed: {exc}") from exc

    async def pending(self, after_seq: int, limit: int) -> list[PendingMessage]:
        rows = await self._fetch(
            "SELECT seq, tenant, phone_number_id, raw, name, wa_id, user_id, trace_id, received_at FROM inbox "
            "WHERE state = 'pending' AND seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        pending: list[PendingMessage] = []
        for row in rows:
            try:
                pending.append(PendingMessage(row["seq"], _pending_item(row)))
            except MalformedItem as exc:  # only if a newer model refuses an old row: skip, never block
                log.error("pending message seq %d cannot be decoded, skipped: %s", row["seq"], exc)
        return pending

    async def recent_inbound(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            'SELECT event_id AS id, tenant, sender AS "from", user_id, name, type, timestamp, text, '
            "context_id, state, error, received_at FROM inbox ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [dict(row) for row in rows]

    async def enqueue(self, rows: list[OutboxRow]) -> list[str]:
        now = self._clock()
        result: list[str] = await self._writer.submit(lambda conn: outbox.enqueue(conn, rows, now))
        return result

    async def claim(self, now: float, quotas: dict[str, int], lease: float, held: frozenset[str]) -> list[OutboxJob]:
        result: list[OutboxJob] = await self._writer.submit(lambda conn: outbox.claim(conn, now, quotas, lease, held))
        return result

    async def settle(self, result: Settlement, now: float) -> None:
        await self._writer.submit(lambda conn: outbox.settle(conn, result, now))

    async def next_due(self, tenants: frozenset[str]) -> float | None:
        """On the reader connection: the writer thread is the bottleneck, and WAL lets this run beside it."""
        dues = [
            (await self._fetch(f"SELECT MIN(due_at) FROM outbox WHERE tenant = ? AND {outbox.PENDING}", (t,)))[0][0]
            for t in sorted(tenants)
        ]
        known = [float(d) for d in dues if d is not None]
        return min(known) if known else None

    async def message(self, outbox_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(
            'SELECT id, tenant, recipient AS "to", type, state, attempts, wamid, error_code, error_message, '
            "error_details, error_fbtrace_id, needs_template, created_at, sent_at, delivered_at, read_at "
            "FROM outbox WHERE id = ?",
            (outbox_id,),
        )
        return dict(rows[0]) if rows else None

    async def message_by_key(self, idem_key: str) -> dict[str, Any] | None:
        rows = await self._fetch("SELECT id FROM outbox WHERE idem_key = ?", (idem_key,))
        return await self.message(rows[0][0]) if rows else None

    async def last_inbound(self, tenant: str, user: str) -> int | None:
        rows = await self._fetch(
            "SELECT MAX(COALESCE((SELECT MAX(timestamp) FROM inbox WHERE tenant = ?1 AND sender = ?2 "
            "AND type != 'system'), 0), COALESCE((SELECT MAX(timestamp) FROM inbox WHERE tenant = ?1 "
            "AND user_id = ?2 AND type != 'system'), 0))",
            (tenant, user),
        )
        value = int(rows[0][0])
        return value or None

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

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            'SELECT event_id AS id, tenant, sender AS "from", name, text, error, handled_at AS at '
            "FROM inbox WHERE state = 'failed' ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [dict(row) for row in rows]

    async def opted_out(self, tenant: str, user: str) -> bool:
        rows = await self._fetch("SELECT 1 FROM optouts WHERE tenant = ? AND user = ?", (tenant, user))
        return bool(rows)

    async def conversation(self, tenant: str, user: str, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(_CONVERSATION, (tenant, user, limit, tenant, user, limit, tenant, user, limit))
        # both clocks are ours (received_at, created_at); within one instant, insertion order
        ordered = sorted(rows, key=lambda row: (row["at"], row["direction"] == "out", row["seq"]))
        return [_conversation_item(row) for row in ordered][-limit:]

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

    async def scrub(self, key: bytes, cutoff: float) -> int:
        result: int = await self._writer.submit(lambda conn: retention.scrub_batch(conn, key, cutoff))
        return result

    async def purge(self, cutoff: float) -> int:
        result: int = await self._writer.submit(lambda conn: retention.delete_batch(conn, cutoff))
        return result

    async def retry_dead(self, ids: list[str] | None, now: float) -> int:
        result: int = await self._writer.submit(lambda conn: outbox.retry_failed(conn, ids, now))
        return result

    def stats(self) -> dict[str, int]:
        return {"writes": self._writer.writes, "commits": self._writer.groups}

    async def healthy(self) -> bool:
        if not self._writer.running:
            return False
        try:
            await self._fetch("SELECT 1", ())
        except (sqlite3.Error, StoreError):
            return False
        return True
