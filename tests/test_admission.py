"""Handler admission: as many handlers as `dispatch.workers` while the process idles, fewer while it is busy."""

from __future__ import annotations

import asyncio
import time

from alfred_bot.admission import FLOOR, Admission


def test_lag_above_the_target_halves_the_limit_down_to_the_floor_and_counts_cuts() -> None:
    adm = Admission(100, target=0.01)
    adm.observe(0.05)
    assert adm.limit == 50
    for _ in range(10):
        adm.observe(0.05)
    assert adm.limit == FLOOR
    assert adm.cuts == 5  # 100 → 50 → 25 → 12 → 6 → 4; cuts at the floor are not cuts


def test_a_busy_cpu_cuts_like_a_late_timer() -> None:
    adm = Admission(100, target=0.02, busy=0.85)
    adm.observe(0.0, cpu=0.8)
    assert adm.limit == 100
    adm.observe(0.0, cpu=0.95)  # handlers computing, or more webhooks than the core takes
    assert (adm.limit, adm.cuts, adm.cpu) == (50, 1, 0.95)


def test_an_idle_process_gets_the_workers_back_within_a_second_of_samples() -> None:
    adm = Admission(100, target=0.01)
    for _ in range(6):
        adm.observe(1.0)
    assert adm.limit == FLOOR
    for _ in range(10):  # 10 samples of 0.1 s: one second
        adm.observe(0.001, cpu=0.3)
    assert adm.limit == 100
    adm.observe(0.0)
    assert adm.limit == 100  # never above the workers


def test_fewer_workers_than_the_floor_are_never_cut() -> None:
    adm = Admission(2)
    adm.observe(1.0)
    assert (adm.floor, adm.limit) == (2, 2)


async def test_only_limit_holders_get_in_and_a_grown_limit_lets_the_others_in() -> None:
    adm = Admission(8, floor=2, target=0.01)
    for _ in range(3):
        adm.observe(1.0)
    assert adm.limit == 2
    inside: list[int] = []
    release = asyncio.Event()

    async def handler(i: int) -> None:
        async with adm:
            inside.append(i)
            await release.wait()

    tasks = [asyncio.create_task(handler(i)) for i in range(6)]
    await asyncio.sleep(0.01)
    assert inside == [0, 1] and adm.running == 2
    adm.observe(0.0)  # the loop keeps up again: the limit grows by 1 (8 // 10, at least 1)
    await asyncio.sleep(0.01)
    assert inside == [0, 1, 2]
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(inside) == list(range(6)) and adm.running == 0


async def test_a_waiter_cancelled_after_being_woken_passes_its_slot_on() -> None:
    adm = Admission(1)
    log: list[str] = []

    async def waiter(name: str) -> None:
        async with adm:
            log.append(name)

    await adm.__aenter__()  # the one slot is taken
    second = asyncio.create_task(waiter("second"))
    third = asyncio.create_task(waiter("third"))
    await asyncio.sleep(0.01)
    await adm.__aexit__(None, None, None)  # wakes `second` (no await inside: nothing ran yet)…
    second.cancel()  # …which leaves before it runs
    await asyncio.wait_for(asyncio.gather(second, third, return_exceptions=True), 2)  # not lost: `third` gets in
    assert log == ["third"] and adm.running == 0


async def test_the_watch_sees_a_blocked_loop_and_cuts_the_limit() -> None:
    adm = Admission(100, target=0.01)
    watch = asyncio.create_task(adm.watch(period=0.01))
    await asyncio.sleep(0.03)
    assert adm.limit == 100
    time.sleep(0.1)  # a handler computing on the loop: every timer fires late
    await asyncio.sleep(0.03)
    watch.cancel()
    assert adm.limit < 100 and adm.cuts >= 1
