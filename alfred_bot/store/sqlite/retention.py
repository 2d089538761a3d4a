"""SQLite's scrub, archive and purge statements: HOW old rows lose personal data and go.

When to run them (hot period, delete period, the loop, the upload to cold storage) is the job in
`alfred_bot.retention`.

Each function does at most one batch per table, so a pass is many short transactions. The
archive reads exactly what the scrub would change (one predicate per table, `_SCRUBBABLE`, used
by both), and `scrub_batch(only=...)` then changes those rows and no others: a row is never
scrubbed without having been archived, even if others became old enough in between.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from alfred_bot.privacy import pseudonym
from alfred_bot.store.base import ARCHIVE_TABLES, ArchiveBatch

BATCH = 500

#: Per table: its key column and what makes a row due for scrubbing (past `cutoff` (?), finished,
#: not scrubbed yet). Pending messages and queued or sending messages are never touched.
_SCRUBBABLE: dict[str, tuple[str, str]] = {
    "inbox": ("seq", "received_at < ? AND state != 'pending' AND raw != x''"),
    "outbox": ("id", "created_at < ? AND state NOT IN ('queued', 'sending', 'scheduled', 'paused') AND payload != x''"),
    "statuses": ("key", "received_at < ? AND raw != x''"),
    # events can name people (user_preferences, unknown fields): past the hot period only the row stays
    "events": ("key", "received_at < ? AND raw != x''"),
    "rejected": ("key", "received_at < ? AND raw != x''"),
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
    "inbox": "text = NULL, name = NULL, raw = x''",
    "outbox": "payload = x'', error_details = NULL",
    "statuses": "raw = x''",
    "events": "raw = x''",
    "rejected": "raw = x''",
}
_DELETES = (
    "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox WHERE received_at < ? AND state != 'pending' LIMIT ?)",
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created_at < ? "
    "AND state NOT IN ('queued', 'sending', 'scheduled', 'paused') LIMIT ?)",
    "DELETE FROM statuses WHERE key IN (SELECT key FROM statuses WHERE received_at < ? LIMIT ?)",
    "DELETE FROM events WHERE key IN (SELECT key FROM events WHERE received_at < ? LIMIT ?)",
    "DELETE FROM rejected WHERE key IN (SELECT key FROM rejected WHERE received_at < ? LIMIT ?)",
    "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE at < ? LIMIT ?)",
    # a `stop` stays as long as the user wants it; a `resume` is the default and may go
    "DELETE FROM preferences WHERE rowid IN (SELECT rowid FROM preferences WHERE received_at < ? "
    "AND value != 'stop' LIMIT ?)",
)


def _hash(key: bytes, value: str | None) -> str | None:
    return pseudonym(key, value) if value else value


def _candidates(conn: sqlite3.Connection, table: str, cutoff: float, keys: Sequence[Any] | None) -> list[Any]:
    """Key and to-be-pseudonymised columns of the rows to scrub: one batch, or the listed keys
    that still qualify (in chunks, well below SQLite's limit on bound parameters)."""
    key_col, due = _SCRUBBABLE[table]
    sql = f"SELECT {', '.join((key_col, *_PSEUDONYMISED[table]))} FROM {table} WHERE {due}"
    if keys is None:
        return conn.execute(f"{sql} LIMIT {BATCH}", (cutoff,)).fetchall()
    rows: list[Any] = []
    for at in range(0, len(keys), BATCH):
        chunk = list(keys[at : at + BATCH])
        rows += conn.execute(f"{sql} AND {key_col} IN ({','.join('?' * len(chunk))})", (cutoff, *chunk)).fetchall()
    return rows


def _scrub_table(conn: sqlite3.Connection, key: bytes, table: str, cutoff: float, keys: Sequence[Any] | None) -> int:
    rows = _candidates(conn, table, cutoff, keys)
    sets = ", ".join([_CLEARED[table], *(f"{col} = ?" for col in _PSEUDONYMISED[table])])
    conn.executemany(
        f"UPDATE {table} SET {sets} WHERE {_SCRUBBABLE[table][0]} = ?",
        [(*(_hash(key, value) for value in row[1:]), row[0]) for row in rows],
    )
    return len(rows)


def scrub_batch(
    conn: sqlite3.Connection, key: bytes, cutoff: float, only: Mapping[str, Sequence[Any]] | None = None
) -> int:
    """Scrub up to one batch of each table older than `cutoff` or, with `only`, exactly the listed
    rows that still qualify (tables not listed are left alone); the number of rows changed."""
    # Opt-outs are never aged out: time passing is not the user writing again (they end only as
    # `consent.ends_opt_out` says), and forgetting one would let campaigns reach someone who said STOP.
    if only is None:
        return sum(_scrub_table(conn, key, table, cutoff, None) for table in ARCHIVE_TABLES)
    return sum(_scrub_table(conn, key, table, cutoff, only[table]) for table in ARCHIVE_TABLES if table in only)


Fetch = Callable[[str, tuple[Any, ...]], Awaitable[list[sqlite3.Row]]]


async def archive_batch(fetch: Fetch, cutoff: float, limit: int) -> ArchiveBatch:
    """Read (on the reader connection, beside the writer) the rows `scrub_batch` would change:
    whole rows as stored, for the archive, and their keys for `scrub_batch(only=...)`."""
    rows: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, list[str | int]] = {}
    for table in ARCHIVE_TABLES:
        key_col, due = _SCRUBBABLE[table]
        found = await fetch(f"SELECT * FROM {table} WHERE {due} LIMIT ?", (cutoff, limit))
        rows[table] = [dict(zip(row.keys(), tuple(row), strict=True)) for row in found]
        keys[table] = [row[key_col] for row in found]
    return ArchiveBatch(rows=rows, keys=keys)


def delete_batch(conn: sqlite3.Connection, cutoff: float) -> int:
    """Delete up to one batch per table of rows older than `cutoff`."""
    return sum(conn.execute(sql, (cutoff, BATCH)).rowcount for sql in _DELETES)
