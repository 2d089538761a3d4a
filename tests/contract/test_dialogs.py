"""Dialogs contract (`store.dialogs`): conversation state written with the completion, scheduled
sends that wait outside the queue, promotion when due, and the cancel rules."""

from __future__ import annotations

import msgspec
import pytest

from alfred_bot.store import Completion, OutboxRow, Store, StoreError
from alfred_bot.store.base import MAX_DIALOG_BYTES, Dialog
from tests.contract.conftest import FakeClock
from tests.contract.helpers import PNID, USER, body, claim_all, handled, row, send, state, text

OTHER = "15550009999"


def later(outbox_id: str, send_at: float, *, to: str = USER, key: str | None = None, kind: str = "text") -> OutboxRow:
    return msgspec.structs.replace(row(outbox_id, to=to, key=key, kind=kind), send_at=send_at)


async def _message(store: Store, wamid: str) -> None:
    await store.ingest(body(text(wamid)))


async def test_state_is_written_by_the_completion_and_read_back(engine_store: Store) -> None:
    await _message(engine_store, "wamid.S1")
    doc = Dialog("awaiting_time", b'{"what":"water the plants","n":1}')
    assert await handled(engine_store, "wamid.S1", row("r1"), dialog=doc, tenant="home", user=USER)
    assert await engine_store.dialogs.get("home", USER) == doc
    assert await engine_store.dialogs.get("biz", USER) is None  # per tenant
    assert await engine_store.dialogs.get("home", OTHER) is None  # per user
    await _message(engine_store, "wamid.S2")
    moved = Dialog("confirm", b'{"what":"water the plants","n":2}')
    assert await handled(engine_store, "wamid.S2", dialog=moved, tenant="home", user=USER)
    assert await engine_store.dialogs.get("home", USER) == moved
    await _message(engine_store, "wamid.S3")
    assert await handled(engine_store, "wamid.S3", tenant="home", user=USER)  # no change: kept
    assert await engine_store.dialogs.get("home", USER) == moved
    await _message(engine_store, "wamid.S4")
    assert await handled(engine_store, "wamid.S4", dialog=Dialog(None), tenant="home", user=USER)  # cleared
    assert await engine_store.dialogs.get("home", USER) is None


async def test_state_with_a_ttl_reads_as_none_once_expired(engine_store: Store, clock: FakeClock) -> None:
    await _message(engine_store, "wamid.T1")
    doc = Dialog("asking", b"{}", expires_at=clock.now + 60)
    assert await handled(engine_store, "wamid.T1", dialog=doc, tenant="home", user=USER)
    clock.advance(59)
    assert await engine_store.dialogs.get("home", USER) == doc
    clock.advance(2)
    assert await engine_store.dialogs.get("home", USER) is None
    assert await engine_store.dialogs.purge(clock.now) == 1
    assert await engine_store.dialogs.purge(clock.now) == 0


async def test_idle_states_are_purged_as_personal_data(engine_store: Store, clock: FakeClock) -> None:
    await _message(engine_store, "wamid.I1")
    assert await handled(engine_store, "wamid.I1", dialog=Dialog("asking", b'{"what":"x"}'), tenant="home", user=USER)
    assert await engine_store.dialogs.purge(clock.now, clock.now - 10) == 0  # changed since
    assert await engine_store.dialogs.purge(clock.now + 100, clock.now + 1) == 1
    assert await engine_store.dialogs.get("home", USER) is None


async def test_state_and_replies_are_committed_together_or_not_at_all(engine_store: Store) -> None:
    """A completion that fails mid-way (the state is over the engine's cap) writes nothing: the
    message stays pending, its reply is not queued, the old state stays; the retry commits all."""
    await _message(engine_store, "wamid.X1")
    kept = Dialog("first", b'{"a":1}')
    assert await handled(engine_store, "wamid.X1", dialog=kept, tenant="home", user=USER)
    await _message(engine_store, "wamid.X2")
    huge = Dialog("second", msgspec.json.encode({"blob": "x" * MAX_DIALOG_BYTES}))
    with pytest.raises(StoreError):
        await handled(engine_store, "wamid.X2", row("x2-reply"), dialog=huge, tenant="home", user=USER)
    assert await state(engine_store, "x2-reply") is None
    assert await engine_store.dialogs.get("home", USER) == kept
    assert [p.item.message.id for p in await engine_store.pending(0, 10)] == ["wamid.X2"]
    fine = Dialog("second", b'{"a":2}')
    assert await handled(engine_store, "wamid.X2", row("x2-reply"), dialog=fine, tenant="home", user=USER)
    assert await state(engine_store, "x2-reply") == "queued"
    assert await engine_store.dialogs.get("home", USER) == fine


async def test_a_completion_that_is_not_pending_writes_no_state(engine_store: Store) -> None:
    await _message(engine_store, "wamid.N1")
    assert await handled(engine_store, "wamid.N1", tenant="home", user=USER)
    again = Dialog("late", b"{}")
    assert not await handled(engine_store, "wamid.N1", row("n1-late"), dialog=again, tenant="home", user=USER)
    assert await engine_store.dialogs.get("home", USER) is None
    assert await state(engine_store, "n1-late") is None


async def test_a_scheduled_row_waits_and_never_holds_back_the_users_other_sends(
    engine_store: Store, clock: FakeClock
) -> None:
    await engine_store.enqueue([later("s1", clock.now + 100)])
    await engine_store.enqueue([row("q1")])  # same user, queued after it
    shown = await engine_store.message("s1") or {}
    assert (shown["state"], shown["send_at"]) == ("scheduled", clock.now + 100)
    assert [j.id for j in await claim_all(engine_store, clock.now)] == ["q1"]
    assert [j.id for j in await claim_all(engine_store, clock.now + 200)] == ["q1"]  # its lease ran out; s1 never
    assert await engine_store.dialogs.next_at() == clock.now + 100
    assert await engine_store.next_due(frozenset({"home"})) is not None  # q1's lease, not s1
    assert await engine_store.dialogs.due(clock.now + 99, 10) == []


async def test_a_past_send_at_is_queued_at_once(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([later("p1", clock.now - 5)])
    assert await state(engine_store, "p1") == "queued"
    assert [j.id for j in await claim_all(engine_store, clock.now)] == ["p1"]


async def test_due_rows_are_promoted_once_and_then_claimed(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([later("s1", clock.now + 10), later("s2", clock.now + 20, to=OTHER)])
    now = clock.advance(15)
    [due] = await engine_store.dialogs.due(now, 10)
    assert (due.id, due.tenant, due.recipient, due.type, due.send_at) == ("s1", "home", USER, "text", now - 5)
    assert b"hello" in due.payload
    assert await engine_store.dialogs.promote([due.id], [], "late", now) == 1
    assert await engine_store.dialogs.promote([due.id], [], "late", now) == 0  # a second node: no-op
    [job] = await claim_all(engine_store, now)
    assert job.id == "s1"
    assert job.created_at >= now - 5  # its age (for `max_age_seconds`) counts from its time, not its queueing
    assert await state(engine_store, "s2") == "scheduled"


async def test_a_late_row_fails_with_the_reason(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([later("s1", clock.now + 10)])
    now = clock.advance(11)
    assert await engine_store.dialogs.promote([], ["s1"], "outside the window", now) == 0
    shown = await engine_store.message("s1") or {}
    assert (shown["state"], shown["error_message"], bool(shown["needs_template"])) == (
        "failed",
        "outside the window",
        True,
    )
    assert await claim_all(engine_store, now) == []


async def test_cancel_rules(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([later("s1", clock.now + 10), row("q1", to="1"), row("x1", to="2"), row("y1", to="3")])
    assert await engine_store.dialogs.cancel("s1") == "cancelled"
    assert await engine_store.dialogs.cancel("q1") == "cancelled"
    assert await engine_store.dialogs.cancel("q1") == "cancelled"  # again: same answer
    jobs = {j.id: j for j in await claim_all(engine_store, clock.now)}
    assert set(jobs) == {"x1", "y1"}  # cancelled rows are never claimed
    assert await engine_store.dialogs.cancel("x1") == "sending"
    await send(engine_store, jobs["y1"], clock.now, "wamid.Y1")
    assert await engine_store.dialogs.cancel("y1") == "sent"
    assert await engine_store.dialogs.cancel("missing") is None
    assert await engine_store.dialogs.promote(["s1"], [], "late", clock.now + 20) == 0  # cancelled stays cancelled
    assert await state(engine_store, "s1") == "cancelled"


async def test_a_completion_cancels_only_its_own_users_sends(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([later("mine", clock.now + 10), later("theirs", clock.now + 10, to=OTHER)])
    await _message(engine_store, "wamid.C1")
    done = Completion(
        "wamid.C1", "handled", (), tenant="home", user=USER, phone_number_id=PNID, cancels=("mine", "theirs")
    )
    assert await engine_store.complete(done)
    assert await state(engine_store, "mine") == "cancelled"
    assert await state(engine_store, "theirs") == "scheduled"


async def test_a_users_scheduled_sends_are_listed_by_key_prefix(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue(
        [
            later("r2", clock.now + 200, key="reminder:reply:w1:001"),
            later("r1", clock.now + 100, key="reminder:reply:w2:001"),
            later("other", clock.now + 50, key="api:home:k"),
            later("theirs", clock.now + 50, to=OTHER, key="reminder:reply:w3:001"),
        ]
    )
    listed = await engine_store.dialogs.scheduled("home", USER, prefix="reminder:")
    assert [(r["id"], r["send_at"], r["type"]) for r in listed] == [
        ("r1", clock.now + 100, "text"),
        ("r2", clock.now + 200, "text"),
    ]
    assert listed[0]["payload"]["text"]["body"] == "hello"
    assert [r["id"] for r in await engine_store.dialogs.scheduled("home", USER)] == ["other", "r1", "r2"]
    await engine_store.dialogs.cancel("r1")
    assert [r["id"] for r in await engine_store.dialogs.scheduled("home", USER, prefix="reminder:")] == ["r2"]


async def test_retention_never_scrubs_or_deletes_a_scheduled_send(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([later("far", clock.now + 90 * 86400)])
    cutoff = clock.advance(40 * 86400)
    await engine_store.scrub(b"k" * 32, cutoff)
    await engine_store.purge(cutoff)
    [due] = await engine_store.dialogs.due(clock.now + 60 * 86400, 10)
    assert due.id == "far" and b"hello" in due.payload
