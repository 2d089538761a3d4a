"""Outbound pacing: a sliding-window limiter per phone number and a pair limiter per recipient.

Both are pure and clock-injected (`clock()` returns monotonic seconds), so tests drive them with
a fake clock and never sleep. The sender asks `delay()` and sleeps itself.

Why a sliding window and not a plain token bucket: Meta counts messages per second as seen by
its servers. A bucket that starts full allows `2 × rate` starts in the second that straddles a
refill; a window of the last `capacity` start times allows at most `capacity` starts in ANY
window of `1 + margin` seconds, which is the promise we make.

Why also spacing: a window alone lets all `capacity` starts happen at once. Under load those
requests reach the wire over the next few hundred milliseconds and pile onto the next window's
at the receiver (measured: 1250 in one second at 1000/s). So starts are also spaced evenly
(GCRA, one every `window / capacity` seconds, with a small burst), which keeps what Meta sees
as smooth as what we send.

Why a start the window held back earns no burst: the burst is credit for idle time. A backlog
that starts with a burst fills its window 5 % early and then waits for room; if that wait counted
as idle, it earned a new burst, which filled the next window early, and so on: a 50 ms silence and
100 starts in the next 50 ms, once a second, at 1000/s (measured at the receiver). So `reserve`
spends the burst when the window, not the spacing, set the wait.

Why the window stretches with observed lag: a start is decided here, but the request reaches
the wire later (a new connection, a busy loop). If early requests lag more than later ones
(a cold connection pool), the receiver sees them compressed: measured 1062 in its first
second at 1000/s. The sender reports each request's decide-to-wire lag (`observe_lag`) and
the window is `1 s + margin + the largest lag seen in the last window`, so the promise holds
at the receiver; in steady state the lag is a millisecond or two and costs nothing.

Why AIMD after a throughput error (130429, 4, 80007) and not "half the rate for a minute": Meta
counts inbound messages too ("inclusive of inbound and outbound messages and all message types"),
so a burst of 130429s often comes from a burst of users writing, not from us; it passes in a
second or two. The rate is multiplied by `factor` (at most once per window: the requests already
in flight answer 130429 together, and that is one signal, not fifty) and then climbs back
additively, linearly, to the full rate over `duration` seconds of success; another 130429 on the
way up cuts it again. Measured under the e2e load (bench/RESULTS.md): the fixed 60 s at 50 % left
replies seconds behind for over a minute after a 1-second burst; AIMD recovers in seconds.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

Clock = Callable[[], float]

#: Extra window length that absorbs jitter between our start time and Meta's arrival time.
DEFAULT_MARGIN = 0.01
#: The most that observed decide-to-wire lag may stretch the window.
MAX_LAG = 5.0
#: The longest a recipient is blocked after repeated 131056 (pair rate limit) answers.
PAIR_MAX_BACKOFF = 900.0
#: The lowest share of the rate repeated throughput errors can push a number to (AIMD floor).
MIN_FACTOR = 0.1


class Pacer(Protocol):
    """A number's rate, as a lane uses it: in-process here, shared by every node later (issue 16)."""

    def reserve(self) -> float:
        """Book the earliest allowed start; the seconds to wait for it."""

    def observe_lag(self, lag: float) -> None:
        """Report how long after its start a request reached the wire."""

    def delay(self) -> float:
        """Seconds until a start would be allowed, booking nothing (0: a slot is free now)."""

    def record(self) -> None:
        """Count one start now (a best-effort send that found a free slot)."""

    def split(self, nodes: int) -> None:
        """Send for one of `nodes` processes sharing the number: at most 1/nodes of its rate."""

    def slow_down(self, factor: float, duration: float) -> None:
        """Meta said "too fast": multiply the rate by `factor`, climbing back to full over `duration` s."""

    @property
    def slowed(self) -> bool:
        """True while a slow-down is in force."""


class PairBudget(Protocol):
    """Per-recipient pacing, as a lane uses it (see `PairLimiter`)."""

    def delay(self, recipient: str) -> float:
        """Seconds until `recipient` may get another message."""

    def record(self, recipient: str) -> None:
        """Spend one message to `recipient`."""

    def strikes(self, recipient: str) -> int:
        """Pair-limit errors in a row for `recipient` (the X of 4^X)."""

    def block(self, recipient: str, seconds: float) -> None:
        """Meta said 131056: hold `recipient` for `seconds` and count a strike."""

    def on_success(self, recipient: str) -> None:
        """A send went through: forget the strikes."""

    def prune(self) -> None:
        """Forget idle recipients (bounded memory)."""


def pair_backoff(strikes: int, cap: float = PAIR_MAX_BACKOFF) -> float:
    """How long a 131056 blocks a recipient: 4^X seconds after X earlier strikes, capped."""
    return min(cap, 4.0 ** min(strikes, 32))


class SlidingWindowLimiter:
    """At most `floor(rate)` starts in any window of `1 + margin` seconds (≈99 % of `rate`)."""

    def __init__(self, rate: float, *, margin: float = DEFAULT_MARGIN, clock: Clock = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.base_window = 1.0 + margin
        self._clock = clock
        self._lags: deque[tuple[float, float]] = deque()  # (at, lag), lags decreasing: a sliding max
        self._starts: deque[float] = deque()
        self._aimd = Aimd(clock=clock)
        self._tat = 0.0  # GCRA "theoretical arrival time" of the next evenly spaced start
        self._nodes = 1

    @property
    def capacity(self) -> int:
        """How many starts the current window allows (lower while slowed down or shared)."""
        return max(1, math.floor(self.rate * self._aimd.factor() / self._nodes))

    def split(self, nodes: int) -> None:
        """Take an equal share of the number's rate: `nodes` processes send for it at once."""
        self._nodes = max(1, nodes)

    @property
    def window(self) -> float:
        """The window in force: 1 s + margin + the largest recent decide-to-wire lag."""
        now = self._clock()
        while self._lags and now - self._lags[0][0] > self.base_window:
            self._lags.popleft()
        return self.base_window + (min(self._lags[0][1], MAX_LAG) if self._lags else 0.0)

    def observe_lag(self, lag: float) -> None:
        """Report how long after its start a request actually reached the wire."""
        now = self._clock()
        while self._lags and self._lags[-1][1] <= lag:
            self._lags.pop()
        self._lags.append((now, max(0.0, lag)))

    def _interval(self) -> float:
        return self.base_window / self.capacity

    def _burst(self) -> int:
        """Starts allowed back to back: 5 % of the capacity, at least one."""
        return max(1, self.capacity // 20)

    def _waits(self) -> tuple[float, float]:
        """(wait for the even spacing, wait for room in the window); either may be negative."""
        now, window = self._clock(), self.window
        while self._starts and now - self._starts[0] >= self.base_window + MAX_LAG:
            self._starts.popleft()
        first = bisect.bisect_right(self._starts, now - window)  # starts inside the current window
        spacing = self._tat - (self._burst() - 1) * self._interval() - now
        excess = len(self._starts) - first - self.capacity
        full = self._starts[first + excess] + window - now if excess >= 0 else 0.0
        return spacing, full

    def delay(self) -> float:
        """Seconds until a start is allowed; 0 means now."""
        return max(0.0, *self._waits())

    def record(self) -> None:
        """Count one start now (call right before sending)."""
        self._record_at(self._clock())

    def _record_at(self, at: float) -> None:
        self._starts.append(at)
        self._tat = max(self._tat, at) + self._interval()

    def reserve(self) -> float:
        """Book the earliest allowed start and return how long to wait for it.

        Each caller sleeps once until its own slot, instead of every waiting worker waking at
        the same moment to compete for one start (measured: 91 checks per send at 1000/s).
        """
        spacing, full = self._waits()
        wait = max(0.0, spacing, full)
        at = self._clock() + wait
        self._record_at(at)
        if full > max(0.0, spacing):
            self._tat = max(self._tat, at + self._burst() * self._interval())
        return wait

    def try_acquire(self) -> bool:
        """Start now if allowed."""
        if self.delay() > 0:
            return False
        self.record()
        return True

    def slow_down(self, factor: float, duration: float) -> None:
        """After a throughput error from Meta: multiplicative decrease, then additive increase (`Aimd`)."""
        self._aimd.decrease(factor, duration, hold=self.base_window)

    @property
    def slowed(self) -> bool:
        return self._aimd.factor() < 1.0


class Aimd:
    """The share of its rate a number may use: cut by a factor on a throughput error, then climbing
    back linearly to 1.0. Pure and clock-injected.

    `decrease(factor, duration)` multiplies the current share by `factor` (never below `MIN_FACTOR`)
    unless the last cut was less than `hold` seconds ago (one burst of errors is one signal); the
    share then grows by `(1 - factor) / duration` per second, so one cut is undone in `duration` s.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._base = 1.0  # the share right after the last cut
        self._at = -math.inf  # when it was cut
        self._slope = 0.0  # share regained per second since then

    def factor(self) -> float:
        """The share of the rate in force now, in [MIN_FACTOR, 1]."""
        return min(1.0, self._base + self._slope * (self._clock() - self._at))

    def decrease(self, factor: float, duration: float, *, hold: float = 1.0) -> bool:
        """Cut the share by `factor`; False if a cut less than `hold` s ago already covers this one."""
        now = self._clock()
        if now - self._at < hold:
            return False
        factor = min(max(factor, 0.0), 1.0)
        self._base = max(MIN_FACTOR, self.factor() * factor)
        self._at = now
        self._slope = (1.0 - factor) / max(duration, 1e-9)
        return True


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
        max_backoff: float = PAIR_MAX_BACKOFF,
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

    def strikes(self, recipient: str) -> int:
        """Pair-limit errors in a row for `recipient` (reset by a successful send)."""
        return self._blocked.get(recipient, (0.0, 0))[1]

    def block(self, recipient: str, seconds: float) -> None:
        """Hold `recipient` for `seconds` (the retry policy chose them) and count one more strike."""
        self._blocked[recipient] = (self._clock() + seconds, self.strikes(recipient) + 1)

    def on_pair_limit(self, recipient: str) -> float:
        """Meta said 131056: block this recipient for 4^X s; returns the block length."""
        backoff = pair_backoff(self.strikes(recipient), self.max_backoff)
        self.block(recipient, backoff)
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
