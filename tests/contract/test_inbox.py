"""Inbox contract: dedupe of everything a webhook carries, pending order, and completion."""

from __future__ import annotations

import pytest

from alfred_bot.parse import InboundItem, StatusItem, parse_body
from alfred_bot.store import Completion, Store
from tests import payloads
from tests.contract.conftest import FakeClock
from tests.contract.helpers import BIZ_PNID, PNID, TENANTS, USER, body, event, handled, row, statuses, text


async def test_a_message_is_new_once_per_phone_number(engine_store: Store) -> None:
    [fresh] = await engine_store.ingest(body(text("wamid.A")))
    assert isinstance(fresh, InboundItem) and fresh.message.id == "wamid.A"
    assert await engine_store.ingest(body(text("wamid.A"))) == []  # Meta's redelivery
    # a wamid is unique per business number only: the same id on another number is another message
    assert len(await engine_store.ingest(body(text("wamid.A"), pnid=BIZ_PNID))) == 1
    assert [p.item.phone_number_id for p in await engine_store.pending(0, 10)] == [PNID, BIZ_PNID]
    assert len(await engine_store.recent_inbound(10)) == 2


async def test_a_message_repeated_inside_one_body_is_new_once(engine_store: Store) -> None:
    assert len(await engine_store.ingest(body(text("wamid.D"), text("wamid.D")))) == 1
    assert len(await engine_store.pending(0, 10)) == 1


async def test_a_status_is_new_once_per_number_message_and_state(engine_store: Store) -> None:
    [fresh] = await engine_store.ingest(statuses(payloads.status("wamid.X", "delivered")))
    assert isinstance(fresh, StatusItem)
    assert await engine_store.ingest(statuses(payloads.status("wamid.X", "delivered"))) == []
    assert len(await engine_store.ingest(statuses(payloads.status("wamid.X", "read")))) == 1
    assert len(await engine_store.ingest(statuses(payloads.status("wamid.X", "read"), pnid=BIZ_PNID))) == 1


async def test_an_event_is_kept_once(engine_store: Store, clock: FakeClock) -> None:
    update = {"event": "FLAGGED", "message_template_id": 1}
    await engine_store.ingest(event("message_template_status_update", update, time=100))
    clock.advance(1)
    await engine_store.ingest(event("message_template_status_update", update, time=100))
    assert len(await engine_store.events(10)) == 1
    await engine_store.ingest(event("message_template_status_update", update, time=101))  # another entry
    assert len(await engine_store.events(10)) == 2


async def test_a_rejected_item_is_kept_once_with_its_reason(engine_store: Store, clock: FakeClock) -> None:
    bad = payloads.dump(payloads.envelope(payloads.entry({"field": "messages", "value": 5})))
    parsed = parse_body(bad, TENANTS)
    assert len(parsed.rejected) == 1
    assert await engine_store.ingest(parsed) == []
    clock.advance(1)
    await engine_store.ingest(parse_body(bad, TENANTS))
    [kept] = await engine_store.rejected(10)
    assert kept["what"] == "change" and kept["reason"] and kept["received_at"] == clock.now - 1
    assert await engine_store.pending(0, 10) == []


async def test_unrouted_and_senderless_messages_are_kept_but_never_pending(engine_store: Store) -> None:
    unknown = parse_body(payloads.body_of(text("wamid.U"), pnid="999"), TENANTS)  # a number of no tenant
    assert await engine_store.ingest(unknown) == []
    nobody = text("wamid.N")
    del nobody["from"]
    assert await engine_store.ingest(body(nobody, contacts=[{"profile": {"name": "?"}}])) == []
    assert await engine_store.pending(0, 10) == []
    states = {r["id"]: r["state"] for r in await engine_store.recent_inbound(10)}
    assert states == {"wamid.U": "unrouted", "wamid.N": "failed"}


async def test_pending_is_oldest_first_and_resumable(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.P1", "one"), payloads.SAMPLES["image"]))
    await engine_store.ingest(body(text("wamid.P3", "three")))
    pending = await engine_store.pending(0, 10)
    assert [p.item.message.type for p in pending] == ["text", "image", "text"]
    assert pending[0].seq < pending[1].seq < pending[2].seq
    first = pending[0].item
    assert (first.tenant, first.message.text, first.contact and first.contact.name) == ("home", "one", "Ana")
    assert await engine_store.pending(pending[0].seq, 10) == pending[1:]
    assert await engine_store.pending(0, 1) == pending[:1]


async def test_completion_is_once_and_writes_replies_and_state_together(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.C")))
    reply = row("o1", key="reply:wamid.C:000", source="wamid.C")
    assert await handled(engine_store, "wamid.C", reply) is True
    assert await engine_store.pending(0, 10) == []
    assert (await engine_store.message("o1") or {})["state"] == "queued"
    # a second run of the same handler (after a crash) finds the message done: nothing is written
    twin = row("o2", key="reply:wamid.C:001", source="wamid.C")
    out = Completion("wamid.C", "handled", (twin,), tenant="home", user=USER, consent="out", phone_number_id=PNID)
    assert await engine_store.complete(out) is False
    assert await engine_store.message("o2") is None
    assert await engine_store.opted_out("home", USER) is False


async def test_completing_an_unknown_message_writes_nothing(engine_store: Store) -> None:
    assert await handled(engine_store, "wamid.NEVER", row("o3")) is False
    assert await engine_store.message("o3") is None


async def test_a_completion_finishes_only_the_row_of_its_number(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.TWIN", "home")))
    await engine_store.ingest(body(text("wamid.TWIN", "biz"), pnid=BIZ_PNID))
    # without the number the wamid is ambiguous: nothing is finished
    assert await engine_store.complete(Completion("wamid.TWIN", "handled")) is False
    done = Completion("wamid.TWIN", "handled", tenant="biz", user=USER, phone_number_id=BIZ_PNID)
    assert await engine_store.complete(done) is True
    [left] = await engine_store.pending(0, 10)
    assert (left.item.phone_number_id, left.item.message.text) == (PNID, "home")


async def test_a_unique_wamid_completes_without_its_number(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.ONLY")))
    assert await engine_store.complete(Completion("wamid.ONLY", "handled")) is True


@pytest.mark.parametrize("final", ["failed", "handled", "limited"])
async def test_a_failure_is_listed_with_its_error(engine_store: Store, final: str) -> None:
    await engine_store.ingest(body(text("wamid.F", "boom")))
    done = Completion("wamid.F", final, error="handler crashed" if final == "failed" else None, phone_number_id=PNID)
    assert await engine_store.complete(done) is True  # type: ignore[arg-type]
    failures = await engine_store.recent_failures(10)
    if final == "failed":
        [failure] = failures
        assert (failure["id"], failure["error"], failure["text"], failure["from"]) == (
            "wamid.F",
            "handler crashed",
            "boom",
            USER,
        )
    else:
        assert failures == []
    assert {r["id"]: r["state"] for r in await engine_store.recent_inbound(10)} == {"wamid.F": final}
