"""The status page's last hour, minute by minute, from the PostgreSQL store (`Queries.activity`).

The same series and definitions as the SQLite engine (see `alfred_bot.store.sqlite.activity`,
whose `points` builds the answer): inbound by `inbox.received_at`, sent by `outbox.sent_at`,
failed = refused Graph calls (`audit.at`) + `failed` delivery statuses (`statuses.received_at`),
and the nearest-rank p95 of `sent_at - origin_at` over immediate replies, here with
`percentile_disc(0.95)`. Every node writes these rows to the one database, so any node's status
page shows the whole cluster's traffic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from alfred_bot.store.sqlite.activity import MINUTE, points

Fetch = Callable[..., Awaitable[Sequence[Any]]]


def _minute(column: str) -> str:
    return f"floor(({column} - $1) / 60)::int"


_COUNTS = {
    "inbound": (
        f"SELECT tenant, {_minute('received_at')} AS m, COUNT(*) FROM inbox "
        "WHERE received_at >= $1 AND received_at < $2 AND tenant IS NOT NULL GROUP BY 1, 2"
    ),
    "sent": (
        f"SELECT tenant, {_minute('sent_at')} AS m, COUNT(*) FROM outbox "
        "WHERE sent_at >= $1 AND sent_at < $2 AND type <> 'read' GROUP BY 1, 2"
    ),
    "refused": (
        f"SELECT tenant, {_minute('at')} AS m, COUNT(*) FROM audit "
        "WHERE at >= $1 AND at < $2 AND outcome <> 'sent' AND type <> 'read' GROUP BY 1, 2"
    ),
    "undelivered": (
        f"SELECT tenant, {_minute('received_at')} AS m, COUNT(*) FROM statuses "
        "WHERE received_at >= $1 AND received_at < $2 AND status = 'failed' AND tenant IS NOT NULL GROUP BY 1, 2"
    ),
}

_P95 = (
    f"SELECT tenant, {_minute('sent_at')} AS m, "
    "percentile_disc(0.95) WITHIN GROUP (ORDER BY GREATEST(0.0, sent_at - origin_at)) FROM outbox "
    "WHERE sent_at >= $1 AND sent_at < $2 AND origin_at IS NOT NULL AND type <> 'read' AND send_at IS NULL "
    "GROUP BY 1, 2"
)


async def read(fetch: Fetch, since: float, minutes: int) -> dict[str, list[dict[str, Any]]]:
    """Five grouped reads with the pool's `fetch` (each on whichever connection is free)."""
    until = since + minutes * MINUTE
    counts = {name: await fetch(sql, since, until) for name, sql in _COUNTS.items()}
    return points(since, minutes, counts, await fetch(_P95, since, until))
