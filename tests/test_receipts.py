"""Read receipts and typing indicators are best-effort: they never hold a reply back.

Store level (real SQLite under tmp_path): coalescing per user, stale drops, replies claimed ahead of
receipts. Sender level (the real app or the real Sender against the fake Graph API on loopback):
a slow or failing receipt never delays its reply, drops are counted, the budget rule is configurable.
Meta's facts: "Throughput", developers.facebook.com/docs/whatsapp/throughput — 80 messages/s per
number by default, "inclusive of inbound and outbound messages and all message types" (whether a read
receipt counts is not documented); "Mark messages as read" + "Typing indicators",
developers.facebook.com/docs/whatsapp/cloud-api/typing-indicators — marking a message read marks the
earlier ones of the conversation read too, and a typing indicator is dismissed when a reply is sent.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError, OutboundConfig, load_secrets
from alfred_bot.graph import GraphTransport
from alfred_bot.outbound.lanes import Lane, LaneQueue, receipt_slots, without_typing
from alfred_bot.outbound.ratelimit import PairLimiter, SlidingWindowLimiter
from alfred_bot.outbound.sender import Sender
from alfred_bot.store import OutboxJob, OutboxRow, SqliteStore, new_outbox_id
from alfred_bot.store.base import RECEIPT_SWEEP
from tests import payloads
from tests.conftest import ACCESS_TOKEN, PROD_ENV, db_rows, make_config, post_webhook, prod_config, wait_for
from tests.fakes import Answer, FakeGraph, graph_error

USER_TO = "+" + payloads.USER


def _receipt(wamid: str, user: str = payloads.USER) -> OutboxRow:
    typing = {"type": "text"}
    body = {"messaging_product": "whatsapp", "status": "read", "message_id": wamid, "typing_indicator": typing}
    return OutboxRow(new_outbox_id(), f"read:{wamid}", "home", user, "read", json.dumps(body).encode())


def _reply(text: str, user: str = payloads.USER) -> OutboxRow:
    body = {"messaging_product": "whatsapp", "to": "+" + user, "type": "text", "text": {"body": text}}
    return OutboxRow(new_outbox_id(), f"reply:{text}", "home", user, "text", json.dumps(body).encode())


class WallClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _store(tmp_path: Path, clock: Any = time.time) -> SqliteStore:
    store = SqliteStore(tmp_path / "alfred.db", clock=clock)
    await store.open()
    return store


def _states(path: Path | str) -> dict[str, str]:
    return {r["id"]: r["state"] for r in db_rows(path, "SELECT id, state FROM outbox")}


# ---------------------------------------------------------------- the store: claim


async def test_a_receipt_never_holds_back_its_users_reply(tmp_path: Path) -> None:
    """Before: only a user's oldest pending row was claimable, so the reply waited for its receipt."""
    store = await _store(tmp_path)
    try:
        receipt, reply = _receipt("wamid.A"), _reply("hello")
        await store.enqueue([receipt, reply])
        jobs = await store.claim(time.time(), {"home": 1}, 30.0, frozenset())
        assert [j.id for j in jobs] == [reply.id]  # the reply goes first; the quota had room for one
        # and while the receipt is in flight (leased), the user's next reply is not held back either
        await store.enqueue([_receipt("wamid.B")])
        jobs = await store.claim(time.time(), {"home": 0}, 30.0, frozenset({reply.id}), receipts={"home": 5})
        assert [(j.id, j.dropped) for j in jobs if j.dropped] == [(receipt.id, "superseded")]
        leased = [j for j in jobs if j.dropped is None]
        assert [j.type for j in leased] == ["read"]
        later = _reply("second")
        await store.enqueue([later])
        claimed = await store.claim(time.time(), {"home": 5}, 30.0, frozenset({reply.id, leased[0].id}))
        assert later.id not in [j.id for j in claimed]  # a reply still waits for the user's earlier reply
    finally:
        await store.close()


async def test_receipts_of_one_user_coalesce_to_the_newest(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        old1, old2, newest = _receipt("wamid.1"), _receipt("wamid.2"), _receipt("wamid.3")
        other = _receipt("wamid.X", user="15550009999")
        await store.enqueue([old1, old2, newest, other])
        jobs = await store.claim(time.time(), {"home": 10}, 30.0, frozenset(), receipts={"home": 10})
        leased = sorted(j.id for j in jobs if j.dropped is None)
        dropped = {j.id: j.dropped for j in jobs if j.dropped is not None}
        assert leased == sorted([newest.id, other.id])
        assert dropped == {old1.id: "superseded", old2.id: "superseded"}
        states = _states(tmp_path / "alfred.db")
        assert (states[old1.id], states[old2.id], states[newest.id]) == ("dropped", "dropped", "sending")
        # a receipt queued after the claim is newer than the one in flight: it is not superseded
        await store.enqueue([_receipt("wamid.0-late", user="15550009999")])
        again = await store.claim(time.time(), {"home": 10}, 30.0, frozenset(leased), receipts={"home": 10})
        assert [j.dropped for j in again] == [None]
    finally:
        await store.close()


async def test_stale_receipts_are_dropped_not_sent(tmp_path: Path) -> None:
    clock = WallClock()
    store = await _store(tmp_path, clock)
    try:
        stale, fresh = _receipt("wamid.old"), _receipt("wamid.new", user="15550001111")
        await store.enqueue([stale])
        clock.now += 6.0
        await store.enqueue([fresh])
        jobs = await store.claim(clock.now, {"home": 10}, 30.0, frozenset(), receipts={"home": 10}, receipt_max_age=5)
        assert [(j.id, j.dropped) for j in jobs] == [(stale.id, "stale"), (fresh.id, None)]
        assert _states(tmp_path / "alfred.db")[stale.id] == "dropped"
        assert not db_rows(tmp_path / "alfred.db", "SELECT 1 FROM outbox WHERE state = 'failed'")  # no dead letter
    finally:
        await store.close()


async def test_claims_that_take_no_receipt_sweep_stale_ones_only_a_few_times_a_second(tmp_path: Path) -> None:
    """Under a backlog with no spare budget the pump claims many times a second and takes no
    receipt: those claims drop superseded and stale receipts every RECEIPT_SWEEP s, not each time
    (it was a third of the writer thread); a claim that takes receipts always drops first."""
    clock = WallClock()
    store = await _store(tmp_path, clock)

    async def claim(receipt_room: int) -> list[str | None]:
        jobs = await store.claim(
            clock.now, {"home": 0}, 30.0, frozenset(), receipts={"home": receipt_room}, receipt_max_age=5
        )
        return [j.dropped for j in jobs]

    try:
        await store.enqueue([_receipt("wamid.1")])
        clock.now += 4.9
        assert await claim(0) == []  # this claim sweeps: nothing stale yet
        clock.now += 0.2  # wamid.1 is stale now (over 5 s old)
        assert await claim(0) == []  # swept 0.2 s ago: this claim takes no receipt, so it skips
        clock.now += RECEIPT_SWEEP
        assert await claim(0) == ["stale"]  # the next sweep
        await store.enqueue([_receipt("wamid.2"), _receipt("wamid.3")])
        assert await claim(5) == ["superseded", None]  # taking receipts: always dropped first
    finally:
        await store.close()


# ---------------------------------------------------------------- the lane


def _job(kind: str, n: int) -> OutboxJob:
    return OutboxJob(f"id{n}", "home", payloads.USER, kind, b"{}", 1, 0.0)


async def test_lane_queue_gives_stuck_replies_the_workers() -> None:
    queue = LaneQueue(maxsize=4, receipt_slots=2)
    queue.put_nowait(_job("read", 1))
    queue.put_nowait(_job("text", 2))
    assert queue.replies_stuck  # no idle worker is about to take the reply
    assert (await queue.get()).id == "id2"  # so a freed worker takes the reply, not the receipt
    assert (await queue.get()).id == "id1"
    assert queue.receipts_busy == 1 and queue.room() == 4 and queue.receipt_room() == 2
    queue.done(_job("read", 1))
    assert queue.receipts_busy == 0


async def test_an_idle_lane_sends_the_receipt_first() -> None:
    """With spare workers the receipt is taken first: the user sees the ticks, then the reply."""
    queue = LaneQueue(maxsize=4, receipt_slots=2)
    waiters = [asyncio.create_task(queue.get()) for _ in range(2)]
    await asyncio.sleep(0)
    queue.put_nowait(_job("text", 2))
    queue.put_nowait(_job("read", 1))
    got = await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert [j.id for j in got] == ["id1", "id2"]


async def test_a_job_goes_to_a_waiting_worker_even_when_the_one_woken_for_it_stops() -> None:
    """A job wakes one waiting worker (not all of them); if that one is stopped before it runs, the
    wake-up passes to the next, so the job is never left with workers asleep beside it."""
    queue = LaneQueue(maxsize=4, receipt_slots=2)
    waiters = [asyncio.create_task(queue.get()) for _ in range(3)]
    await asyncio.sleep(0)
    assert queue.idle == 3
    queue.put_nowait(_job("text", 1))
    waiters[0].cancel()  # woken first, stopped before it could take the job
    assert (await asyncio.wait_for(waiters[1], 1)).id == "id1"
    assert waiters[0].cancelled() and not waiters[2].done() and queue.idle == 1
    queue.put_nowait(_job("text", 2))
    assert (await asyncio.wait_for(waiters[2], 1)).id == "id2"
    assert queue.idle == 0


def test_a_late_receipt_loses_its_typing_indicator() -> None:
    lane = Lane("home", payloads.PNID, 4, SlidingWindowLimiter(80), PairLimiter())
    row = _receipt("wamid.T")
    job = OutboxJob(row.id, "home", row.recipient, "read", row.payload, 1, 100.0)
    assert not lane.answered(job)
    lane.note_reply(row.recipient, 101.0)  # the reply went out after the receipt was queued
    assert lane.answered(job)
    assert json.loads(without_typing(job).payload) == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": "wamid.T",
    }


def test_receipts_may_hold_only_a_quarter_of_the_workers() -> None:
    assert (receipt_slots(1), receipt_slots(20), receipt_slots(250)) == (2, 5, 62)


# ---------------------------------------------------------------- the sender, end to end


async def test_a_slow_receipt_never_delays_the_reply(prod: Any, graph: FakeGraph) -> None:
    graph.script.append(Answer(delay=1.5, body={"success": True}))  # the receipt hangs at Meta
    graph.script_for(USER_TO, Answer(body={"messaging_product": "whatsapp", "messages": [{"id": "wamid.R"}]}))
    start = time.monotonic()
    assert await post_webhook(prod, payloads.body_of(payloads.text("hi"))) == 200
    await wait_for(lambda: graph.texts() == ["You said: hi"])
    assert time.monotonic() - start < 1.0  # before: the reply waited for the receipt's answer


async def test_a_failing_receipt_is_retried_once_then_dropped_and_counted(prod: Any, graph: FakeGraph) -> None:
    graph.script.extend([graph_error(2, 503), graph_error(2, 503), graph_error(2, 503)])  # receipts only
    graph.script_for(USER_TO, Answer(body={"messaging_product": "whatsapp", "messages": [{"id": "wamid.R"}]}))
    assert await post_webhook(prod, payloads.body_of(payloads.text("hi"))) == 200
    path = prod.app[keys.CONFIG].storage.path
    await wait_for(lambda: sorted(_states(path).values()) == ["dropped", "sent"])
    assert sum(1 for r in graph.sends if r.body.get("status") == "read") == 2  # one quick retry, no more
    assert prod.app[keys.SENDER].counts["receipts_dropped_failed"] == 1
    health = await (await prod.get("/healthz")).json()
    assert health["sender"]["receipts_dropped_failed"] == 1


async def test_superseded_receipts_are_counted_and_never_sent(tmp_path: Path, graph: FakeGraph) -> None:
    cfg = prod_config(tmp_path, graph)
    store = await _store(tmp_path)
    rows = [_receipt(f"wamid.{i}") for i in range(3)]
    await store.enqueue([*rows, _reply("answer")])
    transport = GraphTransport(cfg.graph, {payloads.PNID: ACCESS_TOKEN, payloads.BIZ_PNID: ACCESS_TOKEN}, connections=4)
    await transport.start()
    sender = Sender(store, transport, cfg, rng=random.Random(1))
    await sender.start()
    try:
        await wait_for(lambda: len(graph.sends) == 2)
        assert sender.counts["receipts_dropped_superseded"] == 2
        assert [r.body.get("message_id") for r in graph.sends if r.body.get("status") == "read"] == ["wamid.2"]
    finally:
        await sender.stop(1.0)
        await transport.close()
        await store.close()


@pytest.mark.parametrize("use_budget", [True, False])
async def test_receipts_in_or_out_of_the_budget(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, use_budget: bool
) -> None:
    """12 users write at once to a number paced at 10/s: the replies take the slots first; receipts
    count against the rate (no sliding second above 10 at the receiver) or, if configured, not."""
    outbound = {"rate_per_second": 10, "workers": 8, "receipts_use_budget": use_budget}
    client = await aiohttp_client(create_app(prod_config(tmp_path, graph, outbound=outbound), load_secrets(PROD_ENV)))
    users = [f"1555000{i:04d}" for i in range(12)]
    start = time.monotonic()
    assert await post_webhook(client, payloads.body_of(*[payloads.text("x", sender=u) for u in users])) == 200
    await wait_for(lambda: len(graph.texts()) == 12, timeout=10)
    replies = sorted(r.at for r in graph.sends if r.body.get("type") == "text")
    assert replies[-1] - start < 1.8  # before: each reply queued behind its receipt, 24 sends at 10/s
    await wait_for(lambda: len(graph.sends) == 24, timeout=10)

    def worst(times: list[float]) -> int:
        return max(sum(1 for t in times if s <= t < s + 1.0) for s in times)

    counted = sorted(r.at for r in graph.sends) if use_budget else replies
    assert worst(counted) <= 10
    if not use_budget:
        assert worst(sorted(r.at for r in graph.sends)) > 10  # receipts went beside the paced replies


# ---------------------------------------------------------------- config and pool size


def test_receipt_keys_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"outbound\.receipt_max_age_seconds: must be > 0"):
        make_config(tmp_path, outbound={"receipt_max_age_seconds": 0})
    with pytest.raises(ConfigError, match=r"outbound\.slow_down_seconds: must be > 0"):
        make_config(tmp_path, outbound={"slow_down_seconds": 0})
    cfg = make_config(tmp_path).outbound
    assert (cfg.receipt_max_age_seconds, cfg.receipts_use_budget, cfg.slow_down_seconds) == (5.0, True, 5.0)


def test_the_automatic_pool_is_bounded_by_what_graph_latency_needs() -> None:
    """rate × 0.25 s of Graph latency, the rate counted up to Meta's top tier (1,000 msg/s)."""
    assert OutboundConfig().worker_count(1) == 20  # 80 msg/s
    assert OutboundConfig(rate_per_second=1000).worker_count(1) == 250
    assert OutboundConfig(rate_per_second=100000).worker_count(1) == 250  # before: 25,000 tasks
    assert OutboundConfig(rate_per_second=1).worker_count(1) == 4
    assert OutboundConfig(rate_per_second=100000, workers=3000).worker_count(1) == 3000  # explicit wins


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_replies_first_receipts_in_spare_slots_never_above_the_rate_and_aimd_recovers() -> None:
    """The guide's load on a fake clock: 50 replies/s reserve their slots, 50 receipts/s take only
    slots free right now; a 130429 at t = 2 s cuts the rate. Counted together, no sliding second
    exceeds 80; replies wait no more than a few slot intervals once the rate has climbed back (the old
    fixed 50 % for 60 s let them fall behind by 10 more every second), receipts fill what is left."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(80, clock=clock)
    starts: list[float] = []
    reply_waits: list[tuple[float, float]] = []  # (arrival, wait)
    receipts: list[float] = []  # arrival times of receipts not sent yet
    sent_receipts = 0
    t0, step = clock.now, 0.005
    for tick in range(int(10 / step)):
        clock.now = t0 + tick * step
        if tick == int(2 / step):
            limiter.slow_down(OutboundConfig().slow_down_factor, OutboundConfig().slow_down_seconds)
        if tick % 4 == 0:  # one message every 20 ms: a reply and a receipt
            wait = limiter.reserve()
            reply_waits.append((clock.now - t0, wait))
            starts.append(clock.now + wait)
            receipts.append(clock.now)
        receipts = [r for r in receipts if clock.now - r <= 5.0]  # stale ones are dropped
        if receipts and limiter.delay() <= 0:
            limiter.record()
            starts.append(clock.now)
            receipts.pop()  # the newest first
            sent_receipts += 1
    starts.sort()
    worst = max(sum(1 for t in starts[i : i + 90] if t < s + 1.0) for i, s in enumerate(starts))
    assert worst <= 80
    assert max(w for at, w in reply_waits if at < 2.0) <= 0.05  # before the error: replies never wait
    assert max(w for at, w in reply_waits if at > 8.0) <= 0.05  # recovered within seconds
    assert sent_receipts >= 0.7 * (10 * 80 - len(reply_waits) - 5 * 20)  # most of the spare budget is used
