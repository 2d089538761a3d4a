"""Stopping background tasks: a lost cancellation must not hang a shutdown."""

from __future__ import annotations

import asyncio

import pytest

from alfred_bot import tasks


async def _deaf(swallow: int, woke: list[str]) -> None:
    """Swallows its first `swallow` cancellations, as a lost one looks from outside (Python 3.11's
    `wait_for` racing its inner await), then ends on the next."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            woke.append("cancelled")
            if len(woke) > swallow:
                raise


async def test_a_task_that_loses_a_cancellation_is_cancelled_again(caplog: pytest.LogCaptureFixture) -> None:
    woke: list[str] = []
    task = asyncio.create_task(_deaf(2, woke), name="deaf-loop")
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.cancel(task, patience=0.05), timeout=5)
    assert task.cancelled() and woke == ["cancelled"] * 3
    assert caplog.text.count("task deaf-loop is still running") == 2


async def test_a_task_that_ends_on_the_first_cancellation_is_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    woke: list[str] = []
    task = asyncio.create_task(_deaf(0, woke))
    await asyncio.sleep(0)
    await tasks.cancel(task, patience=0.05)
    assert task.cancelled() and woke == ["cancelled"]
    assert "still running" not in caplog.text
    await tasks.cancel(None)  # nothing to stop


async def test_stop_workers_gives_busy_ones_their_grace_then_stops_even_a_deaf_one() -> None:
    finished: list[str] = []

    async def busy() -> None:
        await asyncio.sleep(0.05)
        finished.append("busy")

    woke: list[str] = []
    idle = asyncio.create_task(_deaf(1, woke))
    working = asyncio.create_task(busy())
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.stop_workers([idle, working], {working}, grace=1.0), timeout=10)
    assert finished == ["busy"] and idle.cancelled() and woke == ["cancelled", "cancelled"]
