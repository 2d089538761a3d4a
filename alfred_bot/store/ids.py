"""Outbox row ids, made by whoever queues a send (handlers' replies, the API)."""

from __future__ import annotations

import os
import time


def new_outbox_id() -> str:
    """Time-ordered, unique id for an outbox row (ms timestamp + 64 random bits): sortable by
    creation in every engine, and never handed out twice without coordination between nodes."""
    return f"{int(time.time() * 1000):012x}{os.urandom(8).hex()}"
