"""Outbound pacing: a sliding-window limiter per phone number and a pair limiter per recipient.

Both are pure and clock-injected (`clock()` returns monotonic seconds), so tests drive them with
a fake clock and never sleep. The sender asks `delay()` and sleeps itself.

Why a sliding window and not a plain token bucket: Meta counts messages per second as seen by
its servers. A bucket that starts full allows `2 × rate` starts in the second that straddles a
refill; a window of the last `capacity` start times allows at most `capacity` starts in ANY
window of `1 + margin` seconds, which is the promise we make.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]

#: Extra window length that absorbs jitter between our start time and Meta's arrival time.
DEFAULT_MARGIN = 0.01


class SlidingWindowLimiter:
    """At most `floor(rate)` starts in any window of `1 + margin` seconds (≈99 % of `rate`)."""

    def __init__(self, rate: float, *, margin: float = DEFAULT_MARGIN, clock: Clock = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.window = 1.0 + margin
        self._clock = clock
        self._starts: deque[float] = deque()
        self._factor = 1.0
        self._slow_until = 0.0

    @property
    def capacity(self) -> int:
        """How many starts the current window allows (lower while slowed down)."""
        factor = self._factor if self._clock() < self._slow_until else 1.0
        return max(1, math.floor(self.rate * factor))

    def delay(self) -> float:
        """Seconds until a start is allowed; 0 means now."""
        now = self._clock()
        while self._starts and now - self._starts[0] >= self.window:
            self._starts.popleft()
        excess = len(self._starts) - self.capacity
        if excess < 0:
            return 0.0
        return self._starts[excess] + self.window - now

    def record(self) -> None:
        """Count one start now (call right before sending)."""
        self._starts.append(self._clock())

    def try_acquire(self) -> bool:
        """Start now if allowed."""
        if self.delay() > 0:
            return False
        self.record()
        return True

    def slow_down(self, factor: float, duration: float) -> None:
        """Run at `factor × rate` for `duration` seconds (after a throughput error from Meta)."""
        self._factor = min(max(factor, 0.0), 1.0)
        self._slow_until = self._clock() + duration

    @property
    def slowed(self) -> bool:
        return self._clock() < self._slow_until


class PairLimiter:
    """Per-recipient pacing: Meta allows ~1 message per 6 s to one user, with bursts up to 45.

    Proactively, each recipient has a bucket of `burst` tokens refilled one per `interval`.
    Reactively, a 131056 (pair rate limit) from Meta blocks that recipient alone for 4^X seconds,
    X counting the consecutive pair-limit errors, until a send to them succeeds.
    """

    def __init__(
        self,
        *,
        burst: int = 45,
        interval: float = 6.0,
        max_backoff: float = 900.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.max_backoff = max_backoff
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # recipient -> (tokens, at)
        self._blocked: dict[str, tuple[float, int]] = {}  # recipient -> (until, strikes)

    def _refilled(self, recipient: str, now: float) -> float:
        tokens, at = self._tokens.get(recipient, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) / self.interval)

    def delay(self, recipient: str) -> float:
        """Seconds until `recipient` may get another message."""
        now = self._clock()
        blocked = self._blocked.get(recipient)
        wait = max(0.0, blocked[0] - now) if blocked else 0.0
        tokens = self._refilled(recipient, now)
        if tokens < 1.0:
            wait = max(wait, (1.0 - tokens) * self.interval)
        return wait

    def record(self, recipient: str) -> None:
        """Spend one token for `recipient` (call right before sending)."""
        now = self._clock()
        self._tokens[recipient] = (self._refilled(recipient, now) - 1.0, now)

    def on_pair_limit(self, recipient: str) -> float:
        """Meta said 131056: block this recipient for 4^X s; returns the block length."""
        _, strikes = self._blocked.get(recipient, (0.0, 0))
        backoff = min(self.max_backoff, 4.0**strikes)
        self._blocked[recipient] = (self._clock() + backoff, strikes + 1)
        return backoff

    def on_success(self, recipient: str) -> None:
        """A send went through: forget earlier pair-limit strikes."""
        self._blocked.pop(recipient, None)

    def prune(self) -> None:
        """Drop state for recipients back at a full bucket and not blocked (bounds memory)."""
        now = self._clock()
        for recipient in [r for r in self._tokens if self._refilled(r, now) >= self.burst]:
            del self._tokens[recipient]
        # Strikes outlive the block by `max_backoff`, so repeated 131056s keep escalating.
        for recipient in [r for r, (until, _) in self._blocked.items() if until + self.max_backoff <= now]:
            del self._blocked[recipient]
