"""What a node knows of the others on a shared database: who is alive, and its share of the rate.

Every node heartbeats into the store (the engine does that); this view reads the node list every
`REFRESH` seconds for the status page and, on sending nodes, splits each number's rate evenly
between the live sending nodes, so together they stay under Meta's limit without a shared
limiter (issue 16 adds the exact one on Redis).

A node that joins waits `JOIN_GRACE` before its first send: long enough for every other node to
have seen its heartbeat and lowered its own share, so the total never exceeds the rate. A node
that dies keeps its share reserved until it is judged dead (`storage.takeover_seconds`): slower
for a few seconds, never faster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from alfred_bot import tasks
from alfred_bot.store import Cluster, StoreError

log = logging.getLogger("alfred.cluster")

REFRESH = 1.0
JOIN_GRACE = 2.5 * REFRESH
SENDING_ROLES = frozenset({"all", "worker"})


class ClusterView:
    """The live node list, refreshed in the background; `on_share` gets the sending-node count."""

    def __init__(self, store: Cluster, *, on_share: Callable[[int], None] | None = None) -> None:
        self._store = store
        self._on_share = on_share
        self.nodes: list[dict[str, Any]] = []
        self.senders = 1
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read the node list once and apply the share (a read error keeps the last known list)."""
        try:
            self.nodes = await self._store.nodes()
        except StoreError as exc:
            log.warning("cannot read the node list, keeping the last one: %s", exc)
            return
        senders = max(1, sum(1 for n in self.nodes if n["alive"] and n["role"] in SENDING_ROLES))
        if senders != self.senders:
            log.info("%d node(s) now send for each number: each takes 1/%d of its rate", senders, senders)
        self.senders = senders
        if self._on_share is not None:
            self._on_share(senders)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alfred-cluster-view")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            await self.refresh()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await tasks.cancel(task)
