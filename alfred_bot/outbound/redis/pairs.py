"""Per-recipient pair budgets shared by every node: the bucket and the 131056 strikes in Redis.

A user's consecutive messages may be sent by different nodes, so the budget (≈1 message per 6 s,
bursts up to 45) and the strike count behind the 4^X backoff must live where every node reads
them. `take()` checks and spends in one atomic script (an async round trip before the number's
slot is booked); `strikes()`, `block()` and `on_success()` stay synchronous as the lanes call
them: the strike count comes with each `take()` answer (fresh for the send being settled) and
blocks and resets are written in the background, long before the recipient's next attempt
(a deferred row comes back after the block, seconds later).

Recipients are hashed in the key names: a `KEYS *` on a shared Redis does not list users' phone
numbers. Redis away: the in-process `PairLimiter` of this node decides, as without Redis.
"""

from __future__ import annotations

import hashlib
import time

from alfred_bot.outbound.ratelimit import PAIR_MAX_BACKOFF, Clock, PairLimiter
from alfred_bot.outbound.redis.link import REDIS_ERRORS, Arg, RedisLink
from alfred_bot.outbound.redis.scripts import PAIR_BLOCK, PAIR_TAKE

#: Strike counts this node remembers for recipients it has not sent to for this long are dropped.
FORGET_AFTER = 600.0


class SharedPairs:
    """An `AsyncPairBudget` in Redis for one number (the in-process `PairLimiter` while it is away)."""

    def __init__(
        self,
        link: RedisLink,
        key: str,
        *,
        burst: int = 45,
        interval: float = 6.0,
        max_backoff: float = PAIR_MAX_BACKOFF,
        clock: Clock = time.monotonic,
        redis_clock: Clock | None = None,
    ) -> None:
        self._link = link
        self._prefix = key
        self.burst = burst
        self.interval = interval
        self.max_backoff = max_backoff
        self._clock = clock
        self._redis_clock = redis_clock
        self.local = PairLimiter(burst=burst, interval=interval, max_backoff=max_backoff, clock=clock)
        self._take = link.client.register_script(PAIR_TAKE)
        self._block = link.client.register_script(PAIR_BLOCK)
        self._strikes: dict[str, tuple[int, float]] = {}  # recipient -> (strikes, when learnt)

    def _key(self, recipient: str) -> str:
        return f"{self._prefix}:{hashlib.blake2b(recipient.encode(), digest_size=12).hexdigest()}"

    def _now(self) -> str:
        return "" if self._redis_clock is None else f"{self._redis_clock():.6f}"

    async def take(self, recipient: str) -> float:
        """Spend one message to `recipient` if allowed now (0.0); else the seconds to wait (nothing spent)."""
        if not self._link.degraded:
            try:
                args: list[Arg] = [self._now(), self.burst, self.interval, self.max_backoff]
                wait, strikes = await self._take(keys=[self._key(recipient)], args=args)
            except REDIS_ERRORS as exc:
                self._link.failed(exc)
            else:
                self._strikes[recipient] = (int(strikes), self._clock())
                return float(wait)
        wait = self.local.delay(recipient)
        if wait <= 0:
            self.local.record(recipient)
        return wait

    def strikes(self, recipient: str) -> int:
        """Pair-limit errors in a row for `recipient`, as every node counted them."""
        if self._link.degraded:
            return self.local.strikes(recipient)
        return self._strikes.get(recipient, (0, 0.0))[0]

    def block(self, recipient: str, seconds: float) -> None:
        """Meta said 131056: hold `recipient` on every node for `seconds` and count a strike."""
        self.local.block(recipient, seconds)
        if self._link.degraded:
            return
        self._strikes[recipient] = (self.strikes(recipient) + 1, self._clock())
        args: list[Arg] = [self._now(), seconds, self.max_backoff, self.burst, self.interval]
        self._link.spawn(self._write_block(recipient, args))

    async def _write_block(self, recipient: str, args: list[Arg]) -> None:
        strikes = await self._block(keys=[self._key(recipient)], args=args)
        self._strikes[recipient] = (int(strikes), self._clock())

    def on_success(self, recipient: str) -> None:
        """A send went through: forget the strikes everywhere."""
        self.local.on_success(recipient)
        self._strikes.pop(recipient, None)
        if not self._link.degraded:
            self._link.spawn(self._write_success(recipient))

    async def _write_success(self, recipient: str) -> None:
        await self._link.client.hdel(self._key(recipient), "until", "strikes")  # type: ignore[misc]

    def prune(self) -> None:
        """Forget what this node remembers of idle recipients (Redis expires its own keys)."""
        self.local.prune()
        cutoff = self._clock() - FORGET_AFTER
        self._strikes = {r: s for r, s in self._strikes.items() if s[1] >= cutoff}
