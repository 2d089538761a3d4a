"""The status page's charts' numbers, read from the store a little at a time: the last hour per
minute, and the last day's delivered and read counts.

The store answers for any window (`Queries.activity`), from indexes, across all nodes. Reading
the whole hour on every poll of every open page would still walk an hour of rows each time, on
the same reader the dispatcher uses. Minutes that ended more than `SETTLED` seconds ago no longer
change (every series is stamped with the moment it is written), so they are read once and kept;
a poll reads only the minutes after them: usually the current one and the one before.

The cost of that: a row written with a timestamp more than `SETTLED` seconds in the past (a node
whose clock runs behind the others by that much) is not seen in a minute already kept. A restart,
or another node's page, reads the hour afresh.

The 24-hour delivered and read counts (`Queries.delivery`) walk a day of sends: on a busy number
that takes a while, and a day's rates barely move in half a minute. So they are read again only
once the last read's duration, divided by `READER_SHARE`, has passed (at most `DELIVERY_EVERY`
seconds): a read of 2 ms is repeated on the next poll, one of 300 ms after 30 s, so the page
never spends more than about 1 % of the reader's time on them, and a quiet system stays exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from alfred_bot.store.base import Queries

MINUTE = 60
MINUTES = 60
SETTLED = 30.0
DAY = 86400.0
DELIVERY_EVERY = 30.0
READER_SHARE = 0.01


def empty_point(at: float) -> dict[str, Any]:
    return {"at": at, "inbound": 0, "sent": 0, "failed": 0, "p95_ms": None}


class RecentActivity:
    """One per app: the kept minutes (start → tenant → point) and the last day's counts with the
    time they were read, shared by every page that polls."""

    def __init__(
        self,
        minutes: int = MINUTES,
        settled: float = SETTLED,
        delivery_every: float = DELIVERY_EVERY,
        reader_share: float = READER_SHARE,
    ) -> None:
        self.minutes = minutes
        self.settled = settled
        self.delivery_every = delivery_every
        self.reader_share = reader_share
        self._kept: dict[float, dict[str, dict[str, Any]]] = {}
        #: (read at, good for how many seconds, the counts)
        self._delivery: tuple[float, float, dict[str, dict[str, int]]] | None = None

    async def delivery(self, store: Queries, now: float) -> dict[str, dict[str, int]]:
        """Per tenant, the messages sent in the 24 hours before `now` and how many were delivered and read."""
        kept = self._delivery
        if kept is None or not 0 <= now - kept[0] < kept[1]:
            started = time.perf_counter()
            counts = await store.delivery(now - DAY)
            fresh_for = min(self.delivery_every, (time.perf_counter() - started) / self.reader_share)
            kept = self._delivery = (now, fresh_for, counts)
        return kept[2]

    async def read(self, store: Queries, now: float, tenants: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
        """Per tenant in `tenants` or with traffic in the window, `minutes` points, oldest first,
        the last one the current (unfinished) minute."""
        first = float(math.floor(now / MINUTE) * MINUTE - (self.minutes - 1) * MINUTE)
        starts = [first + MINUTE * i for i in range(self.minutes)]
        # the minutes not kept yet: a suffix of the window (the current minute is never kept)
        unread = starts[next(i for i, s in enumerate(starts) if s not in self._kept) :]
        fresh = await store.activity(unread[0], len(unread))
        by_minute = {s: {t: series[i] for t, series in fresh.items()} for i, s in enumerate(unread)}
        for at, seen in by_minute.items():
            if at + MINUTE + self.settled <= now:
                self._kept[at] = seen
        self._kept = {at: seen for at, seen in self._kept.items() if at >= first}
        window: dict[float, dict[str, dict[str, Any]]] = {**self._kept, **by_minute}
        names = {t for seen in window.values() for t in seen} | set(tenants)
        return {t: [window[s].get(t) or empty_point(s) for s in starts] for t in sorted(names)}


#: The app's one `RecentActivity` (set by `page.setup`; without it every poll reads the whole hour).
RECENT_ACTIVITY = web.AppKey("status_recent_activity", RecentActivity)
