"""One phone number's rate, shared by every node through one atomic Lua script in Redis.

Why an async `acquire()` and not local token leases refilled in batches: a lease is a slot
booked for a node ahead of time. A node whose queue empties, whose sends fail or that dies holds
slots nobody uses (sustained rate drops below 95 % when two nodes trade traffic), and a node
whose lease runs dry still needs Redis before its next start, so the hot path is async anyway.
Here Redis is the single judge of every start, so the total across nodes is exact and nothing
is wasted, and the cost stays small: the senders of a number waiting at the same moment share
one script call (`Batcher`: one in flight per number and node, the next batch queues behind it),
so under load one round trip books many starts, and a quiet number pays ~0.1 ms per send
against a 100 ms Graph call. The wait is never spent in Redis or holding a connection: the
script books the earliest allowed start and answers how long until it; the sender sleeps.

Why the script refuses to book more than `ahead` seconds out (the sender sleeps and asks again):
when Redis dies, every slot booked in it is at most `ahead` away, so a node that falls back
knows when the shared bookings it cannot see any more have left the window.

Redis away from this node (`RedisLink.failed`: down, or unreachable from here only): the node
paces alone on `rate / share()` (share = live sending nodes) after a hold, so its unlogged starts
never share a window with the starts other nodes booked in Redis at a capacity that still
counted this node: the hold is one window + `ahead` + the time the others take to notice this
node left (`notice`: its heartbeat's time to live, one beat and a command timeout). The nodes
still on Redis book `rate x on_redis / share()` between them (`part`), so the total stays the rate
even when only one node lost Redis. Redis back: before its next booking the node replays its
recent starts (made alone, or booked before a Redis restart that may have lost them) into the
log with the ids they were booked with (idempotent), and only then counts itself in again.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

from redis.exceptions import ConnectionError as RedisConnectionError

from alfred_bot.outbound.ratelimit import DEFAULT_MARGIN, MAX_LAG, MIN_FACTOR, Clock, SlidingWindowLimiter
from alfred_bot.outbound.redis.link import REDIS_ERRORS, Arg, RedisLink
from alfred_bot.outbound.redis.scripts import CUT, PACE, REPLAY

#: The furthest ahead a start is booked in Redis (seconds); see the module docstring.
AHEAD = 0.5
#: How fast the Redis server's clock may drift from ours (s/s): an offset sample ages by this much.
DRIFT = 1e-3
#: A reply slower than this says nothing useful about the clock offset (seconds).
MAX_SAMPLE_RTT = 0.05


class ClockOffset:
    """Redis time minus this process's clock, from the round trips the scripts make anyway.

    Why: a wait is counted from the moment Redis booked the slot, but the answer reaches each
    sender a little later, and by a different amount each time under load (measured: 201 starts
    in a second at 200/s when each sender slept its wait from the answer's arrival). Turned into
    a start time on our own clock, every start lands where Redis put it. Each answer bounds the
    offset within its round trip; the tightest recent one wins (its error is half its round trip,
    a fraction of a millisecond on a LAN), aged by `DRIFT` so the estimate follows a drifting clock.
    """

    def __init__(self) -> None:
        self.value: float | None = None
        self._error = 0.0  # half the round trip of the sample in use
        self._at = 0.0

    def sample(self, redis_now: float, sent: float, received: float) -> None:
        error = (received - sent) / 2
        aged = self._error + (received - self._at) * DRIFT
        if self.value is None or (error <= aged and received - sent <= MAX_SAMPLE_RTT):
            self.value, self._error, self._at = redis_now - (sent + received) / 2, error, received


class FallbackPacer:
    """A number's rate on one node while Redis is away: its equal share, after a hold."""

    def __init__(self, rate: float, share: Callable[[], int], *, margin: float, clock: Clock) -> None:
        self.rate = rate
        self.limiter = SlidingWindowLimiter(rate, margin=margin, clock=clock)
        self._share = share
        self._clock = clock
        self.hold_until = 0.0

    def begin(self, hold: float, factor: float, slope: float) -> None:
        """Redis just went away: hold `hold` s, then pace on this node's share, slowed as the number
        was (the shared AIMD factor last seen)."""
        self._rescale()
        self.hold_until = self._clock() + hold
        if factor < 1.0:
            self.limiter.slow_down(factor, (1.0 - factor) / slope if slope > 0 else 60.0)

    def _rescale(self) -> None:
        self.limiter.rate = self.rate / max(1, self._share())

    def delay(self) -> float:
        self._rescale()
        return max(self.hold_until - self._clock(), self.limiter.delay())

    def book(self) -> float:
        """Book the next start on this node's share (call when `delay()` is small); the wait."""
        return self.limiter.reserve()


class Batcher:
    """Single flight: callers that arrive while a booking is in flight share the next one.

    One script call per number and node at a time; the starts asked for while it is in flight go
    in the next call, so calls per second are bounded by the round trip, not by the send rate, and
    the connection pool never runs dry (measured without it at 1,000 msg/s: 500 senders of two
    nodes emptied a 64-connection pool, and a node fell back alone).
    """

    def __init__(self, book: Callable[[list[str]], Awaitable[list[float | None]]], ids: Iterator[str]) -> None:
        self._book = book
        self._ids = ids
        self._waiting: list[tuple[str, asyncio.Future[float | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def take(self) -> float | None:
        """This caller's wait, None if its start was not booked (too far out)."""
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((next(self._ids), future))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    waits = await self._book([start_id for start_id, _ in batch])
                except REDIS_ERRORS as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), wait in zip(batch, waits, strict=True):
                    if not future.done():  # a cancelled caller's slot is lost: rare (shutdown), never too many
                        future.set_result(wait)
        finally:
            self._flusher = None


class SharedPacer:
    """A number's rate across every node (an `AsyncPacer`); `FallbackPacer` while Redis is away.

    `part()` is the share of the rate the nodes on Redis book between them (`SharedPacing` keeps
    it from the heartbeats). `clock` is this process's monotonic clock; `redis_clock` (tests)
    replaces Redis `TIME` in the scripts. Production leaves it None: one clock, the server's.
    """

    def __init__(
        self,
        link: RedisLink,
        key: str,
        rate: float,
        *,
        share: Callable[[], int],
        part: Callable[[], float],
        node: str,
        notice: float,
        margin: float = DEFAULT_MARGIN,
        ahead: float = AHEAD,
        clock: Clock = time.monotonic,
        redis_clock: Clock | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self._link, self._part, self._notice, self._ahead = link, part, notice, ahead
        self._clock, self._redis_clock = clock, redis_clock
        self._keys = [f"{key}:log", f"{key}:state"]
        self._pace = link.client.register_script(PACE)
        self._replay = link.client.register_script(REPLAY)
        self._cut = link.client.register_script(CUT)
        self.fallback = FallbackPacer(rate, share, margin=margin, clock=clock)
        self.offset = ClockOffset()
        run = uuid.uuid4().hex[:6]  # a node restarted under the same name never reuses a live start's id
        self._ids = (f"{node}:{run}:{n}" for n in itertools.count())
        self._recent: deque[tuple[str, float]] = deque()  # this node's starts: (id, when on our clock)
        self._factor = (1.0, 0.0, clock())  # the shared AIMD factor last seen: (factor, slope, when)
        self._next_free = 0.0
        self._batch = Batcher(lambda ids: self._book("wait", ids), self._ids)
        self._recovering = False
        self._catching_up = asyncio.Lock()
        link.on_failure(self._went_down)

    # ------------------------------------------------------------------ the hot path

    async def acquire(self) -> float:
        """Book the earliest allowed start; the seconds to wait for it (may sleep first when the
        slot is more than `ahead` away, so time the whole call plus the wait for a metric)."""
        while True:
            if self._link.degraded:
                wait = self.fallback.delay()
                held = self.fallback.hold_until - self._clock()
                if wait <= self._ahead and held <= 0:
                    return self._remember(self.fallback.book())
                pause = max(held, wait - self._ahead)
            else:
                try:
                    booked = await self._batch.take()
                except REDIS_ERRORS as exc:
                    self._link.failed(exc)
                    continue
                if booked is not None:
                    return booked
                pause = self._next_free - self._clock() - self._ahead
            await asyncio.sleep(max(0.0, pause))

    async def acquire_if_free(self) -> bool:
        """Take a start only if one is free right now (a best-effort send); True if taken."""
        if not self._link.degraded:
            try:
                return (await self._book("free", [next(self._ids)]))[0] is not None
            except REDIS_ERRORS as exc:
                self._link.failed(exc)
        if self.fallback.delay() > 0:
            return False
        self._remember(self.fallback.book())
        return True

    def delay(self) -> float:
        """Seconds until a start is likely free (the last answer's estimate; books nothing)."""
        if self._link.degraded:
            return self.fallback.delay()
        return max(0.0, self._next_free - self._clock())

    def observe_lag(self, lag: float) -> None:
        """This node's decide-to-wire lag; its recent largest goes with each booking and the
        shared window stretches by the largest any node reported in the last window."""
        self.fallback.limiter.observe_lag(lag)

    async def _book(self, mode: str, ids: list[str]) -> list[float | None]:
        """One script call: the wait of each start (None: not booked; `_next_free` says when)."""
        if self._link.degraded:
            raise RedisConnectionError("Redis is away: pacing alone on this node's share")
        if self._recovering:
            await self.catch_up()
        local = self.fallback.limiter
        lag = local.window - local.base_window
        args: list[Arg] = [self._now(), mode, self.rate, local.base_window, lag, self._ahead, self._part(), *ids]
        sent = self._clock()
        factor, slope, redis_now, retry, *waits = await self._pace(keys=self._keys, args=args)
        received = self._clock()
        self._factor = (float(factor), float(slope), received)
        self.offset.sample(float(redis_now), sent, received)
        base = float(redis_now) - (self.offset.value or 0.0) - received  # Redis "now" on our clock, as a wait
        if float(retry) >= 0:
            self._next_free = received + base + float(retry)
        result: list[float | None] = []
        for start_id, wait in zip(ids, waits, strict=False):
            result.append(self._remember(max(0.0, base + float(wait)), start_id))
        return result + [None] * (len(ids) - len(result))

    def _remember(self, wait: float, start_id: str = "") -> float:
        """Keep this node's start for a replay after an outage; `wait` unchanged."""
        at = self._clock() + wait
        self._recent.append((start_id or next(self._ids), at))
        while self._recent and self._recent[0][1] < at - self.fallback.limiter.window - MAX_LAG - self._ahead:
            self._recent.popleft()
        return wait

    def _now(self) -> str:
        return "" if self._redis_clock is None else f"{self._redis_clock():.6f}"

    # ------------------------------------------------------------------ outage and recovery

    @property
    def mode(self) -> str:
        """ "shared" (booked in Redis) or "fallback" (Redis away: this node's share alone)."""
        return "fallback" if self._link.degraded else "shared"

    def _went_down(self) -> None:
        factor, slope, _ = self._factor
        hold = self.fallback.limiter.window + self._ahead + self._notice
        self.fallback.begin(hold, self._current_factor(), slope if factor < 1.0 else 0.0)
        self._recovering = True

    async def catch_up(self) -> None:
        """Back from an outage: put this node's recent starts into the log before booking again."""
        async with self._catching_up:
            if not self._recovering:
                return
            if self._recent:
                sent = self._clock()
                redis_now = await self._redis_time()
                self.offset.sample(redis_now, sent, self._clock())
                offset = self.offset.value or 0.0
                args: list[Arg] = [self._now()]
                for start_id, at in self._recent:
                    args += [start_id, f"{at + offset:.6f}"]
                await self._replay(keys=self._keys, args=args)
            self._recovering = False

    async def _redis_time(self) -> float:
        if self._redis_clock is not None:
            return self._redis_clock()
        seconds, micros = await self._link.client.time()
        return float(seconds) + float(micros) / 1e6

    # ------------------------------------------------------------------ slow-down (AIMD)

    def _current_factor(self) -> float:
        factor, slope, at = self._factor
        return min(1.0, factor + slope * (self._clock() - at))

    def slow_down(self, factor: float, duration: float) -> None:
        """Meta said "too fast": cut the number's shared factor (every node's next booking uses
        it); this node's view changes at once, Redis a round trip later."""
        if self._link.degraded:
            self.fallback.limiter.slow_down(factor, duration)
            return
        cut = min(max(factor, 0.0), 1.0)
        self._factor = (max(MIN_FACTOR, self._current_factor() * cut), (1.0 - cut) / max(duration, 1e-9), self._clock())
        args: list[Arg] = [self._now(), factor, duration, self.fallback.limiter.base_window]
        self._link.spawn(self._cut_shared(args))

    async def _cut_shared(self, args: list[Arg]) -> None:
        await self._cut(keys=self._keys[1:], args=args)

    @property
    def slowed(self) -> bool:
        """True while a slow-down is in force (the shared one; this node's own while Redis is away)."""
        if self._link.degraded:
            return self.fallback.limiter.slowed
        return self._current_factor() < 1.0
