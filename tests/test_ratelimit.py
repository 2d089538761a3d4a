"""Pacing units, driven by a fake clock: no sleeping, exact answers."""

from __future__ import annotations

import heapq
import itertools
import math
import random

import pytest

from alfred_bot.outbound.ratelimit import (
    MAX_LAG,
    MIN_FACTOR,
    PAIR_MAX_BACKOFF,
    Aimd,
    PairLimiter,
    SlidingWindowLimiter,
    pair_backoff,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_backlog(limiter: SlidingWindowLimiter, clock: FakeClock, seconds: float, work: float = 0.002) -> list[float]:
    """Start as fast as the limiter allows for `seconds`; return the start times."""
    starts: list[float] = []
    end = clock.now + seconds
    while clock.now < end:
        wait = limiter.delay()
        if wait > 0:
            clock.advance(wait)
            continue
        limiter.record()
        starts.append(clock.now)
        clock.advance(random.uniform(0, work))  # the sender's own work between starts
    return starts


def worst_window(starts: list[float], width: float = 1.0) -> int:
    worst, lo = 0, 0
    for hi, t in enumerate(starts):
        while t - starts[lo] >= width:
            lo += 1
        worst = max(worst, hi - lo + 1)
    return worst


@pytest.mark.parametrize("rate", [1, 80, 1000])
def test_never_more_than_rate_in_any_second_and_near_full_throughput(rate: int) -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(rate, clock=clock)
    starts = run_backlog(limiter, clock, 30)
    assert worst_window(starts) <= rate
    achieved = len(starts) / 30
    assert achieved >= 0.97 * rate


def test_starts_are_spaced_evenly_not_bunched() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(3, clock=clock)
    assert [limiter.try_acquire() for _ in range(2)] == [True, False]
    assert limiter.delay() == pytest.approx(1.01 / 3)
    clock.advance(1.01 / 3)
    assert limiter.try_acquire() is True


def test_small_burst_then_spacing_at_high_rates() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(1000, clock=clock)
    burst = 0
    while limiter.try_acquire():
        burst += 1
    assert burst == 50  # 5 % of the capacity back to back, then one per 1.01 ms
    assert limiter.delay() == pytest.approx(1.01 / 1000)


def test_window_caps_what_the_burst_would_add() -> None:
    """Spacing with a burst of 2 alone would allow 41 starts in the first 1.01 s at 40/s; the window allows 40."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(40, clock=clock)
    start = clock.now
    starts = run_backlog(limiter, clock, 1.01 - 1e-9, work=0.0)
    assert len([t for t in starts if t < start + 1.01 - 1e-9]) == 40


def test_a_full_window_does_not_replay_the_burst_every_second() -> None:
    """Workers that always have work: after the first window the starts stay evenly spaced.

    The burst of the first moments filled the window 50 ms early; the wait for room then looked
    like idle time and earned a new burst of 50, which filled the next window early, and so on:
    a 50 ms silence and 100 starts in the next 50 ms once a second (seen at the receiver).
    """
    clock = FakeClock()
    limiter = SlidingWindowLimiter(1000, clock=clock)
    begin = clock.now
    workers = [(begin, w) for w in range(250)]  # (when the worker is free again, its number)
    heapq.heapify(workers)
    starts: list[float] = []
    while workers[0][0] < begin + 6:
        free, worker = heapq.heappop(workers)
        clock.now = free
        start = free + limiter.reserve()
        starts.append(start)
        heapq.heappush(workers, (start + 0.1, worker))  # the Graph API answers in 100 ms
    starts.sort()
    steady = [t for t in starts if t >= begin + 1.1]
    assert max(b - a for a, b in itertools.pairwise(steady)) < 2 * 1.01 / 1000
    assert worst_window(steady, 0.05) <= 51
    assert worst_window(starts) <= 1000
    assert len(steady) / (steady[-1] - steady[0]) >= 0.98 * 1000


def test_fractional_rate_rounds_down_never_up() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(2.9, clock=clock)
    assert worst_window(run_backlog(limiter, clock, 10)) <= 2


def test_slow_down_halves_then_climbs_back_additively() -> None:
    """AIMD: a 130429 halves the rate, which then climbs back linearly over `slow_down_seconds`."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(80, clock=clock)
    limiter.slow_down(0.5, 5)
    assert limiter.slowed and limiter.capacity == 40
    clock.advance(2.5)
    assert limiter.slowed and limiter.capacity == 60
    clock.advance(2.5)
    assert not limiter.slowed and limiter.capacity == 80


def test_a_burst_of_errors_is_one_decrease_and_later_bursts_cut_again_to_a_floor() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(80, clock=clock)
    for _ in range(50):  # the requests in flight all answer 130429 at once: one signal
        limiter.slow_down(0.5, 5)
    assert limiter.capacity == 40
    clock.advance(1.1)  # still throttled a window later: cut again from where the climb got to
    limiter.slow_down(0.5, 5)
    assert limiter.capacity == math.floor(80 * (0.5 + 0.1) * 0.5)
    for _ in range(20):
        clock.advance(1.1)
        limiter.slow_down(0.5, 5)
    assert limiter.capacity == math.floor(80 * MIN_FACTOR)  # never below the floor
    assert Aimd(clock=clock).factor() == 1.0


def test_slowed_backlog_never_exceeds_the_rate_and_recovers_within_seconds() -> None:
    """Under a backlog after one throughput error: no sliding second above the rate in force (a
    half second later at most 40 + the climb), and 10 s carry far more than the old 50 % for 60 s."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(80, clock=clock)
    start = clock.now
    limiter.slow_down(0.5, 5)
    starts = run_backlog(limiter, clock, 10)
    assert worst_window(starts) <= 80
    assert sum(1 for t in starts if t < start + 1.0) <= 48  # 40 at first, + 8/s of climb
    assert len(starts) >= 0.97 * (5 * 60 + 5 * 80)  # old behaviour: 400


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate"):
        SlidingWindowLimiter(0)


def test_pair_limiter_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    pairs = PairLimiter(burst=45, interval=6.0, clock=clock)
    for _ in range(45):
        assert pairs.delay("a") == 0
        pairs.record("a")
    assert pairs.delay("a") == pytest.approx(6.0)
    assert pairs.delay("b") == 0  # other recipients are not affected
    clock.advance(6.0)
    assert pairs.delay("a") == 0


def test_pair_limit_error_backs_off_4_to_the_x_for_that_recipient_only() -> None:
    clock = FakeClock()
    pairs = PairLimiter(clock=clock)
    assert [pairs.on_pair_limit("a") for _ in range(4)] == [1.0, 4.0, 16.0, 64.0]
    assert pairs.delay("a") == pytest.approx(64.0)
    assert pairs.delay("b") == 0
    pairs.on_success("a")
    assert pairs.delay("a") == 0
    assert pairs.on_pair_limit("a") == 1.0


def test_a_block_chosen_by_the_retry_policy_holds_the_recipient_and_counts_a_strike() -> None:
    clock = FakeClock()
    pairs = PairLimiter(clock=clock)
    assert pairs.strikes("a") == 0
    pairs.block("a", 7.5)
    assert (pairs.strikes("a"), pairs.delay("a"), pairs.delay("b")) == (1, 7.5, 0)
    pairs.block("a", 2.0)  # a shorter block replaces the longer one; strikes keep counting
    assert (pairs.strikes("a"), pairs.delay("a")) == (2, 2.0)
    assert pairs.on_pair_limit("a") == 16.0  # 4^2, from the same count
    pairs.on_success("a")
    assert pairs.strikes("a") == 0


def test_pair_backoff_is_4_to_the_x_capped() -> None:
    assert [pair_backoff(x) for x in range(6)] == [1.0, 4.0, 16.0, 64.0, 256.0, PAIR_MAX_BACKOFF]
    assert pair_backoff(10_000, cap=30.0) == 30.0  # no overflow for absurd strike counts


def test_pair_backoff_is_capped_and_state_pruned() -> None:
    clock = FakeClock()
    pairs = PairLimiter(max_backoff=100.0, clock=clock)
    backoffs = [pairs.on_pair_limit("a") for _ in range(6)]
    assert max(backoffs) == 100.0
    pairs.record("b")
    clock.advance(100.0)
    pairs.prune()
    assert pairs.on_pair_limit("a") == 100.0  # strikes survive just after the block ends
    clock.advance(1000.0)
    pairs.prune()
    assert pairs.on_pair_limit("a") == 1.0
    assert pairs.delay("b") == 0


def test_observed_wire_lag_stretches_the_window_for_a_while() -> None:
    """Requests that reached the wire late would bunch with the next ones at the receiver."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(1, clock=clock)
    limiter.record()
    limiter.observe_lag(0.3)
    assert limiter.window == pytest.approx(1.31)
    assert limiter.delay() == pytest.approx(1.31)
    clock.advance(0.5)
    limiter.observe_lag(0.1)  # a smaller lag does not shrink the window while the larger is recent
    assert limiter.window == pytest.approx(1.31)
    clock.advance(0.52)
    assert limiter.window == pytest.approx(1.11)  # the 0.3 s lag has aged out, the 0.1 s has not
    limiter.observe_lag(60.0)
    assert limiter.window == pytest.approx(1.01 + MAX_LAG)  # capped


@pytest.mark.parametrize("rate", [3, 80, 1000])
def test_reservations_keep_the_same_promise(rate: int) -> None:
    """Many workers each book a slot and sleep once: the booked starts obey window and spacing."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(rate, clock=clock)
    starts = []
    for _ in range(rate * 5):
        starts.append(clock.now + limiter.reserve())
        clock.advance(random.uniform(0, 0.5 / rate))
    starts.sort()
    assert worst_window(starts) <= rate
    assert len(starts) / (starts[-1] - starts[0]) >= 0.97 * rate
