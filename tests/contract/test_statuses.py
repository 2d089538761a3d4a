"""Status contract: a delivery status only moves its own tenant's row forward.

Meta: Webhooks > messages > statuses ("sent", "delivered", "read", "failed"; "played" for voice
messages), developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components#statuses-object —
webhooks are not ordered, so a late "delivered" after "read" must change nothing.
"""

from __future__ import annotations

from typing import Any

from alfred_bot.store import Store
from tests import payloads
from tests.contract.conftest import FakeClock
from tests.contract.helpers import BIZ_PNID, sent_row, statuses


def _status(wamid: str, state: str, ts: int, **extra: Any) -> dict[str, Any]:
    return payloads.status(wamid, state, timestamp=str(ts), **extra)


async def _show(store: Store, outbox_id: str) -> tuple[Any, ...]:
    row = await store.message(outbox_id) or {}
    return row["state"], row["delivered_at"], row["read_at"]


async def test_statuses_move_a_row_forward_never_back(engine_store: Store, clock: FakeClock) -> None:
    await sent_row(engine_store, "o1", "wamid.O1", clock.now)
    await engine_store.ingest(statuses(_status("wamid.O1", "read", 200)))
    assert await _show(engine_store, "o1") == ("read", 200, 200)  # read implies delivered
    await engine_store.ingest(statuses(_status("wamid.O1", "delivered", 150)))
    await engine_store.ingest(statuses(_status("wamid.O1", "sent", 100)))
    assert await _show(engine_store, "o1") == ("read", 200, 200)


async def test_delivered_then_read_stamps_each(engine_store: Store, clock: FakeClock) -> None:
    await sent_row(engine_store, "o1", "wamid.O1", clock.now)
    await engine_store.ingest(statuses(_status("wamid.O1", "delivered", 150)))
    assert await _show(engine_store, "o1") == ("delivered", 150, None)
    await engine_store.ingest(statuses(_status("wamid.O1", "read", 200)))
    assert await _show(engine_store, "o1") == ("read", 150, 200)


async def test_played_applies_to_audio_only(engine_store: Store, clock: FakeClock) -> None:
    await sent_row(engine_store, "text", "wamid.T", clock.now)
    await sent_row(engine_store, "voice", "wamid.V", clock.now, kind="audio")
    await engine_store.ingest(statuses(_status("wamid.T", "played", 300), _status("wamid.V", "played", 300)))
    assert (await _show(engine_store, "text"))[0] == "sent"
    assert (await _show(engine_store, "voice"))[0] == "played"


async def test_failed_fails_a_row_not_yet_delivered(engine_store: Store, clock: FakeClock) -> None:
    error = [{"code": 131047, "title": "Re-engagement message", "error_data": {"details": "24 hours"}}]
    await sent_row(engine_store, "o1", "wamid.O1", clock.now)
    await engine_store.ingest(statuses(_status("wamid.O1", "failed", 120, errors=error)))
    row = await engine_store.message("o1") or {}
    assert (row["state"], row["error_code"], bool(row["needs_template"])) == ("failed", 131047, True)
    assert [d["id"] for d in await engine_store.dead_letters(10)] == ["o1"]


async def test_failed_after_delivered_is_ignored(engine_store: Store, clock: FakeClock) -> None:
    await sent_row(engine_store, "o1", "wamid.O1", clock.now)
    await engine_store.ingest(statuses(_status("wamid.O1", "delivered", 110)))
    await engine_store.ingest(statuses(_status("wamid.O1", "failed", 120, errors=[{"code": 131026}])))
    assert (await engine_store.message("o1") or {})["state"] == "delivered"


async def test_a_status_before_our_send_is_settled_applies_then(engine_store: Store, clock: FakeClock) -> None:
    """Meta can answer the webhook before our own HTTP answer is recorded."""
    await engine_store.ingest(statuses(_status("wamid.EARLY", "delivered", 110)))
    await sent_row(engine_store, "o1", "wamid.EARLY", clock.now)
    assert await _show(engine_store, "o1") == ("delivered", 110, None)


async def test_a_status_only_touches_its_own_tenants_row(engine_store: Store, clock: FakeClock) -> None:
    await sent_row(engine_store, "home", "wamid.SAME", clock.now)
    await sent_row(engine_store, "biz", "wamid.SAME", clock.now, tenant="biz")
    await engine_store.ingest(statuses(_status("wamid.SAME", "read", 200), pnid=BIZ_PNID))
    assert (await _show(engine_store, "home"))[0] == "sent"
    assert (await _show(engine_store, "biz"))[0] == "read"
    # and a status replayed at send time is scoped the same way
    await engine_store.ingest(statuses(_status("wamid.LATE", "read", 200), pnid=BIZ_PNID))
    await sent_row(engine_store, "home2", "wamid.LATE", clock.now)
    assert (await _show(engine_store, "home2"))[0] == "sent"


async def test_delivery_counts_sent_delivered_and_read_per_tenant(engine_store: Store, clock: FakeClock) -> None:
    await sent_row(engine_store, "a", "wamid.A", clock.now)
    clock.advance(100)
    await sent_row(engine_store, "b", "wamid.B", clock.now)
    await sent_row(engine_store, "c", "wamid.C", clock.now)
    await engine_store.ingest(statuses(_status("wamid.B", "delivered", 1), _status("wamid.C", "read", 2)))
    assert await engine_store.delivery(clock.now - 10) == {"home": {"sent": 2, "delivered": 2, "read": 1}}
