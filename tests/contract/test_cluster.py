"""Cluster contract: `take` leases pending messages in per-user order, `nodes` shows this node.

On SQLite the process is the only node; on PostgreSQL several nodes share the database and
`tests/test_postgres.py` adds what only a shared engine can show (takeover, NOTIFY)."""

from __future__ import annotations

from alfred_bot.store import Completion, Store
from tests.contract.helpers import BIZ_PNID, PNID, body, handled, text

OTHER = "15550009999"


async def test_take_hands_out_each_pending_message_once(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.A"), text("wamid.B", sender=OTHER)))
    first = await engine_store.take(10)
    assert [p.item.message.id for p in first] == ["wamid.A", "wamid.B"]
    assert await engine_store.take(10) == []  # held by this node until completed
    assert [p.item.message.id for p in await engine_store.pending(0, 10)] == ["wamid.A", "wamid.B"]


async def test_take_keeps_each_users_messages_in_order(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.1"), text("wamid.2"), text("wamid.X", sender=OTHER)))
    assert [p.item.message.id for p in await engine_store.take(10)] == ["wamid.1", "wamid.X"]
    assert await engine_store.take(10) == []  # wamid.2 waits until its user's earlier message is done
    assert await handled(engine_store, "wamid.1")
    assert [p.item.message.id for p in await engine_store.take(10)] == ["wamid.2"]


async def test_take_respects_its_limit_and_resumes(engine_store: Store) -> None:
    await engine_store.ingest(body(*(text(f"wamid.{i}", sender=f"1555000{i:04d}") for i in range(5))))
    assert len(await engine_store.take(2)) == 2
    assert len(await engine_store.take(2)) == 2
    assert [p.item.message.id for p in await engine_store.take(2)] == ["wamid.4"]


async def test_the_same_user_on_two_numbers_is_two_lines(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.H1"), text("wamid.H2")))
    await engine_store.ingest(body(text("wamid.B1"), pnid=BIZ_PNID))
    taken = {(p.item.tenant, p.item.message.id) for p in await engine_store.take(10)}
    assert taken == {("home", "wamid.H1"), ("biz", "wamid.B1")}


async def test_a_failed_completion_releases_the_user(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.F1"), text("wamid.F2")))
    [taken] = await engine_store.take(10)
    assert await engine_store.complete(Completion(taken.item.message.id, "failed", error="boom", phone_number_id=PNID))
    assert [p.item.message.id for p in await engine_store.take(10)] == ["wamid.F2"]


async def test_nodes_lists_this_node_alive(engine_store: Store) -> None:
    nodes = await engine_store.nodes()
    assert len(nodes) >= 1
    mine = nodes[0]
    assert {"id", "host", "role", "version", "pid", "started_at", "seen_at", "alive"} <= set(mine)
    assert mine["alive"] is True and mine["role"] in {"all", "web", "worker"}



async def test_a_released_message_can_be_taken_again(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.R1"), text("wamid.R2")))
    [taken] = await engine_store.take(10)
    assert await engine_store.take(10) == []
    await engine_store.release(taken.item.message.id, PNID)
    assert [p.item.message.id for p in await engine_store.take(10)] == ["wamid.R1"]  # still first in line
