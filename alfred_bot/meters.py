"""Per-tenant message rates over the last minute, in fixed memory (sixty one-second buckets)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

WINDOW = 60


class RateMeter:
    """Events in the last 60 seconds, in one-second buckets."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets = [0] * WINDOW
        self._stamps = [-1] * WINDOW

    def add(self, n: int = 1) -> None:
        second = math.floor(self._clock())
        slot = second % WINDOW
        if self._stamps[slot] != second:
            self._stamps[slot] = second
            self._buckets[slot] = 0
        self._buckets[slot] += n

    def last_minute(self) -> int:
        now = math.floor(self._clock())
        return sum(b for b, s in zip(self._buckets, self._stamps, strict=True) if now - WINDOW < s <= now)


class Meters:
    """Per-tenant inbound and outbound meters."""

    def __init__(self, tenants: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.inbound = {name: RateMeter(clock) for name in tenants}
        self.outbound = {name: RateMeter(clock) for name in tenants}

    def received(self, tenant: str | None, n: int = 1) -> None:
        if tenant in self.inbound:
            self.inbound[tenant].add(n)

    def sent(self, tenant: str) -> None:
        if tenant in self.outbound:
            self.outbound[tenant].add()
