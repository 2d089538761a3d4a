"""Campaigns and synced templates on SQLite (`store.campaigns`, `store.templates`).

A campaign's sends are ordinary outbox rows (priority 1, `campaign_id` set), so pacing, retries,
statuses and the claim's "conversation first" order apply to them unchanged. What a campaign adds
lives in the rows' `state`: while the campaign is `loading` or `paused` its waiting rows are
`paused` (the claim only takes `queued` rows), and a cancel makes them `cancelled`. Recipients
not sent to (opted out, stopped marketing) are kept in `campaign_skips`, one per recipient.

The shape of a summary is engine-neutral (`summary_of`): the PostgreSQL engine uses it too.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from alfred_bot.store.base import CampaignSpec, OutboxRow, TemplateInfo
from alfred_bot.store.sqlite import outbox
from alfred_bot.store.sqlite.dialogs import Engine  # the engine, named structurally (no import cycle)
from alfred_bot.store.sqlite.events import MARKETING

#: Row states that still wait to be sent, in any form (counted as `queued`).
WAITING = ("queued", "sending", "scheduled", "paused")
#: Row states a pause holds and a cancel ends (a row in flight finishes either way).
HOLDABLE = ("queued", "scheduled")
#: What each stored campaign state does to rows inserted while it holds.
HOLD = {"loading": "paused", "paused": "paused", "cancelled": "cancelled"}
#: action -> (stored states it applies to, the state after, the row states it changes).
ACTIONS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "pause": (("running",), "paused", HOLDABLE),
    "resume": (("paused",), "running", ("paused",)),
    "cancel": (("loading", "running", "paused"), "cancelled", (*HOLDABLE, "paused")),
}
SUMMARY_LIMIT = 200


def idem_key(campaign_id: str, recipient: str) -> str:
    """One send per (campaign, recipient): a re-run of the same upload queues nothing twice."""
    return f"campaign:{campaign_id}:{recipient}"


def counts_of(states: Mapping[str, int], skipped: int) -> dict[str, int]:
    """Exclusive counts by each send's current state (see `Campaigns.summaries`)."""
    return {
        "queued": sum(states.get(s, 0) for s in WAITING),
        "sent": states.get("sent", 0),
        "delivered": states.get("delivered", 0),
        "read": states.get("read", 0) + states.get("played", 0),
        "failed": states.get("failed", 0) + states.get("dropped", 0),
        "skipped": skipped + states.get("skipped", 0),  # (rows: the user opted out after they were queued)
        "cancelled": states.get("cancelled", 0),
    }


def shown_state(stored: str, counts: Mapping[str, int], send_at: float | None, now: float) -> str:
    """`running` is refined for people: `scheduled` before its time, `done` when nothing waits."""
    if stored != "running":
        return stored
    if counts["queued"] == 0:
        return "done"
    started = counts["sent"] + counts["delivered"] + counts["read"] + counts["failed"]
    return "scheduled" if send_at is not None and send_at > now and not started else "running"


def summary_of(
    campaign: Any, states: Mapping[str, int], failures: Mapping[Any, int], skipped: int, now: float
) -> dict[str, Any]:
    """The JSON-ready summary of one campaign (the shape /work/notes/campaigns-api.md documents)."""
    counts = counts_of(states, skipped)
    return {
        "id": campaign["id"],
        "tenant": campaign["tenant"],
        "name": campaign["name"],
        "state": shown_state(campaign["state"], counts, campaign["send_at"], now),
        "template": json.loads(campaign["template"]),
        "created_at": campaign["created_at"],
        "send_at": campaign["send_at"],
        "counts": counts,
        "total": sum(counts.values()),
        "failures_by_code": {("unknown" if code is None else str(code)): n for code, n in failures.items()},
    }


def template_row(tenant: str, t: TemplateInfo, now: float) -> tuple[Any, ...]:
    return (tenant, t.name, t.language, t.id, t.status, t.category, t.parameter_format, json.dumps(t.components), now)


def template_of(row: Any) -> TemplateInfo:
    """A stored template (an SQLite row or an asyncpg record, by column name)."""
    return TemplateInfo(
        name=row["name"],
        language=row["language"],
        status=row["status"],
        category=row["category"],
        id=row["id"],
        parameter_format=row["parameter_format"],
        components=json.loads(row["components"]),
    )


# ---------------------------------------------------------------------------- writer-thread ops

_OPTED_OUT = """
SELECT r.value FROM json_each(?2) r WHERE EXISTS (SELECT 1 FROM optouts o WHERE o.tenant = ?1 AND (o.user = r.value
    OR o.user IN (SELECT user_id FROM inbox WHERE tenant = ?1 AND sender = r.value AND user_id IS NOT NULL)
    OR o.user IN (SELECT sender FROM inbox WHERE tenant = ?1 AND user_id = r.value AND sender IS NOT NULL)))
"""
_STOPPED = (
    "SELECT user FROM preferences WHERE tenant = ? AND category = ? AND value = 'stop' "
    "AND user IN (SELECT value FROM json_each(?))"
)
_EXISTING = "SELECT idem_key FROM outbox WHERE tenant = ? AND idem_key IN (SELECT value FROM json_each(?))"
_SKIPPED = (
    "SELECT recipient FROM campaign_skips WHERE campaign_id = ? AND recipient IN (SELECT value FROM json_each(?))"
)


def skips(conn: sqlite3.Connection, tenant: str, recipients: list[str], marketing: bool) -> dict[str, str]:
    """Recipients not to send to, with why: opted out (by any id of theirs, as `opted_out`), or,
    for a marketing template, their latest preference stopped marketing messages."""
    listed = json.dumps(recipients)
    why = {r[0]: "opted_out" for r in conn.execute(_OPTED_OUT, (tenant, listed))}
    if marketing:
        for (user,) in conn.execute(_STOPPED, (tenant, MARKETING, listed)):
            why.setdefault(user, "marketing_stopped")
    return why


def _add_op(campaign_id: str, rows: Sequence[OutboxRow], marketing: bool, now: float) -> Callable[..., Any]:
    def op(conn: sqlite3.Connection) -> dict[str, int] | None:
        found = conn.execute("SELECT tenant, state FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
        if found is None:
            return None
        tenant, state = found
        fresh = _unseen(conn, campaign_id, tenant, rows)
        why = skips(conn, tenant, [r.recipient for r in fresh], marketing)
        conn.executemany(
            "INSERT INTO campaign_skips (campaign_id, recipient, reason) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [(campaign_id, user, reason) for user, reason in why.items()],
        )
        queued = [r for r in fresh if r.recipient not in why]
        outbox.insert_rows(conn, queued, now)
        if state in HOLD:
            hold = f"({','.join('?' * len(HOLDABLE))})"
            conn.execute(
                f"UPDATE outbox SET state = ? WHERE campaign_id = ? AND state IN {hold}",
                (HOLD[state], campaign_id, *HOLDABLE),
            )
        return {"queued": len(queued), "skipped": len(why), "duplicates": len(rows) - len(queued) - len(why)}

    return op


def _unseen(conn: sqlite3.Connection, campaign_id: str, tenant: str, rows: Sequence[OutboxRow]) -> list[OutboxRow]:
    """The batch's rows whose recipient the campaign has neither queued nor skipped (each once)."""
    keys = json.dumps([r.idem_key for r in rows])
    queued = {k for (k,) in conn.execute(_EXISTING, (tenant, keys))}
    skipped = {u for (u,) in conn.execute(_SKIPPED, (campaign_id, json.dumps([r.recipient for r in rows])))}
    fresh: dict[str, OutboxRow] = {}
    for r in rows:
        if r.idem_key not in queued and r.recipient not in skipped:
            fresh.setdefault(r.recipient, r)
    return list(fresh.values())


_RELEASE = (
    "UPDATE outbox SET state = CASE WHEN send_at IS NOT NULL AND send_at > ? THEN 'scheduled' ELSE 'queued' END, "
    "due_at = MAX(due_at, ?) WHERE campaign_id = ? AND state = 'paused'"
)


def _finish_op(campaign_id: str, now: float) -> Callable[..., Any]:
    def op(conn: sqlite3.Connection) -> str | None:
        found = conn.execute("SELECT state FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
        if found is None or found[0] != "loading":
            return None if found is None else str(found[0])
        conn.execute("UPDATE campaigns SET state = 'running', updated_at = ? WHERE id = ?", (now, campaign_id))
        conn.execute(_RELEASE, (now, now, campaign_id))
        return "running"

    return op


def _control_op(campaign_id: str, action: str, now: float) -> Callable[..., Any]:
    applies, after, rows = ACTIONS[action]

    def op(conn: sqlite3.Connection) -> str | None:
        found = conn.execute("SELECT state FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
        if found is None or found[0] not in applies:
            return None if found is None else str(found[0])
        conn.execute("UPDATE campaigns SET state = ?, updated_at = ? WHERE id = ?", (after, now, campaign_id))
        if action == "resume":
            conn.execute(_RELEASE, (now, now, campaign_id))
        else:
            marks = ",".join("?" * len(rows))
            conn.execute(
                f"UPDATE outbox SET state = ? WHERE campaign_id = ? AND state IN ({marks})",
                ("paused" if action == "pause" else "cancelled", campaign_id, *rows),
            )
        return after

    return op


def _replace_op(tenant: str, templates: Sequence[TemplateInfo], now: float) -> Callable[..., Any]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM templates WHERE tenant = ?", (tenant,))
        conn.executemany(_UPSERT, [template_row(tenant, t, now) for t in templates])
        conn.execute(
            "INSERT INTO template_syncs (tenant, synced_at) VALUES (?, ?) "
            "ON CONFLICT(tenant) DO UPDATE SET synced_at = excluded.synced_at",
            (tenant, now),
        )

    return op


_UPSERT = """
INSERT INTO templates (tenant, name, language, id, status, category, parameter_format, components, synced_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(tenant, name, language) DO UPDATE SET id = excluded.id,
    status = excluded.status, category = excluded.category, parameter_format = excluded.parameter_format,
    components = excluded.components, synced_at = excluded.synced_at
"""
_CAMPAIGN = "SELECT id, tenant, name, state, template, created_at, send_at FROM campaigns"


class SqliteCampaigns:
    """`store.campaigns` on SQLite: writes on the group-commit writer, reads on the reader."""

    def __init__(self, store: Engine) -> None:
        self._store = store

    async def create(self, spec: CampaignSpec) -> bool:
        now = self._store._clock()
        values = (spec.id, spec.tenant, spec.name, json.dumps(spec.template), now, spec.send_at, now)

        def op(conn: sqlite3.Connection) -> bool:
            sql = (
                "INSERT INTO campaigns (id, tenant, name, state, template, created_at, send_at, updated_at) "
                "VALUES (?, ?, ?, 'loading', ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING"
            )
            return conn.execute(sql, values).rowcount == 1

        result: bool = await self._store._write(op)
        return result

    async def add(self, campaign_id: str, rows: Sequence[OutboxRow], *, marketing: bool) -> dict[str, int]:
        result: dict[str, int] | None = await self._store._write(
            _add_op(campaign_id, list(rows), marketing, self._store._clock())
        )
        if result is None:
            raise KeyError(campaign_id)
        return result

    async def finish(self, campaign_id: str) -> str | None:
        result: str | None = await self._store._write(_finish_op(campaign_id, self._store._clock()))
        return result

    async def control(self, campaign_id: str, action: str) -> str | None:
        result: str | None = await self._store._write(_control_op(campaign_id, action, self._store._clock()))
        return result

    async def summary(self, campaign_id: str) -> dict[str, Any] | None:
        rows = await self._store._fetch(f"{_CAMPAIGN} WHERE id = ?", (campaign_id,))
        return (await self._summaries(rows))[0] if rows else None

    async def summaries(self, tenant: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE tenant = ? ", (tenant,)) if tenant is not None else ("", ())
        sql = f"{_CAMPAIGN} {where}ORDER BY created_at DESC, id LIMIT {SUMMARY_LIMIT}"
        return await self._summaries(await self._store._fetch(sql, params))

    async def _summaries(self, campaigns: Iterable[sqlite3.Row]) -> list[dict[str, Any]]:
        fetch, now, shown = self._store._fetch, self._store._clock(), []
        for c in campaigns:
            states = await fetch("SELECT state, COUNT(*) FROM outbox WHERE campaign_id = ? GROUP BY state", (c["id"],))
            failures = await fetch(
                "SELECT error_code, COUNT(*) FROM outbox WHERE campaign_id = ? AND state = 'failed' "
                "GROUP BY error_code ORDER BY COUNT(*) DESC",
                (c["id"],),
            )
            skipped = await fetch("SELECT COUNT(*) FROM campaign_skips WHERE campaign_id = ?", (c["id"],))
            shown.append(summary_of(c, dict(map(tuple, states)), dict(map(tuple, failures)), skipped[0][0], now))
        return shown


class SqliteTemplates:
    """`store.templates` on SQLite."""

    def __init__(self, store: Engine) -> None:
        self._store = store

    async def replace(self, tenant: str, templates: Sequence[TemplateInfo]) -> None:
        await self._store._write(_replace_op(tenant, list(templates), self._store._clock()))

    async def upsert(self, tenant: str, template: TemplateInfo) -> None:
        values = template_row(tenant, template, self._store._clock())

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_UPSERT, values)

        await self._store._write(op)

    async def remove(self, tenant: str, name: str, template_id: str | None = None) -> int:
        one = () if template_id is None else (template_id,)
        sql, params = "DELETE FROM templates WHERE tenant = ? AND name = ?", (tenant, name, *one)
        if template_id is not None:
            sql = f"{sql} AND id = ?"
        result: int = await self._store._write(lambda conn: conn.execute(sql, params).rowcount)
        return result

    async def templates(self, tenant: str, name: str | None = None) -> list[TemplateInfo]:
        sql, params = "SELECT * FROM templates WHERE tenant = ?", (tenant, *(() if name is None else (name,)))
        if name is not None:
            sql = f"{sql} AND name = ?"
        return [template_of(r) for r in await self._store._fetch(f"{sql} ORDER BY name, language", params)]

    async def synced_at(self, tenant: str) -> float | None:
        rows = await self._store._fetch("SELECT synced_at FROM template_syncs WHERE tenant = ?", (tenant,))
        return float(rows[0][0]) if rows else None
