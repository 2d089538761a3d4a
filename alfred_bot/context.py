"""The handler's view of one inbound message, and how it replies.

Replies are validated when the handler asks for them (a bad reply raises before anything is
queued) and buffered here; the dispatcher commits them with the message's completion.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from alfred_bot.models import Contact, Message
from alfred_bot.store import OutboxRow
from alfred_bot.validate import InvalidMessage, validate_content

MAX_TEXT = 4096


ReplyError = InvalidMessage  # a reply the Cloud API would refuse; raised before anything is queued


def new_outbox_id() -> str:
    """Time-ordered, unique id for an outbox row (ms timestamp + 64 random bits)."""
    return f"{int(time.time() * 1000):012x}{os.urandom(8).hex()}"


class Context:
    """What a handler knows about the message it answers, and its `reply` methods."""

    def __init__(self, *, tenant: str, phone_number_id: str, message: Message, contact: Contact | None) -> None:
        self.tenant = tenant
        self.phone_number_id = phone_number_id
        self.message = message
        self.contact = contact
        self.replies: list[OutboxRow] = []

    @property
    def user_name(self) -> str | None:
        """The sender's WhatsApp profile name, if Meta sent one."""
        return self.contact.name if self.contact else None

    @property
    def recipient(self) -> str:
        """Who replies go to: the sender's phone number (wa_id digits), else their user id."""
        return self.message.sender

    @property
    def to(self) -> str:
        """The `to` of a reply: `+` and the digits (without it Meta prefixes our own country code)."""
        sender = self.message.sender
        return f"+{sender}" if sender.isdigit() else sender

    def mark_read(self, *, typing: bool = True) -> str:
        """Queue a read receipt for this message, with a typing indicator (one call, up to 25 s)."""
        payload: dict[str, Any] = {"messaging_product": "whatsapp", "status": "read", "message_id": self.message.id}
        if typing:
            payload["typing_indicator"] = {"type": "text"}
        return self._queue("read", payload)

    def reply(self, text: str, *, quote: bool = False, preview_url: bool = False) -> str:
        """Queue a text reply (1–4096 characters); `quote` shows it as a reply to the message."""
        if not isinstance(text, str) or not text.strip():
            raise ReplyError("text.body", "must be a non-empty string")
        body: dict[str, Any] = {"body": text}
        if preview_url:
            body["preview_url"] = True
        return self.send("text", body, quote=quote)

    def send(self, kind: str, content: dict[str, Any], *, quote: bool = False) -> str:
        """Queue any Cloud API message object of type `kind` (e.g. "image", {"id": ...})."""
        validate_content(kind, content)
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": self.to,
            "type": kind,
            kind: content,
        }
        if quote:
            payload["context"] = {"message_id": self.message.id}
        return self._queue(kind, payload)

    def _queue(self, kind: str, payload: dict[str, Any]) -> str:
        row = OutboxRow(
            id=new_outbox_id(),
            idem_key=f"reply:{self.message.id}:{len(self.replies):03d}",
            tenant=self.tenant,
            recipient=self.recipient,
            type=kind,
            payload=msgspec.json.encode(payload),
            source_event_id=self.message.id,
        )
        self.replies.append(row)
        return row.id
