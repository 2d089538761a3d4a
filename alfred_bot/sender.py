"""Send workers: outbox → lease → pacing → Graph API → decision → outbox.

Each tenant (one business number) has its own lane: a bounded queue, a worker pool sized for
its rate, its sliding-window limiter and its pair limiter, so one number's backlog never
delays another's. A pump claims due rows per lane (a lease in the store: a crash returns them
by themselves), only the oldest pending row of each user (so one user's messages keep their
order even across retries), and never a row this process already holds. A worker checks the
user's pair budget (else the row is put back for later, without blocking other users), books
a slot in the number's window and sleeps once for it, then sends. Only `decide.py` reads
Graph answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping

import msgspec

from alfred_bot.config import Config, OutboundConfig
from alfred_bot.decide import TOKEN_CODES, Decision, Outcome, backoff
from alfred_bot.graph import Transport
from alfred_bot.logs import bound
from alfred_bot.metrics import Metrics
from alfred_bot.privacy import mask
from alfred_bot.ratelimit import PairLimiter, SlidingWindowLimiter
from alfred_bot.store import AuditEntry, OutboxJob, Settlement, Store, StoreError
from alfred_bot.tasks import stop_workers

log = logging.getLogger("alfred.sender")

#: Types that are not messages to a user (read receipts / typing): no pair budget, no wamid.
RECEIPT_TYPES = frozenset({"read"})
IDLE_POLL = 1.0
#: Consecutive transient failures of a number that mean "Meta is down": retries stop counting.
OUTAGE_AFTER = 5
OUTAGE_GATE_BASE = 0.05  # seconds the lane waits after the 5th failure in a row, doubling
OUTAGE_GATE_CAP = 2.0
PRUNE_EVERY = 60.0
SETTLE_RETRY_CAP = 30.0


class Pause(msgspec.Struct, frozen=True):
    """Why a tenant's sends are held: `token` lifts itself when a probe succeeds, `account` does not."""

    kind: str
    reason: str
    code: int | None
    since: float


class _Lane:
    """One business number's sending machinery."""

    def __init__(self, tenant: str, phone_number_id: str, out: OutboundConfig, monotonic: Callable[[], float]) -> None:
        self.tenant = tenant
        self.phone_number_id = phone_number_id
        self.limiter = SlidingWindowLimiter(out.rate_per_second, clock=monotonic)
        self.pairs = PairLimiter(burst=out.pair_burst, interval=out.pair_interval_seconds, clock=monotonic)
        self.workers = out.worker_count(1)
        self.queue: asyncio.Queue[OutboxJob] = asyncio.Queue(maxsize=self.workers * 2)
        self.transient_streak = 0
        self.gate_until = 0.0  # monotonic: during an outage the lane pauses briefly between tries

    @property
    def capacity(self) -> int:
        return self.queue.maxsize


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
        token_groups: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._audit: dict[str, AuditEntry] = {}  # per claimed row: its Graph call, until settled
        self._store = store
        # Tenants that send with the same access token: a token error pauses all of them.
        self._token_groups = dict(token_groups or {})
        self._transport = transport
        self._out = cfg.outbound
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not crypto)
        self._lanes = {name: _Lane(name, t.phone_number_id, self._out, monotonic) for name, t in cfg.tenants.items()}
        self.workers = sum(lane.workers for lane in self._lanes.values())
        self.lease = (
            cfg.graph.timeout_seconds * 2
            + max(lane.capacity / self._out.rate_per_second for lane in self._lanes.values())
            + 30
        )
        self.pauses: dict[str, Pause] = {}
        self.counts: Counter[str] = Counter()
        self.on_sent: Callable[[str], None] | None = None  # told the tenant of each accepted send
        self._held: set[str] = set()  # rows claimed by this process and not settled yet
        self._cut_off: list[OutboxJob] = []  # sends cancelled by a stop, maybe already on the wire
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for lane in self._lanes.values():
            self._tasks += [
                asyncio.create_task(self._worker(lane), name=f"alfred-sender-{lane.tenant}-{i}")
                for i in range(lane.workers)
            ]
        self._tasks.append(asyncio.create_task(self._pump(), name="alfred-pump"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="alfred-probe"))

    @property
    def running(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks) and not self._stopping

    @property
    def queued(self) -> int:
        return sum(lane.queue.qsize() for lane in self._lanes.values())

    def queue_depths(self) -> dict[str, int]:
        """Claimed sends waiting for a worker, per tenant."""
        return {name: lane.queue.qsize() for name, lane in self._lanes.items()}

    def wake(self) -> None:
        """New rows were queued: claim now rather than at the next poll."""
        self._wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Let in-flight sends finish (up to `grace` s); put claimed-but-unsent rows back."""
        self._stopping = True
        await stop_workers(self._tasks, self._busy, grace)
        self._tasks = []
        for lane in self._lanes.values():
            while not lane.queue.empty():
                job = lane.queue.get_nowait()
                await self._settle(Settlement(id=job.id, state="queued", attempts=job.attempts, refund=True))
        # Cancelled mid-send: Meta may have it, so the attempt counts, but the lease is released
        # so the next start retries at once instead of after the lease (~50 s); at-least-once either way.
        for job in self._cut_off:
            await self._settle(Settlement(id=job.id, state="queued", attempts=job.attempts))
        if self._cut_off:
            count = len(self._cut_off)
            log.warning("%d send(s) cut off by the shutdown are queued again (a duplicate is possible)", count)
        self._cut_off.clear()

    # ------------------------------------------------------------------ pump

    async def _pump(self) -> None:
        while not self._stopping:
            try:
                await self._pump_once()
            except Exception:  # the pump must outlive a store hiccup; leases keep rows safe
                log.exception("outbox pump failed; retrying")
                await asyncio.sleep(IDLE_POLL)

    async def _pump_once(self) -> None:
        now = self._monotonic()
        active = {
            name: lane for name, lane in self._lanes.items() if name not in self.pauses and lane.gate_until <= now
        }
        quotas = {name: lane.capacity - lane.queue.qsize() for name, lane in active.items()}
        if active and not any(q > 0 for q in quotas.values()):
            self._room.clear()
            await self._room.wait()
            return
        self._wake.clear()
        jobs = await self._claim(quotas)
        for job in jobs:
            self._held.add(job.id)
            self._lanes[job.tenant].queue.put_nowait(job)
        if self._stopping:
            return  # stop() puts what was just claimed back
        if any(sum(1 for j in jobs if j.tenant == name) == quota > 0 for name, quota in quotas.items()):
            return  # a lane took all it could: more may be due, claim again once there is room
        due = await self._store.next_due(frozenset(active))
        timeout = IDLE_POLL if due is None else min(IDLE_POLL, max(0.01, due - self._clock()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel
                await self._wake.wait()

    async def _claim(self, quotas: dict[str, int]) -> list[OutboxJob]:
        """Claim as a busy task: a stop must not cancel a claim the writer has already committed,
        or its rows would stay leased until the lease runs out."""
        current = asyncio.current_task()
        assert current is not None
        self._busy.add(current)
        try:
            return await self._store.claim(self._clock(), quotas, self.lease, frozenset(self._held))
        finally:
            self._busy.discard(current)

    # ------------------------------------------------------------------ workers

    async def _worker(self, lane: _Lane) -> None:
        current = asyncio.current_task()
        assert current is not None
        while not self._stopping:
            job = await lane.queue.get()
            self._room.set()
            self._busy.add(current)
            try:
                with bound(trace_id=job.trace_id, tenant=lane.tenant, message_id=job.id):
                    await self._send(lane, job)
            except asyncio.CancelledError:
                self._cut_off.append(job)  # stop() releases its lease
                raise
            except Exception:  # the row stays leased and comes back when the lease ends
                log.exception("send of outbox row %s failed unexpectedly", job.id)
            finally:
                self._busy.discard(current)
                self._held.discard(job.id)
                lane.queue.task_done()

    async def _send(self, lane: _Lane, job: OutboxJob) -> None:
        gated = lane.gate_until - self._monotonic()
        if gated > 0:  # the number's outage gate: wait instead of hammering a Graph API that is down
            await asyncio.sleep(gated)
        if lane.tenant in self.pauses:
            await self._put_back(job, IDLE_POLL)
            return
        receipt = job.type in RECEIPT_TYPES
        wait = 0.0 if receipt else lane.pairs.delay(job.recipient)
        if wait > 0:
            self.counts["deferred_pair"] += 1
            await self._put_back(job, wait)
            return
        slot = lane.limiter.reserve()
        self._metrics.ratelimit_wait.labels(lane.tenant).observe(max(0.0, slot))
        if slot > 0:
            self.counts["paced_waits"] += 1
            await asyncio.sleep(slot)
        if not receipt:
            lane.pairs.record(job.recipient)
        started = self._monotonic()

        def on_wire() -> None:
            lane.limiter.observe_lag(self._monotonic() - started)

        decision = await self._transport.send(lane.phone_number_id, job.payload, on_wire)
        self._record(lane, job, decision, self._monotonic() - started)
        await self._apply(lane, job, decision)

    def _record(self, lane: _Lane, job: OutboxJob, d: Decision, seconds: float) -> None:
        """Metrics, the status page's latency view and the audit entry of one Graph call."""
        self._metrics.send_done(lane.tenant, str(d.outcome), seconds, d.code)
        if d.outcome is Outcome.SENT and job.origin_at and job.type not in RECEIPT_TYPES:
            self._metrics.e2e_latency.labels(lane.tenant).observe(max(0.0, self._clock() - job.origin_at))
        self._audit[job.id] = AuditEntry(
            tenant=lane.tenant,
            type=job.type,
            recipient=mask(job.recipient),
            http_status=d.http_status,
            error_code=d.code,
            fbtrace_id=d.fbtrace_id,
            latency_ms=round(seconds * 1000, 2),
            outcome=str(d.outcome),
        )

    async def _put_back(self, job: OutboxJob, wait: float) -> None:
        """Not sent (paused, or the user's pair budget is spent): back to the queue, attempt refunded."""
        await self._settle(
            Settlement(id=job.id, state="queued", attempts=job.attempts, refund=True, due_at=self._clock() + wait)
        )

    # ------------------------------------------------------------------ decisions

    async def _apply(self, lane: _Lane, job: OutboxJob, d: Decision) -> None:
        self.counts[f"result_{d.outcome}"] += 1
        if d.code is not None:
            self.counts[f"error_{d.code}"] += 1
        if d.outcome is not Outcome.RETRY:
            lane.transient_streak = 0
        if d.outcome is Outcome.SENT:
            lane.pairs.on_success(job.recipient)
            if self.on_sent is not None:
                self.on_sent(lane.tenant)
            await self._settle(Settlement(id=job.id, state="sent", attempts=job.attempts, wamid=d.wamid))
            self.wake()  # the user's next row (the reply after its receipt) is claimable now
        elif d.outcome is Outcome.FAILED:
            log.warning("outbox %s failed permanently: code %s %s", job.id, d.code, d.message)
            failed = Settlement(id=job.id, state="failed", attempts=job.attempts, needs_template=d.needs_template)
            await self._settle(_with_error(failed, d))
        elif d.outcome is Outcome.PAIR_LIMIT:
            await self._pair_limited(lane, job, d)
        elif d.outcome in (Outcome.PAUSE_TENANT, Outcome.PAUSE_NUMBER):
            self._pause(lane.tenant, d)
            await self._retry_at(job, d, 0.0, refund=True)
        else:
            await self._retry(lane, job, d)

    async def _pair_limited(self, lane: _Lane, job: OutboxJob, d: Decision) -> None:
        if self._too_old(job):
            await self._give_up(job, d, "too old")
            return
        await self._retry_at(job, d, lane.pairs.on_pair_limit(job.recipient), refund=True)

    def _too_old(self, job: OutboxJob) -> bool:
        return self._clock() - job.created_at > self._out.max_age_seconds

    async def _retry(self, lane: _Lane, job: OutboxJob, d: Decision) -> None:
        if d.slow_down:
            lane.limiter.slow_down(self._out.slow_down_factor, self._out.slow_down_seconds)
        lane.transient_streak += 1
        outage = lane.transient_streak >= OUTAGE_AFTER and not d.limited
        limit = self._out.unknown_max_attempts if d.limited else self._out.max_attempts
        if self._too_old(job) or (job.attempts >= limit and not outage):
            await self._give_up(job, d, "too old" if self._too_old(job) else f"after {job.attempts} attempts")
            return
        wait = backoff(
            job.attempts - 1, base=self._out.backoff_base_seconds, cap=self._out.backoff_cap_seconds, rng=self._rng
        )
        # During an outage of the number (many transient failures in a row) an attempt is not
        # counted: otherwise a 10-minute Meta incident would dead-letter every message tried in it.
        # Since refunded rows stay due almost at once, the lane itself backs off instead.
        if outage:
            gate = min(OUTAGE_GATE_CAP, OUTAGE_GATE_BASE * 2 ** (lane.transient_streak - OUTAGE_AFTER))
            lane.gate_until = max(lane.gate_until, self._monotonic() + gate)
        await self._retry_at(job, d, max(wait, d.retry_after or 0.0), refund=outage)

    async def _give_up(self, job: OutboxJob, d: Decision, why: str) -> None:
        log.warning("outbox %s failed %s: code %s %s", job.id, why, d.code, d.message or d.raw)
        failed = _with_error(Settlement(id=job.id, state="failed", attempts=job.attempts), d)
        await self._settle(msgspec.structs.replace(failed, error_message=f"gave up {why}: {failed.error_message}"))

    async def _retry_at(self, job: OutboxJob, d: Decision, wait: float, *, refund: bool) -> None:
        queued = Settlement(
            id=job.id, state="queued", attempts=job.attempts, due_at=self._clock() + wait, refund=refund
        )
        await self._settle(_with_error(queued, d))

    async def _settle(self, result: Settlement) -> None:
        """Record an outcome; if the store refuses (disk full), keep it and retry, never resend.

        Dropping it would leave the row leased, and when the lease ran out it would be sent again.
        The row stays in `_held`, so it cannot be claimed meanwhile. While stopping, one try only:
        the lease brings the row back after a restart.
        """
        audit = self._audit.pop(result.id, None)
        if audit is not None:
            result = msgspec.structs.replace(result, audit=audit)
        attempt = 0
        while True:
            try:
                await self._store.settle(result, self._clock())
                break
            except StoreError as exc:
                if self._stopping:
                    raise
                delay = min(SETTLE_RETRY_CAP, 0.5 * 2**attempt)
                log.error("could not record the outcome of %s, retrying in %.1f s: %s", result.id, delay, exc)
                self.counts["settle_retries"] += 1
                await asyncio.sleep(delay)
                attempt += 1
        if result.state == "queued":
            self.wake()  # the pump re-reads the next due time instead of sleeping a full poll

    # ------------------------------------------------------------------ pauses

    def _pause(self, tenant: str, d: Decision) -> None:
        """Token errors pause every tenant using the same token; other pauses only this one."""
        token = d.code in TOKEN_CODES or (d.code is None and d.outcome is Outcome.PAUSE_TENANT)
        kind = "token" if d.outcome is Outcome.PAUSE_TENANT else "account"
        reason = f"Graph error {d.code}: {d.message}" if d.code is not None else (d.message or "unauthorised")
        group = self._token_groups.get(tenant, "")
        sharing = [name for name in self._lanes if self._token_groups.get(name, "") == group]
        for name in sharing if token else [tenant]:
            if name not in self.pauses:
                self.pauses[name] = Pause(kind, reason, d.code, self._clock())
                log.error("PAUSED all sends of tenant %s (%s); queued messages wait", name, reason)

    def resume(self, tenant: str) -> bool:
        """Lift a pause (operator action or a successful probe); False if it was not paused."""
        if self.pauses.pop(tenant, None) is None:
            return False
        log.warning("resumed sends of tenant %s", tenant)
        self.wake()
        return True

    async def _housekeeping(self) -> None:
        """Probe token-paused tenants; forget idle recipients' pair state (bounded memory)."""
        last_prune = self._monotonic()
        while True:
            await asyncio.sleep(self._out.probe_interval_seconds)
            for tenant, pause in list(self.pauses.items()):
                if pause.kind == "token" and await self._transport.probe(self._lanes[tenant].phone_number_id):
                    self.resume(tenant)
            if self._monotonic() - last_prune >= PRUNE_EVERY:
                for lane in self._lanes.values():
                    lane.pairs.prune()
                last_prune = self._monotonic()


def _with_error(s: Settlement, d: Decision) -> Settlement:
    return msgspec.structs.replace(
        s,
        error_code=d.code,
        error_message=d.message or (f"HTTP {d.http_status}: {d.raw}" if d.raw else None),
        error_details=d.details,
        error_fbtrace_id=d.fbtrace_id,
        error_http_status=d.http_status,
    )
