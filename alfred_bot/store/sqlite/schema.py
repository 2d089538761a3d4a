"""The SQLite schema and its migrations.

A new database gets `_SCHEMA` at once. An older one is brought forward step by step, ALL steps
and the final `_SCHEMA` in ONE transaction: a crash or a full disk mid-upgrade leaves the old
database exactly as it was, and the next start simply tries again.

v3 scopes every dedupe key (issue 13 item 3): an inbox row is unique per phone number id and
wamid (not per wamid alone), an outbox idempotency key per tenant, a status key starts with the
phone number id. SQLite cannot drop a UNIQUE constraint in place, so `inbox` and `outbox` are
rebuilt (rows, rowids and the AUTOINCREMENT counter kept).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from alfred_bot.store.base import StoreError

SCHEMA_VERSION = 5

log = logging.getLogger("alfred.store")

#: `{name}` lets a migration build the new table beside the old one before swapping them.
INBOX_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
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
    trace_id TEXT,
    parse_error TEXT,
    errors TEXT,
    UNIQUE (event_id, phone_number_id)
)"""

OUTBOX_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id TEXT PRIMARY KEY,
    idem_key TEXT NOT NULL,
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
    origin_at REAL,
    send_at REAL,
    campaign_id TEXT,
    orphaned INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, idem_key)
)"""

_SCHEMA = f"""
{INBOX_TABLE.format(name="inbox")};
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
    received_at REAL NOT NULL,
    recipient_user_id TEXT
);
CREATE INDEX IF NOT EXISTS statuses_wamid ON statuses(wamid);
CREATE TABLE IF NOT EXISTS events (
    key TEXT PRIMARY KEY,
    field TEXT NOT NULL,
    tenant TEXT,
    phone_number_id TEXT,
    waba_id TEXT,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL,
    time INTEGER
);
CREATE INDEX IF NOT EXISTS events_received ON events(received_at);
CREATE INDEX IF NOT EXISTS events_field ON events(field, received_at);
CREATE TABLE IF NOT EXISTS rejected (
    key TEXT PRIMARY KEY,
    what TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL
);
{OUTBOX_TABLE.format(name="outbox")};
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
CREATE TABLE IF NOT EXISTS preferences (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    category TEXT NOT NULL,
    value TEXT NOT NULL,
    detail TEXT,
    timestamp INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (tenant, user, category)
);
CREATE INDEX IF NOT EXISTS outbox_scheduled ON outbox(due_at) WHERE state = 'scheduled';
CREATE INDEX IF NOT EXISTS outbox_campaign ON outbox(campaign_id, state) WHERE campaign_id IS NOT NULL;
-- v5: pending read receipts apart, so that dropping the superseded and stale ones at every claim
-- costs what is pending of them, not a scan of the whole backlog (35 % of the writer under load):
-- the rowid ends every SQLite index key, so "newer receipt of the same user" is a range in it
CREATE INDEX IF NOT EXISTS outbox_receipts ON outbox(tenant, recipient)
    WHERE type = 'read' AND state IN ('queued', 'sending');
-- v4: conversation state and scheduled sends
CREATE TABLE IF NOT EXISTS dialogs (
    tenant TEXT NOT NULL,
    user_id TEXT NOT NULL,
    step TEXT,
    data TEXT NOT NULL CHECK (length(CAST(data AS BLOB)) <= 16384),
    expires_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, user_id)
);
CREATE INDEX IF NOT EXISTS dialogs_expiry ON dialogs(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_user_scheduled ON outbox(tenant, recipient, due_at) WHERE state = 'scheduled';
-- v4: campaigns and templates
CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    template TEXT NOT NULL,
    created_at REAL NOT NULL,
    send_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS campaigns_tenant ON campaigns(tenant, created_at);
CREATE TABLE IF NOT EXISTS campaign_skips (
    campaign_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (campaign_id, recipient)
);
CREATE TABLE IF NOT EXISTS templates (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    language TEXT NOT NULL,
    id TEXT,
    status TEXT NOT NULL,
    category TEXT,
    parameter_format TEXT,
    components TEXT NOT NULL,
    synced_at REAL NOT NULL,
    PRIMARY KEY (tenant, name, language)
);
CREATE TABLE IF NOT EXISTS template_syncs (
    tenant TEXT PRIMARY KEY,
    synced_at REAL NOT NULL
);
-- v4: the event bus feed
CREATE TABLE IF NOT EXISTS feed (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def _statements(script: str) -> list[str]:
    """`_SCHEMA` has no `;` inside a statement (no triggers), so splitting on it is exact."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _to_v2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE inbox ADD COLUMN trace_id TEXT")
    conn.execute("ALTER TABLE outbox ADD COLUMN trace_id TEXT")
    conn.execute("ALTER TABLE outbox ADD COLUMN origin_at REAL")


def _rebuild(conn: sqlite3.Connection, table: str, ddl: str) -> None:
    """Swap `table` for a copy built from `ddl`: same rows, same rowids, same AUTOINCREMENT
    counter (so a seq or rowid is never handed out twice). Its indexes go with the old table;
    `_SCHEMA` creates them again right after."""
    new = f"{table}_v3"  # the step that rebuilds (v3), whatever the current version
    conn.execute(f"DROP TABLE IF EXISTS {new}")
    conn.execute(ddl.format(name=new))
    kept = [c for c in _columns(conn, table) if c in set(_columns(conn, new))]
    cols = ", ".join(kept)
    conn.execute(f"INSERT INTO {new} (rowid, {cols}) SELECT rowid, {cols} FROM {table}")
    counter = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {new} RENAME TO {table}")
    if counter is not None:
        conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?", (counter[0], table))


def _to_v3(conn: sqlite3.Connection) -> None:
    """Scoped dedupe keys (see the module docstring), plus new columns: the inbox keeps Meta's
    errors and our parse error, statuses the username-only recipient, events the entry time."""
    _rebuild(conn, "inbox", INBOX_TABLE)
    _rebuild(conn, "outbox", OUTBOX_TABLE)
    statuses = _columns(conn, "statuses")
    if statuses:
        if "recipient_user_id" not in statuses:
            conn.execute("ALTER TABLE statuses ADD COLUMN recipient_user_id TEXT")
        # old keys were `wamid:state`; a redelivery must still find its row
        conn.execute("UPDATE statuses SET key = phone_number_id || ':' || key")
    events = _columns(conn, "events")
    if events and "time" not in events:
        conn.execute("ALTER TABLE events ADD COLUMN time INTEGER")


def _add_columns(conn: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Add the columns `table` lacks (a v3 rebuild in the same upgrade already has today's)."""
    present = set(_columns(conn, table))
    for name, kind in columns.items():
        if name not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def _to_v4(conn: sqlite3.Connection) -> None:
    """Columns added to existing tables in v4 (new tables come from `_SCHEMA`)."""
    _add_columns(conn, "outbox", {"send_at": "REAL", "campaign_id": "TEXT"})
    # v4 columns: conversation state and scheduled sends
    # v4 columns: campaigns and templates
    # v4 columns: the event bus feed


#: Steps from version N-1 to N, for what `CREATE … IF NOT EXISTS` cannot do to an old table.
def _to_v5(conn: sqlite3.Connection) -> None:
    """v5: how often a row was found leased by a dead process (`outbox.release_orphans`); the
    index `outbox_receipts` comes from `_SCHEMA`."""
    _add_columns(conn, "outbox", {"orphaned": "INTEGER NOT NULL DEFAULT 0"})


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5}


def migrate(conn: sqlite3.Connection) -> None:
    """Create a new database, or bring an older one forward in one transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"database schema v{version} is newer than this Alfred (v{SCHEMA_VERSION})")
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1) if version else ():
            log.warning("migrating the database schema to v%d", step)
            _MIGRATIONS[step](conn)
        for statement in _statements(_SCHEMA):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
