"""Activity contract: the status page's last hour per minute (inbound, sent, failed, p95 reply latency).

Every row gets its moment from the store's clock or the sender's `now`, both driven here by hand:
inbound by the time the webhook was stored, sends by the time Meta accepted them, failures by the
refused Graph call (its audit entry) or the `failed` status webhook, latency from the reply's
`origin_at` (when the user's message arrived) to its `sent_at`.

Meta: Webhooks > messages > statuses ("failed" with `errors`),
developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components#statuses-object
"""

from __future__ import annotations

from typing import Any

import msgspec

from alfred_bot.store import AuditEntry, OutboxRow, Settlement, Store
from tests import payloads
from tests.contract.conftest import START, FakeClock
from tests.contract.helpers import BIZ_PNID, body, row, sent_row, statuses, text

MINUTE = 60.0
EMPTY = {"inbound": 0, "sent": 0, "failed": 0, "p95_ms": None}


def _audit(outcome: str, kind: str = "text") -> AuditEntry:
    return AuditEntry(
        tenant="home", type=kind, recipient="+15•••••4567", http_status=400, error_code=131026,
        fbtrace_id=None, latency_ms=12.0, outcome=outcome,
    )  # fmt: skip


async def _send(store: Store, rows: list[OutboxRow], at: list[float], *, tenant: str = "home") -> None:
    """Queue `rows` (one recipient each) and have Meta accept row i at `at[i]` (its `sent_at`)."""
    await store.enqueue(rows)
    jobs = {j.id: j for j in await store.claim(max(at), {tenant: 1000}, 3600.0, frozenset())}
    for r, when in zip(rows, at, strict=True):
        job = jobs[r.id]
        await store.settle(Settlement(id=job.id, state="sent", attempts=job.attempts, wamid=f"wamid.{r.id}"), when)


async def _refuse(store: Store, outbox_id: str, to: str, when: float, outcome: str, *, kind: str = "text") -> None:
    """One Graph call Meta refused (`outcome`: retry or failed), recorded with its audit entry at `when`."""
    await store.enqueue([row(outbox_id, to=to, kind=kind)])
    [job] = [j for j in await store.claim(when, {"home": 1000}, 3600.0, frozenset()) if j.id == outbox_id]
    state = "failed" if outcome == "failed" else "queued"
    await store.settle(
        Settlement(id=job.id, state=state, attempts=job.attempts, error_code=131026, audit=_audit(outcome, kind)), when
    )


def _reply(outbox_id: str, n: int, origin: float, *, kind: str = "text", **changes: Any) -> OutboxRow:
    """A reply to a user's message that arrived at `origin`, to its own recipient (number `n`)."""
    base = row(outbox_id, to=f"1666{n:07d}", kind=kind, source="wamid.IN")
    return msgspec.structs.replace(base, **{"origin_at": origin, **changes})


def _at(series: list[dict[str, Any]], minute: int) -> dict[str, Any]:
    point = dict(series[minute])
    assert point.pop("at") == START + minute * MINUTE
    return point


async def test_no_traffic_no_series(engine_store: Store) -> None:
    assert await engine_store.activity(START, 60) == {}


async def test_counts_each_minute_per_tenant(engine_store: Store, clock: FakeClock) -> None:
    clock.now = START - 1  # just before the window: not counted
    await engine_store.ingest(body(text("wamid.OLD")))
    clock.now = START  # minute 0: two messages to home, one to biz
    await engine_store.ingest(body(text("wamid.1"), text("wamid.2", sender="15550000002")))
    await engine_store.ingest(body(text("wamid.B1"), pnid=BIZ_PNID))
    clock.now = START + 2 * MINUTE + 59.5  # minute 2, at its very end
    await engine_store.ingest(body(text("wamid.3")))
    # minute 1: three messages accepted by Meta, and a read receipt (not a message: not counted)
    clock.now = START + MINUTE
    sends = [row(f"s{i}", to=f"155500010{i:02d}") for i in range(3)] + [row("r1", to="15550001099", kind="read")]
    await _send(engine_store, sends, [START + MINUTE + i for i in range(4)])
    # minute 3: two refused Graph calls (a retry, a permanent failure), a refused receipt (not
    # counted), and a delivery failure Meta reported for a message sent earlier
    clock.now = START + 3 * MINUTE
    await _refuse(engine_store, "f1", "15550002001", clock.now, "retry")
    await _refuse(engine_store, "f2", "15550002002", clock.now + 1, "failed")
    await _refuse(engine_store, "f3", "15550002003", clock.now + 2, "failed", kind="read")
    error = [{"code": 131026, "title": "Message undeliverable"}]
    failed = payloads.status("wamid.s0", "failed", timestamp=str(int(clock.now)), errors=error)
    await engine_store.ingest(statuses(failed))
    # the end of the window is exclusive
    clock.now = START + 5 * MINUTE
    await engine_store.ingest(body(text("wamid.LATE")))

    series = await engine_store.activity(START, 5)
    assert set(series) == {"home", "biz"}
    home = series["home"]
    assert len(home) == 5
    assert _at(home, 0) == {**EMPTY, "inbound": 2}
    assert _at(home, 1) == {**EMPTY, "sent": 3}
    assert _at(home, 2) == {**EMPTY, "inbound": 1}
    assert _at(home, 3) == {**EMPTY, "failed": 3}
    assert _at(home, 4) == EMPTY
    assert [p["inbound"] for p in series["biz"]] == [1, 0, 0, 0, 0]
    # a later window sees the later message; an earlier one sees the one before the first window
    assert [p["inbound"] for p in (await engine_store.activity(START + 5 * MINUTE, 1))["home"]] == [1]
    assert [p["inbound"] for p in (await engine_store.activity(START - MINUTE, 1))["home"]] == [1]


async def test_p95_reply_latency_per_minute(engine_store: Store, clock: FakeClock) -> None:
    # minute 0: twenty replies, 1..20 s after their messages arrived -> nearest-rank p95 = the 19th
    clock.now = START - 30.0
    replies = [_reply(f"a{i}", i, START + 10.0 - i) for i in range(1, 21)]
    await _send(engine_store, replies, [START + 10.0] * 20)
    # minute 2: one reply 2.5 s after its message; beside it, sends that are not immediate replies:
    # a receipt, an API send (no origin_at), a send scheduled for a moment already past (`send_at`)
    at = clock.now = START + 2 * MINUTE + 5
    others = [
        _reply("b1", 101, at - 2.5),
        _reply("b2", 102, at - 50.0, kind="read"),
        _reply("b3", 103, at, origin_at=None),
        _reply("b4", 104, at - 40.0, send_at=at - 40.0),
    ]
    await _send(engine_store, others, [at] * 4)

    home = (await engine_store.activity(START, 3))["home"]
    assert _at(home, 0) == {**EMPTY, "sent": 20, "p95_ms": 19000.0}
    assert _at(home, 1) == EMPTY  # no reply that minute: no latency, not zero
    assert _at(home, 2) == {**EMPTY, "sent": 3, "p95_ms": 2500.0}  # the receipt is not a send either


async def test_p95_of_one_hundred_is_the_95th(engine_store: Store, clock: FakeClock) -> None:
    clock.now = START
    replies = [_reply(f"c{i:03d}", i, START + 30.0 - i / 10) for i in range(1, 101)]  # 0.1 .. 10.0 s
    await _send(engine_store, replies, [START + 30.0] * 100)
    [point] = (await engine_store.activity(START, 1))["home"]
    assert (point["sent"], point["p95_ms"]) == (100, 9500.0)


async def test_read_only_store_answers_too(engine_store: Store, read_only_store: Store, clock: FakeClock) -> None:
    """`python main.py status` and the other nodes read the same numbers."""
    clock.now = START + 10
    await engine_store.ingest(body(text("wamid.1")))
    await sent_row(engine_store, "o1", "wamid.O1", START + 20)
    [point] = (await read_only_store.activity(START, 1))["home"]
    assert (point["inbound"], point["sent"], point["failed"]) == (1, 1, 0)
