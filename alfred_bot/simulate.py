"""Webhook bodies as Meta sends them, for `python main.py simulate`, tests and benchmarks.

Bodies are serialised like Meta's (ASCII with escaped unicode), because the signature covers
the exact bytes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

KINDS = (
    "text",
    "image",
    "audio",
    "video",
    "document",
    "sticker",
    "location",
    "contacts",
    "interactive",
    "button",
    "reaction",
    "status",
)


def envelope(phone_number_id: str, value: dict[str, Any]) -> bytes:
    """Wrap one `messages` change value in Meta's envelope."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": phone_number_id, "phone_number_id": phone_number_id},
        **value,
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "0", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(body, ensure_ascii=True).encode()


def text_webhook(phone_number_id: str, sender: str, name: str, text: str, wamid: str) -> bytes:
    """A text-message webhook as Meta sends it (escaped-unicode JSON)."""
    return message_webhook(phone_number_id, sender, name, wamid, "text", {"body": text})


def message_webhook(  # noqa: PLR0917 (mirrors the fields of Meta's message)
    phone_number_id: str, sender: str, name: str, wamid: str, kind: str, content: Any
) -> bytes:
    """A webhook carrying one inbound message of type `kind` with its object `content`."""
    message = {"from": sender, "id": wamid, "timestamp": str(int(time.time())), "type": kind, kind: content}
    contacts = [{"profile": {"name": name}, "wa_id": sender}]
    return envelope(phone_number_id, {"contacts": contacts, "messages": [message]})


def status_webhook(phone_number_id: str, recipient: str, wamid: str, state: str) -> bytes:
    """A delivery status of a message we sent."""
    status: dict[str, Any] = {
        "id": wamid,
        "status": state,
        "timestamp": str(int(time.time())),
        "recipient_id": recipient,
    }
    if state == "failed":
        status["errors"] = [{"code": 131026, "title": "Message undeliverable"}]
    return envelope(phone_number_id, {"statuses": [status]})


def content_for(kind: str, *, text: str, reply_id: str, payload: str, emoji: str, message_id: str) -> Any:
    """A plausible message object of `kind`, using the given texts and ids (a list for contacts)."""
    media = {"id": f"media-{uuid.uuid4().hex[:12]}", "sha256": "0" * 64}
    caption = {"caption": text} if text else {}
    objects: dict[str, Any] = {
        "text": {"body": text or "hello"},
        "image": {**media, "mime_type": "image/jpeg", **caption},
        "video": {**media, "mime_type": "video/mp4", **caption},
        "audio": {**media, "mime_type": "audio/ogg; codecs=opus", "voice": True},
        "document": {**media, "mime_type": "application/pdf", "filename": "file.pdf", **caption},
        "sticker": {**media, "mime_type": "image/webp", "animated": False},
        "location": {"latitude": 51.5074, "longitude": -0.1278, "name": text or "London"},
        "contacts": [{"name": {"formatted_name": text or "Ada Lovelace"}, "phones": []}],
        "interactive": {"type": "button_reply", "button_reply": {"id": reply_id, "title": text or reply_id}},
        "button": {"payload": payload, "text": text or payload},
        "reaction": {"message_id": message_id, "emoji": emoji},
    }
    return objects[kind]


def simulated_body(
    kind: str,
    *,
    phone_number_id: str,
    sender: str,
    name: str,
    wamid: str,
    text: str = "",
    reply_id: str = "menu",
    payload: str = "yes",
    emoji: str = "👍",
    message_id: str = "",
    state: str = "delivered",
) -> bytes:
    """The webhook `python main.py simulate --type KIND` posts."""
    if kind == "status":
        return status_webhook(phone_number_id, sender, message_id or wamid, state)
    content = content_for(kind, text=text, reply_id=reply_id, payload=payload, emoji=emoji, message_id=message_id)
    return message_webhook(phone_number_id, sender, name, wamid, kind, content)
