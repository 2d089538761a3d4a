"""Handler admission: as many handlers as `dispatch.workers` while the process idles, fewer while it is busy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from alfred_bot import keys
from alfred_bot.admission import FLOOR, Admission
from alfred_bot.app import create_app
from alfred_bot.fairqueue import FairQueue
from tests.conftest import make_config


def test_lag_above_the_target_halves_the_limit_down_to_the_floor_and_counts_cuts() -> None:
    adm = Admission(100, target=0.01)
    adm.observe(0.05)
    assert adm.limit == 50
    for _ in range(10):
        adm.observe(0.05)
    assert adm.limit == FLOOR
    assert adm.cuts == 5  # 100 → 50 → 25 → 12 → 6 → 4; cuts at the floor are not cuts


def test_a_busy_process_cuts_like_a_late_timer() -> None:
    adm = Admission(100, target=0.02, busy=0.85)
    adm.observe(0.002, cpu=0.8)
    assert adm.limit == 100
    adm.observe(0.002, cpu=0.95)  # quick handlers, or more webhooks than the core takes
    assert (adm.limit, adm.cuts, adm.cpu, adm.lag) == (50, 1, 0.95, 0.002)


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


def test_every_change_of_the_limit_is_reported_once() -> None:
    seen: list[int] = []
    adm = Admission(100, target=0.01, on_change=seen.append)
    adm.observe(0.0)  # already at the ceiling: no change
    adm.observe(0.5)
    adm.observe(0.5)
    adm.observe(0.0)
    assert seen == [50, 25, 35]


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
    adm = Admission(100, target=0.15)  # generous: a loaded test machine must not cut before the block
    watch = asyncio.create_task(adm.watch(period=0.01))
    await asyncio.sleep(0.03)
    time.sleep(0.3)  # a handler computing on the loop: every timer fires late
    await asyncio.sleep(0.03)
    watch.cancel()
    assert adm.limit < 100 and adm.cuts >= 1 and adm.lag >= 0.0


async def test_with_the_limit_cut_one_tenants_hanging_handlers_leave_a_worker_for_the_other(tmp_path: Path) -> None:
    """The fair queue's per-tenant cap follows the limit: at 4 allowed, tenant "a" may hold 3."""
    cfg = make_config(tmp_path).dispatch  # 100 workers, 2 tenants: cap 99
    queue: FairQueue[str] = FairQueue(maxsize=10, cap=cfg.tenant_cap(2))
    adm = Admission(cfg.workers, on_change=lambda limit: queue.set_cap(cfg.tenant_cap(2, limit)))
    for _ in range(6):
        adm.observe(1.0)
    assert (adm.limit, queue.cap) == (4, 3)
    hang, served = asyncio.Event(), asyncio.Queue[str]()

    async def worker() -> None:
        while True:
            async with adm:
                lane, item = await queue.get()
                served.put_nowait(item)
                if lane == "a":
                    await hang.wait()
                queue.done(lane)

    workers = [asyncio.create_task(worker()) for _ in range(cfg.workers)]
    for i in range(5):
        queue.put_nowait("a", f"a{i}")
    await asyncio.sleep(0.01)
    queue.put_nowait("b", "b0")
    taken = [await asyncio.wait_for(served.get(), 1) for _ in range(4)]
    assert taken == ["a0", "a1", "a2", "b0"]  # "a" holds 3, the 4th worker serves "b"
    for _ in range(10):
        adm.observe(0.0)  # the process idles again: all workers, and "a" may hold 99
    assert queue.cap == 99
    assert sorted([await asyncio.wait_for(served.get(), 1) for _ in range(2)]) == ["a3", "a4"]
    hang.set()
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


async def test_the_apps_dispatcher_caps_tenants_by_the_current_limit(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    cfg = make_config(tmp_path)  # tenants home and biz
    client = await aiohttp_client(create_app(cfg, secrets))
    dispatcher = client.app[keys.DISPATCHER]
    assert dispatcher.admission.floor == FLOOR  # (the cap starts at 99; a late timer may cut it already)
    for _ in range(6):
        dispatcher.admission.observe(1.0)
    assert (dispatcher.admission.limit, dispatcher.queue.cap) == (4, 3)
    health = await (await client.get("/healthz")).json()
    assert health["dispatcher"]["handler_limit"] < 100 and health["dispatcher"]["handler_limit_cuts"] >= 5
