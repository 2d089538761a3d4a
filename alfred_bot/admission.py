"""How many handlers may run at once: all `dispatch.workers` while the process idles, fewer while it is busy.

Why many: a handler waiting on an agent platform or an API holds a worker and no CPU. A bot that
forwards to an agent needs one worker per message in flight: 50 msg/s to an agent answering in 2 s
keep 100 busy. With 4, an agent answering in 1 s capped the bot at 4 msg/s: at the guide's 50 msg/s,
reply p50 37 s and 68 % of the replies missing a minute later (bench/e2e.py --agent-latency 1).

Why not always all of them: handlers that compute, or that are many and quick, keep the one event
loop busy, and the webhook's acknowledgement to Meta waits behind them. Past what the core can
take (500 conversations/s in bench/meta_sim.py), 100 workers always running put the webhook p50
at 2–3 s, where 4 kept it at 17–27 ms. The 200 to Meta must not wait (a slow one
brings redeliveries, more load); the store is the buffer for handling.

What tells the two apart is the process's load: handlers that wait leave it mostly idle; handlers
that compute, or webhooks beyond what the core can take, keep it busy. So the limit follows the
process's CPU time over each 0.1 s (all its threads: the SQLite writer works for the loop) and the
loop's lag (how late the timer fired; it also catches a process throttled below a whole core), as
the sender's pacing follows 130429 (AIMD): a busy period halves it (never below `floor`), an idle
one gives back a tenth of the workers, all of them within a second. The lag alone was tried: its
samples stay under 10–20 ms on a saturated core (iterations are short, there are just too many),
and at 500 conversations/s the webhook p50 still reached 3 s. The price: a bot bridging to an agent
whose webhooks alone keep the core above 85 % is cut too, though its handlers wait; but there each
handled message's own work (its commit, its reply's send) is what the core lacks.

A cut binds as slots come free: a worker already holding one (waiting for a message, or handling
it) keeps it until that message is done, so after a quiet spell up to all workers may start one
message each before the lower limit holds. With quick handlers that is milliseconds.

The per-tenant cap of the fair queue follows the limit (`on_change`): with the limit cut to the
floor, one tenant's hanging handlers must still leave a worker for every other tenant.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

#: How often CPU and lag are sampled, s.
PERIOD = 0.1
#: The process is busy above this share of one core over a period.
BUSY_CPU = 0.85
#: ... or when the timer fires this late, s.
TARGET_LAG = 0.02
#: The fewest handlers ever allowed (what `dispatch.workers` was before the limit adapted).
FLOOR = 4


class Admission:
    """A semaphore whose size (`limit`) follows the process's load; `async with` takes a slot."""

    def __init__(
        self,
        ceiling: int,
        *,
        floor: int = FLOOR,
        target: float = TARGET_LAG,
        busy: float = BUSY_CPU,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.target = target
        self.busy = busy
        self._on_change = on_change
        self.limit = self.ceiling
        self.running = 0
        self.lag = 0.0  # the latest samples: s late, share of one core
        self.cpu = 0.0
        self.cuts = 0  # how often the limit was halved (a counter for /healthz)
        self._waiters: deque[asyncio.Future[None]] = deque()

    def observe(self, lag: float, cpu: float = 0.0) -> None:
        """One period's sample: a busy process or a late timer halves the limit, else it grows back."""
        self.lag, self.cpu = lag, cpu
        before = self.limit
        if lag > self.target or cpu > self.busy:
            self.limit = max(self.floor, self.limit // 2)
            self.cuts += self.limit < before
        else:
            self.limit = min(self.ceiling, self.limit + max(1, self.ceiling // 10))
            self._wake()
        if self.limit != before and self._on_change is not None:
            self._on_change(self.limit)

    async def __aenter__(self) -> None:
        while self.running >= self.limit:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._wake()  # woken, but leaving: pass the slot on
                raise
            finally:
                if future in self._waiters:
                    self._waiters.remove(future)
        self.running += 1

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.running -= 1
        self._wake()

    def _wake(self) -> None:
        """Wake as many waiters as there are free slots."""
        free = self.limit - self.running
        while free > 0 and self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                free -= 1

    async def watch(self, period: float = PERIOD) -> None:
        """Sample for ever (a background task): how late a `period` s sleep wakes, and the CPU meanwhile."""
        loop = asyncio.get_running_loop()
        while True:
            began, cpu = loop.time(), time.process_time()
            await asyncio.sleep(period)
            wall = loop.time() - began
            self.observe(max(0.0, wall - period), (time.process_time() - cpu) / wall)
