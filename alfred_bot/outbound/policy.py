"""The retry policy: what one Graph answer means for its outbox row and its lane. Pure.

`RetryPolicy.settle(job, decision, lane, now)` reads a `Decision` (classified by `decide.py`,
the one place that reads Graph answers), the lane's state before the answer and the wall clock,
and returns either a `Verdict` (how to settle the row, and what the lane must change) or a
`PauseOrder` (what to pause and why, plus the row's settlement). It does no I/O and keeps no
state; jitter comes from the injected rng, so a test with a seeded rng knows every wait.
"""

from __future__ import annotations

import random

import msgspec

from alfred_bot.config import OutboundConfig
from alfred_bot.outbound.decide import Decision, Outcome, Scope, backoff
from alfred_bot.outbound.ratelimit import PAIR_MAX_BACKOFF, pair_backoff
from alfred_bot.store import OutboxJob, Settlement

#: Consecutive transient failures of a number that mean "Meta is down": retries stop counting.
OUTAGE_AFTER = 5
OUTAGE_GATE_BASE = 0.05  # seconds the lane waits after the 5th failure in a row, doubling
OUTAGE_GATE_CAP = 2.0


class LaneState(msgspec.Struct, frozen=True, kw_only=True):
    """The lane as the policy needs it, before this answer."""

    streak: int = 0  # transient failures in a row on this number
    pair_strikes: int = 0  # 131056 answers in a row for this job's recipient


class SlowDown(msgspec.Struct, frozen=True):
    """Run the number at `factor × rate` for `seconds` (Meta said: throughput exceeded)."""

    factor: float
    seconds: float


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """How to settle the row, and what the lane must change."""

    row: Settlement
    streak: int = 0  # the lane's new transient-failure streak
    gate: float = 0.0  # seconds the lane holds all its sends (an outage of the number)
    slow_down: SlowDown | None = None
    block_recipient: float | None = None  # seconds to hold this recipient (131056)
    recipient_ok: bool = False  # a send to the recipient went through: forget its pair strikes
    why: str | None = None  # why the row failed, for the log


class PauseOrder(msgspec.Struct, frozen=True, kw_only=True):
    """Hold the sends of `scope` (every tenant using the token, the tenant, or the number)."""

    scope: Scope
    reason: str
    code: int | None
    row: Settlement  # the row itself goes back, unharmed: its attempt is refunded

    @property
    def kind(self) -> str:
        """`token` pauses are lifted by a successful probe; `account` ones need a person."""
        return "account" if self.scope == "number" else "token"


class RetryPolicy:
    """Backoff with jitter, Retry-After, attempt and age limits, the outage rule, pair-limit
    deferrals and slow-downs, from the `[outbound]` config."""

    def __init__(self, out: OutboundConfig, rng: random.Random, *, pair_cap: float = PAIR_MAX_BACKOFF) -> None:
        self._out = out
        self._rng = rng
        self._pair_cap = pair_cap

    def settle(self, job: OutboxJob, d: Decision, lane: LaneState, now: float) -> Verdict | PauseOrder:
        """The consequence of answer `d` to the claim `job`, at wall-clock time `now`."""
        if d.outcome is Outcome.SENT:
            sent = Settlement(id=job.id, state="sent", attempts=job.attempts, wamid=d.wamid)
            return Verdict(row=sent, recipient_ok=True)
        if d.outcome is Outcome.FAILED:
            failed = Settlement(id=job.id, state="failed", attempts=job.attempts, needs_template=d.needs_template)
            return Verdict(row=with_error(failed, d), why="permanently")
        if d.outcome is Outcome.PAIR_LIMIT:
            return self._pair_limited(job, d, lane, now)
        if d.outcome in (Outcome.PAUSE_TENANT, Outcome.PAUSE_NUMBER):
            return _pause(job, d, now)
        return self._retry(job, d, lane, now)

    def defer(self, job: OutboxJob, wait: float, now: float) -> Settlement:
        """Not sent (paused, or the recipient's budget is spent): back in `wait` s, attempt refunded."""
        return Settlement(id=job.id, state="queued", attempts=job.attempts, refund=True, due_at=now + wait)

    def too_old(self, job: OutboxJob, now: float) -> bool:
        return now - job.created_at > self._out.max_age_seconds

    def _pair_limited(self, job: OutboxJob, d: Decision, lane: LaneState, now: float) -> Verdict:
        """131056 holds only this recipient, for 4^X s; the attempt did not reach them, so it is refunded."""
        if self.too_old(job, now):
            return _give_up(job, d, "too old")
        block = pair_backoff(lane.pair_strikes, self._pair_cap)
        return Verdict(row=_retry_at(job, d, now + block, refund=True), block_recipient=block)

    def _retry(self, job: OutboxJob, d: Decision, lane: LaneState, now: float) -> Verdict:
        out = self._out
        slow = SlowDown(out.slow_down_factor, out.slow_down_seconds) if d.slow_down else None
        streak = lane.streak + 1
        # During an outage of the number (many transient failures in a row) an attempt is not
        # counted: otherwise a 10-minute Meta incident would dead-letter every message tried in it.
        outage = streak >= OUTAGE_AFTER and not d.limited
        limit = out.unknown_max_attempts if d.limited else out.max_attempts
        if self.too_old(job, now) or (job.attempts >= limit and not outage):
            why = "too old" if self.too_old(job, now) else f"after {job.attempts} attempts"
            return msgspec.structs.replace(_give_up(job, d, why), streak=streak, slow_down=slow)
        wait = backoff(job.attempts - 1, base=out.backoff_base_seconds, cap=out.backoff_cap_seconds, rng=self._rng)
        # Since refunded rows stay due almost at once, the lane itself backs off instead.
        gate = min(OUTAGE_GATE_CAP, OUTAGE_GATE_BASE * 2 ** (streak - OUTAGE_AFTER)) if outage else 0.0
        row = _retry_at(job, d, now + max(wait, d.retry_after or 0.0), refund=outage)
        return Verdict(row=row, streak=streak, gate=gate, slow_down=slow)


def _pause(job: OutboxJob, d: Decision, now: float) -> PauseOrder:
    """Every send of the scope would fail the same way: hold them all, keep the row queued."""
    scope: Scope = d.scope or ("number" if d.outcome is Outcome.PAUSE_NUMBER else "tenant")
    reason = f"Graph error {d.code}: {d.message}" if d.code is not None else (d.message or "unauthorised")
    return PauseOrder(scope=scope, reason=reason, code=d.code, row=_retry_at(job, d, now, refund=True))


def _give_up(job: OutboxJob, d: Decision, why: str) -> Verdict:
    failed = with_error(Settlement(id=job.id, state="failed", attempts=job.attempts), d)
    row = msgspec.structs.replace(failed, error_message=f"gave up {why}: {failed.error_message}")
    return Verdict(row=row, why=why)


def _retry_at(job: OutboxJob, d: Decision, due_at: float, *, refund: bool) -> Settlement:
    queued = Settlement(id=job.id, state="queued", attempts=job.attempts, due_at=due_at, refund=refund)
    return with_error(queued, d)


def with_error(s: Settlement, d: Decision) -> Settlement:
    """`s` carrying everything worth keeping of Meta's (or a proxy's) error answer."""
    return msgspec.structs.replace(
        s,
        error_code=d.code,
        error_message=d.message or (f"HTTP {d.http_status}: {d.raw}" if d.raw else None),
        error_details=d.details,
        error_fbtrace_id=d.fbtrace_id,
        error_http_status=d.http_status,
    )
