"""PostgreSQL's scrub, archive and purge statements: the same rows, batches and rules as
`alfred_bot.store.sqlite.retention` (when to run them is the job in `alfred_bot.retention`).

Each call does at most one batch per table in one transaction. The scrub locks the rows it reads
(`FOR UPDATE`), so a node settling a send or completing a message at the same moment either
goes first (and the row is then judged on its new state) or waits for the scrub's commit.
Pseudonyms are computed in Python with `alfred_bot.privacy.pseudonym`, as on SQLite: both
engines turn one number into the same pseudonym.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from alfred_bot.privacy import pseudonym
from alfred_bot.store.base import ARCHIVE_TABLES, ArchiveBatch

BATCH = 500
_EMPTY = "''::bytea"

#: Per table: key column, its SQL type, and what makes a row due for scrubbing (older than `$1`,
#: finished, not scrubbed yet). Pending messages and queued or sending sends are never touched.
_SCRUBBABLE: dict[str, tuple[str, str, str]] = {
    "inbox": ("seq", "bigint", f"received_at < $1 AND state <> 'pending' AND raw <> {_EMPTY}"),
    "outbox": (
        "id",
        "text",
        f"created_at < $1 AND state NOT IN ('queued', 'sending', 'scheduled', 'paused') AND payload <> {_EMPTY}",
    ),
    "statuses": ("key", "text", f"received_at < $1 AND raw <> {_EMPTY}"),
    # events can name people (user_preferences, unknown fields): past the hot period only the row stays
    "events": ("key", "text", f"received_at < $1 AND raw <> {_EMPTY}"),
    "rejected": ("key", "text", f"received_at < $1 AND raw <> {_EMPTY}"),
}
#: Columns that become pseudonyms, and what is cleared outright.
_PSEUDONYMISED: dict[str, tuple[str, ...]] = {
    "inbox": ("sender", "user_id", "wa_id"),
    "outbox": ("recipient",),
    "statuses": ("recipient_id", "recipient_user_id"),
    "events": (),
    "rejected": (),
}
_CLEARED = {
    "inbox": f"text = NULL, name = NULL, raw = {_EMPTY}",
    "outbox": f"payload = {_EMPTY}, error_details = NULL",
    "statuses": f"raw = {_EMPTY}",
    "events": f"raw = {_EMPTY}",
    "rejected": f"raw = {_EMPTY}",
}
#: Columns only this engine has (leases, insertion order): left out of the archive, which holds
#: the same columns whichever engine wrote it.
_ENGINE_ONLY = frozenset({"owner", "lease_until"})
_ORDER_ONLY = {"outbox", "events", "rejected"}  # their `seq` is PostgreSQL's stand-in for SQLite's rowid

_DELETES = (
    "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox WHERE received_at < $1 AND state <> 'pending' LIMIT $2)",
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created_at < $1 "
    "AND state NOT IN ('queued', 'sending', 'scheduled', 'paused') LIMIT $2)",
    "DELETE FROM statuses WHERE key IN (SELECT key FROM statuses WHERE received_at < $1 LIMIT $2)",
    "DELETE FROM events WHERE key IN (SELECT key FROM events WHERE received_at < $1 LIMIT $2)",
    "DELETE FROM rejected WHERE key IN (SELECT key FROM rejected WHERE received_at < $1 LIMIT $2)",
    "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE at < $1 LIMIT $2)",
    # a `stop` stays as long as the user wants it; a `resume` is the default and may go
    "DELETE FROM preferences WHERE ctid IN (SELECT ctid FROM preferences WHERE received_at < $1 "
    "AND value <> 'stop' LIMIT $2)",
    # nodes gone for longer than the retention period (a live node's heartbeat is seconds old)
    "DELETE FROM nodes WHERE id IN (SELECT id FROM nodes WHERE seen_at < $1 LIMIT $2)",
)


def _hash(key: bytes, value: str | None) -> str | None:
    return pseudonym(key, value) if value else value


async def _scrub_table(
    conn: asyncpg.Connection, key: bytes, table: str, cutoff: float, keys: Sequence[Any] | None
) -> int:
    """Scrub one batch of `table` (or the listed keys that still qualify); rows changed."""
    key_col, key_type, due = _SCRUBBABLE[table]
    columns = _PSEUDONYMISED[table]
    select = f"SELECT {', '.join((key_col, *columns))} FROM {table} WHERE {due}"
    if keys is None:
        rows = await conn.fetch(f"{select} LIMIT {BATCH} FOR UPDATE", cutoff)
    else:
        rows = await conn.fetch(f"{select} AND {key_col} = ANY($2::{key_type}[]) FOR UPDATE", cutoff, list(keys))
    if not rows:
        return 0
    sets = ", ".join([_CLEARED[table], *(f"{col} = v.c{n}" for n, col in enumerate(columns))])
    arrays = ", ".join([f"$1::{key_type}[]", *(f"${n + 2}::text[]" for n in range(len(columns)))])
    names = ", ".join(["k", *(f"c{n}" for n in range(len(columns)))])
    values = [[r[0] for r in rows], *([_hash(key, r[n + 1]) for r in rows] for n in range(len(columns)))]
    await conn.execute(
        f"UPDATE {table} SET {sets} FROM unnest({arrays}) AS v({names}) WHERE {table}.{key_col} = v.k", *values
    )
    return len(rows)


async def scrub_batch(
    conn: asyncpg.Connection, key: bytes, cutoff: float, only: Mapping[str, Sequence[Any]] | None = None
) -> int:
    """Scrub up to one batch of each table older than `cutoff` or, with `only`, exactly the listed
    rows that still qualify (tables not listed are left alone); the number of rows changed."""
    # Opt-outs are never aged out: time passing is not the user writing again (they end only as
    # `consent.ends_opt_out` says), and forgetting one would let campaigns reach someone who said STOP.
    tables = [t for t in ARCHIVE_TABLES if only is None or t in only]
    changed = 0
    for table in tables:
        changed += await _scrub_table(conn, key, table, cutoff, None if only is None else only[table])
    return changed


def _archived(table: str, row: asyncpg.Record) -> dict[str, Any]:
    drop = _ENGINE_ONLY | ({"seq"} if table in _ORDER_ONLY else set())
    return {name: value for name, value in row.items() if name not in drop}


async def archive_batch(conn: asyncpg.Connection, cutoff: float, limit: int) -> ArchiveBatch:
    """Read (change nothing) the rows `scrub_batch` would change: whole rows as stored, with the
    SQLite schema's column names, and their keys for `scrub_batch(only=...)`."""
    rows: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, list[str | int]] = {}
    for table in ARCHIVE_TABLES:
        key_col, _, due = _SCRUBBABLE[table]
        found = await conn.fetch(f"SELECT * FROM {table} WHERE {due} ORDER BY {key_col} LIMIT $2", cutoff, limit)
        rows[table] = [_archived(table, row) for row in found]
        keys[table] = [row[key_col] for row in found]
    return ArchiveBatch(rows=rows, keys=keys)


async def delete_batch(conn: asyncpg.Connection, cutoff: float) -> int:
    """Delete up to one batch per table of rows older than `cutoff`."""
    deleted = 0
    for sql in _DELETES:
        status = await conn.execute(sql, cutoff, BATCH)
        deleted += int(status.rsplit(" ", 1)[1])
    return deleted
