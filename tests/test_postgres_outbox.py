"""The PostgreSQL outbox with several nodes on one database: what the contract suite (one store at a
time) cannot show. Each node is a real `PostgresStore` with its own node id on a fresh database of
the test server (tests/pgserver.py); a node "dies" by its heartbeat stopping (its clock frozen).

- Claims racing on two nodes never hand out the same row, and a user's rows go out one at a time,
  in order, whichever node sends them (FOR UPDATE SKIP LOCKED, a per-user lock, a re-check).
- A `sending` row of a node whose heartbeat is older than `takeover_seconds` goes to another node
  at once, and the dead node's late settle changes nothing.
- A status and the settle that records its wamid, committing on two nodes at the same time, never
  lose the status between them.
- Queuing sends wakes every node (NOTIFY alfred_outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from alfred_bot.store import NodeInfo, OutboxJob, Settlement, StoreError
from alfred_bot.store.postgres import inbox, outbox
from alfred_bot.store.postgres.engine import PostgresStore
from tests import pgserver
from tests.contract.conftest import START, FakeClock
from tests.contract.helpers import USER, row, send, statuses

TAKEOVER = 15.0
#: Meta: Webhooks > messages > statuses (a "delivered" status for our wamid),
#: developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components#statuses-object
DELIVERED = {"id": "wamid.RACE", "status": "delivered", "timestamp": "1767225700", "recipient_id": USER}


@pytest.fixture
def url() -> Iterator[str]:
    """A fresh database on the session's test server, dropped after the test."""
    server = pgserver.shared_server()
    database = server.fresh_database()
    yield database
    server.drop_database(database.rsplit("/", 1)[1])


@contextlib.asynccontextmanager
async def node(url: str, name: str, clock: FakeClock) -> AsyncIterator[PostgresStore]:
    """One Alfred process: its own pool, node id and heartbeat (which writes `clock`'s time)."""
    info = NodeInfo(id=name, host="test", role="all", version="test", started_at=clock.now, pid=1)
    store = PostgresStore(url, clock=clock, node=info, takeover_seconds=TAKEOVER)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


class Ledger:
    """What the senders of all nodes saw: each claim, the users in flight, each user's order."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.claimed: list[str] = []
        self.by_node: dict[str, int] = defaultdict(int)
        self.in_flight: dict[str, str] = {}
        self.order: dict[str, list[str]] = defaultdict(list)
        self.sent = 0

    def took(self, name: str, job: OutboxJob) -> None:
        assert job.recipient not in self.in_flight, f"{job.id} claimed while {self.in_flight[job.recipient]} in flight"
        self.in_flight[job.recipient] = job.id
        self.claimed.append(job.id)
        self.order[job.recipient].append(job.id)
        self.by_node[name] += 1


async def _sender(store: PostgresStore, name: str, clock: FakeClock, ledger: Ledger) -> None:
    """A sender loop as the dispatcher runs it: claim a few, send them, settle each."""
    while ledger.sent < ledger.total:
        jobs = await store.claim(clock.now, {"home": 3}, 60.0, frozenset())
        for job in jobs:
            ledger.took(name, job)
        await asyncio.sleep(0.001)  # "sending": the other nodes claim meanwhile
        for job in jobs:
            del ledger.in_flight[job.recipient]  # before the settle commits: the next claim may follow it
            await send(store, job, clock.now, f"wamid.{job.id}")
            ledger.sent += 1
        if not jobs:
            await asyncio.sleep(0.005)


async def test_two_nodes_claiming_at_once_never_share_a_row_and_keep_each_users_order(url: str) -> None:
    clock = FakeClock()
    users = [f"1555000{u:04d}" for u in range(12)]
    rows = [row(f"{user}-{n}", to=user) for n in range(6) for user in users]
    ledger = Ledger(len(rows))
    async with node(url, "node-a", clock) as a, node(url, "node-b", clock) as b:
        await a.enqueue(rows)
        senders = [_sender(store, name, clock, ledger) for store, name in ((a, "a"), (b, "b")) for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(*senders), 120)
        assert await b.outbox_counts() == {"sent": len(rows)}
    assert sorted(ledger.claimed) == sorted(r.id for r in rows)  # each row claimed exactly once
    assert ledger.by_node["a"] > 0 and ledger.by_node["b"] > 0  # both nodes really raced
    for user in users:
        assert ledger.order[user] == [f"{user}-{n}" for n in range(6)]


async def test_a_users_next_row_waits_for_the_row_another_node_is_sending(url: str) -> None:
    clock = FakeClock()
    async with node(url, "node-a", clock) as a, node(url, "node-b", clock) as b:
        await a.enqueue([row("u1"), row("u2"), row("u3"), row("other", to="15550000001")])
        first = await a.claim(clock.now, {"home": 1}, 60.0, frozenset())
        assert [j.id for j in first] == ["u1"]
        assert [j.id for j in await b.claim(clock.now, {"home": 5}, 60.0, frozenset())] == ["other"]
        assert await b.claim(clock.now, {"home": 5}, 60.0, frozenset()) == []  # u1 is in flight on node a
        await send(a, first[0], clock.now, "wamid.U1")
        [second] = await b.claim(clock.now, {"home": 5}, 60.0, frozenset())
        assert second.id == "u2"
        assert await a.claim(clock.now, {"home": 5}, 60.0, frozenset()) == []


async def test_a_claim_skips_a_user_another_node_is_claiming_right_now(url: str) -> None:
    """Two enqueues commit in the other order than their rows were numbered; node A claims the
    user's only visible row, and before A commits, the older row appears: node B must not send it
    beside A's. (A per-user lock: B skips the user while A's claim is open.)"""
    clock = FakeClock()
    async with node(url, "node-a", clock) as a, node(url, "node-b", clock) as b:
        late, claimer = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            late_enqueue = late.transaction()
            await late_enqueue.start()
            await outbox.enqueue(late, [row("x1")], clock.now)  # numbered first, committed last
            await a.enqueue([row("x2")])
            async with claimer.transaction():  # node A's claim, not yet committed
                jobs = await outbox.claim(
                    claimer, clock.now, {"home": 5}, 60.0, frozenset(), receipts=None, receipt_max_age=None,
                    node="node-a", dead_before=clock.now - TAKEOVER,
                )  # fmt: skip
                assert [j.id for j in jobs] == ["x2"]
                await late_enqueue.commit()
                assert await b.claim(clock.now, {"home": 5}, 60.0, frozenset()) == []
            assert await b.claim(clock.now, {"home": 5}, 60.0, frozenset()) == []  # x2 is in flight on node A
        finally:
            await late.close()
            await claimer.close()


async def test_an_older_row_queued_again_waits_while_a_later_one_is_in_flight(url: str) -> None:
    """A dead letter retried behind a row another node is sending: one send per user at a time."""
    clock = FakeClock()
    async with node(url, "node-a", clock) as a, node(url, "node-b", clock) as b:
        await a.enqueue([row("old")])
        [old] = await a.claim(clock.now, {"home": 1}, 60.0, frozenset())
        await a.settle(Settlement(id="old", state="failed", attempts=old.attempts, error_code=131026), clock.now)
        await a.enqueue([row("new")])
        [new] = await a.claim(clock.now, {"home": 1}, 60.0, frozenset())
        assert new.id == "new"
        assert await b.retry_dead(["old"], clock.now) == 1
        assert await b.claim(clock.now, {"home": 5}, 60.0, frozenset()) == []
        await send(a, new, clock.now, "wamid.NEW")
        assert [j.id for j in await b.claim(clock.now, {"home": 5}, 60.0, frozenset())] == ["old"]


async def test_a_dead_nodes_send_is_taken_over_and_its_late_settle_changes_nothing(url: str) -> None:
    dead_clock = FakeClock(START)  # its heartbeat stops at START: it keeps writing that time
    async with node(url, "node-dead", dead_clock) as dead:
        await dead.enqueue([row("a1"), row("a2"), row("b1", to="15550000001")])
        [a1] = await dead.claim(START, {"home": 1}, 600.0, frozenset())  # a 10-minute lease
        clock = FakeClock(START + TAKEOVER - 1)
        async with node(url, "node-live", clock) as live:
            [b1] = await live.claim(clock.now, {"home": 5}, 600.0, frozenset())
            assert (a1.id, b1.id) == ("a1", "b1")  # a1's node is not yet too long silent: a1 and a2 wait
            clock.advance(2)  # now it is: its lease passes on long before the 10 minutes
            async with node(url, "node-other", clock) as other:
                [taken] = await other.claim(clock.now, {"home": 5}, 600.0, frozenset())
                assert (taken.id, taken.attempts) == ("a1", 2)  # not a2 (a1 goes first), not b1 (its node lives)
                late = Settlement(id="a1", state="sent", attempts=a1.attempts, wamid="wamid.LATE")
                await dead.settle(late, clock.now)
                assert (await live.message("a1") or {})["state"] == "sending"
                await send(other, taken, clock.now, "wamid.A1")
            shown = await live.message("a1") or {}
    assert (shown["state"], shown["wamid"], shown["attempts"]) == ("sent", "wamid.A1", 2)


async def _wait_blocked(task: asyncio.Task[Any]) -> None:
    """The task is waiting on a lock the open transaction holds: it cannot finish meanwhile."""
    await asyncio.sleep(0.5)
    assert not task.done(), "it did not wait for the other node's transaction"


@pytest.mark.parametrize("first", ["settle", "status"])
async def test_a_status_and_the_settle_of_its_wamid_committing_at_once_never_lose_it(url: str, first: str) -> None:
    """Meta can answer the webhook on node B while node A is still recording its own HTTP answer
    (or A records it while B's webhook transaction is open): whichever commits last sees the other."""
    clock = FakeClock()
    async with node(url, "node-a", clock) as a, node(url, "node-b", clock) as b:
        await a.enqueue([row("o1")])
        [job] = await a.claim(clock.now, {"home": 1}, 60.0, frozenset())
        done = Settlement(id="o1", state="sent", attempts=job.attempts, wamid="wamid.RACE")
        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():  # one node's write, not yet committed
                second: asyncio.Task[Any]
                if first == "settle":
                    await outbox.settle(conn, done, clock.now)
                    second = asyncio.create_task(b.ingest(statuses(DELIVERED)))
                else:
                    await inbox.ingest(conn, statuses(DELIVERED), clock.now)
                    second = asyncio.create_task(a.settle(done, clock.now))
                await _wait_blocked(second)
            await second
        finally:
            await conn.close()
        assert (await b.message("o1") or {})["state"] == "delivered"


async def test_queuing_and_retrying_sends_wakes_the_other_nodes(url: str) -> None:
    clock = FakeClock()
    async with node(url, "node-a", clock) as a, node(url, "node-b", clock) as b:
        woken = asyncio.Event()
        a.watch(lambda: None, woken.set)
        await b.enqueue([row("o1")])
        await asyncio.wait_for(woken.wait(), 10)
        [job] = await b.claim(clock.now, {"home": 1}, 60.0, frozenset())
        await b.settle(Settlement(id="o1", state="failed", attempts=job.attempts, error_code=131026), clock.now)
        woken.clear()
        assert await b.retry_dead(["missing"], clock.now) == 0
        await asyncio.sleep(0.5)
        assert not woken.is_set()  # nothing made due: nobody is woken for nothing
        assert await b.retry_dead(None, clock.now) == 1
        await asyncio.wait_for(woken.wait(), 10)


async def test_a_receipt_given_up_is_dropped_and_an_empty_enqueue_writes_nothing(url: str) -> None:
    clock = FakeClock()
    async with node(url, "node-a", clock) as a:
        assert await a.enqueue([]) == []
        await a.enqueue([row("r1", kind="read", key="read:wamid.1")])
        [job] = await a.claim(clock.now, {"home": 1}, 60.0, frozenset())
        gave_up = Settlement(id="r1", state="dropped", attempts=job.attempts, error_code=131000, error_message="x")
        await a.settle(gave_up, clock.now)
        shown = await a.message("r1") or {}
        assert (shown["state"], shown["error_code"], shown["error_message"]) == ("dropped", 131000, "x")
        assert await a.outbox_counts() == {"dropped": 1}


async def test_reads_fail_with_a_store_error_when_the_database_is_gone(url: str) -> None:
    """The API answers 503 on a StoreError; a driver exception would be a 500 with a traceback."""
    async with node(url, "node-a", FakeClock()) as a:
        await a.enqueue([row("o1", key="api:home:k1")])
        pgserver.shared_server().drop_database(url.rsplit("/", 1)[1])
        with pytest.raises(StoreError):
            await a.recent_inbound(5)
        with pytest.raises(StoreError):
            await a.message("o1")
        with pytest.raises(StoreError):
            await a.message_by_key("api:home:k1")
