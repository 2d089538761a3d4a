"""The embedded engine's side of `Cluster`: one process, so one node.

The file lock (see `engine._lock_database`) already guarantees that only this process writes the
database, so there is nobody to share leases with: what this process has taken is remembered in
memory, and a restart — the only way another "node" can appear — releases it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from alfred_bot import __version__
from alfred_bot.store.base import NodeInfo

#: Pending messages each the oldest pending one of its user: per-user order, as on a shared database.
TAKE = (
    "SELECT seq, tenant, phone_number_id, raw, name, wa_id, user_id, trace_id, received_at, errors, parse_error "
    "FROM inbox i WHERE state = 'pending' AND NOT EXISTS (SELECT 1 FROM inbox e WHERE e.state = 'pending' "
    "AND e.tenant IS i.tenant AND COALESCE(e.sender, e.user_id) IS COALESCE(i.sender, i.user_id) "
    "AND e.seq < i.seq) ORDER BY seq LIMIT ?"
)


def this_node(role: str = "all") -> NodeInfo:
    """This process as a node: a fresh id per start, so a restarted node is a new one."""
    return NodeInfo(
        id=uuid.uuid4().hex[:12],
        host=socket.gethostname(),
        role=role,
        version=__version__,
        started_at=time.time(),
        pid=os.getpid(),
    )


class LoneNode:
    """`shared`, `nodes` and `watch` for a database only this process uses."""

    def __init__(self, node: NodeInfo | None, clock: Callable[[], float]) -> None:
        self.node = node or this_node()
        self._node_clock = clock
        #: seq of messages handed out by `take` and not yet completed (per-user order holds them back)
        self.taken: set[int] = set()

    @property
    def shared(self) -> bool:
        return False

    async def nodes(self) -> list[dict[str, Any]]:
        info = self.node
        return [
            {
                "id": info.id,
                "host": info.host,
                "role": info.role,
                "version": info.version,
                "pid": info.pid,
                "started_at": info.started_at,
                "seen_at": self._node_clock(),
                "alive": True,
            }
        ]

    def watch(self, on_inbox: Callable[[], None], on_outbox: Callable[[], None]) -> None:
        """Nothing to watch: every write happens in this process, which wakes its own workers."""
