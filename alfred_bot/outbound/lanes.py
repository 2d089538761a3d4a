"""Per-number lanes: one business number's queue, workers, limiter, pair budget and outage gate.

Each tenant (one business number) has its own lane, so one number's backlog never delays
another's. A worker takes a claimed job from its lane, checks the user's pair budget (else the
row goes back for later, without blocking other users), books a slot in the number's window and
sleeps once for it, sends, and settles the row as the retry policy says. Only `decide.py` reads
Graph answers; only `policy.py` decides what they mean for the row.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import msgspec

from alfred_bot.config import OutboundConfig
from alfred_bot.graph import Transport
from alfred_bot.logs import bound
from alfred_bot.metrics import Metrics
from alfred_bot.outbound.decide import Decision, Outcome
from alfred_bot.outbound.pauses import PauseBoard
from alfred_bot.outbound.policy import LaneState, PauseOrder, RetryPolicy, Verdict
from alfred_bot.outbound.ratelimit import Pacer, PairBudget, PairLimiter, SlidingWindowLimiter
from alfred_bot.privacy import mask
from alfred_bot.store import AuditEntry, OutboxJob, Settlement

log = logging.getLogger("alfred.sender")

#: Types that are not messages to a user (read receipts / typing): no pair budget, no wamid.
RECEIPT_TYPES = frozenset({"read"})
PAUSED_RECHECK = 1.0  # seconds until a row put back by a pause is due again


class Lane:
    """One business number's sending machinery."""

    def __init__(self, tenant: str, phone_number_id: str, workers: int, limiter: Pacer, pairs: PairBudget) -> None:
        self.tenant = tenant
        self.phone_number_id = phone_number_id
        self.limiter = limiter
        self.pairs = pairs
        self.workers = workers
        self.queue: asyncio.Queue[OutboxJob] = asyncio.Queue(maxsize=workers * 2)
        self.streak = 0  # transient failures in a row
        self.gate_until = 0.0  # monotonic: during an outage the lane pauses briefly between tries

    @classmethod
    def local(cls, tenant: str, phone_number_id: str, out: OutboundConfig, monotonic: Callable[[], float]) -> Lane:
        """A lane paced by this process alone."""
        limiter = SlidingWindowLimiter(out.rate_per_second, clock=monotonic)
        pairs = PairLimiter(burst=out.pair_burst, interval=out.pair_interval_seconds, clock=monotonic)
        return cls(tenant, phone_number_id, out.worker_count(1), limiter, pairs)

    @property
    def capacity(self) -> int:
        return self.queue.maxsize

    def state(self, recipient: str) -> LaneState:
        return LaneState(streak=self.streak, pair_strikes=self.pairs.strikes(recipient))

    def apply(self, recipient: str, verdict: Verdict | PauseOrder, now: float) -> None:
        """Carry out what the policy asked of this lane (`now` is monotonic)."""
        if isinstance(verdict, PauseOrder):
            self.streak = 0
            return
        self.streak = verdict.streak
        if verdict.slow_down is not None:
            self.limiter.slow_down(verdict.slow_down.factor, verdict.slow_down.seconds)
        if verdict.gate > 0:
            self.gate_until = max(self.gate_until, now + verdict.gate)
        if verdict.block_recipient is not None:
            self.pairs.block(recipient, verdict.block_recipient)
        if verdict.recipient_ok:
            self.pairs.on_success(recipient)


class Feed(Protocol):
    """The pump, as the workers see it."""

    busy: set[asyncio.Task[None]]
    stopping: bool

    def wake(self) -> None: ...

    def room(self) -> None: ...

    def release(self, job_id: str) -> None: ...

    async def settle(self, result: Settlement) -> None: ...


class LaneWorkers:
    """The workers of every lane: pace a claimed job, send it, settle it as the policy says."""

    def __init__(
        self,
        feed: Feed,
        transport: Transport,
        policy: RetryPolicy,
        pauses: PauseBoard,
        *,
        metrics: Metrics,
        counts: Counter[str],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        on_pause: Callable[[str, PauseOrder], None],
    ) -> None:
        self._feed = feed
        self._transport = transport
        self._policy = policy
        self._pauses = pauses
        self._metrics = metrics
        self._counts = counts
        self._clock = clock
        self._monotonic = monotonic
        self._on_pause = on_pause
        self.on_sent: Callable[[str], None] | None = None  # told the tenant of each accepted send
        self._audit: dict[str, AuditEntry] = {}  # per claimed row: its Graph call, until settled
        self.cut_off: list[OutboxJob] = []  # sends cancelled by a stop, maybe already on the wire

    async def run(self, lane: Lane) -> None:
        current = asyncio.current_task()
        assert current is not None
        while not self._feed.stopping:
            job = await lane.queue.get()
            self._feed.room()
            self._feed.busy.add(current)
            try:
                with bound(trace_id=job.trace_id, tenant=lane.tenant, message_id=job.id):
                    await self._send(lane, job)
            except asyncio.CancelledError:
                self.cut_off.append(job)  # stop() releases its lease
                raise
            except Exception:  # the row stays leased and comes back when the lease ends
                log.exception("send of outbox row %s failed unexpectedly", job.id)
            finally:
                self._feed.busy.discard(current)
                self._feed.release(job.id)
                lane.queue.task_done()

    async def settle(self, result: Settlement) -> None:
        """Record an outcome with the audit entry of its Graph call, if there was one."""
        audit = self._audit.pop(result.id, None)
        if audit is not None:
            result = msgspec.structs.replace(result, audit=audit)
        await self._feed.settle(result)

    async def _send(self, lane: Lane, job: OutboxJob) -> None:
        gated = lane.gate_until - self._monotonic()
        if gated > 0:  # the number's outage gate: wait instead of hammering a Graph API that is down
            await asyncio.sleep(gated)
        if lane.tenant in self._pauses.current():
            await self.settle(self._policy.defer(job, PAUSED_RECHECK, self._clock()))
            return
        receipt = job.type in RECEIPT_TYPES
        wait = 0.0 if receipt else lane.pairs.delay(job.recipient)
        if wait > 0:
            self._counts["deferred_pair"] += 1
            await self.settle(self._policy.defer(job, wait, self._clock()))
            return
        slot = lane.limiter.reserve()
        self._metrics.ratelimit_wait.labels(lane.tenant).observe(max(0.0, slot))
        if slot > 0:
            self._counts["paced_waits"] += 1
            await asyncio.sleep(slot)
        if not receipt:
            lane.pairs.record(job.recipient)
        started = self._monotonic()

        def on_wire() -> None:
            lane.limiter.observe_lag(self._monotonic() - started)

        decision = await self._transport.send(lane.phone_number_id, job.payload, on_wire)
        self._record(lane, job, decision, self._monotonic() - started)
        await self._apply(lane, job, decision)

    def _record(self, lane: Lane, job: OutboxJob, d: Decision, seconds: float) -> None:
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

    async def _apply(self, lane: Lane, job: OutboxJob, d: Decision) -> None:
        self._counts[f"result_{d.outcome}"] += 1
        if d.code is not None:
            self._counts[f"error_{d.code}"] += 1
        verdict = self._policy.settle(job, d, lane.state(job.recipient), self._clock())
        lane.apply(job.recipient, verdict, self._monotonic())
        if isinstance(verdict, PauseOrder):
            self._on_pause(lane.tenant, verdict)
        elif verdict.row.state == "failed":
            log.warning("outbox %s failed %s: code %s %s", job.id, verdict.why, d.code, d.message or d.raw)
        elif verdict.row.state == "sent" and self.on_sent is not None:
            self.on_sent(lane.tenant)
        await self.settle(verdict.row)
        if verdict.row.state == "sent":
            self._feed.wake()  # the user's next row (the reply after its receipt) is claimable now
