"""What the lanes need from pacing once it may be shared: `acquire()` instead of `reserve()`.

`Pacer.reserve()` and `PairBudget.delay()` / `record()` are synchronous: they suit a limiter in
this process, but a limiter shared by every node answers from Redis, one round trip away. These
protocols are the same surface with the booking steps async (`acquire`, `acquire_if_free`,
`take`) and everything else unchanged; `LocalPacer` and `LocalPairs` give the in-process
limiters this surface, so a lane is written once for both.
"""

from __future__ import annotations

from typing import Protocol

from alfred_bot.outbound.ratelimit import PairLimiter, SlidingWindowLimiter


class AsyncPacer(Protocol):
    """A number's rate, booked asynchronously (in this process or in Redis)."""

    async def acquire(self) -> float:
        """Book the earliest allowed start; the seconds still to wait for it."""

    async def acquire_if_free(self) -> bool:
        """Take a start only if one is free now (a best-effort send); True if taken."""

    def delay(self) -> float:
        """Seconds until a start is likely free (books nothing; how long a poller sleeps)."""

    def observe_lag(self, lag: float) -> None:
        """Report how long after its start a request reached the wire."""

    def slow_down(self, factor: float, duration: float) -> None:
        """Meta said "too fast": multiply the rate by `factor`, climbing back to full over `duration` s."""

    @property
    def slowed(self) -> bool:
        """True while a slow-down is in force."""


class AsyncPairBudget(Protocol):
    """Per-recipient pacing with an atomic check-and-spend."""

    async def take(self, recipient: str) -> float:
        """Spend one message to `recipient` if allowed now (0.0); else the seconds to wait."""

    def strikes(self, recipient: str) -> int:
        """Pair-limit errors in a row for `recipient` (the X of 4^X)."""

    def block(self, recipient: str, seconds: float) -> None:
        """Meta said 131056: hold `recipient` for `seconds` and count a strike."""

    def on_success(self, recipient: str) -> None:
        """A send went through: forget the strikes."""

    def prune(self) -> None:
        """Forget idle recipients (bounded memory)."""


class LocalPacer:
    """An in-process `SlidingWindowLimiter` as an `AsyncPacer` (nothing here ever waits)."""

    def __init__(self, limiter: SlidingWindowLimiter) -> None:
        self.limiter = limiter

    async def acquire(self) -> float:
        return self.limiter.reserve()

    async def acquire_if_free(self) -> bool:
        return self.limiter.try_acquire()

    def delay(self) -> float:
        return self.limiter.delay()

    def observe_lag(self, lag: float) -> None:
        self.limiter.observe_lag(lag)

    def slow_down(self, factor: float, duration: float) -> None:
        self.limiter.slow_down(factor, duration)

    @property
    def slowed(self) -> bool:
        return self.limiter.slowed


class LocalPairs:
    """An in-process `PairLimiter` as an `AsyncPairBudget`."""

    def __init__(self, pairs: PairLimiter) -> None:
        self.pairs = pairs

    async def take(self, recipient: str) -> float:
        wait = self.pairs.delay(recipient)
        if wait <= 0:
            self.pairs.record(recipient)
        return wait

    def strikes(self, recipient: str) -> int:
        return self.pairs.strikes(recipient)

    def block(self, recipient: str, seconds: float) -> None:
        self.pairs.block(recipient, seconds)

    def on_success(self, recipient: str) -> None:
        self.pairs.on_success(recipient)

    def prune(self) -> None:
        self.pairs.prune()
