"""Inbox rows: what `ingest` writes for each message, how a pending row becomes an item again,
and how `/api/inbound` shows one.

Every message with an id is stored, even one that did not decode as its type (`parse_error`):
it is routed like an unknown type. One without any sender cannot be answered, so it is stored
`failed` with the reason and never dispatched. A row is identified by its phone number id AND
its wamid: a wamid is unique per business number, not across numbers (issue 13 item 3).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from alfred_bot.models import Contact, ErrorData, Profile, WireError
from alfred_bot.parse import InboundItem, MalformedItem, decode_message, read_message

INSERT = """
INSERT INTO inbox (event_id, tenant, phone_number_id, sender, user_id, wa_id, name, type,
                   timestamp, text, context_id, raw, state, error, received_at, trace_id, parse_error, errors)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(event_id, phone_number_id) DO NOTHING
"""
NO_SENDER = "message has neither `from` nor `from_user_id`"
#: Types whose row needs its raw JSON decoded for `/api/inbound` (edits, revokes, flow and call
#: permission replies); every other row is shown from its columns alone.
_DETAILED = frozenset({"edit", "revoke", "interactive"})


class _Error(msgspec.Struct, omit_defaults=True):
    """Meta's error as `/api/inbound` shows it and the `errors` column keeps it."""

    code: int
    title: str | None = None
    message: str | None = None
    details: str | None = None


_errors = msgspec.json.Decoder(list[_Error])


def state_of(item: InboundItem) -> tuple[str, str | None]:
    """The first state of a new row and, for a row that can never be handled, why."""
    if item.tenant is None:
        return "unrouted", None
    if not item.message.sender:
        return "failed", item.parse_error or NO_SENDER
    return "pending", None


def _encode_errors(errors: tuple[WireError, ...]) -> bytes | None:
    if not errors:
        return None
    plain = [_Error(e.code, e.title, e.message, e.error_data.details if e.error_data else None) for e in errors]
    return msgspec.json.encode(plain)


def row(item: InboundItem, now: float) -> tuple[Any, ...]:
    msg, contact = item.message, item.contact
    state, error = state_of(item)
    errors = _encode_errors(item.errors)
    return (
        msg.id,
        item.tenant,
        item.phone_number_id,
        msg.from_ or None,  # an empty `from` is no sender (reads, the window and opt-outs match None)
        msg.from_user_id or (contact.user_id if contact else None),
        contact.wa_id if contact else None,
        contact.name if contact else None,
        msg.type,
        msg.timestamp,
        msg.text,
        msg.context.id if msg.context else None,
        item.raw,
        state,
        error,
        now,
        item.trace_id or None,
        item.parse_error,
        errors.decode() if errors is not None else None,
    )


def _decoded_errors(text: str | None) -> list[_Error]:
    if not text:
        return []
    try:
        return _errors.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return []


def pending_item(r: sqlite3.Row) -> InboundItem:
    """The item a pending row holds, as the dispatcher first saw it (after a restart, say)."""
    contact = None
    if r["name"] is not None or r["wa_id"] is not None or r["user_id"] is not None:
        profile = Profile(name=r["name"]) if r["name"] is not None else None
        contact = Contact(profile=profile, wa_id=r["wa_id"], user_id=r["user_id"])
    message, problem = read_message(r["raw"], user_id=r["user_id"])
    errors = tuple(
        WireError(code=e.code, title=e.title, message=e.message, error_data=ErrorData(details=e.details))
        if e.details is not None
        else WireError(code=e.code, title=e.title, message=e.message)
        for e in _decoded_errors(r["errors"])
    )
    return InboundItem(
        r["phone_number_id"],
        r["tenant"],
        message,
        contact,
        r["raw"],
        r["trace_id"] or "",
        r["received_at"],
        errors=errors,
        parse_error=r["parse_error"] or problem,  # a row of an older Alfred has no parse_error column value
    )


PENDING = (
    "SELECT seq, tenant, phone_number_id, raw, name, wa_id, user_id, trace_id, received_at, errors, parse_error "
    "FROM inbox WHERE state = 'pending' AND seq > ? ORDER BY seq LIMIT ?"
)
RECENT = (
    'SELECT event_id AS id, tenant, sender AS "from", user_id, name, type, timestamp, text, context_id, state, '
    "error, received_at, parse_error, errors, raw FROM inbox ORDER BY seq DESC LIMIT ?"
)


def _details(r: sqlite3.Row) -> dict[str, Any]:
    """What only the raw JSON says (edits, revokes, flow and call permission replies); cheap: decoded
    only for the few types that have it, and empty once retention removed the raw JSON."""
    empty: dict[str, Any] = {"edited_id": None, "revoked_id": None, "call_permission": None, "flow_response": None}
    if r["type"] not in _DETAILED or r["parse_error"] is not None or not r["raw"]:
        return empty
    try:
        message = decode_message(r["raw"], user_id=r["user_id"])
    except MalformedItem:
        return empty
    return {
        "edited_id": message.edited_id,
        "revoked_id": message.revoked_id,
        "call_permission": message.call_permission_response,
        "flow_response": message.flow_response,
    }


def recent(r: sqlite3.Row) -> dict[str, Any]:
    """One row of `/api/inbound`."""
    item = dict(r)
    del item["raw"]
    item["errors"] = [msgspec.structs.asdict(e) for e in _decoded_errors(r["errors"])]
    item.update(_details(r))
    return item


def complete(conn: sqlite3.Connection, event_id: str, phone_number_id: str | None, values: tuple[Any, ...]) -> bool:
    """Move a pending row to its final state; False if it was not pending.

    With the phone number id the row is exact. Without it (an old caller) only a wamid that no
    other number used is accepted, so one number's completion can never finish another's row.
    """
    if phone_number_id is not None:
        where, params = "event_id = ? AND phone_number_id = ?", (event_id, phone_number_id)
    else:
        where, params = "event_id = ? AND (SELECT COUNT(*) FROM inbox WHERE event_id = ?) = 1", (event_id, event_id)
    sql = f"UPDATE inbox SET state = ?, error = ?, handled_at = ? WHERE {where} AND state = 'pending'"
    return conn.execute(sql, (*values, *params)).rowcount == 1
