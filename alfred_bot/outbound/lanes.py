"""Per-number lanes: one business number's queue, workers, limiter, pair budget and outage gate.

Each tenant (one business number) has its own lane, so one number's backlog never delays
another's. A worker takes a claimed job from its lane, checks the user's pair budget (else the
row goes back for later, without blocking other users), books a slot in the number's window and
sleeps once for it, sends, and settles the row as the retry policy says. Only `decide.py` reads
Graph answers; only `policy.py` decides what they mean for the row.

Read receipts (with their typing indicator) are best-effort (`LaneQueue`, `_send_receipt`): their
own line in the lane, a spare slot of the rate only, dropped when stale, one quick retry, never
dead-lettered, so a reply never waits behind a receipt.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

import msgspec

from alfred_bot.config import OutboundConfig
from alfred_bot.graph import Transport
from alfred_bot.logs import bound
from alfred_bot.outbound.decide import Decision, Outcome
from alfred_bot.outbound.pauses import PauseBoard
from alfred_bot.outbound.policy import LaneState, PauseOrder, RetryPolicy, Verdict, with_error
from alfred_bot.outbound.ratelimit import PairLimiter, SlidingWindowLimiter
from alfred_bot.outbound.redis.base import AsyncPacer, AsyncPairBudget, LocalPacer, LocalPairs
from alfred_bot.privacy import mask
from alfred_bot.store import AuditEntry, OutboxJob, Settlement
from alfred_bot.telemetry import Telemetry

log = logging.getLogger("alfred.sender")

#: Types that are not messages to a user (read receipts / typing): no pair budget, no wamid.
RECEIPT_TYPES = frozenset({"read"})
PAUSED_RECHECK = 1.0  # seconds until a row put back by a pause is due again
REPLIED_KEEP = 1024  # recipients remembered before the oldest replies are forgotten
SPARE_POLL = 0.005  # a receipt waiting for a spare slot looks again at least this often (seconds)
RECEIPT_RETRY = 0.25  # a receipt that failed transiently is tried once more after this (seconds)


class LaneQueue:
    """A lane's claimed jobs: replies (and API sends) in one line, read receipts in another.

    Receipts are best-effort (see `LaneWorkers._send_receipt`): at most `receipt_slots` of them wait
    here and at most as many hold a worker at once, so receipts never take the room or the workers
    replies need. A free worker takes a receipt first (with a spare slot, the user sees "typing…"
    and the blue ticks before the reply); the receipt then yields its slot to any reply no free
    worker is about to take. The interface is `asyncio.Queue`'s, plus `done(job)` and the two rooms
    the pump fills.
    """

    def __init__(self, maxsize: int, receipt_slots: int) -> None:
        self.maxsize = maxsize
        self.receipt_slots = receipt_slots
        self._replies: deque[OutboxJob] = deque()
        self._receipts: deque[OutboxJob] = deque()
        self.receipts_busy = 0  # receipts a worker holds
        self.idle = 0  # workers waiting for a job
        #: One future per waiting worker, first come first woken. Why not one Event: its set()
        #: wakes every idle worker (hundreds at the top tier) to hand out one job.
        self._waiters: deque[asyncio.Future[None]] = deque()

    def qsize(self) -> int:
        return len(self._replies) + len(self._receipts)

    def empty(self) -> bool:
        return not self._replies and not self._receipts

    @property
    def replies_waiting(self) -> int:
        """Claimed non-receipt jobs no worker has taken yet."""
        return len(self._replies)

    def room(self) -> int:
        """How many more replies the pump may claim."""
        return self.maxsize - len(self._replies)

    def receipt_room(self) -> int:
        """How many more receipts the pump may claim."""
        return self.receipt_slots - len(self._receipts)

    def put_nowait(self, job: OutboxJob) -> None:
        (self._receipts if job.type in RECEIPT_TYPES else self._replies).append(job)
        self._wake()

    def get_nowait(self) -> OutboxJob:
        """Any job, replies first (a stop puts them all back)."""
        if self._replies:
            return self._replies.popleft()
        if self._receipts:
            return self._receipts.popleft()
        raise asyncio.QueueEmpty

    @property
    def replies_stuck(self) -> bool:
        """Replies wait that no idle worker is about to take: a receipt must leave the slot to them."""
        return len(self._replies) > self.idle

    def _next(self) -> OutboxJob | None:
        if self._receipts and self.receipts_busy < self.receipt_slots and not self.replies_stuck:
            self.receipts_busy += 1
            return self._receipts.popleft()
        if self._replies:
            return self._replies.popleft()
        return None

    def put_back(self, receipt: OutboxJob) -> None:
        """A receipt yields to stuck replies: first in its line again, still held by this process."""
        self._receipts.appendleft(receipt)
        self._wake()

    def holds(self, job: OutboxJob) -> bool:
        """True if `job` is back in this queue (put back, not finished)."""
        return job in self._receipts

    def _wake(self) -> None:
        """Wake one waiting worker (a job arrived, or a receipt slot came free)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def get(self) -> OutboxJob:
        while (job := self._next()) is None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.idle += 1
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, but stopping: the wake-up goes to the next worker
                raise
            finally:
                self.idle -= 1  # a cancelled waiter stays in line, done: `_wake` skips it
        if self._waiters and (self._replies or self._receipts):
            self._wake()  # more left that this worker did not take: maybe another can
        return job

    def done(self, job: OutboxJob) -> None:
        """A worker finished `job`: a receipt frees its slot for the next one."""
        if job.type in RECEIPT_TYPES:
            self.receipts_busy -= 1
            self._wake()

    def task_done(self) -> None:
        """`asyncio.Queue` compatibility (nothing joins a lane)."""


class ReceiptRules(msgspec.Struct, frozen=True):
    """How a lane treats read receipts (`outbound.receipt_max_age_seconds`, `receipts_use_budget`)."""

    max_age: float = 5.0
    use_budget: bool = True


def receipt_slots(workers: int) -> int:
    """Workers receipts may hold at once: a quarter, at least two (enough for the spare budget at
    Graph latency; the rest always serve replies)."""
    return max(2, workers // 4)


class Lane:
    """One business number's sending machinery."""

    def __init__(
        self,
        tenant: str,
        phone_number_id: str,
        workers: int,
        limiter: AsyncPacer,
        pairs: AsyncPairBudget,
        *,
        receipts: ReceiptRules | None = None,
    ) -> None:
        self.tenant = tenant
        self.phone_number_id = phone_number_id
        self.limiter = limiter
        self.pairs = pairs
        self.workers = workers
        self.receipts = receipts or ReceiptRules()
        self.queue = LaneQueue(workers * 2, receipt_slots(workers))
        self._replied: dict[str, float] = {}  # recipient -> wall time of the latest reply sent
        self._replied_kept = REPLIED_KEEP
        self.streak = 0  # transient failures in a row
        self.gate_until = 0.0  # monotonic: during an outage the lane pauses briefly between tries

    @classmethod
    def local(cls, tenant: str, phone_number_id: str, out: OutboundConfig, monotonic: Callable[[], float]) -> Lane:
        """A lane paced by this process alone."""
        limiter = LocalPacer(SlidingWindowLimiter(out.rate_per_second, clock=monotonic))
        pairs = LocalPairs(PairLimiter(burst=out.pair_burst, interval=out.pair_interval_seconds, clock=monotonic))
        rules = ReceiptRules(max_age=out.receipt_max_age_seconds, use_budget=out.receipts_use_budget)
        return cls(tenant, phone_number_id, out.worker_count(1), limiter, pairs, receipts=rules)

    @property
    def shared(self) -> bool:
        """True when the lane books its starts in Redis (every node shares its rate)."""
        return not isinstance(self.limiter, LocalPacer)

    @property
    def mode(self) -> str:
        """ "local" (this process alone), "shared" (Redis) or "fallback" (Redis away: this node's share)."""
        return str(getattr(self.limiter, "mode", "local"))

    @property
    def capacity(self) -> int:
        return self.queue.maxsize

    def note_reply(self, recipient: str, now: float) -> None:
        """A message to `recipient` starts now (forgotten after `receipts.max_age`: bounded memory)."""
        self._replied[recipient] = now
        if len(self._replied) > self._replied_kept:
            cutoff = now - self.receipts.max_age
            self._replied = {r: t for r, t in self._replied.items() if t >= cutoff}
            self._replied_kept = max(REPLIED_KEEP, 2 * len(self._replied))

    def answered(self, receipt: OutboxJob) -> bool:
        """True if a message went to the receipt's user after the receipt was queued."""
        return self._replied.get(receipt.recipient, -1.0) >= receipt.created_at

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
        telemetry: Telemetry,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        on_pause: Callable[[str, PauseOrder], None],
    ) -> None:
        self._feed = feed
        self._transport = transport
        self._policy = policy
        self.pauses = pauses  # the sender swaps in the shared board before starting (Redis)
        self._telemetry = telemetry
        self._metrics = telemetry.metrics
        self._counts = telemetry.sender
        self._clock = clock
        self._monotonic = monotonic
        self._on_pause = on_pause
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
                if not lane.queue.holds(job):
                    self._feed.release(job.id)
                lane.queue.done(job)

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
        if lane.tenant in self.pauses.current():
            await self.settle(self._policy.defer(job, PAUSED_RECHECK, self._clock()))
            return
        if job.type in RECEIPT_TYPES:
            await self._send_receipt(lane, job)
            return
        wait = await lane.pairs.take(job.recipient)  # checks and spends the recipient's budget at once
        if wait > 0:
            self._counts["deferred_pair"] += 1
            await self.settle(self._policy.defer(job, wait, self._clock()))
            return
        asked = self._monotonic()
        slot = await lane.limiter.acquire()  # a shared limiter may sleep first when its slot is far out
        due = self._monotonic() + slot
        self._metrics.ratelimit_wait.labels(lane.tenant).observe(max(0.0, due - asked))
        if slot > 0:
            self._counts["paced_waits"] += 1
            await asyncio.sleep(slot)
        lane.note_reply(job.recipient, self._clock())
        decision = await self._call(lane, job, due)
        await self._apply(lane, job, decision)

    async def _call(self, lane: Lane, job: OutboxJob, due: float | None = None) -> Decision:
        """One Graph API call, its decide-to-wire lag reported to the limiter, recorded.

        The lag counts from the start the limiter booked (`due`; from the call when none is given):
        an oversleep is lag too. A stalled loop wakes several paced senders late and together, and
        the receiver sees their starts bunched (12 in one second at 10/s, seen on a loaded CI
        machine); counted as lag, the stall stretches the window and the next starts wait."""
        started = self._monotonic()
        since = started if due is None else due

        def on_wire() -> None:
            lane.limiter.observe_lag(self._monotonic() - since)

        decision = await self._transport.send(lane.phone_number_id, job.payload, on_wire)
        self._record(lane, job, decision, self._monotonic() - started)
        return decision

    # ------------------------------------------------------------------ read receipts

    async def _send_receipt(self, lane: Lane, job: OutboxJob) -> None:
        """Best-effort: in a spare slot only, dropped when stale, one quick retry, never dead-lettered.

        A read receipt (with its typing indicator) is worth something for a few seconds; a reply is
        what the user waits for. So a receipt takes a slot of the number's rate only when no reply
        is waiting for one (`_spare_slot`), and a receipt that cannot be sent in time is dropped
        and counted (`receipts_dropped_<reason>`), never failed: no operator has to handle it.
        """
        for attempt in range(2):
            slot = await self._spare_slot(lane, job)
            if slot is None:
                lane.queue.put_back(job)  # replies wait for workers: serve them, this receipt later
                return
            if not slot:
                await self._drop(job, "stale")
                return
            if lane.answered(job):
                job = without_typing(job)  # "typing…" after the answer would promise a message that never comes
            decision = await self._call(lane, job)
            if decision.outcome is Outcome.SENT:
                self._counts["receipts_sent"] += 1
                await self._apply(lane, job, decision)
                return
            if not await self._receipt_failed(lane, job, decision, last=attempt > 0):
                return
            await asyncio.sleep(RECEIPT_RETRY)

    async def _receipt_failed(self, lane: Lane, job: OutboxJob, d: Decision, *, last: bool) -> bool:
        """The lane learns from the answer as from any other (a 130429 slows the number all the
        same); the receipt goes back on a pause, is dropped on a permanent error or a second
        failure. True if it should be tried once more."""
        self._counts[f"result_{d.outcome}"] += 1
        if d.code is not None:
            self._counts[f"error_{d.code}"] += 1
        verdict = self._policy.settle(job, d, lane.state(job.recipient), self._clock())
        lane.apply(job.recipient, verdict, self._monotonic())
        if isinstance(verdict, PauseOrder):  # back, unharmed: sent after a short pause, else stale
            self._on_pause(lane.tenant, verdict)
            await self.settle(verdict.row)
            return False
        if last or d.outcome is not Outcome.RETRY:
            await self._drop(job, "failed", d)
            return False
        return True

    async def _spare_slot(self, lane: Lane, job: OutboxJob) -> bool | None:
        """Wait for a slot no reply wants (any moment, if receipts are outside the budget): True
        when taken, False once the receipt is older than `receipt_max_age_seconds`, None if replies
        are waiting with no worker free for them (the receipt must give its worker up)."""
        while True:
            if self._clock() - job.created_at > lane.receipts.max_age:
                return False
            if lane.queue.replies_stuck:
                return None
            if not lane.receipts.use_budget or await lane.limiter.acquire_if_free():
                return True
            wait = lane.limiter.delay()
            await asyncio.sleep(min(max(SPARE_POLL, wait), SPARE_POLL * 10))

    async def _drop(self, job: OutboxJob, reason: str, d: Decision | None = None) -> None:
        self._counts[f"receipts_dropped_{reason}"] += 1
        if d is not None:  # the answer is already redacted (GraphTransport): safe to say why
            log.info("read receipt %s dropped (%s): %s", job.id, reason, d.message or d.outcome)
        row = Settlement(id=job.id, state="dropped", attempts=job.attempts, error_message=f"dropped: {reason}")
        await self.settle(with_error(row, d) if d is not None else row)

    def _record(self, lane: Lane, job: OutboxJob, d: Decision, seconds: float) -> None:
        """Metrics, the status page's latency view and the audit entry of one Graph call."""
        self._telemetry.send_done(lane.tenant, str(d.outcome), seconds, d.code)
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
        elif verdict.row.state == "sent":
            self._telemetry.sent(lane.tenant)
        await self.settle(verdict.row)  # a sent row wakes the pump: the user's next row is claimable


def without_typing(receipt: OutboxJob) -> OutboxJob:
    """The receipt marking the message read, without its typing indicator."""
    try:
        body = msgspec.json.decode(receipt.payload)
    except msgspec.DecodeError:
        return receipt
    if not isinstance(body, dict) or body.pop("typing_indicator", None) is None:
        return receipt
    return msgspec.structs.replace(receipt, payload=msgspec.json.encode(body))
