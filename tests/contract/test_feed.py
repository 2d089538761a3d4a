"""Event bus feed contract (issue 16): while the feed is on, every accepted message, status and
event and every send outcome leaves one feed row written with it; the relay hands rows out in
order and deletes only what `publish` accepted. Off (no Redis configured): no row at all.

Meta: Webhooks > messages (messages, statuses: "sent", "delivered", "read", "failed"),
developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from alfred_bot.store import Completion, Settlement, Store
from alfred_bot.store.base import FeedEntry
from tests import payloads
from tests.contract.conftest import FakeClock
from tests.contract.helpers import PNID, USER, body, claim_all, event, row, statuses, text


async def drain(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    """Everything the relay would publish now, as (stream-tagged) JSON objects."""
    out: list[dict[str, Any]] = []

    async def publish(entries: list[FeedEntry]) -> None:
        out.extend({"stream": e.stream, **msgspec.json.decode(e.body)} for e in entries)

    while await store.feed.relay(publish, limit):
        pass
    return out


async def test_nothing_is_written_while_the_feed_is_off(engine_store: Store, clock: FakeClock) -> None:
    assert engine_store.feed.on is False
    await engine_store.ingest(body(text("wamid.A")))
    await engine_store.enqueue([row("o1")])
    assert await engine_store.feed.backlog() == (0, None)
    assert await drain(engine_store) == []


async def test_each_new_message_status_and_event_is_one_ingest_entry(engine_store: Store, clock: FakeClock) -> None:
    engine_store.feed.on = True
    await engine_store.ingest(body(text("wamid.A", "hello"), text("wamid.A", "hello")))  # repeated in one body
    await engine_store.ingest(body(text("wamid.A", "hello")))  # Meta's redelivery: stored once, published once
    await engine_store.ingest(statuses(payloads.status("wamid.X", "delivered", timestamp="100")))
    await engine_store.ingest(event("message_template_status_update", {"event": "APPROVED", "message_template_id": 7}))
    entries = await drain(engine_store)
    assert [(e["stream"], e["kind"]) for e in entries] == [("ingest", "message"), ("ingest", "status")] + [
        ("ingest", "event")
    ] * (len(entries) - 2)
    message, status = entries[0], entries[1]
    assert message["dedupe_id"] == f"message:{PNID}:wamid.A"
    assert (message["tenant_id"], message["id"], message["from"], message["type"], message["text"]) == (
        "home", "wamid.A", USER, "text", "hello",
    )  # fmt: skip
    assert message["message"]["text"] == {"body": "hello"}  # Meta's object as it arrived
    assert (status["tenant_id"], status["id"], status["status"]) == ("home", "wamid.X", "delivered")
    assert await engine_store.feed.backlog() == (0, None)


async def test_send_outcomes_go_to_the_events_stream(engine_store: Store, clock: FakeClock) -> None:
    engine_store.feed.on = True
    await engine_store.enqueue([row("o1", key="api:home:order-42"), row("o2", to="15550001111")])
    await engine_store.enqueue([row("o1b", key="api:home:order-42")])  # same key: nothing new
    jobs = {j.id: j for j in await claim_all(engine_store, clock.now)}
    await engine_store.settle(Settlement(id="o1", state="sent", attempts=jobs["o1"].attempts, wamid="wamid.O1"), 1)
    await engine_store.settle(
        Settlement(id="o2", state="failed", attempts=jobs["o2"].attempts, error_code=131026, error_message="no"), 1
    )
    await engine_store.settle(Settlement(id="o2", state="failed", attempts=jobs["o2"].attempts), 2)  # stale: nothing
    await engine_store.ingest(statuses(payloads.status("wamid.O1", "delivered", timestamp="100")))
    await engine_store.ingest(statuses(payloads.status("wamid.O1", "read", timestamp="101")))
    sends = [e for e in await drain(engine_store) if e["stream"] == "events"]
    assert [(e["outbox_id"], e["state"]) for e in sends] == [
        ("o1", "queued"), ("o2", "queued"), ("o1", "sent"), ("o2", "failed"), ("o1", "delivered"), ("o1", "read"),
    ]  # fmt: skip
    assert {e["idempotency_key"] for e in sends if e["outbox_id"] == "o1"} == {"order-42"}
    assert {e["idempotency_key"] for e in sends if e["outbox_id"] == "o2"} == {None}  # not an API / bus key
    failed = sends[3]
    assert failed["error"]["code"] == 131026 and failed["error"]["needs_template"] is False
    assert sends[2]["wamid"] == "wamid.O1" and sends[2]["error"] is None
    assert len({e["dedupe_id"] for e in sends}) == len(sends)


async def test_handler_replies_are_queued_with_the_completion(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.ingest(body(text("wamid.A")))
    engine_store.feed.on = True
    done = Completion("wamid.A", "handled", replies=(row("r1", source="wamid.A"),), phone_number_id=PNID)
    assert await engine_store.complete(done)
    [entry] = await drain(engine_store)
    assert (entry["stream"], entry["outbox_id"], entry["state"]) == ("events", "r1", "queued")
    assert entry["reply_to"] == "wamid.A"


async def test_a_failed_publish_deletes_nothing_and_order_is_kept(engine_store: Store, clock: FakeClock) -> None:
    engine_store.feed.on = True
    for n in range(5):
        await engine_store.ingest(body(text(f"wamid.{n}")))

    async def down(entries: list[FeedEntry]) -> None:
        raise ConnectionError("redis is down")

    with pytest.raises(ConnectionError):
        await engine_store.feed.relay(down, 3)
    count, oldest = await engine_store.feed.backlog()
    assert (count, oldest) == (5, clock.now)
    batches: list[list[str]] = []

    async def publish(entries: list[FeedEntry]) -> None:
        batches.append([msgspec.json.decode(e.body)["id"] for e in entries])

    assert await engine_store.feed.relay(publish, 3) == 3
    assert await engine_store.feed.relay(publish, 3) == 2
    assert await engine_store.feed.relay(publish, 3) == 0
    assert batches == [["wamid.0", "wamid.1", "wamid.2"], ["wamid.3", "wamid.4"]]
