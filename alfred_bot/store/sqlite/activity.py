"""The status page's last hour, minute by minute, from the SQLite store (`Queries.activity`).

Four series per tenant, each counted where the store already stamps the moment with an index on
it, so the read is a handful of index range scans and grouped counts however much history is kept:

- `inbound`: inbox rows by `received_at` (every message a user sent, whatever became of it).
- `sent`: outbox rows by `sent_at` (Meta accepted them), read receipts left out: they are not messages.
- `failed`: failed attempts, from two sources: Graph calls Meta refused (the `audit` row of every
  call whose outcome is not `sent`: failed for good, retried, a pause, a pair-limit wait) by `at`,
  and the delivery failures Meta reported later (a `failed` status webhook) by `received_at`.
- `p95_ms`: the 95th percentile (nearest rank) of reply latency among the replies sent in that
  minute. Latency is `sent_at - origin_at` on the outbox row itself: `origin_at` is when the
  webhook carrying the user's message arrived, `sent_at` when Meta accepted the reply. One row
  holds both, so there is no join to the inbox (whose row retention may have scrubbed), and it is
  the same measure as the `alfred_e2e_latency_seconds` histogram. Only immediate replies count:
  rows with an `origin_at` (API and campaign sends have none), not receipts, not scheduled sends
  (`send_at`: their wait is on purpose). None when no reply went out that minute.

The PostgreSQL engine answers the same question with the same definitions
(`alfred_bot.store.postgres.activity`) and builds its points with `points` below.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

MINUTE = 60

#: (tenant, minute index, count) of each counted series, over [?1, ?2).
_COUNTS = {
    "inbound": (
        "SELECT tenant, CAST((received_at - ?1) / 60 AS INTEGER) AS m, COUNT(*) FROM inbox "
        "WHERE received_at >= ?1 AND received_at < ?2 AND tenant IS NOT NULL GROUP BY tenant, m"
    ),
    "sent": (
        "SELECT tenant, CAST((sent_at - ?1) / 60 AS INTEGER) AS m, COUNT(*) FROM outbox "
        "WHERE sent_at >= ?1 AND sent_at < ?2 AND type != 'read' GROUP BY tenant, m"
    ),
    "refused": (
        "SELECT tenant, CAST((at - ?1) / 60 AS INTEGER) AS m, COUNT(*) FROM audit "
        "WHERE at >= ?1 AND at < ?2 AND outcome != 'sent' AND type != 'read' GROUP BY tenant, m"
    ),
    "undelivered": (
        "SELECT tenant, CAST((received_at - ?1) / 60 AS INTEGER) AS m, COUNT(*) FROM statuses "
        "WHERE received_at >= ?1 AND received_at < ?2 AND status = 'failed' AND tenant IS NOT NULL GROUP BY tenant, m"
    ),
}

#: Nearest-rank p95 per (tenant, minute): the value at rank ceil(0.95 n), in integers as
#: (95 n + 99) / 100; PostgreSQL's `percentile_disc(0.95)` picks the same value.
_P95 = """
SELECT tenant, m, latency FROM (
    SELECT tenant, m, latency,
           ROW_NUMBER() OVER (PARTITION BY tenant, m ORDER BY latency) AS rank,
           COUNT(*) OVER (PARTITION BY tenant, m) AS n
    FROM (SELECT tenant, CAST((sent_at - ?1) / 60 AS INTEGER) AS m, MAX(0.0, sent_at - origin_at) AS latency
          FROM outbox WHERE sent_at >= ?1 AND sent_at < ?2 AND origin_at IS NOT NULL AND type != 'read'
          AND send_at IS NULL)
) WHERE rank = (95 * n + 99) / 100
"""

Rows = Iterable[Any]  # rows of three columns: (tenant, minute, value)
Fetch = Callable[[str, tuple[Any, ...]], Awaitable[Sequence[Any]]]


class _Series:
    """Per tenant, `minutes` points from `since`, built up row by row from the grouped reads."""

    def __init__(self, since: float, minutes: int) -> None:
        self.since, self.minutes = since, minutes
        self.by_tenant: dict[str, list[dict[str, Any]]] = {}

    def point(self, tenant: Any, minute: Any) -> dict[str, Any] | None:
        index = int(minute)
        if not 0 <= index < self.minutes:
            return None  # a boundary rounding of the database's float arithmetic: outside the window
        if str(tenant) not in self.by_tenant:
            self.by_tenant[str(tenant)] = [
                {"at": self.since + i * MINUTE, "inbound": 0, "sent": 0, "failed": 0, "p95_ms": None}
                for i in range(self.minutes)
            ]
        return self.by_tenant[str(tenant)][index]

    def add(self, field: str, rows: Rows) -> None:
        for tenant, minute, count in rows:
            if (p := self.point(tenant, minute)) is not None:
                p[field] += int(count)

    def latency(self, rows: Rows) -> None:
        for tenant, minute, seconds in rows:
            if (p := self.point(tenant, minute)) is not None:
                p["p95_ms"] = round(float(seconds) * 1000, 1)


def points(since: float, minutes: int, counts: Mapping[str, Rows], p95: Rows) -> dict[str, list[dict[str, Any]]]:
    """Per tenant seen in any series, `minutes` points from `since`, oldest first, zeros filled in.

    `counts` maps each `_COUNTS` series to its (tenant, minute, count) rows; `refused` and
    `undelivered` add up to `failed`. `p95` gives (tenant, minute, seconds) rows."""
    series = _Series(since, minutes)
    for name, rows in counts.items():
        series.add("failed" if name in ("refused", "undelivered") else name, rows)
    series.latency(p95)
    return series.by_tenant


async def read(fetch: Fetch, since: float, minutes: int) -> dict[str, list[dict[str, Any]]]:
    """`Queries.activity` with the reader's `fetch` (WAL lets it run beside the writer)."""
    until = since + minutes * MINUTE
    counts = {name: await fetch(sql, (since, until)) for name, sql in _COUNTS.items()}
    return points(since, minutes, counts, await fetch(_P95, (since, until)))
