"""The dispatch queue: one FIFO lane per tenant under one bound, handed out fairly.

Why not one `asyncio.Queue`: with a shared FIFO, twelve texts for one tenant whose orchestrator
hangs take every handler worker, and another tenant's `/ping` waits for the hang to time out.
Here a tenant may hold at most `cap` workers at once (by default every worker but one per other
tenant, `DispatchConfig.tenant_cap`), so another tenant always finds a free one; and when several
tenants wait, the one holding the fewest workers goes first (ties: the one served longest ago), so
shares even out as workers free up. Within a tenant, order is kept (first in, first out).

The bound (`maxsize`) covers every lane together, like the queue it replaces: `put_nowait` raises
`asyncio.QueueFull` (the caller leaves the item to the store's catch-up scan) and `put` waits.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from itertools import count
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-lane FIFOs; `get` hands out an item of a lane below its cap, fewest-busy lane first.

    Every `get` must be matched by one `done(lane)` when the item's work ends (a busy slot).
    """

    def __init__(self, maxsize: int, cap: int) -> None:
        self.maxsize = maxsize
        self.cap = max(1, cap)
        self._lanes: dict[str, deque[T]] = {}
        self._busy: Counter[str] = Counter()
        self._served: dict[str, int] = {}
        self._turns = count(1)
        self._size = 0
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def set_cap(self, cap: int) -> None:
        """Change how many workers one lane may hold (the workers allowed to run changed)."""
        self.cap = max(1, cap)
        self._wake(self._getters)  # a lane held back by the old cap may be ready now

    def qsize(self) -> int:
        """Items waiting (not those being worked on)."""
        return self._size

    def full(self) -> bool:
        return self._size >= self.maxsize

    def depths(self) -> dict[str, int]:
        """Waiting items per lane."""
        return {lane: len(items) for lane, items in self._lanes.items() if items}

    def busy(self) -> dict[str, int]:
        """Items being worked on per lane."""
        return {lane: n for lane, n in self._busy.items() if n}

    def put_nowait(self, lane: str, item: T) -> None:
        if self.full():
            raise asyncio.QueueFull
        self._lanes.setdefault(lane, deque()).append(item)
        self._size += 1
        self._wake(self._getters)

    async def put(self, lane: str, item: T) -> None:
        """Wait for room, then queue `item` on `lane`."""
        while self.full():
            await self._wait(self._putters)
        self.put_nowait(lane, item)

    async def get(self) -> tuple[str, T]:
        """The next (lane, item) a worker may take; the lane counts it busy until `done(lane)`."""
        while (lane := self._pick()) is None:
            await self._wait(self._getters)
        item = self._lanes[lane].popleft()
        self._size -= 1
        self._busy[lane] += 1
        self._served[lane] = next(self._turns)
        self._wake(self._putters)
        if self._pick() is not None:
            self._wake(self._getters)  # more is ready: do not leave it to the next put
        return lane, item

    def done(self, lane: str) -> None:
        """The work on one item of `lane` ended: its slot is free for the lane (or another)."""
        self._busy[lane] -= 1
        if self._busy[lane] <= 0:
            del self._busy[lane]
        self._wake(self._getters)

    def _pick(self) -> str | None:
        ready = [lane for lane, items in self._lanes.items() if items and self._busy[lane] < self.cap]
        if not ready:
            return None
        return min(ready, key=lambda lane: (self._busy[lane], self._served.get(lane, 0)))

    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._wake(waiters)  # we were woken but will not act: pass it on
            raise
        finally:
            if future in waiters:
                waiters.remove(future)

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
