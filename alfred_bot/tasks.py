"""Owned background tasks: the one shutdown rule both worker pools follow."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection


async def stop_workers(tasks: list[asyncio.Task[None]], busy: Collection[asyncio.Task[None]], grace: float) -> None:
    """Cancel idle tasks now, give busy ones `grace` seconds to finish their item, then cancel them too.

    Whatever a cancelled task held stays in the store (pending, or leased) and is picked up again.
    """
    for task in tasks:
        if task not in busy:
            task.cancel()
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=grace)
    for task in late:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Stop one background task and wait until it has (its `CancelledError` is the expected end)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
