"""The SQLite store on its own: durability settings, group commit, isolation, completion."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from alfred_bot.parse import parse_body
from alfred_bot.store import Completion, OutboxRow, SqliteStore, StoreError
from tests import payloads

TENANTS = {payloads.PNID: "home"}


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SqliteStore(tmp_path / "sub" / "alfred.db")
    await s.open()
    yield s
    await s.close()


def _body(*msgs: dict[str, Any]) -> Any:
    return parse_body(payloads.body_of(*msgs), TENANTS)


async def test_pragmas_in_force(store: SqliteStore) -> None:
    mode = await store.writer.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    sync = await store.writer.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    assert (mode, sync) == ("wal", 2)  # 2 = FULL


async def test_concurrent_ingests_share_commits(store: SqliteStore) -> None:
    bodies = [_body(payloads.text(f"m{i}")) for i in range(200)]
    results = await asyncio.gather(*(store.ingest(b) for b in bodies))
    assert all(len(r) == 1 for r in results)
    assert store.writer.writes == 200
    assert store.writer.groups < 50


async def test_failing_write_is_isolated_in_its_group(store: SqliteStore) -> None:
    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO events (key, field, raw, received_at) VALUES ('k', 'f', x'00', 0)")
        raise ValueError("bug in one write")

    results = await asyncio.gather(
        store.ingest(_body(payloads.text("a", id="wamid.A"))),
        store.writer.submit(bad),
        store.ingest(_body(payloads.text("b", id="wamid.B"))),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert (store.writer.writes, store.writer.groups) == (3, 1)  # they shared one transaction
    assert [len(r) for r in (results[0], results[2])] == [1, 1]
    assert [r["id"] for r in await store.recent_inbound(10)] == ["wamid.B", "wamid.A"]
    assert await store.writer.read(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0]) == 0


async def test_complete_is_once_and_atomic(store: SqliteStore) -> None:
    assert len(await store.ingest(_body(payloads.text("hi", id="wamid.C")))) == 1
    reply = OutboxRow(
        id="o1",
        idem_key="reply:wamid.C:000",
        tenant="home",
        recipient=payloads.USER,
        type="text",
        payload=b"{}",
        source_event_id="wamid.C",
    )
    assert await store.complete(Completion("wamid.C", "handled", (reply,))) is True
    twin = msgspec.structs.replace(reply, id="o2")  # a second run of the same handler
    assert await store.complete(Completion("wamid.C", "handled", (twin,))) is False
    ids = await store.writer.read(lambda c: [r[0] for r in c.execute("SELECT id FROM outbox")])
    assert ids == ["o1"]
    assert await store.pending(0, 10) == []


async def test_pending_rebuilds_items(store: SqliteStore) -> None:
    await store.ingest(_body(payloads.text("x", id="wamid.P1"), payloads.SAMPLES["image"]))
    pending = await store.pending(0, 10)
    assert [p.item.message.type for p in pending] == ["text", "image"]
    assert pending[0].item.contact is not None and pending[0].item.contact.name == "Ana"
    assert pending[0].item.tenant == "home"
    assert await store.pending(pending[0].seq, 10) == pending[1:]


async def test_newer_schema_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "alfred.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    await store.close()


async def test_writes_after_close_are_refused(store: SqliteStore) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.ingest(_body(payloads.text("late")))
    assert await store.healthy() is False


async def test_undecodable_pending_row_is_skipped_not_blocking(store: SqliteStore) -> None:
    def insert_bad(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO inbox (event_id, tenant, phone_number_id, type, timestamp, raw, state, received_at) "
            "VALUES ('wamid.OLD', 'home', ?, 'text', 1, ?, 'pending', 0)",
            (payloads.PNID, b'{"id": "wamid.OLD", "type": "text", "timestamp": 1, "from": "1", "text": null}'),
        )

    await store.writer.submit(insert_bad)
    await store.ingest(_body(payloads.text("after", id="wamid.AFTER")))
    assert [p.item.message.id for p in await store.pending(0, 10)] == ["wamid.AFTER"]
