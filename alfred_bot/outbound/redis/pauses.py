"""The pause board shared by every node: a 190 on one node pauses the tenant on all of them.

The board lives in one Redis hash (tenant -> pause JSON). `current()` is read on every send and
must stay synchronous and free, so each node keeps a mirror of the hash: a change is written in
the background and announced on a pub/sub channel, and every node re-reads the hash when told
(propagation: one write, one publish and one `HGETALL`, a few milliseconds on a LAN) and at least
every `poll` seconds anyway (pub/sub drops messages while a subscriber reconnects: then the
delay is at most `poll`, 1 s by default).

The node that pauses sees its own pause at once. Redis away: pauses and lifts still apply to
this node's mirror and wait, in order, to be written when Redis is back (a 190 seen during an
outage still pauses every node once it can be told; an operator's resume is not lost either).
The first reason is kept (`HSETNX`), as `LocalPauses` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterator

import msgspec

from alfred_bot import tasks
from alfred_bot.outbound.pauses import Pause
from alfred_bot.outbound.redis.link import REDIS_ERRORS, RedisLink
from alfred_bot.outbound.redis.scripts import PAUSE_HOLD, PAUSE_LIFT

log = logging.getLogger("alfred.pauses")

#: Seconds between two attempts to follow the board after an error.
RETRY_PAUSE = 0.05


class SharedPauses:
    """A `PauseBoard` in Redis with a local mirror; `start()` follows the others' changes."""

    def __init__(self, link: RedisLink, key: str, *, poll: float = 1.0) -> None:
        self._link = link
        self._key = key
        self._channel = key
        self.poll = poll
        self._mirror: dict[str, Pause] = {}
        self._pending: deque[tuple[str, Pause | None]] = deque()  # changes not yet in Redis, in order
        self._version = 0  # bumped by every local change: a read that raced one is discarded
        self._hold = link.client.register_script(PAUSE_HOLD)
        self._lift = link.client.register_script(PAUSE_LIFT)
        self._writing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def current(self) -> dict[str, Pause]:
        return self._mirror

    def hold(self, tenant: str, pause: Pause) -> bool:
        if tenant in self._mirror:
            return False
        self._mirror[tenant] = pause
        self._change(tenant, pause)
        return True

    def lift(self, tenant: str) -> bool:
        if self._mirror.pop(tenant, None) is None:
            return False
        self._change(tenant, None)
        return True

    def _change(self, tenant: str, pause: Pause | None) -> None:
        self._version += 1
        self._pending.append((tenant, pause))
        if not self._link.degraded:
            self._link.spawn(self._write())

    async def _write(self) -> None:
        """Write the pending changes in order (each leaves the queue only once Redis has it)."""
        async with self._writing:
            while self._pending:
                tenant, pause = self._pending[0]
                if pause is None:
                    await self._lift(keys=[self._key], args=[self._channel, tenant])
                else:
                    await self._hold(keys=[self._key], args=[self._channel, tenant, msgspec.json.encode(pause)])
                self._pending.popleft()

    async def refresh(self) -> None:
        """Read the board from Redis into the mirror (after writing this node's pending changes)."""
        await self._write()
        version = self._version
        raw = await self._link.client.hgetall(self._key)  # type: ignore[misc]
        if version != self._version:
            return  # changed here meanwhile: the change's own publish brings the next read
        self._mirror = dict(_readable(raw))

    # ------------------------------------------------------------------ following the other nodes

    async def start(self) -> None:
        """Load the board (if Redis answers) and follow its changes in the background."""
        try:
            await self.refresh()
        except REDIS_ERRORS as exc:
            self._link.failed(exc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="alfred-redis-pauses")

    async def _run(self) -> None:
        while True:
            await self._link.healthy.wait()
            try:
                await self._follow()
            except REDIS_ERRORS as exc:
                self._link.failed(exc)
                await asyncio.sleep(RETRY_PAUSE)  # never a busy loop, even if only pub/sub fails

    async def _follow(self) -> None:
        async with self._link.client.pubsub() as channel:
            await channel.subscribe(self._channel)
            while True:
                await self.refresh()  # on a message, and every `poll` seconds without one
                await channel.get_message(ignore_subscribe_messages=True, timeout=self.poll)

    async def close(self) -> None:
        """Stop following. `tasks.cancel` cancels again if the first is lost inside a driver call:
        a close that waited on such a task hung a test teardown for 300 s in CI (`SharedPacing.close`)."""
        await tasks.cancel(self._task)


def _readable(raw: dict[bytes, bytes]) -> Iterator[tuple[str, Pause]]:
    """The board's entries this node can read; one it cannot (a node of another version during a
    rolling upgrade) is skipped with a warning instead of ending the follower task for good."""
    for key, value in raw.items():
        try:
            yield key.decode(), msgspec.json.decode(value, type=Pause)
        except (UnicodeDecodeError, msgspec.MsgspecError) as exc:
            log.warning("skipped an unreadable pause entry %r: %s", key[:100], exc)
