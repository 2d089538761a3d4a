"""The status page's campaigns panel: the campaigns still under way, with progress and rates.

Read from the campaigns feature of the store (`store.campaigns.summaries()`, on every engine, so
any node shows every node's campaigns); a store without that feature simply shows none. The
counts of a summary are exclusive, by each send's current state (`queued` waiting, `sent` accepted
but not yet delivered, `delivered` not yet read, `read`, `failed`, `skipped` never queued
(opted out), `cancelled`), so:

- progress = everything no longer waiting, of all recipients: (total - queued) / total;
- delivery rate = (delivered + read) / attempted, read rate = read / attempted, where attempted =
  sent + delivered + read + failed (the sends that went to Meta; skipped and cancelled never did).

The open view keeps counts, states and times; the campaign's name, id and template (an
operator's words about the business) need the API token, like every other name on the page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: States of a campaign that is not over (see the campaigns API).
UNDER_WAY = ("running", "paused", "scheduled", "loading")
SHOWN = 20
COUNTS = ("queued", "sent", "delivered", "read", "failed", "skipped", "cancelled")
OPEN_KEYS = (
    "tenant", "state", "created_at", "send_at", "total", "done", "progress", "counts",
    "delivered_ratio", "read_ratio",
)  # fmt: skip


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 3) if whole > 0 else None


def panel_row(summary: Mapping[str, Any], detailed: bool) -> dict[str, Any]:
    """One campaign's line on the page, from its summary (read defensively: a missing count is 0)."""
    raw = summary.get("counts")
    counts = {k: _int(raw.get(k)) for k in COUNTS} if isinstance(raw, Mapping) else dict.fromkeys(COUNTS, 0)
    total = _int(summary.get("total")) or sum(counts.values())
    done = max(0, total - counts["queued"])
    attempted = counts["sent"] + counts["delivered"] + counts["read"] + counts["failed"]
    row: dict[str, Any] = {
        "tenant": summary.get("tenant"),
        "state": summary.get("state"),
        "created_at": summary.get("created_at"),
        "send_at": summary.get("send_at"),
        "total": total,
        "done": done,
        "progress": _ratio(done, total),
        "counts": counts,
        "delivered_ratio": _ratio(counts["delivered"] + counts["read"], attempted),
        "read_ratio": _ratio(counts["read"], attempted),
    }
    if not detailed:
        return {k: row[k] for k in OPEN_KEYS}
    template = summary.get("template")
    return {
        **row,
        "id": summary.get("id"),
        "name": summary.get("name"),
        "template": template.get("name") if isinstance(template, Mapping) else None,
        "failures_by_code": dict(summary.get("failures_by_code") or {}),
    }


async def under_way(store: Any, detailed: bool) -> list[dict[str, Any]]:
    """The newest campaigns not yet over, at most `SHOWN` (none when the store has no campaigns)."""
    campaigns = getattr(store, "campaigns", None)
    if campaigns is None:
        return []
    summaries = await campaigns.summaries()
    rows = [s for s in summaries if isinstance(s, Mapping) and s.get("state") in UNDER_WAY]
    return [panel_row(s, detailed) for s in rows[:SHOWN]]
