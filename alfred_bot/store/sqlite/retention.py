"""SQLite's scrub and purge statements: HOW old rows lose personal data and go.

When to run them (hot period, delete period, the loop) is the job in `alfred_bot.retention`.

Each function does at most one batch per table, so a pass is many short transactions.
"""

from __future__ import annotations

import sqlite3

from alfred_bot.privacy import pseudonym

BATCH = 500

_SCRUB_INBOX = f"""
SELECT seq, sender, user_id, wa_id FROM inbox WHERE received_at < ? AND state != 'pending' AND raw != x'' LIMIT {BATCH}
"""
_SCRUB_OUTBOX = f"""
SELECT id, recipient FROM outbox
WHERE created_at < ? AND state NOT IN ('queued', 'sending') AND payload != x''
LIMIT {BATCH}
"""
_SCRUB_STATUSES = (
    f"SELECT key, recipient_id, recipient_user_id FROM statuses WHERE received_at < ? AND raw != x'' LIMIT {BATCH}"
)
#: Events can name people (user_preferences, unknown fields): past the hot period only the row stays.
_SCRUB_EVENTS = (
    f"UPDATE events SET raw = x'' WHERE key IN (SELECT key FROM events WHERE received_at < ? AND raw != x'' "
    f"LIMIT {BATCH})"
)
_DELETES = (
    "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox WHERE received_at < ? AND state != 'pending' LIMIT ?)",
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created_at < ? "
    "AND state NOT IN ('queued', 'sending') LIMIT ?)",
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


def scrub_batch(conn: sqlite3.Connection, key: bytes, cutoff: float) -> int:
    """Scrub up to one batch of each table older than `cutoff`; the number of rows changed."""
    changed = 0
    for seq, sender, user_id, wa_id in conn.execute(_SCRUB_INBOX, (cutoff,)).fetchall():
        conn.execute(
            "UPDATE inbox SET text = NULL, name = NULL, raw = x'', sender = ?, user_id = ?, wa_id = ? WHERE seq = ?",
            (_hash(key, sender), _hash(key, user_id), _hash(key, wa_id), seq),
        )
        changed += 1
    for outbox_id, recipient in conn.execute(_SCRUB_OUTBOX, (cutoff,)).fetchall():
        conn.execute(
            "UPDATE outbox SET payload = x'', recipient = ?, error_details = NULL WHERE id = ?",
            (_hash(key, recipient), outbox_id),
        )
        changed += 1
    for status_key, recipient, user_id in conn.execute(_SCRUB_STATUSES, (cutoff,)).fetchall():
        conn.execute(
            "UPDATE statuses SET raw = x'', recipient_id = ?, recipient_user_id = ? WHERE key = ?",
            (_hash(key, recipient), _hash(key, user_id), status_key),
        )
        changed += 1
    changed += conn.execute(_SCRUB_EVENTS, (cutoff,)).rowcount
    changed += conn.execute(
        f"UPDATE rejected SET raw = x'' WHERE key IN (SELECT key FROM rejected WHERE received_at < ? "
        f"AND raw != x'' LIMIT {BATCH})",
        (cutoff,),
    ).rowcount
    # Opt-outs are never aged out: time passing is not the user writing again (they end only as
    # `consent.ends_opt_out` says), and forgetting one would let campaigns reach someone who said STOP.
    return changed


def delete_batch(conn: sqlite3.Connection, cutoff: float) -> int:
    """Delete up to one batch per table of rows older than `cutoff`."""
    return sum(conn.execute(sql, (cutoff, BATCH)).rowcount for sql in _DELETES)
