"""Send workers: outbox → lease → pacing → Graph API → decision → outbox.

A pump claims due rows (a lease in the store, so a crash returns them by themselves) into a
bounded queue; workers take them in order. A row for a user whose previous message is still in
flight is parked behind it (one user's messages keep their order, and no worker waits idle). A
worker then checks the user's pair budget (else the row is put back for later, without blocking
other users) and waits for the number's sliding window. The decision decides the row's fate;
only `decide.py` reads Graph answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable

import msgspec

from alfred_bot.config import Config
from alfred_bot.decide import Decision, Outcome, backoff
from alfred_bot.graph import Transport
from alfred_bot.ratelimit import PairLimiter, SlidingWindowLimiter
from alfred_bot.store import OutboxJob, Settlement, Store

log = logging.getLogger("alfred.sender")

#: Types that are not messages to a user (read receipts / typing): no pair budget, no wamid.
RECEIPT_TYPES = frozenset({"read"})
IDLE_POLL = 1.0


class Pause(msgspec.Struct, frozen=True):
    """Why a tenant's sends are held: `token` lifts itself when a probe succeeds, `account` does not."""

    kind: str
    reason: str
    code: int | None
    since: float


class Sender:
    """Delivers the outbox of every tenant, paced per number."""

    def __init__(
        self,
        store: Store,
        transport: Transport,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._transport = transport
        self._out = cfg.outbound
        self._pnid = {name: t.phone_number_id for name, t in cfg.tenants.items()}
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not crypto)
        self._limiters = {name: SlidingWindowLimiter(self._out.rate_per_second, clock=monotonic) for name in self._pnid}
        self._pairs = {
            name: PairLimiter(burst=self._out.pair_burst, interval=self._out.pair_interval_seconds, clock=monotonic)
            for name in self._pnid
        }
        self.workers = self._out.worker_count(len(self._pnid))
        self.queue: asyncio.Queue[OutboxJob] = asyncio.Queue(maxsize=self.workers * 2)
        self.lease = cfg.graph.timeout_seconds * 2 + self.queue.maxsize / self._out.rate_per_second + 30
        self.pauses: dict[str, Pause] = {}
        self.counts: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._active: dict[tuple[str, str], deque[OutboxJob]] = {}  # user -> jobs parked behind the one in flight
        self._orphans: list[OutboxJob] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"alfred-sender-{i}") for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._pump(), name="alfred-pump"))
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="alfred-probe"))

    @property
    def running(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks) and not self._stopping

    def wake(self) -> None:
        """New rows were queued: claim now rather than at the next poll."""
        self._wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Let in-flight sends finish (up to `grace` s); put claimed-but-unsent rows back."""
        self._stopping = True
        idle = [t for t in self._tasks if t not in self._busy]
        for task in idle:
            task.cancel()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks = []
        leftovers = [*self._orphans, *(job for parked in self._active.values() for job in parked)]
        while not self.queue.empty():
            leftovers.append(self.queue.get_nowait())
        for job in leftovers:
            await self._settle(Settlement(id=job.id, state="queued", refund=True))
        self._orphans.clear()

    # ------------------------------------------------------------------ pump

    async def _pump(self) -> None:
        while True:
            try:
                await self._pump_once()
            except Exception:  # the pump must outlive a store hiccup; leases keep rows safe
                log.exception("outbox pump failed; retrying")
                await asyncio.sleep(IDLE_POLL)

    async def _pump_once(self) -> None:
        free = self.queue.maxsize - self.queue.qsize()
        if free <= 0:
            self._room.clear()
            await self._room.wait()
            return
        skip = frozenset(self.pauses)
        jobs = await self._store.claim(self._clock(), free, self.lease, skip)
        for job in jobs:
            self.queue.put_nowait(job)
        if len(jobs) == free:
            return  # more may be due: claim again as soon as there is room
        self._wake.clear()
        due = await self._store.next_due(skip)
        timeout = IDLE_POLL if due is None else min(IDLE_POLL, max(0.01, due - self._clock()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel
                await self._wake.wait()

    # ------------------------------------------------------------------ workers

    async def _worker(self) -> None:
        current = asyncio.current_task()
        assert current is not None
        while not self._stopping:
            job = await self.queue.get()
            self._room.set()
            self._busy.add(current)
            try:
                await self._process(job)
            finally:
                self._busy.discard(current)
                self.queue.task_done()

    async def _process(self, job: OutboxJob) -> None:
        """Send `job`, or park it behind the send already under way to the same user.

        Parking instead of waiting on a lock keeps one user's messages in order without
        tying up a worker per waiting message (which would stall every other user).
        """
        key = (job.tenant, job.recipient)
        if key in self._active:
            self._active[key].append(job)
            return
        parked: deque[OutboxJob] = deque()
        self._active[key] = parked
        try:
            while True:
                try:
                    await self._send(job)
                except Exception:  # the row stays leased and comes back when the lease ends
                    log.exception("send of outbox row %s failed unexpectedly", job.id)
                if not parked:
                    break
                job = parked.popleft()
        finally:
            self._orphans.extend(self._active.pop(key))  # non-empty only when cancelled mid-chain

    async def _send(self, job: OutboxJob) -> None:
        if job.tenant in self.pauses or job.tenant not in self._pnid:
            await self._settle(Settlement(id=job.id, state="queued", refund=True, due_at=self._clock() + IDLE_POLL))
            return
        pairs = self._pairs[job.tenant]
        receipt = job.type in RECEIPT_TYPES
        wait = 0.0 if receipt else pairs.delay(job.recipient)
        if wait > 0:
            await self._settle(Settlement(id=job.id, state="queued", refund=True, due_at=self._clock() + wait))
            self.counts["deferred_pair"] += 1
            return
        limiter = self._limiters[job.tenant]
        await self._pace(limiter)
        if not receipt:
            pairs.record(job.recipient)
        started = self._monotonic()

        def on_wire() -> None:
            limiter.observe_lag(self._monotonic() - started)

        decision = await self._transport.send(self._pnid[job.tenant], job.payload, on_wire)
        await self._apply(job, decision)

    async def _pace(self, limiter: SlidingWindowLimiter) -> None:
        while (wait := limiter.delay()) > 0:
            self.counts["paced_waits"] += 1
            await asyncio.sleep(wait)
        limiter.record()

    # ------------------------------------------------------------------ decisions

    async def _apply(self, job: OutboxJob, d: Decision) -> None:
        self.counts[f"result_{d.outcome}"] += 1
        if d.code is not None:
            self.counts[f"error_{d.code}"] += 1
        if d.outcome is Outcome.SENT:
            self._pairs[job.tenant].on_success(job.recipient)
            await self._settle(Settlement(id=job.id, state="sent", wamid=d.wamid))
        elif d.outcome is Outcome.FAILED:
            log.warning("outbox %s failed permanently: code %s %s", job.id, d.code, d.message)
            await self._settle(_with_error(Settlement(id=job.id, state="failed", needs_template=d.needs_template), d))
        elif d.outcome is Outcome.PAIR_LIMIT:
            wait = self._pairs[job.tenant].on_pair_limit(job.recipient)
            await self._retry_at(job, d, wait, refund=True)
        elif d.outcome in (Outcome.PAUSE_TENANT, Outcome.PAUSE_NUMBER):
            self._pause(job.tenant, d)
            await self._retry_at(job, d, 0.0, refund=True)
        else:
            await self._retry(job, d)

    async def _retry(self, job: OutboxJob, d: Decision) -> None:
        if d.slow_down:
            self._limiters[job.tenant].slow_down(self._out.slow_down_factor, self._out.slow_down_seconds)
        limit = self._out.unknown_max_attempts if d.limited else self._out.max_attempts
        too_old = self._clock() - job.created_at > self._out.max_age_seconds
        if job.attempts >= limit or too_old:
            why = "too old" if too_old else f"after {job.attempts} attempts"
            log.warning("outbox %s failed %s: code %s %s", job.id, why, d.code, d.message or d.raw)
            failed = _with_error(Settlement(id=job.id, state="failed"), d)
            await self._settle(msgspec.structs.replace(failed, error_message=f"gave up {why}: {failed.error_message}"))
            return
        wait = backoff(
            job.attempts - 1, base=self._out.backoff_base_seconds, cap=self._out.backoff_cap_seconds, rng=self._rng
        )
        await self._retry_at(job, d, max(wait, d.retry_after or 0.0), refund=False)

    async def _retry_at(self, job: OutboxJob, d: Decision, wait: float, *, refund: bool) -> None:
        queued = Settlement(id=job.id, state="queued", due_at=self._clock() + wait, refund=refund)
        await self._settle(_with_error(queued, d))

    async def _settle(self, result: Settlement) -> None:
        await self._store.settle(result, self._clock())
        if result.state == "queued":
            self.wake()  # the pump re-reads the next due time instead of sleeping a full poll

    # ------------------------------------------------------------------ pauses

    def _pause(self, tenant: str, d: Decision) -> None:
        if tenant in self.pauses:
            return
        kind = "token" if d.outcome is Outcome.PAUSE_TENANT else "account"
        reason = f"Graph error {d.code}: {d.message}" if d.code is not None else (d.message or "unauthorised")
        self.pauses[tenant] = Pause(kind, reason, d.code, self._clock())
        log.error("PAUSED all sends of tenant %s (%s); queued messages wait", tenant, reason)

    def resume(self, tenant: str) -> bool:
        """Lift a pause (operator action or a successful probe); False if it was not paused."""
        if self.pauses.pop(tenant, None) is None:
            return False
        log.warning("resumed sends of tenant %s", tenant)
        self.wake()
        return True

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._out.probe_interval_seconds)
            for tenant, pause in list(self.pauses.items()):
                if pause.kind == "token" and await self._transport.probe(self._pnid[tenant]):
                    self.resume(tenant)


def _with_error(s: Settlement, d: Decision) -> Settlement:
    return msgspec.structs.replace(
        s,
        error_code=d.code,
        error_message=d.message or (f"HTTP {d.http_status}: {d.raw}" if d.raw else None),
        error_details=d.details,
        error_fbtrace_id=d.fbtrace_id,
        error_http_status=d.http_status,
    )
