"""Pacing shared by every node through Redis (issue 16): one exact limiter per phone number, the
per-recipient pair budgets, the slow-down after throughput errors and the pause board.

`SharedPacing` is what a node builds once (with `ALFRED_REDIS_URL` set): it owns the connection
(`RedisLink`: degraded or not, reconnecting on its own) and hands out one `SharedPacer` and one
`SharedPairs` per number plus the process's `SharedPauses`. Without Redis nothing here is used.

Keys (prefix `alfred` by default; the `{...}` hash tags keep a number's keys in one cluster slot):
`alfred:{pace:<tenant>:<number>}:log|state` (the start log and GCRA/AIMD state),
`alfred:{pair:<tenant>:<number>}:<hash of recipient>`, the node registry `alfred:nodes` and the
hash `alfred:pauses` (also the pub/sub channel). Every key but the pause board expires on its own
when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis

from alfred_bot import tasks
from alfred_bot.outbound.ratelimit import DEFAULT_MARGIN, PAIR_MAX_BACKOFF, Clock
from alfred_bot.outbound.redis.base import AsyncPacer, AsyncPairBudget, LocalPacer, LocalPairs
from alfred_bot.outbound.redis.link import REDIS_ERRORS, RedisLink, connect
from alfred_bot.outbound.redis.pacer import AHEAD, FallbackPacer, SharedPacer
from alfred_bot.outbound.redis.pairs import SharedPairs
from alfred_bot.outbound.redis.pauses import SharedPauses
from alfred_bot.outbound.redis.scripts import HEARTBEAT

#: Seconds between two heartbeats of a node in the registry.
BEAT = 0.25
#: Beats a node may miss before the others count it out (its heartbeat's time to live).
TTL_BEATS = 4

__all__ = [
    "REDIS_ERRORS",
    "AsyncPacer",
    "AsyncPairBudget",
    "FallbackPacer",
    "LocalPacer",
    "LocalPairs",
    "RedisLink",
    "SharedPacer",
    "SharedPacing",
    "SharedPairs",
    "SharedPauses",
    "connect",
]


class SharedPacing:
    """Everything one node shares through one Redis. `share()` returns the number of live
    sending nodes (each takes `rate / share()` while Redis is away); `timeout` is the client's
    command timeout (`connect(url, timeout=...)`).

    Every `beat` seconds the node says in Redis that it books there and learns how many nodes do
    (`on_redis`, counting those heard from in the last `ttl` s): the nodes on Redis book
    `on_redis / share()` of each rate between them, and a node that lost Redis (alone, or with
    everyone) takes its `1 / share()` alone once the others cannot count it any more. Call
    `start()` before the first send: until the first beat a node counts itself alone.
    """

    def __init__(
        self,
        client: Redis,
        *,
        share: Callable[[], int],
        prefix: str = "alfred",
        node: str = "",
        backoff_cap: float = 1.0,
        timeout: float = 0.5,
        poll: float = 1.0,
        beat: float = BEAT,
        ahead: float = AHEAD,
        clock: Clock = time.monotonic,
        redis_clock: Clock | None = None,
    ) -> None:
        self.link = RedisLink(client, backoff_cap=backoff_cap, timeout=timeout, clock=clock)
        self.node = node or uuid.uuid4().hex[:12]
        self.prefix = prefix
        self.share = share
        self.beat = beat
        self.ttl = TTL_BEATS * beat
        self.ahead = ahead
        self.on_redis = 0
        self._clock = clock
        self._redis_clock = redis_clock
        self._registry = f"{prefix}:nodes"
        self._heartbeat = client.register_script(HEARTBEAT)
        self.pauses = SharedPauses(self.link, f"{prefix}:pauses", poll=poll)
        self._pacers: list[SharedPacer] = []
        self._beating: asyncio.Task[None] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, share: Callable[[], int], timeout: float = 0.5, prefix: str = "alfred", node: str = ""
    ) -> SharedPacing:
        """A node's shared pacing on the Redis at `url` (commands fail after `timeout` s)."""
        return cls(connect(url, timeout=timeout), share=share, timeout=timeout, prefix=prefix, node=node)

    @property
    def degraded(self) -> bool:
        """True while Redis is away and every number runs on this node's share (for /healthz)."""
        return self.link.degraded

    def part(self) -> float:
        """The share of each rate the nodes on Redis book between them."""
        return min(1.0, max(1, self.on_redis) / max(1, self.share()))

    def pacer(self, tenant: str, number: str, rate: float, *, margin: float = DEFAULT_MARGIN) -> SharedPacer:
        """The shared limiter of one business number."""
        pacer = SharedPacer(
            self.link,
            f"{self.prefix}:{{pace:{tenant}:{number}}}",
            rate,
            share=self.share,
            part=self.part,
            node=self.node,
            notice=self.ttl + self.beat + self.link.timeout,
            margin=margin,
            ahead=self.ahead,
            clock=self._clock,
            redis_clock=self._redis_clock,
        )
        self._pacers.append(pacer)
        return pacer

    def pairs(
        self, tenant: str, number: str, *, burst: int = 45, interval: float = 6.0, max_backoff: float = PAIR_MAX_BACKOFF
    ) -> SharedPairs:
        """The shared pair budgets of one business number's recipients."""
        key = f"{self.prefix}:{{pair:{tenant}:{number}}}"
        return SharedPairs(
            self.link,
            key,
            burst=burst,
            interval=interval,
            max_backoff=max_backoff,
            clock=self._clock,
            redis_clock=self._redis_clock,
        )

    async def start(self) -> None:
        """Say this node books here, load the pause board, and keep both going in the background."""
        try:
            await self._beat()
        except REDIS_ERRORS as exc:
            self.link.failed(exc)
        await self.pauses.start()
        self._beating = asyncio.get_running_loop().create_task(self._beat_forever(), name="alfred-redis-heartbeat")

    async def _beat(self) -> None:
        """One heartbeat; back from an outage, every number first replays its recent starts."""
        for pacer in self._pacers:
            await pacer.catch_up()
        now = "" if self._redis_clock is None else f"{self._redis_clock():.6f}"
        self.on_redis = int(await self._heartbeat(keys=[self._registry], args=[now, self.node, self.ttl]))

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.beat)
            await self.link.healthy.wait()
            try:
                await self._beat()
            except REDIS_ERRORS as exc:
                self.link.failed(exc)

    async def close(self) -> None:
        """Stop the heartbeat and leave the registry (the others count this node out at once)."""
        if self._beating is not None:
            await tasks.cancel(self._beating)  # cancelled again if a driver call swallows it
            if not self.link.degraded:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.link.client.zrem(self._registry, self.node)
        await self.pauses.close()
        await self.link.close()
