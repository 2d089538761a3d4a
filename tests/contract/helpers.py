"""Builders for the contract tests: webhook bodies (via tests.payloads, as Meta nests them) and rows."""

from __future__ import annotations

from typing import Any

from alfred_bot.parse import ParsedBody, parse_body
from alfred_bot.store import Completion, OutboxJob, OutboxRow, Settlement, Store
from tests import payloads

PNID, BIZ_PNID, USER = payloads.PNID, payloads.BIZ_PNID, payloads.USER
BSUID = "US.13491208655302741918"  # the same person's business-scoped user id (Meta, 2026)
TENANTS = {PNID: "home", BIZ_PNID: "biz"}


def body(*msgs: dict[str, Any], pnid: str = PNID, contacts: list[dict[str, Any]] | None = None) -> ParsedBody:
    value = payloads.value(list(msgs), pnid=pnid, contacts=contacts)
    return parse_body(payloads.dump(payloads.envelope(payloads.entry(payloads.change(value)))), TENANTS)


def text(wamid: str, words: str = "hi", *, sender: str = USER, ts: int | None = None) -> dict[str, Any]:
    msg = payloads.text(words, id=wamid, sender=sender)
    if ts is not None:
        msg["timestamp"] = str(ts)
    return msg


def statuses(*items: dict[str, Any], pnid: str = PNID) -> ParsedBody:
    value = payloads.value(statuses=list(items), pnid=pnid)
    return parse_body(payloads.dump(payloads.envelope(payloads.entry(payloads.change(value)))), TENANTS)


def event(field: str, value: dict[str, Any], *, time: int | None = None, waba: str = "WABA1") -> ParsedBody:
    entry = payloads.entry(payloads.change(value, field), waba=waba)
    if time is not None:
        entry["time"] = time
    return parse_body(payloads.dump(payloads.envelope(entry)), TENANTS)


def row(
    outbox_id: str,
    *,
    tenant: str = "home",
    to: str = USER,
    kind: str = "text",
    priority: int = 0,
    key: str | None = None,
    source: str | None = None,
    words: str = "hello",
) -> OutboxRow:
    payload = payloads.dump({"messaging_product": "whatsapp", "to": f"+{to}", "type": kind, kind: {"body": words}})
    return OutboxRow(
        id=outbox_id,
        idem_key=key or f"test:{outbox_id}",
        tenant=tenant,
        recipient=to,
        type=kind,
        payload=payload,
        source_event_id=source,
        priority=priority,
    )


async def state(store: Store, outbox_id: str) -> str | None:
    found = await store.message(outbox_id)
    return None if found is None else str(found["state"])


async def claim_all(store: Store, now: float, *, tenant: str = "home", lease: float = 30.0) -> list[OutboxJob]:
    return await store.claim(now, {tenant: 100}, lease, frozenset())


async def send(store: Store, job: OutboxJob, now: float, wamid: str) -> None:
    await store.settle(Settlement(id=job.id, state="sent", attempts=job.attempts, wamid=wamid), now)


async def sent_row(
    store: Store, outbox_id: str, wamid: str, now: float, *, kind: str = "text", tenant: str = "home"
) -> None:
    """Queue, claim and settle one send as `sent` with `wamid` (as the sender would)."""
    await store.enqueue([row(outbox_id, kind=kind, tenant=tenant)])
    [job] = [j for j in await claim_all(store, now, tenant=tenant) if j.id == outbox_id]
    await send(store, job, now, wamid)


async def handled(store: Store, wamid: str, *replies: OutboxRow, **kw: Any) -> bool:
    return await store.complete(Completion(wamid, "handled", tuple(replies), phone_number_id=PNID, **kw))
