"""A database made by the previous release (schema v1) is brought forward by the next node to
start, its rows kept, in one transaction; a failed step leaves v1 exactly as it was."""

from __future__ import annotations

import asyncpg
import pytest

from alfred_bot.store import StoreError
from alfred_bot.store.postgres import schema
from alfred_bot.store.postgres.engine import PostgresStore
from tests import payloads
from tests.contract.helpers import PNID, USER, row


async def _v1_database(url: str) -> None:
    """What the v1 release left: its schema (applied as that release did), its version row and
    some traffic (rows written with v1's columns only)."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TABLE schema_version (version int NOT NULL)")
            await conn.execute(schema.MIGRATIONS[0])
            await conn.execute("INSERT INTO schema_version VALUES (1)")
        raw = payloads.dump(payloads.text("from v1", id="wamid.OLD"))
        await conn.execute(
            "INSERT INTO inbox (event_id, tenant, phone_number_id, sender, type, timestamp, text, raw, state, "
            "received_at) VALUES ('wamid.OLD', 'home', $1, $2, 'text', 1, 'from v1', $3, 'pending', 1)",
            PNID,
            USER,
            raw,
        )
        await conn.execute(
            "INSERT INTO outbox (id, idem_key, tenant, recipient, type, payload, due_at, created_at) "
            "VALUES ('old-send', 'k1', 'home', $1, 'text', $2, 1, 1)",
            USER,
            row("old-send").payload,
        )
    finally:
        await conn.close()


_COLUMNS = "SELECT column_name FROM information_schema.columns WHERE table_name = 'outbox'"


async def test_a_v1_database_is_brought_forward_with_its_rows(pg_url: str) -> None:
    assert schema.SCHEMA_VERSION >= 2
    await _v1_database(pg_url)
    store = PostgresStore(pg_url)
    await store.open()
    try:
        assert [p.item.message.id for p in await store.pending(0, 10)] == ["wamid.OLD"]
        old = await store.message("old-send")
        assert old is not None and old["state"] == "queued"
        later = row("later", key="later")
        await store.enqueue([later])
        assert await store.message("later") is not None
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT version FROM schema_version") == schema.SCHEMA_VERSION
        assert {"send_at", "campaign_id"} <= {r["column_name"] for r in await conn.fetch(_COLUMNS)}
    finally:
        await conn.close()


async def test_a_failed_step_leaves_the_v1_database_as_it_was(pg_url: str) -> None:
    await _v1_database(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:  # something in the way of the v2 step: its index name is taken
        await conn.execute("CREATE INDEX outbox_scheduled ON inbox(seq)")
    finally:
        await conn.close()
    store = PostgresStore(pg_url)
    with pytest.raises(StoreError):
        await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT version FROM schema_version") == 1
        assert "send_at" not in {r["column_name"] for r in await conn.fetch(_COLUMNS)}  # the step rolled back whole
    finally:
        await conn.close()
