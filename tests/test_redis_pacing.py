"""Pacing shared by every node through a real redis-server (issue 16): the limiter's Lua script
books exactly what the in-process limiter books, two "nodes" (two clients, two node ids) sharing
one number never exceed its rate in any sliding second and use ≥ 95 % of it, pauses, pair
budgets and slow-downs reach the other node, and a Redis killed with SIGKILL mid-run leaves each
node on its share (nothing above the rate) until the restarted server takes over again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from alfred_bot.outbound.pauses import Pause
from alfred_bot.outbound.ratelimit import PairLimiter, SlidingWindowLimiter
from alfred_bot.outbound.redis import LocalPacer, LocalPairs, SharedPacer, SharedPacing, connect
from tests.redisserver import Cable, RedisServer, redis_server  # noqa: F401 (the fixture)

TENANT, NUMBER = "home", "123456789012345"


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def worst_second(starts: list[float], window: float = 1.0) -> int:
    """The most starts in any window of `window` seconds (half-open: [t, t + window))."""
    starts = sorted(starts)
    worst, first = 0, 0
    for last, at in enumerate(starts):
        while at - starts[first] >= window:
            first += 1
        worst = max(worst, last - first + 1)
    return worst


Node = Callable[..., Awaitable[SharedPacing]]


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[Node]:  # noqa: F811
    """Start "nodes": each its own client and node id on the same server; all closed at the end."""
    made: list[SharedPacing] = []

    async def node(url: str = "", share: int = 2, timeout: float = 0.25, **options: Any) -> SharedPacing:
        client = connect(url or redis_server.url, timeout=timeout)
        pacing = SharedPacing(client, share=lambda: share, timeout=timeout, **options)
        made.append(pacing)
        await pacing.start()
        return pacing

    yield node
    for pacing in made:
        await pacing.close()


async def drive(pacer: SharedPacer, starts: list[float], until: float, workers: int = 20) -> None:
    """`workers` senders in a loop: book a slot, sleep for it, "send" (record the time)."""

    async def worker() -> None:
        while time.monotonic() < until:
            wait = await pacer.acquire()
            due = time.monotonic() + wait
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            starts.append(now)
            pacer.observe_lag(now - due)  # as the lanes report decide-to-wire lag

    await asyncio.gather(*(worker() for _ in range(workers)))


async def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    begin = time.monotonic()
    while not condition():
        assert time.monotonic() - begin < timeout, "not propagated in time"
        await asyncio.sleep(0.002)
    return time.monotonic() - begin


# ------------------------------------------------------------------ the Lua script, on a fake clock


async def test_the_script_books_exactly_what_the_in_process_limiter_books(nodes: Node) -> None:
    clock = FakeClock()
    a = (await nodes(share=1, clock=clock, redis_clock=clock, ahead=1e9)).pacer(TENANT, NUMBER, 50)
    b = (await nodes(share=1, clock=clock, redis_clock=clock, ahead=1e9)).pacer(TENANT, NUMBER, 50)
    local = SlidingWindowLimiter(50, clock=clock)
    booked: list[float] = []
    # Bursts, gaps, a late start's lag and a slow-down, alternating between the two nodes.
    steps = [(0.0, 30), (0.3, 40), (2.5, 5), (0.001, 60), (0.7, 10), (5.0, 80), (0.05, 20)]
    for i, (advance, count) in enumerate(steps):
        clock.now += advance
        if i == 3:
            a.observe_lag(0.2)
            local.observe_lag(0.2)
        if i == 5:
            b.slow_down(0.5, 10.0)
            local.slow_down(0.5, 10.0)
            await asyncio.sleep(0.05)  # the cut is written in the background
        for k in range(count):
            expected = local.reserve()
            got = await (a if k % 2 else b).acquire()
            assert got == pytest.approx(expected, abs=2e-6), (i, k)
            booked.append(clock.now + got)
    assert a.slowed and b.slowed
    # The promise itself: never more than 50 starts in any window of 1 s + margin (0.01 s).
    assert worst_second(booked, 1.0 + 0.01 - 1e-6) <= 50


async def test_a_best_effort_start_takes_only_a_free_slot(nodes: Node) -> None:
    clock = FakeClock()
    a = (await nodes(share=1, clock=clock, redis_clock=clock)).pacer(TENANT, NUMBER, 20)
    b = (await nodes(share=1, clock=clock, redis_clock=clock)).pacer(TENANT, NUMBER, 20)
    assert await a.acquire_if_free()  # the burst (5 %, at least one) is free
    assert not await b.acquire_if_free()  # the next is spaced 1.01 / 20 s later, on every node
    assert b.delay() == pytest.approx(1.01 / 20, abs=1e-4)
    clock.now += 1.01 / 20
    assert await b.acquire_if_free()
    assert a.mode == b.mode == "shared"


# ------------------------------------------------------------------ two nodes, real time


async def test_two_nodes_sharing_a_number_never_exceed_it_and_use_95_percent(
    nodes: Node,
) -> None:
    rate, seconds = 200, 2.5
    one, two = await nodes(), await nodes()
    await wait_for(lambda: one.on_redis == two.on_redis == 2, timeout=1.0)  # each has heard the other
    a, b = one.pacer(TENANT, NUMBER, rate), two.pacer(TENANT, NUMBER, rate)
    starts_a: list[float] = []
    starts_b: list[float] = []
    begin = time.monotonic()
    until = begin + seconds
    await asyncio.gather(drive(a, starts_a, until), drive(b, starts_b, until))
    starts = starts_a + starts_b
    assert worst_second(starts) <= rate, "a sliding second above the rate"
    sustained = sum(1 for t in starts if t < until) / seconds
    assert sustained >= 0.95 * rate, sustained
    assert len(starts_a) > rate / 2 and len(starts_b) > rate / 2  # both nodes really sent


# ------------------------------------------------------------------ shared pauses, pairs, slow-down


async def test_a_pause_on_one_node_pauses_every_node_at_once(nodes: Node) -> None:
    a, b = await nodes(poll=30.0), await nodes(poll=30.0)  # no polling: only pub/sub can carry it in time
    await asyncio.sleep(0.05)  # both subscribed
    token = Pause("token", "access token expired", 190, time.time())
    assert a.pauses.hold("home", token)
    assert "home" in a.pauses.current()  # at once on the node that saw the 190
    delay = await wait_for(lambda: "home" in b.pauses.current(), timeout=0.5)
    assert delay < 0.5
    assert b.pauses.current()["home"] == token
    assert not b.pauses.hold("home", Pause("account", "other", 368, time.time()))  # first reason kept
    assert b.pauses.lift("home")
    await wait_for(lambda: "home" not in a.pauses.current(), timeout=0.5)
    # Both nodes pause the same tenant in the same instant: one reason wins, the same on both.
    first, second = Pause("token", "first", 190, 1.0), Pause("account", "second", 368, 2.0)
    a.pauses.hold("biz", first)
    b.pauses.hold("biz", second)
    await wait_for(lambda: a.pauses.current().get("biz") == b.pauses.current().get("biz") == first, timeout=0.5)


async def test_the_pair_budget_and_its_strikes_are_shared(
    nodes: Node,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a = (await nodes()).pairs(TENANT, NUMBER, burst=2, interval=60.0)
    b = (await nodes()).pairs(TENANT, NUMBER, burst=2, interval=60.0)
    user, other = "15551230001", "15551230002"
    assert await a.take(user) == 0.0
    assert await b.take(user) == 0.0
    wait = await a.take(user)  # the burst of 2 is spent across both nodes
    assert 59.0 < wait <= 60.0
    assert await b.take(other) == 0.0  # another user's budget is untouched
    a.block(other, 30.0)  # Meta said 131056 to node a
    assert a.strikes(other) == 1
    await asyncio.sleep(0.05)
    assert 29.0 < await b.take(other) <= 30.0
    assert b.strikes(other) == 1
    b.on_success(other)
    await asyncio.sleep(0.05)
    await a.take(other)
    assert a.strikes(other) == 0
    client = connect(redis_server.url)
    keys = [key.decode() for key in await client.keys("*")]
    await client.aclose()
    assert any(":{pair:home:" in key for key in keys)
    assert not [key for key in keys if user in key or other in key], "users' numbers are hashed in key names"


async def test_a_slow_down_on_one_node_slows_the_number_on_every_node(nodes: Node) -> None:
    clock = FakeClock()
    a = (await nodes(share=1, clock=clock, redis_clock=clock)).pacer(TENANT, NUMBER, 100)
    b = (await nodes(share=1, clock=clock, redis_clock=clock)).pacer(TENANT, NUMBER, 100)
    await b.acquire()
    assert not b.slowed
    a.slow_down(0.5, 10.0)
    assert a.slowed
    await asyncio.sleep(0.05)
    clock.now += 1.0
    await b.acquire()  # b learns the shared factor with its next booking
    assert b.slowed
    waits = [await b.acquire() for _ in range(10)]
    # Half the rate: one start every 1.01 / 50 s (the factor climbs back by 5 % a second).
    assert waits[-1] - waits[-2] == pytest.approx(1.01 / (100 * 0.55), rel=0.1)
    clock.now += 11.0
    await b.acquire()
    assert not b.slowed


# ------------------------------------------------------------------ Redis lost: killed, or cut off from one node

#: Outage tests: quick beats and a short `ahead`, so a node's hold (one window + ahead + the
#: others' time to notice: 4 beats + a beat + a timeout) is ~2 s instead of ~3.5 s.
QUICK: dict[str, Any] = {"backoff_cap": 0.2, "poll": 0.2, "beat": 0.1, "ahead": 0.25}


def per_second_at_most(starts: list[float], begin: float, end: float, limit: int) -> None:
    """No window of one second inside [begin, end] holds more than `limit` of `starts`."""
    inside = [t for t in starts if begin <= t <= end]
    assert inside, "nothing sent in that span"
    assert worst_second(inside) <= limit, (worst_second(inside), limit)


async def test_redis_killed_mid_run_each_node_falls_back_to_its_share_then_recovers(
    nodes: Node,
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="alfred.redis")
    rate = 200
    one, two = await nodes(**QUICK), await nodes(**QUICK)
    a, b = one.pacer(TENANT, NUMBER, rate), two.pacer(TENANT, NUMBER, rate)
    starts_a: list[float] = []
    starts_b: list[float] = []
    until = time.monotonic() + 4.8
    run = asyncio.gather(drive(a, starts_a, until), drive(b, starts_b, until))

    await asyncio.sleep(0.7)
    redis_server.kill()
    killed = time.monotonic()
    await wait_for(lambda: one.degraded and two.degraded, timeout=1.0)
    assert a.mode == b.mode == "fallback"
    one.pauses.hold("biz", Pause("token", "190 during the outage", 190, time.time()))
    await asyncio.sleep(2.6)
    redis_server.start()  # same port, same directory: the AOF comes back
    restarted = time.monotonic()
    await wait_for(lambda: not one.degraded and not two.degraded, timeout=2.0)
    await wait_for(lambda: "biz" in two.pauses.current(), timeout=1.0)  # the outage's pause reached the other node
    await run

    assert worst_second(starts_a + starts_b) <= rate, "a sliding second above the rate"
    for alone in (starts_a, starts_b):  # each node on its share (rate / 2) while Redis was away
        per_second_at_most(alone, killed, restarted, rate // 2)
    # ... after a hold: the slots booked in Redis (at most `ahead` out) leave the window first.
    hold = 1.01 + 0.25 + (4 * 0.1 + 0.1 + 0.25)
    assert not [t for t in starts_a + starts_b if killed + 0.25 + 0.05 < t < killed + hold - 0.05]
    assert [t for t in starts_a + starts_b if t > restarted + 0.5], "sending goes on after the recovery"
    assert a.mode == b.mode == "shared"
    said = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(said) == 2, "one line per node, not one per send"
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 2


async def test_one_node_cut_off_from_redis_takes_its_share_and_the_others_leave_it_room(
    nodes: Node,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    rate = 200
    cable = Cable(redis_server.port)  # node two reaches Redis through it; node one directly
    await cable.mend()
    one, two = await nodes(**QUICK), await nodes(url=cable.url, **QUICK)
    a, b = one.pacer(TENANT, NUMBER, rate), two.pacer(TENANT, NUMBER, rate)
    starts_a: list[float] = []
    starts_b: list[float] = []
    until = time.monotonic() + 4.5
    run = asyncio.gather(drive(a, starts_a, until), drive(b, starts_b, until))

    await asyncio.sleep(0.7)
    await cable.cut()
    cut = time.monotonic()
    await wait_for(lambda: two.degraded, timeout=1.0)
    await wait_for(lambda: one.on_redis == 1, timeout=1.0)  # node one counts node two out: half the rate
    assert not one.degraded
    await asyncio.sleep(2.4)
    await cable.mend()
    mended = time.monotonic()
    await wait_for(lambda: not two.degraded, timeout=2.0)
    await run
    await cable.cut()

    assert worst_second(starts_a + starts_b) <= rate, "a sliding second above the rate"
    per_second_at_most(starts_b, cut, mended, rate // 2)  # alone: its share
    per_second_at_most(starts_a, cut + 1.5, mended, rate // 2)  # on Redis: the rest of the rate
    assert [t for t in starts_b if t > mended + 0.5], "node two books in Redis again"


async def test_on_a_fake_clock_a_node_holds_then_paces_on_its_share_slowed_as_the_number_was(
    nodes: Node,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    clock = FakeClock()
    one = await nodes(clock=clock, redis_clock=clock, **QUICK)  # one of two live nodes: its share is half
    a = one.pacer(TENANT, NUMBER, 100)
    pairs = one.pairs(TENANT, NUMBER, burst=1, interval=6.0)
    a.slow_down(0.5, 10.0)  # a 130429: the number runs at half its rate, back to full in 10 s
    await one.link.settled()
    assert await a.acquire() == 0.0
    redis_server.kill()

    assert not await a.acquire_if_free()  # finds Redis gone: holds
    assert one.degraded and a.mode == "fallback" and a.slowed
    hold = 1.01 + 0.25 + (4 * 0.1 + 0.1 + 0.25)  # a window + ahead + the others' time to notice
    assert a.delay() == pytest.approx(hold, abs=1e-3)
    clock.now += hold
    assert await a.acquire_if_free()
    # Alone on its share (100 / 2), slowed as the number was: factor 0.5 + 0.05/s x 2.01 s.
    assert await a.acquire() == pytest.approx(1.01 / math.floor(50 * (0.5 + 0.05 * hold)), rel=1e-3)
    assert await pairs.take("15551230001") == 0.0  # the pair budget: this node's own meanwhile
    assert await pairs.take("15551230001") == pytest.approx(6.0)
    pairs.block("15551230001", 30.0)
    assert pairs.strikes("15551230001") == 1

    redis_server.start()
    await wait_for(lambda: not one.degraded, timeout=3.0)
    await a.acquire()
    assert a.mode == "shared"
    client = connect(redis_server.url)
    # The start booked before the crash (back from the AOF), the two made alone (replayed, once
    # each) and the new one: every start of the last window is in the log.
    assert await client.zcard(f"alfred:{{pace:{TENANT}:{NUMBER}}}:log") == 4
    await client.aclose()


async def test_the_in_process_limiters_have_the_same_async_surface() -> None:
    clock = FakeClock()
    pacer = LocalPacer(SlidingWindowLimiter(20, clock=clock))
    assert await pacer.acquire() == 0.0
    assert not await pacer.acquire_if_free()
    assert pacer.delay() == pytest.approx(1.01 / 20)
    pacer.observe_lag(0.1)
    pacer.slow_down(0.5, 10.0)
    assert pacer.slowed
    pairs = LocalPairs(PairLimiter(burst=1, interval=6.0, clock=clock))
    assert await pairs.take("u") == 0.0
    assert await pairs.take("u") == pytest.approx(6.0)
    pairs.block("u", 10.0)
    assert pairs.strikes("u") == 1
    pairs.on_success("u")
    assert pairs.strikes("u") == 0
    clock.now += 7.0
    pairs.prune()
    assert await pairs.take("u") == 0.0
