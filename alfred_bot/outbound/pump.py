"""The outbox pump: the outbound side's only contact with the store.

It claims due rows per lane (a lease in the store: a crash returns them by themselves), only the
oldest pending row of each user (so one user's messages keep their order even across retries),
never a row this process already holds, and only as many as each lane has room for. Read receipts
stand apart: the lane's receipt room is claimed separately (newest first), and the receipts the
store dropped as superseded or stale are counted here (`receipts_dropped_<reason>`). It sleeps
until the next row is due, a wake-up (new rows, a settle) or room in a lane. It also records
outcomes (`settle`), retrying a refused write rather than ever sending twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping

from alfred_bot.outbound.lanes import RECEIPT_TYPES, Lane
from alfred_bot.outbound.pauses import PauseBoard
from alfred_bot.store import Outbox, OutboxJob, Settlement, StoreError, claim_after

log = logging.getLogger("alfred.sender")

IDLE_POLL = 1.0
#: Rows are due but the claim left them (a user's next row behind one in flight, a full receipt
#: room): what frees them wakes the pump (a settle, a worker taking a job), this is the safety net.
#: It was 10 ms: a handler's second message polled the store a hundred times a second while the
#: first was at the Graph API.
BLOCKED_POLL = 0.25
SETTLE_RETRY_CAP = 30.0


class Pump:
    """Claims due rows into lanes and records how they ended."""

    def __init__(
        self,
        store: Outbox,
        lanes: Mapping[str, Lane],
        pauses: PauseBoard,
        counts: Counter[str],
        *,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        lease: float,
    ) -> None:
        self._store = store
        self._lanes = lanes
        self.pauses = pauses  # the sender swaps in the shared board before starting (Redis)
        self._counts = counts
        self._clock = clock
        self._monotonic = monotonic
        self.lease = lease
        self.busy: set[asyncio.Task[None]] = set()  # tasks a stop must let finish (see `tasks.stop_workers`)
        self.stopping = False
        self._held: set[str] = set()  # rows claimed by this process and not settled yet
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        #: SQLite: every write that frees a row wakes this pump (`claim_after`), so held-back rows
        #: can wait for a wake; on a shared database other nodes' settles do not, so they poll
        self._ordered = not store.shared
        self._blocked = False  # waiting with due rows left behind: a free slot wakes the pump too

    def wake(self) -> None:
        """Rows were queued or settled, or are about to be (a claim submitted after such a write
        runs after it on SQLite's one writer): claim now rather than at the next poll."""
        self._wake.set()

    def room(self) -> None:
        """A worker took a job from its lane: a lane that was full may take more."""
        self._room.set()
        if self._blocked:
            self._wake.set()

    def release(self, job_id: str) -> None:
        """The row is settled (or its lease will bring it back): it may be claimed again."""
        self._held.discard(job_id)

    async def run(self, hold: float = 0.0) -> None:
        """Claim and hand out sends until stopped; the first claim after `hold` s (a node joining
        others waits until they have lowered their share of the rate)."""
        await asyncio.sleep(hold)
        while not self.stopping:
            try:
                await self._pump_once()
            except Exception:  # the pump must outlive a store hiccup; leases keep rows safe
                log.exception("outbox pump failed; retrying")
                await asyncio.sleep(IDLE_POLL)

    def _active(self) -> dict[str, Lane]:
        """Lanes that may send now: not paused, not gated by an outage."""
        now, paused = self._monotonic(), self.pauses.current()
        return {name: lane for name, lane in self._lanes.items() if name not in paused and lane.gate_until <= now}

    async def _pump_once(self) -> None:
        active = self._active()
        quotas = {name: lane.queue.room() for name, lane in active.items()}
        receipts = {name: lane.queue.receipt_room() for name, lane in active.items()}
        if active and not any(q > 0 for q in (*quotas.values(), *receipts.values())):
            self._room.clear()
            await self._room.wait()
            return
        self._wake.clear()
        jobs = await self._claim(quotas, receipts)
        for job in jobs:
            if job.dropped is not None:  # a receipt the claim dropped (superseded or stale): count it
                self._counts[f"receipts_dropped_{job.dropped}"] += 1
                continue
            self._held.add(job.id)
            self._lanes[job.tenant].queue.put_nowait(job)
        if self.stopping:
            return  # stop() puts what was just claimed back
        if _filled(jobs, quotas):
            return  # a lane took all it could: more may be due, claim again once there is room
        due = await self._store.next_due(frozenset(active))
        now = self._clock()
        self._blocked = self._ordered and due is not None and due <= now
        timeout = BLOCKED_POLL if self._blocked else IDLE_POLL if due is None else min(IDLE_POLL, max(0.01, due - now))
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel
                    await self._wake.wait()
        finally:
            self._blocked = False

    async def _claim(self, quotas: dict[str, int], receipts: dict[str, int]) -> list[OutboxJob]:
        """Claim as a busy task: a stop must not cancel a claim the writer has already committed,
        or its rows would stay leased until the lease runs out."""
        current = asyncio.current_task()
        assert current is not None
        self.busy.add(current)
        max_age = min((lane.receipts.max_age for lane in self._lanes.values()), default=None)
        try:
            return await self._store.claim(
                self._clock(), quotas, self.lease, frozenset(self._held), receipts=receipts, receipt_max_age=max_age
            )
        finally:
            self.busy.discard(current)

    async def settle(self, result: Settlement) -> None:
        """Record an outcome; if the store refuses (disk full), keep it and retry, never resend.

        Dropping it would leave the row leased, and when the lease ran out it would be sent again.
        The row stays held, so it cannot be claimed meanwhile. While stopping, one try only:
        the lease brings the row back after a restart.

        A settled row frees its user's next row (and a re-queued one has a new due time): the pump
        is woken to claim after it (`claim_after`).
        """
        attempt = 0
        while True:
            try:
                await claim_after(self._store, self._store.settle(result, self._clock()), self.wake)
                break
            except StoreError as exc:
                if self.stopping:
                    raise
                delay = min(SETTLE_RETRY_CAP, 0.5 * 2**attempt)
                log.error("could not record the outcome of %s, retrying in %.1f s: %s", result.id, delay, exc)
                self._counts["settle_retries"] += 1
                await asyncio.sleep(delay)
                attempt += 1


def _filled(jobs: list[OutboxJob], quotas: dict[str, int]) -> bool:
    """True if some lane got as many replies (receipts aside) as it had room for."""
    taken = Counter(j.tenant for j in jobs if j.dropped is None and j.type not in RECEIPT_TYPES)
    return any(taken[name] == quota > 0 for name, quota in quotas.items())
