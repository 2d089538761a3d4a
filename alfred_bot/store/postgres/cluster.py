"""What several nodes on one database need besides the tables: a heartbeat, the list of nodes,
and wake-ups (LISTEN/NOTIFY) that survive the database restarting.

The heartbeat row says a node is alive; a node whose row is older than `takeover_seconds` has
lost its leases (its `sending` outbox rows and its taken inbox messages) to the others. The
listener holds one dedicated connection (LISTEN needs a session, so a transaction-mode pooler
cannot carry it) and reconnects with backoff; after a reconnect it wakes everyone once, because
a NOTIFY sent while it was away is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from alfred_bot import tasks
from alfred_bot.store.base import NodeInfo, PendingMessage
from alfred_bot.store.postgres.inbox import INBOX_CHANNEL, OUTBOX_CHANNEL

log = logging.getLogger("alfred.store")

#: Any failure of the driver or the network: what the engine turns into `StoreError`.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
DAY = 86400.0

_BEAT = """
INSERT INTO nodes (id, host, role, version, pid, started_at, seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, host = excluded.host, role = excluded.role,
    version = excluded.version, pid = excluded.pid
"""
#: Only the leases this node's dispatcher was told about (`Holdings`): a take whose answer was lost
#: (the connection dropped after the commit) must lapse, or nobody would ever handle those rows.
_RENEW = "UPDATE inbox SET lease_until = $2 WHERE owner = $1 AND state = 'pending' AND seq = ANY($3::bigint[])"
_NODES = """
SELECT id, host, role, version, pid, started_at, seen_at FROM nodes WHERE seen_at >= $1
ORDER BY seen_at DESC, started_at DESC, id
"""


async def beat(conn: asyncpg.Connection, node: NodeInfo, now: float, takeover: float, held: list[int]) -> None:
    """One heartbeat (inside a transaction): the node row says `now`; the leases of the messages in
    `held` run to `now + takeover`."""
    await conn.execute(_BEAT, node.id, node.host, node.role, node.version, node.pid, node.started_at, now)
    if held:
        await conn.execute(_RENEW, node.id, now + takeover, held)


class Holdings:
    """The pending messages `take` handed to this node and that it has not finished: what the
    heartbeat keeps leased. Keyed like a completion (wamid, phone number id)."""

    def __init__(self) -> None:
        self._seqs: dict[tuple[str, str], int] = {}

    def add(self, taken: list[PendingMessage]) -> list[PendingMessage]:
        for pending in taken:
            self._seqs[(pending.item.message.id, pending.item.phone_number_id)] = pending.seq
        return taken

    def drop(self, event_id: str, phone_number_id: str | None) -> None:
        if phone_number_id is not None:
            self._seqs.pop((event_id, phone_number_id), None)
            return
        for key in [k for k in self._seqs if k[0] == event_id]:
            del self._seqs[key]

    def seqs(self) -> list[int]:
        return sorted(self._seqs.values())


async def leave(conn: asyncpg.Connection, node: NodeInfo, now: float, takeover: float) -> None:
    """A clean stop: the node shows as stopped (its row stays a day for the status page), and the
    messages it took go back to the others at once instead of after `takeover` seconds."""
    await conn.execute("UPDATE nodes SET seen_at = $2 WHERE id = $1", node.id, now - takeover - 1)
    await conn.execute(
        "UPDATE inbox SET owner = NULL, lease_until = NULL WHERE owner = $1 AND state = 'pending'", node.id
    )


async def nodes(conn: asyncpg.Connection, now: float, takeover: float) -> list[dict[str, Any]]:
    rows = await conn.fetch(_NODES, now - DAY)
    return [{**dict(row), "alive": row["seen_at"] >= now - takeover} for row in rows]


class Heartbeat:
    """Runs `beat` every `interval` seconds until stopped; a failed beat is logged and retried."""

    def __init__(self, beat_once: Callable[[], Any], interval: float) -> None:
        self._beat_once = beat_once
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alfred-heartbeat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._beat_once()
            except Exception as exc:  # noqa: BLE001 - the next beat retries; the store reports the outage
                log.warning("heartbeat failed: %s", exc)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await tasks.cancel(task)


Wake = Callable[[], None]


class Listener:
    """LISTEN on both channels over a dedicated connection, reconnecting with backoff forever.

    `on_reconnect` counts the reconnects (for `stats`)."""

    def __init__(self, url: str, interval: float, on_reconnect: Callable[[], None]) -> None:
        self._url = url
        self._interval = interval
        self._on_reconnect = on_reconnect
        self._inbox: list[Wake] = []
        self._outbox: list[Wake] = []
        self._task: asyncio.Task[None] | None = None
        self._listened = False
        self.connected = asyncio.Event()

    def watch(self, on_inbox: Wake, on_outbox: Wake) -> None:
        self._inbox.append(on_inbox)
        self._outbox.append(on_outbox)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alfred-listen")

    def _notified(self, _conn: object, _pid: int, channel: str, _payload: object) -> None:
        self._wake(self._inbox if channel == INBOX_CHANNEL else self._outbox)

    @staticmethod
    def _wake(callbacks: list[Wake]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a wake-up callback failed")

    async def start_and_wait(self, within: float) -> None:
        """Start listening; wait (up to `within` s) until LISTEN is in place, so a NOTIFY sent
        right after `open()` is not missed."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), within)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._session()
                delay = 0.1  # it was up: the first retry comes quickly
            except DRIVER_ERRORS as exc:
                log.warning("LISTEN connection failed (%s); retrying in %.1f s", exc, delay)
            except Exception:
                log.exception("LISTEN connection failed; retrying in %.1f s", delay)
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _session(self) -> None:
        """One connection's life: LISTEN, then wait until it dies (a ping every `interval` finds a
        connection the network silently dropped)."""
        conn = await asyncpg.connect(self._url, timeout=5, server_settings={"application_name": "alfred-listen"})
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(INBOX_CHANNEL, self._notified)
            await conn.add_listener(OUTBOX_CHANNEL, self._notified)
            if self._listened:
                self._on_reconnect()
                self._wake(self._inbox + self._outbox)  # a NOTIFY sent while we were away is lost
            self._listened = True
            self.connected.set()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self._interval)
                if not lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=5)
        finally:
            conn.terminate()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await tasks.cancel(task)
