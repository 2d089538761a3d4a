"""Turn a verified webhook body into typed items, isolating every malformed part.

Only a broken envelope (not JSON, not an object, `entry` missing or not a list) fails the whole
request; that is a 400 because Meta will never send it. Below the envelope each entry, change,
message, status and error is decoded on its own: a bad one is counted and logged (without its
content: it may hold personal data) and its siblings are kept.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from alfred_bot.models import (
    KNOWN_TYPES,
    NO_RAW,
    Change,
    Contact,
    Context,
    Entry,
    Envelope,
    Int64,
    KnownMessage,
    Message,
    MessagesValue,
    Metadata,
    Status,
    UnknownMessage,
    WireError,
    lenient_errors,
)

log = logging.getLogger("alfred.parse")

_envelope = msgspec.json.Decoder(Envelope)
_entry = msgspec.json.Decoder(Entry, strict=False)
_change = msgspec.json.Decoder(Change)
_value = msgspec.json.Decoder(MessagesValue, strict=False)
_message = msgspec.json.Decoder(KnownMessage, strict=False)
_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_items = msgspec.json.Decoder(list[msgspec.Raw])
_metadata = msgspec.json.Decoder(Metadata, strict=False)
_context = msgspec.json.Decoder(Context, strict=False)
_int64 = msgspec.json.Decoder(Int64, strict=False)
_str = msgspec.json.Decoder(str)
_contact = msgspec.json.Decoder(Contact, strict=False)
_wire_error = msgspec.json.Decoder(WireError, strict=False)
_status = msgspec.json.Decoder(Status, strict=False)

_NO_ID = "message without a usable `id` (missing, empty or not a string)"

#: What a failed decode of one part raises: a wrong shape, or nesting deeper than msgspec follows.
_BAD = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)


class EnvelopeError(ValueError):
    """The body is not a webhook envelope at all (answered with 400)."""


class MalformedItem(ValueError):
    """One item could not be decoded; it is skipped, its siblings are kept."""


class InboundItem(msgspec.Struct, frozen=True):
    """A user's message, routed to a tenant (None: no tenant owns the phone number id).

    `parse_error` is set when the message has an id but could not be read as its type (or has no
    sender): `message` is then an `UnknownMessage` keeping what did decode, and `raw` keeps it all.
    `errors` are Meta's own: those of the message, then those of the change value that carried it.
    """

    phone_number_id: str
    tenant: str | None
    message: Message
    contact: Contact | None
    raw: bytes
    trace_id: str = ""  # of the webhook that carried it: follows the message to its replies
    received_at: float = 0.0  # when our webhook received it (for end-to-end latency)
    errors: tuple[WireError, ...] = ()
    parse_error: str | None = None

    @property
    def key(self) -> str:
        """Dedupe key: a message id is unique per business phone number, not across them."""
        return f"{self.phone_number_id}:{self.message.id}"


class StatusItem(msgspec.Struct, frozen=True):
    """A delivery status update; its dedupe key is the phone number id, message id and state."""

    phone_number_id: str
    tenant: str | None
    status: Status
    raw: bytes

    @property
    def key(self) -> str:
        return f"{self.phone_number_id}:{self.status.id}:{self.status.status}"

    @property
    def recipient(self) -> str | None:
        """Who the message went to: the phone number, else (username-only users) the user id."""
        return self.status.recipient_id or self.status.recipient_user_id


class EventItem(msgspec.Struct, frozen=True):
    """Anything else: another webhook field (template status, quality, …) or a `value.errors` item."""

    field: str
    phone_number_id: str | None
    tenant: str | None
    waba_id: str | None
    raw: bytes
    time: int | None = None  # the entry's `time` (Unix seconds), when Meta sent a usable one

    @property
    def key(self) -> str:
        """Identical redeliveries share a key; the same value at another `time` (APPROVED → PAUSED →
        APPROVED) is another event and is kept."""
        time = "" if self.time is None else str(self.time)
        scope = f"{self.field}\0{self.waba_id or ''}\0{self.phone_number_id or ''}\0{time}\0".encode()
        digest = hashlib.sha256(scope + self.raw)
        return digest.hexdigest()


class RejectedItem(msgspec.Struct, frozen=True):
    """A malformed item, kept raw with the reason (a quarantine an operator can inspect)."""

    what: str
    reason: str
    raw: bytes

    @property
    def key(self) -> str:
        return hashlib.sha256(self.what.encode() + b"\0" + self.raw).hexdigest()


class ParsedBody(msgspec.Struct):
    """Everything one POST carried, including the malformed items it skipped."""

    messages: list[InboundItem] = msgspec.field(default_factory=list)
    statuses: list[StatusItem] = msgspec.field(default_factory=list)
    events: list[EventItem] = msgspec.field(default_factory=list)
    rejected: list[RejectedItem] = msgspec.field(default_factory=list)
    trace_id: str = ""
    received_at: float = 0.0

    @property
    def skipped(self) -> int:
        return len(self.rejected)

    def __len__(self) -> int:
        return len(self.messages) + len(self.statuses) + len(self.events) + len(self.rejected)


# ---------------------------------------------------------------------------- one message


def read_message(raw: bytes | msgspec.Raw, *, user_id: str | None = None) -> tuple[Message, str | None]:
    """Decode one message and say what was wrong with it (None: nothing).

    Only a message without a usable `id` raises `MalformedItem`. A known type that fails to
    decode, or a message without a sender, comes back as an `UnknownMessage` (type as given, or
    "unknown") with the reason. `user_id` (the lone contact's, see `parse_body`) is the sender of a
    message that has neither `from` nor `from_user_id` (username-only users).
    """
    problem: str | None = None
    try:
        message: Message = _message.decode(raw)
    except _BAD as exc:
        message, problem = _salvage(raw, exc)
    if not message.id:
        raise MalformedItem(_NO_ID)
    if not message.sender and user_id:
        message = msgspec.structs.replace(message, from_user_id=user_id)
    if message.sender and problem is None:
        return message, None
    problem = problem or "message has neither `from` nor `from_user_id`"
    kept = message if isinstance(message, UnknownMessage) else _salvage(raw, None)[0]
    return msgspec.structs.replace(kept, parse_error=problem), problem


def decode_message(raw: bytes | msgspec.Raw, *, user_id: str | None = None) -> Message:
    """`read_message` without the reason (what a restart reads back from the stored raw JSON)."""
    return read_message(raw, user_id=user_id)[0]


def _salvage(raw: bytes | msgspec.Raw, exc: BaseException | None) -> tuple[UnknownMessage, str | None]:
    """Keep what decodes of a message the typed decode refused; raise only without a usable id."""
    try:
        fields = _fields.decode(raw)
    except _BAD:
        raise MalformedItem("message is not a JSON object") from None
    message_id = _string(fields.get("id"))
    if not message_id:
        raise MalformedItem(_NO_ID)
    kind = _string(fields.get("type"))
    message = UnknownMessage(
        id=message_id,
        type=kind or "unknown",
        from_=_string(fields.get("from")),
        from_user_id=_string(fields.get("from_user_id")),
        timestamp=_decoded(_int64, fields.get("timestamp")) or 0,
        context=_decoded(_context, fields.get("context")),
        raw=bytes(raw),
        errors_raw=fields.get("errors", NO_RAW),
    )
    if exc is None:
        return message, None
    if kind is None or kind in KNOWN_TYPES:
        return message, f"{kind or 'message'}: {_reason(exc)}"
    return message, _head_problem(fields)


def _head_problem(fields: Mapping[str, msgspec.Raw]) -> str | None:
    """What is wrong with the common fields of a message of a type we do not know (None: nothing)."""
    if _decoded(_int64, fields.get("timestamp")) is None:
        return "message without a valid `timestamp` (read as 0)"
    for name in ("from", "from_user_id"):
        if name in fields and _string(fields[name]) is None and bytes(fields[name]) != b"null":
            return f"`{name}` is not a string"
    if "context" in fields and _decoded(_context, fields["context"]) is None and bytes(fields["context"]) != b"null":
        return "`context` could not be decoded"
    return None


def _reason(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:300]


def _string(raw: msgspec.Raw | None) -> str | None:
    value = _decoded(_str, raw)
    return value if isinstance(value, str) else None


def _decoded(decoder: msgspec.json.Decoder[Any], raw: msgspec.Raw | None) -> Any:
    """`raw` decoded, or None when absent or of the wrong shape."""
    if not raw:
        return None
    try:
        return decoder.decode(raw)
    except _BAD:
        return None


def entry_time(raw: msgspec.Raw | None) -> int | None:
    """`entry.time`: Meta sends an integer; a numeric string is read too, anything else is None."""
    value = _decoded(_int64, raw)
    return value if isinstance(value, int) else None


def _waba_id(raw: msgspec.Raw | None) -> str | None:
    """`entry.id` (the WABA id): a string; a number is taken as its digits."""
    text = _string(raw)
    if text is not None:
        return text
    number = _decoded(_int64, raw)
    return str(number) if isinstance(number, int) else None


# ---------------------------------------------------------------------------- the body


def _decode_envelope(body: bytes) -> Envelope:
    try:
        body.decode("utf-8")  # msgspec checks UTF-8 only in what it decodes, not inside Raw parts
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"body is not valid UTF-8 JSON (byte {exc.start})") from None
    try:
        return _envelope.decode(body)
    except msgspec.ValidationError as exc:
        raise EnvelopeError(f"not a webhook envelope: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EnvelopeError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise EnvelopeError("body is nested too deeply") from None


class _Scope(msgspec.Struct, frozen=True):
    """Where a change came from: its entry (WABA id, time) and the tenants to route to."""

    waba_id: str | None
    time: int | None
    tenants: Mapping[str, str]
    wabas: Mapping[str, str]


def parse_body(
    body: bytes,
    tenants: Mapping[str, str],
    *,
    trace_id: str = "",
    received_at: float = 0.0,
    wabas: Mapping[str, str] | None = None,
) -> ParsedBody:
    """Decode a whole webhook body. `tenants` maps phone_number_id to tenant name; `wabas` maps a
    WhatsApp Business Account id to its tenant, for account-level fields that name no number."""
    envelope = _decode_envelope(body)
    out = ParsedBody(trace_id=trace_id, received_at=received_at)
    for raw_entry in envelope.entry:
        try:
            entry = _entry.decode(raw_entry)
        except _BAD as exc:
            _skip(out, "entry", exc, bytes(raw_entry))
            continue
        scope = _Scope(_waba_id(entry.id), entry_time(entry.time), tenants, wabas or {})
        for raw_change in entry.changes or ():
            try:
                _parse_change(raw_change, scope, out)
            except (*_BAD, MalformedItem) as exc:
                _skip(out, "change", exc, bytes(raw_change))
    return out


def _skip(out: ParsedBody, what: str, exc: BaseException, raw: bytes) -> None:
    """Count and keep a malformed item: stored in quarantine, never dispatched, never lost."""
    reason = _reason(exc)
    out.rejected.append(RejectedItem(what, reason, raw))
    log.warning("skipped a malformed %s: %s", what, reason)


def _parse_change(raw: msgspec.Raw, scope: _Scope, out: ParsedBody) -> None:
    change = _change.decode(raw)
    if change.field != "messages":
        pnid = _phone_number_id_of(change.value)
        tenant = scope.tenants.get(pnid) if pnid else scope.wabas.get(scope.waba_id or "")
        out.events.append(EventItem(change.field, pnid, tenant, scope.waba_id, bytes(change.value), scope.time))
        return
    value = _value.decode(change.value)
    pnid = _metadata_pnid(value.metadata)
    tenant = scope.tenants.get(pnid)
    contacts = _contacts(_list(value.contacts, "contacts", out), out)
    value_errors = _list(value.errors, "errors", out)
    attached = tuple(lenient_errors(value.errors) or ()) if value_errors else ()
    before = len(out.messages)
    where = _Where(pnid, tenant, attached)
    for raw_message in _list(value.messages, "messages", out):
        _add_message(raw_message, where, contacts, out)
    for raw_status in _list(value.statuses, "statuses", out):
        try:
            out.statuses.append(StatusItem(pnid, tenant, _status.decode(raw_status), bytes(raw_status)))
        except _BAD as exc:
            _skip(out, "status", exc, bytes(raw_status))
    for raw_error in value_errors:
        if len(out.messages) == before or _decoded(_wire_error, raw_error) is None:  # else carried by the messages
            out.events.append(EventItem("errors", pnid, tenant, scope.waba_id, bytes(raw_error), scope.time))


def _metadata_pnid(raw: msgspec.Raw | None) -> str:
    """The business phone number id; "" when Meta's metadata is missing or broken (the messages
    are still kept, owned by no tenant, rather than lost with the change)."""
    metadata = _decoded(_metadata, raw)
    if metadata is None:
        log.warning("a messages change without a usable metadata.phone_number_id: kept, owned by no tenant")
        return ""
    pnid: str = metadata.phone_number_id
    return pnid


def _list(raw: msgspec.Raw | None, what: str, out: ParsedBody) -> list[msgspec.Raw]:
    """The items of one list of a messages value; a part that is not a list is quarantined whole."""
    if not raw or bytes(raw) == b"null":
        return []
    try:
        return _items.decode(raw)
    except _BAD as exc:
        _skip(out, what, exc, bytes(raw))
        return []


class _PhoneOnly(msgspec.Struct):
    metadata: dict[str, object] | None = None


_phone_only = msgspec.json.Decoder(_PhoneOnly)


def _phone_number_id_of(value: msgspec.Raw) -> str | None:
    """Other fields may carry metadata.phone_number_id too; None when they do not."""
    try:
        meta = _phone_only.decode(value).metadata or {}
    except _BAD:
        return None
    pnid = meta.get("phone_number_id")
    return pnid if isinstance(pnid, str) else None


def _contacts(raws: Sequence[msgspec.Raw], out: ParsedBody) -> list[Contact]:
    contacts: list[Contact] = []
    for raw in raws:
        try:
            contacts.append(_contact.decode(raw))
        except _BAD as exc:
            _skip(out, "contact", exc, bytes(raw))
    return contacts


def _contact_for(message: Message, contacts: list[Contact]) -> Contact | None:
    """Match the sender to `value.contacts[]` by wa_id or user_id; a lone contact is the sender
    unless its ids contradict the message's (then it describes someone else)."""
    for contact in contacts:
        if (message.from_ and contact.wa_id == message.from_) or (
            message.from_user_id and contact.user_id == message.from_user_id
        ):
            return contact
    if len(contacts) != 1:
        return None
    lone = contacts[0]
    contradicts = (message.from_ and lone.wa_id and lone.wa_id != message.from_) or (
        message.from_user_id and lone.user_id and lone.user_id != message.from_user_id
    )
    return None if contradicts else lone


def _lone_user_id(contacts: list[Contact]) -> str | None:
    return contacts[0].user_id if len(contacts) == 1 else None


class _Where(NamedTuple):
    """The messages value a message came in: phone number id, tenant and the value's own errors."""

    pnid: str
    tenant: str | None
    errors: tuple[WireError, ...]


def _add_message(raw: msgspec.Raw, where: _Where, contacts: list[Contact], out: ParsedBody) -> None:
    try:
        message, problem = read_message(raw, user_id=_lone_user_id(contacts))
    except MalformedItem as exc:
        _skip(out, "message", exc, bytes(raw))
        return
    if problem is not None:
        log.warning("kept message %s with a parse error: %s", message.id, problem)
    errors = (*(message.errors or ()), *where.errors)
    contact = _contact_for(message, contacts)
    out.messages.append(
        InboundItem(
            where.pnid, where.tenant, message, contact, bytes(raw), out.trace_id, out.received_at, errors, problem
        )
    )
