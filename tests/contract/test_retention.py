"""Retention contract: scrub personal data from finished rows, then delete them; never touch
work in progress (a pending message, a queued send) and never forget an opt-out or a stop."""

from __future__ import annotations

from alfred_bot.privacy import pseudonym
from alfred_bot.store import Completion, Store
from tests.contract.conftest import FakeClock
from tests.contract.helpers import PNID, USER, body, claim_all, event, row, send, statuses, text

DAY = 86400.0
KEY = b"k" * 32


async def _drain(step: object) -> int:
    total = 0
    while changed := await step():  # type: ignore[operator]
        total += changed
    return total


async def _old_world(store: Store, clock: FakeClock) -> None:
    """40 days before now: a handled conversation, a pending message, a delivered reply, a queued send,
    an event, a status, an opt-out and a marketing stop. Then one fresh message."""
    await store.ingest(body(text("wamid.OLD", "secret plans"), text("wamid.PENDING", "still waiting")))
    reply = row("o-old", key="reply:wamid.OLD:000", source="wamid.OLD", words="You said: secret plans")
    done = Completion("wamid.OLD", "handled", (reply,), tenant="home", user=USER, consent="out", phone_number_id=PNID)
    assert await store.complete(done) is True
    [job] = await claim_all(store, clock.now)
    await send(store, job, clock.now, "wamid.S")
    await store.enqueue([row("o-queued", to="15550000009", words="not sent yet")])
    await store.ingest(statuses({"id": "wamid.S", "status": "delivered", "timestamp": "1", "recipient_id": USER}))
    prefs = {"metadata": {"phone_number_id": PNID}, "user_preferences": [{"wa_id": "7", "value": "stop"}]}
    await store.ingest(event("user_preferences", prefs, time=1))
    clock.advance(40 * DAY)
    await store.ingest(body(text("wamid.NEW", "fresh")))


async def test_scrub_removes_personal_data_of_finished_old_rows_only(engine_store: Store, clock: FakeClock) -> None:
    await _old_world(engine_store, clock)
    cutoff = clock.now - 30 * DAY
    assert await _drain(lambda: engine_store.scrub(KEY, cutoff)) >= 3
    assert await engine_store.scrub(KEY, cutoff) == 0  # idempotent
    inbox = {i["id"]: i for i in await engine_store.recent_inbound(10)}
    old = inbox["wamid.OLD"]
    assert (old["text"], old["name"], old["from"]) == (None, None, pseudonym(KEY, USER))
    assert (inbox["wamid.PENDING"]["text"], inbox["wamid.PENDING"]["from"]) == ("still waiting", USER)
    assert [p.item.message.text for p in await engine_store.pending(0, 10)] == ["still waiting", "fresh"]
    assert inbox["wamid.NEW"]["text"] == "fresh"
    sent = await engine_store.message("o-old") or {}
    assert (sent["to"], sent["state"]) == (pseudonym(KEY, USER), "delivered")
    queued = await engine_store.message("o-queued") or {}
    assert (queued["to"], queued["state"]) == ("15550000009", "queued")
    assert (await engine_store.replies_to("home", "wamid.OLD"))[0]["payload"] is None
    [prefs] = await engine_store.events(10)
    assert prefs["field"] == "user_preferences" and prefs["value"] is None  # the row stays, not the body
    assert await engine_store.opted_out("home", USER) is True  # time passing is not consent
    assert await engine_store.marketing_stopped("home", "7") is True


async def test_purge_deletes_finished_old_rows_and_keeps_work_and_consent(
    engine_store: Store, clock: FakeClock
) -> None:
    await _old_world(engine_store, clock)
    cutoff = clock.now - 30 * DAY
    await _drain(lambda: engine_store.scrub(KEY, cutoff))
    assert await _drain(lambda: engine_store.purge(cutoff)) >= 4
    assert await engine_store.purge(cutoff) == 0
    assert sorted(i["id"] for i in await engine_store.recent_inbound(10)) == ["wamid.NEW", "wamid.PENDING"]
    assert await engine_store.message("o-old") is None
    assert (await engine_store.message("o-queued") or {})["state"] == "queued"
    assert await engine_store.events(10) == []
    assert await engine_store.opted_out("home", USER) is True
    assert await engine_store.marketing_stopped("home", "7") is True
    assert [j.id for j in await engine_store.claim(clock.now, {"home": 5}, 30, frozenset())] == ["o-queued"]


async def test_nothing_newer_than_the_cutoff_is_touched(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.ingest(body(text("wamid.1", "hello")))
    await engine_store.complete(Completion("wamid.1", "handled", phone_number_id=PNID))
    cutoff = clock.now - 1
    assert await engine_store.scrub(KEY, cutoff) == 0
    assert await engine_store.purge(cutoff) == 0
    assert [i["text"] for i in await engine_store.recent_inbound(10)] == ["hello"]
