"""Campaigns and synced templates on PostgreSQL (`store.campaigns`, `store.templates`).

The rules and the summary's shape are the SQLite engine's (`alfred_bot.store.sqlite.campaigns`).
What several nodes add: every write that depends on a campaign's state first locks its row
(`FOR UPDATE`), so a batch of recipients and a pause, resume or cancel on another node are applied
one after the other, never interleaved (a batch inserted beside a cancel is cancelled too). A row a
node is claiming right now is locked by the claim; the pause waits for it and then skips it (it is
`sending`), so a claim and a pause never both win. Released rows wake every node (NOTIFY).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from alfred_bot.store.base import CampaignSpec, OutboxRow, TemplateInfo
from alfred_bot.store.postgres import outbox
from alfred_bot.store.postgres.dialogs import Engine  # the engine, named structurally (no import cycle)
from alfred_bot.store.postgres.inbox import SAME_USER
from alfred_bot.store.postgres.text import safe, safe_struct
from alfred_bot.store.sqlite.campaigns import (
    ACTIONS,
    HOLD,
    HOLDABLE,
    SUMMARY_LIMIT,
    summary_of,
    template_of,
    template_row,
)
from alfred_bot.store.sqlite.events import MARKETING

_LOCK = "SELECT tenant, state FROM campaigns WHERE id = $1 FOR UPDATE"
#: `SAME_USER` with the recipient as `$2`, for each recipient of the batch.
_OPTED_OUT = (
    "SELECT r AS recipient FROM unnest($2::text[]) AS r WHERE EXISTS (SELECT 1 FROM optouts o WHERE o.tenant = $1 AND "
    + SAME_USER.format(col="o.user_id").replace("$2", "r")
    + ")"
)
_STOPPED = (
    "SELECT user_id FROM preferences WHERE tenant = $1 AND category = $2 AND value = 'stop' "
    "AND user_id = ANY($3::text[])"
)
_EXISTING = "SELECT idem_key FROM outbox WHERE tenant = $1 AND idem_key = ANY($2::text[])"
_SKIPPED = "SELECT recipient FROM campaign_skips WHERE campaign_id = $1 AND recipient = ANY($2::text[])"
_SKIP = (
    "INSERT INTO campaign_skips (campaign_id, recipient, reason) "
    "SELECT $1, u, w FROM unnest($2::text[], $3::text[]) AS k(u, w) ON CONFLICT DO NOTHING"
)
_RELEASE = (
    "UPDATE outbox SET state = CASE WHEN send_at IS NOT NULL AND send_at > $2 THEN 'scheduled' ELSE 'queued' END, "
    "due_at = GREATEST(due_at, $2) WHERE campaign_id = $1 AND state = 'paused'"
)
_CHANGE_ROWS = "UPDATE outbox SET state = $2 WHERE campaign_id = $1 AND state = ANY($3::text[])"
_SET_STATE = "UPDATE campaigns SET state = $2, updated_at = $3 WHERE id = $1"


async def _skips(conn: asyncpg.Connection, tenant: str, recipients: list[str], marketing: bool) -> dict[str, str]:
    why = {r["recipient"]: "opted_out" for r in await conn.fetch(_OPTED_OUT, tenant, recipients)}
    if marketing:
        for r in await conn.fetch(_STOPPED, tenant, MARKETING, recipients):
            why.setdefault(r["user_id"], "marketing_stopped")
    return why


async def _unseen(
    conn: asyncpg.Connection, campaign_id: str, tenant: str, rows: Sequence[OutboxRow]
) -> list[OutboxRow]:
    queued = {r["idem_key"] for r in await conn.fetch(_EXISTING, tenant, [r.idem_key for r in rows])}
    skipped = {r["recipient"] for r in await conn.fetch(_SKIPPED, campaign_id, [r.recipient for r in rows])}
    fresh: dict[str, OutboxRow] = {}
    for r in rows:
        if r.idem_key not in queued and r.recipient not in skipped:
            fresh.setdefault(r.recipient, r)
    return list(fresh.values())


async def _add(
    conn: asyncpg.Connection, campaign_id: str, rows: Sequence[OutboxRow], marketing: bool, now: float
) -> dict[str, int] | None:
    found = await conn.fetchrow(_LOCK, campaign_id)
    if found is None:
        return None
    tenant, state = found["tenant"], found["state"]
    fresh = await _unseen(conn, campaign_id, tenant, rows)
    why = await _skips(conn, tenant, [r.recipient for r in fresh], marketing)
    if why:
        await conn.execute(_SKIP, campaign_id, list(why), list(why.values()))
    queued = [r for r in fresh if r.recipient not in why]
    if queued:
        await outbox.insert_rows(conn, queued, now)
    if state in HOLD:
        await conn.execute(_CHANGE_ROWS, campaign_id, HOLD[state], list(HOLDABLE))
    elif queued:
        await outbox.notify(conn)
    return {"queued": len(queued), "skipped": len(why), "duplicates": len(rows) - len(queued) - len(why)}


async def _finish(conn: asyncpg.Connection, campaign_id: str, now: float) -> str | None:
    found = await conn.fetchrow(_LOCK, campaign_id)
    if found is None or found["state"] != "loading":
        return None if found is None else str(found["state"])
    await conn.execute(_SET_STATE, campaign_id, "running", now)
    await conn.execute(_RELEASE, campaign_id, now)
    await outbox.notify(conn)
    return "running"


async def _control(conn: asyncpg.Connection, campaign_id: str, action: str, now: float) -> str | None:
    applies, after, rows = ACTIONS[action]
    found = await conn.fetchrow(_LOCK, campaign_id)
    if found is None or found["state"] not in applies:
        return None if found is None else str(found["state"])
    await conn.execute(_SET_STATE, campaign_id, after, now)
    if action == "resume":
        await conn.execute(_RELEASE, campaign_id, now)
        await outbox.notify(conn)
    else:
        await conn.execute(_CHANGE_ROWS, campaign_id, "paused" if action == "pause" else "cancelled", list(rows))
    return after


_CAMPAIGN = "SELECT id, tenant, name, state, template, created_at, send_at FROM campaigns"
_STATES = "SELECT state, COUNT(*) AS n FROM outbox WHERE campaign_id = $1 GROUP BY state"
_FAILURES = (
    "SELECT error_code, COUNT(*) AS n FROM outbox WHERE campaign_id = $1 AND state = 'failed' "
    "GROUP BY error_code ORDER BY COUNT(*) DESC"
)
_UPSERT = """
INSERT INTO templates (tenant, name, language, id, status, category, parameter_format, components, synced_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (tenant, name, language) DO UPDATE SET id = excluded.id,
    status = excluded.status, category = excluded.category, parameter_format = excluded.parameter_format,
    components = excluded.components, synced_at = excluded.synced_at
"""
_SYNCED = (
    "INSERT INTO template_syncs (tenant, synced_at) VALUES ($1, $2) "
    "ON CONFLICT (tenant) DO UPDATE SET synced_at = excluded.synced_at"
)


class PostgresCampaigns:
    """`store.campaigns` on PostgreSQL: each call one transaction of the engine."""

    def __init__(self, store: Engine) -> None:
        self._store = store

    async def create(self, spec: CampaignSpec) -> bool:
        now, spec = self._store._clock(), safe_struct(spec)
        sql = (
            "INSERT INTO campaigns (id, tenant, name, state, template, created_at, send_at, updated_at) "
            "VALUES ($1, $2, $3, 'loading', $4, $5, $6, $5) ON CONFLICT (id) DO NOTHING"
        )
        template = safe(json.dumps(spec.template))
        done = await self._store._write(
            lambda c: c.execute(sql, spec.id, spec.tenant, spec.name, template, now, spec.send_at)
        )
        return str(done).endswith(" 1")

    async def add(self, campaign_id: str, rows: Sequence[OutboxRow], *, marketing: bool) -> dict[str, int]:
        now, batch = self._store._clock(), [safe_struct(r) for r in rows]
        result = await self._store._write(lambda c: _add(c, campaign_id, batch, marketing, now))
        if result is None:
            raise KeyError(campaign_id)
        return result

    async def finish(self, campaign_id: str) -> str | None:
        now = self._store._clock()
        return await self._store._write(lambda c: _finish(c, campaign_id, now))

    async def control(self, campaign_id: str, action: str) -> str | None:
        now = self._store._clock()
        return await self._store._write(lambda c: _control(c, campaign_id, action, now))

    async def summary(self, campaign_id: str) -> dict[str, Any] | None:
        rows = await self._store._read(lambda c: c.fetch(f"{_CAMPAIGN} WHERE id = $1", safe(campaign_id)))
        return (await self._summaries(rows))[0] if rows else None

    async def summaries(self, tenant: str | None = None) -> list[dict[str, Any]]:
        order = f"ORDER BY created_at DESC, id LIMIT {SUMMARY_LIMIT}"
        if tenant is None:
            rows = await self._store._read(lambda c: c.fetch(f"{_CAMPAIGN} {order}"))
        else:
            rows = await self._store._read(lambda c: c.fetch(f"{_CAMPAIGN} WHERE tenant = $1 {order}", safe(tenant)))
        return await self._summaries(rows)

    async def _summaries(self, campaigns: Iterable[asyncpg.Record]) -> list[dict[str, Any]]:
        now = self._store._clock()

        async def read(c: asyncpg.Connection) -> list[dict[str, Any]]:
            shown = []
            for row in campaigns:
                states = {r["state"]: r["n"] for r in await c.fetch(_STATES, row["id"])}
                failures = {r["error_code"]: r["n"] for r in await c.fetch(_FAILURES, row["id"])}
                skipped = await c.fetchval("SELECT COUNT(*) FROM campaign_skips WHERE campaign_id = $1", row["id"])
                shown.append(summary_of(dict(row), states, failures, int(skipped), now))
            return shown

        return await self._store._read(read)


class PostgresTemplates:
    """`store.templates` on PostgreSQL."""

    def __init__(self, store: Engine) -> None:
        self._store = store

    async def replace(self, tenant: str, templates: Sequence[TemplateInfo]) -> None:
        now, values = self._store._clock(), [_values(tenant, t, self._store._clock()) for t in templates]

        async def op(c: asyncpg.Connection) -> None:
            await c.execute("DELETE FROM templates WHERE tenant = $1", tenant)
            if values:
                await c.executemany(_UPSERT, values)
            await c.execute(_SYNCED, tenant, now)

        await self._store._write(op)

    async def upsert(self, tenant: str, template: TemplateInfo) -> None:
        values = _values(tenant, template, self._store._clock())
        await self._store._write(lambda c: c.execute(_UPSERT, *values))

    async def remove(self, tenant: str, name: str, template_id: str | None = None) -> int:
        sql, args = "DELETE FROM templates WHERE tenant = $1 AND name = $2", [tenant, safe(name)]
        if template_id is not None:
            sql, args = f"{sql} AND id = $3", [*args, safe(template_id)]
        done = await self._store._write(lambda c: c.execute(sql, *args))
        return int(str(done).split()[-1])

    async def templates(self, tenant: str, name: str | None = None) -> list[TemplateInfo]:
        sql, args = "SELECT * FROM templates WHERE tenant = $1", [tenant]
        if name is not None:
            sql, args = f"{sql} AND name = $2", [tenant, safe(name)]
        sql = f'{sql} ORDER BY name COLLATE "C", language COLLATE "C"'
        rows = await self._store._read(lambda c: c.fetch(sql, *args))
        return [template_of(r) for r in rows]

    async def synced_at(self, tenant: str) -> float | None:
        sql = "SELECT synced_at FROM template_syncs WHERE tenant = $1"
        value = await self._store._read(lambda c: c.fetchval(sql, tenant))
        return None if value is None else float(value)


def _values(tenant: str, t: TemplateInfo, now: float) -> tuple[Any, ...]:
    return tuple(safe(v) for v in template_row(tenant, t, now))
