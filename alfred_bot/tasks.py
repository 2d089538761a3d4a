"""Owned background tasks: the one shutdown rule both worker pools follow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection

log = logging.getLogger("alfred.tasks")

#: How long a cancelled task may take to end before it is cancelled again (seconds).
PATIENCE = 2.0


async def stop_workers(tasks: list[asyncio.Task[None]], busy: Collection[asyncio.Task[None]], grace: float) -> None:
    """Cancel idle tasks now, give busy ones `grace` seconds to finish their item, then cancel them too.

    Whatever a cancelled task held stays in the store (pending, or leased) and is picked up again.
    """
    idle = {task for task in tasks if task not in busy}  # (`busy` changes as workers finish)
    for task in idle:
        task.cancel()
    if not tasks:
        return
    await asyncio.wait(tasks, timeout=grace)
    for task in tasks:
        await cancel(task, again=task in idle)


async def cancel(task: asyncio.Task[None] | None, patience: float = PATIENCE, *, again: bool = False) -> None:
    """Stop one background task and wait until it has (its `CancelledError` is the expected end).

    Why again and again: a cancellation can be lost. On Python 3.11 `asyncio.wait_for` swallows
    one that arrives as its inner await completes, and a driver may catch it mid-read; the task
    then runs on, and a shutdown that waited for it would wait for ever (seen under load: a node
    that never exited after SIGTERM). So a task still running after `patience` seconds is named
    in the log and cancelled again, until it ends. `again`: the caller cancelled it already.
    """
    if task is None:
        return
    if not again:  # (`cancelling()` cannot tell: a timeout inside the task may have cancelled it)
        task.cancel()
    while not task.done():
        await asyncio.wait([task], timeout=patience)
        if not task.done():
            log.warning("task %s is still running %.0f s after it was cancelled: cancelling it again",
                        task.get_name(), patience)  # fmt: skip
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
