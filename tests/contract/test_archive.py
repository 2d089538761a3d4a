"""Archive contract: `archive_batch` reads exactly the rows the next scrub would change (whole, as
stored, changing nothing), and `scrub(only=...)` changes those rows and no others, so the retention
job can copy rows to cold storage first and never scrub a row it did not copy."""

from __future__ import annotations

from alfred_bot.parse import parse_body
from alfred_bot.privacy import pseudonym
from alfred_bot.store import Completion, Store
from alfred_bot.store.base import ARCHIVE_TABLES, ArchiveBatch
from tests import payloads
from tests.contract.conftest import FakeClock
from tests.contract.helpers import PNID, TENANTS, USER, body, claim_all, event, row, send, statuses, text

DAY = 86400.0
KEY = b"k" * 32
KEYS = {"inbox": "seq", "outbox": "id", "statuses": "key", "events": "key", "rejected": "key"}


async def _old_world(store: Store, clock: FakeClock) -> None:
    """40 days ago: a handled message with a delivered reply, a pending message, a queued send, a
    status, an event and a rejected part. Then one fresh message."""
    await store.ingest(body(text("wamid.OLD", "secret plans"), text("wamid.PENDING", "still waiting")))
    reply = row("o-old", key="reply:wamid.OLD:000", source="wamid.OLD", words="You said: secret plans")
    assert await store.complete(Completion("wamid.OLD", "handled", (reply,), phone_number_id=PNID)) is True
    [job] = await claim_all(store, clock.now)
    await send(store, job, clock.now, "wamid.S")
    await store.enqueue([row("o-queued", to="15550000009", words="not sent yet")])
    await store.ingest(statuses({"id": "wamid.S", "status": "delivered", "timestamp": "1", "recipient_id": USER}))
    prefs = {"metadata": {"phone_number_id": PNID}, "user_preferences": [{"wa_id": USER, "value": "stop"}]}
    await store.ingest(event("user_preferences", prefs, time=1))
    bad = payloads.dump(payloads.envelope(payloads.entry({"field": "messages", "value": 5})))
    await store.ingest(parse_body(bad, TENANTS))
    clock.advance(40 * DAY)
    await store.ingest(body(text("wamid.NEW", "fresh")))


def _by_table(batch: ArchiveBatch) -> dict[str, list[dict[str, object]]]:
    return {table: batch.rows.get(table, []) for table in ARCHIVE_TABLES}


async def test_the_batch_is_the_old_finished_rows_whole_with_their_keys(engine_store: Store, clock: FakeClock) -> None:
    await _old_world(engine_store, clock)
    batch = await engine_store.archive_batch(clock.now - 30 * DAY, 100)
    rows = _by_table(batch)
    assert {t: len(r) for t, r in rows.items()} == {"inbox": 1, "outbox": 1, "statuses": 1, "events": 1, "rejected": 1}
    assert len(batch) == 5
    for table, found in rows.items():  # the keys name the rows, in the same order
        assert list(batch.keys[table]) == [r[KEYS[table]] for r in found], table
    [inbound], [sent] = rows["inbox"], rows["outbox"]
    assert (inbound["event_id"], inbound["text"], inbound["sender"], inbound["state"]) == (
        "wamid.OLD",
        "secret plans",
        USER,
        "handled",
    )
    assert isinstance(inbound["raw"], bytes) and b"secret plans" in inbound["raw"]
    assert isinstance(inbound["received_at"], float) and inbound["received_at"] == clock.now - 40 * DAY
    assert (sent["id"], sent["recipient"], sent["state"]) == ("o-old", USER, "delivered")
    assert isinstance(sent["payload"], bytes) and b"You said: secret plans" in sent["payload"]
    assert sent["created_at"] == clock.now - 40 * DAY
    [status] = rows["statuses"]
    assert (status["wamid"], status["recipient_id"], status["status"]) == ("wamid.S", USER, "delivered")
    assert b'"delivered"' in status["raw"]  # type: ignore[operator]
    [ev], [rejected] = rows["events"], rows["rejected"]
    assert ev["field"] == "user_preferences" and USER.encode() in ev["raw"]  # type: ignore[operator]
    assert rejected["what"] == "change" and rejected["raw"]


async def test_reading_a_batch_changes_nothing(engine_store: Store, read_only_store: Store, clock: FakeClock) -> None:
    await _old_world(engine_store, clock)
    cutoff = clock.now - 30 * DAY
    first = await engine_store.archive_batch(cutoff, 100)
    assert (await engine_store.archive_batch(cutoff, 100)).keys == first.keys
    assert (await read_only_store.archive_batch(cutoff, 100)).keys == first.keys  # beside a running server
    assert {i["id"]: i["text"] for i in await engine_store.recent_inbound(10)}["wamid.OLD"] == "secret plans"


async def test_nothing_newer_than_the_cutoff_nor_in_progress_is_in_a_batch(
    engine_store: Store, clock: FakeClock
) -> None:
    await _old_world(engine_store, clock)
    assert len(await engine_store.archive_batch(clock.now - 41 * DAY, 100)) == 0
    batch = await engine_store.archive_batch(clock.now + 1, 100)  # everything is old: still no work in progress
    assert [r["event_id"] for r in batch.rows["inbox"]] == ["wamid.OLD"]  # PENDING and NEW wait for a handler
    assert [r["id"] for r in batch.rows["outbox"]] == ["o-old"]


async def test_scrub_only_changes_the_archived_rows(engine_store: Store, clock: FakeClock) -> None:
    for n in range(3):
        await engine_store.ingest(body(text(f"wamid.{n}", f"private {n}")))
        await engine_store.complete(Completion(f"wamid.{n}", "handled", phone_number_id=PNID))
    clock.advance(40 * DAY)
    cutoff = clock.now - 30 * DAY
    batch = await engine_store.archive_batch(cutoff, 2)
    assert len(batch.rows["inbox"]) == 2
    assert await engine_store.scrub(KEY, cutoff, only=batch.keys) == 2
    texts = {i["id"]: i["text"] for i in await engine_store.recent_inbound(10)}
    archived = {str(r["event_id"]) for r in batch.rows["inbox"]}
    assert {k for k, v in texts.items() if v is None} == archived  # the third stays whole: it was not archived
    nxt = await engine_store.archive_batch(cutoff, 2)
    assert [r["event_id"] for r in nxt.rows["inbox"]] == [k for k in texts if k not in archived]
    assert not set(nxt.keys["inbox"]) & set(batch.keys["inbox"])


async def test_scrub_only_skips_rows_that_do_not_qualify_and_unknown_keys(
    engine_store: Store, clock: FakeClock
) -> None:
    await _old_world(engine_store, clock)
    cutoff = clock.now - 30 * DAY
    everything = await engine_store.archive_batch(clock.now + 1, 100)
    batch = await engine_store.archive_batch(cutoff, 100)
    assert await engine_store.scrub(KEY, cutoff, only={}) == 0
    assert await engine_store.scrub(KEY, cutoff, only={"inbox": [], "nonsense": ["x"]}) == 0
    # keys of rows newer than the cutoff (wamid.NEW is pending anyway) and keys that exist nowhere
    newer = [k for k in everything.keys["inbox"] if k not in batch.keys["inbox"]]
    assert await engine_store.scrub(KEY, cutoff, only={"inbox": [*newer, 999_999], "outbox": ["o-queued", "zz"]}) == 0
    assert (await engine_store.message("o-queued") or {})["to"] == "15550000009"
    assert await engine_store.scrub(KEY, cutoff, only={"outbox": batch.keys["outbox"]}) == 1
    assert (await engine_store.message("o-old") or {})["to"] == pseudonym(KEY, USER)
    assert {i["id"]: i["text"] for i in await engine_store.recent_inbound(10)}["wamid.OLD"] == "secret plans"
    assert await engine_store.scrub(KEY, cutoff, only=batch.keys) == 4  # the rest; the reply is done already


async def test_archive_then_scrub_until_empty_scrubs_what_scrub_would(engine_store: Store, clock: FakeClock) -> None:
    await _old_world(engine_store, clock)
    cutoff = clock.now - 30 * DAY
    archived = 0
    while batch := await engine_store.archive_batch(cutoff, 2):
        assert await engine_store.scrub(KEY, cutoff, only=batch.keys) == len(batch)
        archived += len(batch)
    assert archived == 5
    assert await engine_store.scrub(KEY, cutoff) == 0  # nothing left that was not archived
    inbox = {i["id"]: i for i in await engine_store.recent_inbound(10)}
    assert (inbox["wamid.OLD"]["text"], inbox["wamid.OLD"]["from"]) == (None, pseudonym(KEY, USER))
    assert inbox["wamid.PENDING"]["text"] == "still waiting" and inbox["wamid.NEW"]["text"] == "fresh"
    assert (await engine_store.replies_to("home", "wamid.OLD"))[0]["payload"] is None
    assert [e["value"] for e in await engine_store.events(10)] == [None]
    assert await engine_store.marketing_stopped("home", USER) is True
