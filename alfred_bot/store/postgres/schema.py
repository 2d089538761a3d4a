"""The PostgreSQL schema and its versioned migrations.

Same tables and columns as the SQLite schema v3 (`alfred_bot.store.sqlite.schema`), types mapped
(TEXT→text, INTEGER→bigint, REAL→double precision, BLOB→bytea), plus what several nodes need:
`outbox.owner` and `inbox.owner`/`inbox.lease_until` (who holds a lease), and `nodes` (heartbeats).
`user` is reserved in PostgreSQL, so `optouts` and `preferences` name that column `user_id`.
Where SQLite orders by rowid, PostgreSQL orders by a `seq` identity column (`outbox`, `events`,
`rejected`; `inbox` and `audit` have it as their key).

A node applies the migrations at start while other nodes may be running: every step runs in ONE
transaction under a transaction-scoped advisory lock, so two nodes starting at once apply each
step exactly once (the second waits, then finds the version current), and a failed step leaves the
database as it was. DDL is transactional in PostgreSQL, unlike in most databases.
"""

from __future__ import annotations

import logging

import asyncpg

from alfred_bot.store.base import StoreError

log = logging.getLogger("alfred.store")

#: Arbitrary, fixed: the advisory lock key every Alfred node agrees on for migrations.
MIGRATION_LOCK = 0x616C66726564  # "alfred"

_V1 = """
CREATE TABLE inbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL,
    tenant text,
    phone_number_id text NOT NULL,
    sender text,
    user_id text,
    wa_id text,
    name text,
    type text NOT NULL,
    timestamp bigint NOT NULL,
    text text,
    context_id text,
    raw bytea NOT NULL,
    state text NOT NULL,
    error text,
    received_at double precision NOT NULL,
    handled_at double precision,
    trace_id text,
    parse_error text,
    errors text,
    owner text,
    lease_until double precision,
    UNIQUE (event_id, phone_number_id)
);
CREATE INDEX inbox_pending ON inbox(seq) WHERE state = 'pending';
-- per-user order of `take`: a user is the phone number, else the user id (as `Message.sender`)
CREATE INDEX inbox_pending_user ON inbox(tenant, (COALESCE(sender, user_id)), seq) WHERE state = 'pending';
CREATE INDEX inbox_sender ON inbox(tenant, sender, timestamp);
CREATE INDEX inbox_user ON inbox(tenant, user_id, timestamp);
CREATE INDEX inbox_received ON inbox(received_at);
CREATE INDEX inbox_failed ON inbox(seq) WHERE state = 'failed';
CREATE TABLE statuses (
    key text PRIMARY KEY,
    wamid text NOT NULL,
    tenant text,
    phone_number_id text NOT NULL,
    status text NOT NULL,
    timestamp bigint NOT NULL,
    recipient_id text,
    error_code bigint,
    raw bytea NOT NULL,
    received_at double precision NOT NULL,
    recipient_user_id text
);
CREATE INDEX statuses_wamid ON statuses(wamid);
CREATE INDEX statuses_received ON statuses(received_at);
CREATE TABLE events (
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    key text PRIMARY KEY,
    field text NOT NULL,
    tenant text,
    phone_number_id text,
    waba_id text,
    raw bytea NOT NULL,
    received_at double precision NOT NULL,
    time bigint
);
CREATE INDEX events_received ON events(received_at);
CREATE INDEX events_field ON events(field, received_at);
CREATE TABLE rejected (
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    key text PRIMARY KEY,
    what text NOT NULL,
    reason text NOT NULL,
    raw bytea NOT NULL,
    received_at double precision NOT NULL
);
CREATE INDEX rejected_received ON rejected(received_at);
CREATE TABLE outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id text PRIMARY KEY,
    idem_key text NOT NULL,
    tenant text NOT NULL,
    recipient text NOT NULL,
    type text NOT NULL,
    payload bytea NOT NULL,
    state text NOT NULL DEFAULT 'queued',
    priority bigint NOT NULL DEFAULT 0,
    attempts bigint NOT NULL DEFAULT 0,
    due_at double precision NOT NULL,
    created_at double precision NOT NULL,
    source_event_id text,
    wamid text,
    error_code bigint,
    error_message text,
    error_details text,
    error_fbtrace_id text,
    error_http_status bigint,
    needs_template bigint NOT NULL DEFAULT 0,
    sent_at double precision,
    delivered_at double precision,
    read_at double precision,
    trace_id text,
    origin_at double precision,
    owner text,
    UNIQUE (tenant, idem_key)
);
CREATE INDEX outbox_due ON outbox(tenant, due_at) WHERE state IN ('queued', 'sending');
CREATE INDEX outbox_claim ON outbox(tenant, priority, due_at) WHERE state IN ('queued', 'sending');
CREATE INDEX outbox_user ON outbox(tenant, recipient, seq) WHERE state IN ('queued', 'sending');
CREATE INDEX outbox_owner ON outbox(owner) WHERE state = 'sending';
CREATE INDEX outbox_receipts ON outbox(tenant, recipient, seq) WHERE type = 'read' AND state IN ('queued', 'sending');
CREATE INDEX outbox_source ON outbox(source_event_id);
CREATE INDEX outbox_wamid ON outbox(wamid) WHERE wamid IS NOT NULL;
CREATE INDEX outbox_idem_key ON outbox(idem_key);
CREATE INDEX outbox_recipient ON outbox(tenant, recipient, created_at);
CREATE INDEX outbox_failed ON outbox(created_at) WHERE state = 'failed';
CREATE INDEX outbox_sent ON outbox(sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX outbox_created ON outbox(created_at);
CREATE TABLE audit (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    tenant text NOT NULL,
    outbox_id text NOT NULL,
    type text NOT NULL,
    recipient text NOT NULL,
    http_status bigint,
    error_code bigint,
    fbtrace_id text,
    latency_ms double precision NOT NULL,
    outcome text NOT NULL,
    trace_id text
);
CREATE INDEX audit_outbox ON audit(outbox_id);
CREATE INDEX audit_at ON audit(at);
CREATE TABLE optouts (
    tenant text NOT NULL,
    user_id text NOT NULL,
    at double precision NOT NULL,
    PRIMARY KEY (tenant, user_id)
);
CREATE TABLE preferences (
    tenant text NOT NULL,
    user_id text NOT NULL,
    category text NOT NULL,
    value text NOT NULL,
    detail text,
    timestamp bigint NOT NULL,
    received_at double precision NOT NULL,
    PRIMARY KEY (tenant, user_id, category)
);
CREATE INDEX preferences_received ON preferences(received_at);
CREATE TABLE nodes (
    id text PRIMARY KEY,
    host text NOT NULL,
    role text NOT NULL,
    version text NOT NULL,
    pid bigint NOT NULL,
    started_at double precision NOT NULL,
    seen_at double precision NOT NULL
);
CREATE INDEX nodes_seen ON nodes(seen_at)
"""

#: v2: conversation state, scheduled sends, campaigns, templates and the event bus feed.
_V2 = """
ALTER TABLE outbox ADD COLUMN send_at double precision;
ALTER TABLE outbox ADD COLUMN campaign_id text;
CREATE INDEX outbox_scheduled ON outbox(due_at) WHERE state = 'scheduled';
CREATE INDEX outbox_campaign ON outbox(campaign_id, state) WHERE campaign_id IS NOT NULL;
-- v2: conversation state and scheduled sends
CREATE TABLE dialogs (
    tenant text NOT NULL,
    user_id text NOT NULL,
    step text,
    data text NOT NULL CHECK (octet_length(data) <= 16384),
    expires_at double precision,
    updated_at double precision NOT NULL,
    PRIMARY KEY (tenant, user_id)
);
CREATE INDEX dialogs_expiry ON dialogs(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX outbox_user_scheduled ON outbox(tenant, recipient, due_at) WHERE state = 'scheduled';
-- v2: campaigns and templates
CREATE TABLE campaigns (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL,
    state text NOT NULL,
    template text NOT NULL,
    created_at double precision NOT NULL,
    send_at double precision,
    updated_at double precision NOT NULL
);
CREATE INDEX campaigns_tenant ON campaigns(tenant, created_at);
CREATE TABLE campaign_skips (
    campaign_id text NOT NULL,
    recipient text NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (campaign_id, recipient)
);
CREATE TABLE templates (
    tenant text NOT NULL,
    name text NOT NULL,
    language text NOT NULL,
    id text,
    status text NOT NULL,
    category text,
    parameter_format text,
    components text NOT NULL,
    synced_at double precision NOT NULL,
    PRIMARY KEY (tenant, name, language)
);
CREATE TABLE template_syncs (
    tenant text PRIMARY KEY,
    synced_at double precision NOT NULL
);
-- v2: the event bus feed
CREATE TABLE feed (
    seq bigserial PRIMARY KEY,
    stream text NOT NULL,
    body text NOT NULL,
    created_at double precision NOT NULL
);
SELECT 1
"""

#: Step N brings a database from version N-1 to N; a new version appends one step, never edits one.
MIGRATIONS: tuple[str, ...] = (_V1, _V2)
SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version int NOT NULL)"


async def current_version(conn: asyncpg.Connection) -> int:
    """The database's schema version (0: empty, no Alfred tables yet)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    value = await conn.fetchval("SELECT max(version) FROM schema_version")
    return int(value or 0)


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the database to `SCHEMA_VERSION` (one transaction, under the advisory lock); the
    version found before. A newer database than this Alfred knows is refused, never touched."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_VERSION_TABLE)
        version = await current_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(f"database schema v{version} is newer than this Alfred (v{SCHEMA_VERSION})")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            log.warning("migrating the database schema to v%d", step)
            await conn.execute(MIGRATIONS[step - 1])
        if version < SCHEMA_VERSION:
            await conn.execute("DELETE FROM schema_version")
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", SCHEMA_VERSION)
        return version


async def check_version(conn: asyncpg.Connection) -> None:
    """A read-only store cannot migrate: a database at another version is refused with what to do."""
    version = await current_version(conn)
    if version != SCHEMA_VERSION:
        raise StoreError(f"database has schema v{version}, this Alfred reads v{SCHEMA_VERSION}: start the server once")
