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

import msgspec

from alfred_bot.models import (
    KNOWN_TYPES,
    Change,
    Contact,
    Entry,
    Envelope,
    KnownMessage,
    Message,
    MessageHead,
    MessagesValue,
    Status,
    UnknownMessage,
)

log = logging.getLogger("alfred.parse")

_envelope = msgspec.json.Decoder(Envelope)
_entry = msgspec.json.Decoder(Entry, strict=False)
_change = msgspec.json.Decoder(Change)
_value = msgspec.json.Decoder(MessagesValue, strict=False)
_message = msgspec.json.Decoder(KnownMessage, strict=False)
_head = msgspec.json.Decoder(MessageHead, strict=False)
_contact = msgspec.json.Decoder(Contact, strict=False)
_status = msgspec.json.Decoder(Status, strict=False)


class EnvelopeError(ValueError):
    """The body is not a webhook envelope at all (answered with 400)."""


class MalformedItem(ValueError):
    """One item could not be decoded; it is skipped, its siblings are kept."""


class InboundItem(msgspec.Struct, frozen=True):
    """A user's message, routed to a tenant (None: no tenant owns the phone number id)."""

    phone_number_id: str
    tenant: str | None
    message: Message
    contact: Contact | None
    raw: bytes
    trace_id: str = ""  # of the webhook that carried it: follows the message to its replies
    received_at: float = 0.0  # when our webhook received it (for end-to-end latency)


class StatusItem(msgspec.Struct, frozen=True):
    """A delivery status update; its dedupe key is the message id plus the state."""

    phone_number_id: str
    tenant: str | None
    status: Status
    raw: bytes

    @property
    def key(self) -> str:
        return f"{self.status.id}:{self.status.status}"


class EventItem(msgspec.Struct, frozen=True):
    """Anything else: another webhook field (template status, quality, …) or a `value.errors` item."""

    field: str
    phone_number_id: str | None
    tenant: str | None
    waba_id: str | None
    raw: bytes

    @property
    def key(self) -> str:
        """Identical redeliveries share a key; distinct events practically never do."""
        scope = f"{self.field}\0{self.waba_id or ''}\0{self.phone_number_id or ''}\0".encode()
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


def decode_message(raw: bytes | msgspec.Raw) -> Message:
    """Decode one message; an unknown type becomes `UnknownMessage`, a broken known one raises."""
    try:
        message: Message = _message.decode(raw)
    except msgspec.ValidationError as exc:
        head = _decode_head(raw, exc)
        if head.type in KNOWN_TYPES:
            raise MalformedItem(f"{head.type} message: {exc}") from None
        message = UnknownMessage(
            id=head.id,
            type=head.type,
            from_=head.from_,
            from_user_id=head.from_user_id,
            timestamp=head.timestamp,
            context=head.context,
            raw=bytes(raw),
        )
    if not message.sender:
        raise MalformedItem("message has neither `from` nor `from_user_id`")
    return message


def _decode_head(raw: bytes | msgspec.Raw, first: Exception) -> MessageHead:
    try:
        return _head.decode(raw)
    except msgspec.ValidationError as exc:
        raise MalformedItem(f"message: {exc}") from first


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


def parse_body(body: bytes, tenants: Mapping[str, str], *, trace_id: str = "", received_at: float = 0.0) -> ParsedBody:
    """Decode a whole webhook body. `tenants` maps phone_number_id to tenant name."""
    envelope = _decode_envelope(body)
    out = ParsedBody(trace_id=trace_id, received_at=received_at)
    for raw_entry in envelope.entry:
        try:
            entry = _entry.decode(raw_entry)
        except (msgspec.ValidationError, RecursionError) as exc:
            _skip(out, "entry", exc, bytes(raw_entry))
            continue
        for raw_change in entry.changes or ():
            try:
                _parse_change(raw_change, entry, tenants, out)
            except (msgspec.ValidationError, MalformedItem, RecursionError) as exc:
                _skip(out, "change", exc, bytes(raw_change))
    return out


def _skip(out: ParsedBody, what: str, exc: BaseException, raw: bytes) -> None:
    """Count and keep a malformed item: stored in quarantine, never dispatched, never lost."""
    reason = str(exc) or type(exc).__name__
    out.rejected.append(RejectedItem(what, reason, raw))
    log.warning("skipped a malformed %s: %s", what, reason)


def _parse_change(raw: msgspec.Raw, entry: Entry, tenants: Mapping[str, str], out: ParsedBody) -> None:
    change = _change.decode(raw)
    if change.field != "messages":
        pnid = _phone_number_id_of(change.value)
        tenant = tenants.get(pnid) if pnid else None
        out.events.append(EventItem(change.field, pnid, tenant, entry.id, bytes(change.value)))
        return
    value = _value.decode(change.value)
    if value.metadata is None:
        raise MalformedItem("messages change without metadata.phone_number_id")
    pnid = value.metadata.phone_number_id
    tenant = tenants.get(pnid)
    contacts = _contacts(value.contacts or (), out)
    for raw_message in value.messages or ():
        _add_message(raw_message, pnid, tenant, contacts, out)
    for raw_status in value.statuses or ():
        try:
            out.statuses.append(StatusItem(pnid, tenant, _status.decode(raw_status), bytes(raw_status)))
        except (msgspec.ValidationError, RecursionError) as exc:
            _skip(out, "status", exc, bytes(raw_status))
    for raw_error in value.errors or ():
        out.events.append(EventItem("errors", pnid, tenant, entry.id, bytes(raw_error)))


class _PhoneOnly(msgspec.Struct):
    metadata: dict[str, object] | None = None


_phone_only = msgspec.json.Decoder(_PhoneOnly)


def _phone_number_id_of(value: msgspec.Raw) -> str | None:
    """Other fields may carry metadata.phone_number_id too; None when they do not."""
    try:
        meta = _phone_only.decode(value).metadata or {}
    except msgspec.ValidationError:
        return None
    pnid = meta.get("phone_number_id")
    return pnid if isinstance(pnid, str) else None


def _contacts(raws: Sequence[msgspec.Raw], out: ParsedBody) -> list[Contact]:
    contacts: list[Contact] = []
    for raw in raws:
        try:
            contacts.append(_contact.decode(raw))
        except (msgspec.ValidationError, RecursionError) as exc:
            _skip(out, "contact", exc, bytes(raw))
    return contacts


def _contact_for(message: Message, contacts: list[Contact]) -> Contact | None:
    """Match the sender to `value.contacts[]` by wa_id or user_id; a lone contact is the sender."""
    for contact in contacts:
        if (message.from_ and contact.wa_id == message.from_) or (
            message.from_user_id and contact.user_id == message.from_user_id
        ):
            return contact
    return contacts[0] if len(contacts) == 1 else None


def _add_message(raw: msgspec.Raw, pnid: str, tenant: str | None, contacts: list[Contact], out: ParsedBody) -> None:
    try:
        message = decode_message(raw)
    except (MalformedItem, RecursionError) as exc:
        _skip(out, "message", exc, bytes(raw))
        return
    contact = _contact_for(message, contacts)
    out.messages.append(InboundItem(pnid, tenant, message, contact, bytes(raw), out.trace_id, out.received_at))
