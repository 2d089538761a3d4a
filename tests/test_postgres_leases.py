"""A take whose answer never reached the node (the connection dropped after the commit) must not
hold its messages for ever: the heartbeat renews only the leases the node knows it holds."""

from __future__ import annotations

import asyncio

import asyncpg

from alfred_bot.store.postgres.engine import PostgresStore
from alfred_bot.store.postgres.inbox import TAKE
from tests.contract.conftest import FakeClock
from tests.contract.helpers import body, text

TAKEOVER = 3.0


async def test_a_take_whose_answer_was_lost_lapses_and_is_taken_again(pg_url: str) -> None:
    clock = FakeClock()
    store = PostgresStore(pg_url, clock=clock, takeover_seconds=TAKEOVER)
    await store.open()
    try:
        await store.ingest(body(text("wamid.LOST"), text("wamid.KEPT", sender="15550001111")))
        [kept] = await store.take(1)  # this one the node knows it holds
        assert kept.item.message.id == "wamid.LOST"
        # the same node's take of the other message commits, but its answer is lost on the way back
        conn = await asyncpg.connect(pg_url)
        try:
            now = clock.now
            lost = await conn.fetch(TAKE, store.node.id, now + TAKEOVER, now, now - TAKEOVER, 10)
        finally:
            await conn.close()
        assert len(lost) == 1  # the other user's message
        assert await store.take(10) == []  # leased, and this node is alive
        clock.advance(TAKEOVER + 1)
        await asyncio.sleep(TAKEOVER / 3 + 0.5)  # at least one heartbeat at the new time
        again = await store.take(10)
        assert [p.item.message.id for p in again] == ["wamid.KEPT"]  # lapsed: not renewed by the beat
        # the message the node knew about was renewed: nobody may take it while the node lives
        assert await store.take(10) == []
    finally:
        await store.close()
