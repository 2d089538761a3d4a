"""Read models: events, conversation history, replies of one message, counts, audit, read-only access."""

from __future__ import annotations

import pytest

from alfred_bot.store import AuditEntry, Completion, Settlement, Store, StoreError
from tests.contract.conftest import FakeClock
from tests.contract.helpers import BSUID, PNID, USER, body, claim_all, event, row, text


async def test_events_are_newest_first_with_filters(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.ingest(event("account_update", {"event": "A"}, time=100))
    clock.advance(1)
    template = {"event": "B", "metadata": {"phone_number_id": PNID}}
    await engine_store.ingest(event("message_template_status_update", template))
    clock.advance(1)
    await engine_store.ingest(event("account_update", {"event": "C", "metadata": {"phone_number_id": PNID}}, time=300))
    events = await engine_store.events(10)
    assert [(e["field"], e["time"], e["received_at"]) for e in events] == [
        ("account_update", 300, clock.now),
        ("message_template_status_update", None, clock.now - 1),
        ("account_update", 100, clock.now - 2),
    ]
    assert set(events[0]) == {"field", "tenant", "phone_number_id", "waba_id", "time", "received_at", "value"}
    assert events[1]["value"] == template and events[1]["waba_id"] == "WABA1"
    assert [e["time"] for e in await engine_store.events(10, field="account_update")] == [300, 100]
    assert [e["time"] for e in await engine_store.events(10, field="account_update", tenant="home")] == [300]
    assert [e["value"]["event"] for e in await engine_store.events(1)] == ["C"]


async def test_recent_inbound_is_newest_first_with_both_ids(engine_store: Store) -> None:
    contacts = [{"profile": {"name": "Ana"}, "wa_id": USER, "user_id": BSUID}]
    await engine_store.ingest(body(text("wamid.1", "one"), contacts=contacts))
    await engine_store.ingest(body(text("wamid.2", "two")))
    items = await engine_store.recent_inbound(10)
    assert [(i["id"], i["text"], i["from"]) for i in items] == [("wamid.2", "two", USER), ("wamid.1", "one", USER)]
    assert (items[1]["user_id"], items[1]["name"], items[1]["state"]) == (BSUID, "Ana", "pending")
    assert [i["id"] for i in await engine_store.recent_inbound(1)] == ["wamid.2"]


async def test_conversation_is_both_directions_oldest_first(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.ingest(body(text("wamid.1", "hello")))
    clock.advance(1)
    receipt = row("r1", kind="read", key="read:wamid.1", source="wamid.1")
    reply = row("o1", key="reply:wamid.1:000", source="wamid.1", words="hi Ana")
    await engine_store.complete(Completion("wamid.1", "handled", (receipt, reply), phone_number_id=PNID))
    clock.advance(1)
    await engine_store.ingest(body(text("wamid.2", "bye")))
    await engine_store.ingest(body(text("wamid.X", "other user", sender="15550000000")))
    history = await engine_store.conversation("home", USER, 10)
    assert [(h["direction"], h["text"]) for h in history] == [("in", "hello"), ("out", "hi Ana"), ("in", "bye")]
    assert history[1]["state"] == "queued"
    assert [h["text"] for h in await engine_store.conversation("home", USER, 2)] == ["hi Ana", "bye"]
    assert await engine_store.conversation("biz", USER, 10) == []


async def test_replies_to_lists_one_messages_sends_in_order(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.1")))
    replies = (
        row("r", kind="read", key="read:wamid.1", source="wamid.1"),
        row("b", key="reply:wamid.1:001", source="wamid.1", words="second"),
        row("a", key="reply:wamid.1:000", source="wamid.1", words="first"),
    )
    await engine_store.complete(Completion("wamid.1", "handled", replies, phone_number_id=PNID))
    await engine_store.enqueue([row("other", tenant="biz", key="reply:wamid.1:000", source="wamid.1")])
    found = await engine_store.replies_to("home", "wamid.1")
    assert [(r["id"], r["type"], r["state"], r["to"]) for r in found] == [
        ("r", "read", "queued", USER),
        ("a", "text", "queued", USER),
        ("b", "text", "queued", USER),
    ]
    assert found[1]["payload"]["text"] == {"body": "first"}
    assert await engine_store.replies_to("home", "wamid.none") == []


async def test_outbox_counts_by_state_and_tenant(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("h1", to="1"), row("h2", to="2"), row("b1", tenant="biz")])
    [job, _] = await claim_all(engine_store, clock.now)
    await engine_store.settle(Settlement(id=job.id, state="sent", attempts=job.attempts, wamid="w"), clock.now)
    assert await engine_store.outbox_counts() == {"sent": 1, "sending": 1, "queued": 1}
    assert await engine_store.outbox_by_tenant() == {"home": {"sent": 1, "sending": 1}, "biz": {"queued": 1}}


async def test_audit_entries_are_written_with_their_settle(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1"), row("b1", tenant="biz")])
    for tenant in ("home", "biz"):
        [job] = await claim_all(engine_store, clock.now, tenant=tenant)
        entry = AuditEntry(
            tenant=tenant,
            type="text",
            recipient="+15•••4567",
            http_status=200,
            error_code=None,
            fbtrace_id="Afb",
            latency_ms=12.5,
            outcome="sent",
        )
        done = Settlement(id=job.id, state="sent", attempts=job.attempts, wamid=f"w-{tenant}", audit=entry)
        await engine_store.settle(done, clock.advance(1))
    entries = await engine_store.audit(10)
    assert [(e["tenant"], e["outbox_id"], e["outcome"]) for e in entries] == [
        ("biz", "b1", "sent"),
        ("home", "o1", "sent"),
    ]
    assert (entries[1]["http_status"], entries[1]["latency_ms"], entries[1]["at"]) == (200, 12.5, clock.now - 1)
    assert [e["outbox_id"] for e in await engine_store.audit(10, tenant="home")] == ["o1"]
    assert [e["outbox_id"] for e in await engine_store.audit(10, outbox_id="b1")] == ["b1"]
    assert len(await engine_store.audit(1)) == 1


async def test_a_read_only_store_reads_what_was_written_and_refuses_writes(
    engine_store: Store, read_only_store: Store
) -> None:
    await engine_store.ingest(body(text("wamid.1", "hello")))
    await engine_store.enqueue([row("o1")])
    assert [i["id"] for i in await read_only_store.recent_inbound(10)] == ["wamid.1"]
    assert (await read_only_store.message("o1") or {})["state"] == "queued"
    assert await read_only_store.healthy() is True
    with pytest.raises(StoreError):
        await read_only_store.retry_dead(None, 0.0)
    with pytest.raises(StoreError):
        await read_only_store.enqueue([row("o2")])
    assert await engine_store.message("o2") is None
    await engine_store.enqueue([row("o3")])  # the writer goes on beside it
    assert await read_only_store.message("o3") is not None


async def test_a_closed_store_refuses_work(engine_store: Store) -> None:
    await engine_store.close()
    with pytest.raises(StoreError):
        await engine_store.ingest(body(text("wamid.late")))
    with pytest.raises(StoreError):
        await engine_store.recent_inbound(1)
    assert await engine_store.healthy() is False
