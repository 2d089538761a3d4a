"""Builders for Meta webhook payloads, written from the Cloud API reference (not captured).

`SAMPLES` holds one message of every inbound type; the builders wrap messages, statuses and
other fields into entries/changes exactly as Meta nests them.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from alfred_bot.security import sign

PNID = "123456789012345"
BIZ_PNID = "987654321098765"
USER = "15551234567"
TS = "1760000000"
_ids = itertools.count(1)


def wamid() -> str:
    return f"wamid.TEST{next(_ids):08d}"


def message(
    kind: str, content: Any = None, *, sender: str = USER, id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """One inbound message of type `kind`; `content` goes under the key named like the type."""
    msg: dict[str, Any] = {"from": sender, "id": id or wamid(), "timestamp": TS, "type": kind}
    if content is not None:
        msg[kind] = content
    msg.update(extra)
    return msg


def text(body: str, **kw: Any) -> dict[str, Any]:
    return message("text", {"body": body}, **kw)


SAMPLES: dict[str, dict[str, Any]] = {
    "text": text("hello"),
    "image": message("image", {"caption": "a cat", "mime_type": "image/jpeg", "sha256": "abc", "id": "m1"}),
    "audio": message("audio", {"mime_type": "audio/ogg; codecs=opus", "sha256": "abc", "id": "m2", "voice": True}),
    "video": message("video", {"caption": "clip", "mime_type": "video/mp4", "sha256": "abc", "id": "m3"}),
    "document": message(
        "document",
        {"caption": "bill", "filename": "bill.pdf", "mime_type": "application/pdf", "sha256": "x", "id": "m4"},
    ),
    "sticker": message("sticker", {"mime_type": "image/webp", "sha256": "abc", "id": "m5", "animated": False}),
    "location": message("location", {"latitude": 51.5, "longitude": -0.12, "name": "Home", "address": "1 Road"}),
    "contacts": message(
        "contacts",
        [
            {
                "name": {"formatted_name": "Ana Pérez", "first_name": "Ana"},
                "phones": [{"phone": "+1 555 000", "wa_id": "1555000", "type": "CELL"}],
                "emails": [{"email": "ana@example.com", "type": "WORK"}],
                "org": {"company": "ACME"},
                "birthday": "1990-01-01",
            }
        ],
    ),
    "interactive": message(
        "interactive",
        {"type": "button_reply", "button_reply": {"id": "yes-1", "title": "Yes"}},
        context={"from": "15550001111", "id": "wamid.BIZ1"},
    ),
    "button": message(
        "button",
        {"payload": "STOP_PROMOS", "text": "Stop promotions"},
        context={"from": "15550001111", "id": "wamid.BIZ2"},
    ),
    "reaction": message("reaction", {"message_id": "wamid.BIZ3", "emoji": "👍"}),
    "order": message(
        "order",
        {
            "catalog_id": "cat1",
            "text": "please deliver",
            "product_items": [{"product_retailer_id": "sku1", "quantity": 2, "item_price": 9.5, "currency": "EUR"}],
        },
    ),
    "system": message("system", {"body": "User changed number", "wa_id": "15559990000", "type": "user_changed_number"}),
    "unsupported": message(
        "unsupported",
        errors=[{"code": 131051, "title": "Message type unknown", "error_data": {"details": "poll"}}],
        unsupported={"type": "poll"},
    ),
}


#: Types Meta documents since 2025, kept apart from `SAMPLES` (whose every type other tests expect
#: an echo for): an edit and a revoke (WhatsApp Business app "coexistence" numbers) and the
#: first-open `request_welcome`. Meta: Webhooks > messages > edit / revoke / request_welcome,
#: developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/reference/messages/
SAMPLES_2025: dict[str, dict[str, Any]] = {
    "edit": message(
        "edit",
        {
            "original_message_id": "wamid.ORIGINAL1",
            "message": {"context": {"id": "wamid.CTX1"}, "type": "text", "text": {"body": "fixed typo"}},
        },
    ),
    "revoke": message("revoke", {"original_message_id": "wamid.ORIGINAL2"}),
    "request_welcome": message("request_welcome"),
}


def status(msg_id: str, state: str = "delivered", **extra: Any) -> dict[str, Any]:
    return {"id": msg_id, "status": state, "timestamp": TS, "recipient_id": USER, **extra}


def value(
    messages: list[dict[str, Any]] | None = None,
    *,
    statuses: list[dict[str, Any]] | None = None,
    errors: list[dict[str, Any]] | None = None,
    pnid: str = PNID,
    name: str = "Ana",
    contacts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `value` of a `messages` change, with metadata and a contact for the sender."""
    val: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": pnid},
    }
    if messages is not None:
        val["contacts"] = contacts if contacts is not None else [{"profile": {"name": name}, "wa_id": USER}]
        val["messages"] = messages
    if statuses is not None:
        val["statuses"] = statuses
    if errors is not None:
        val["errors"] = errors
    return val


def change(val: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    return {"field": field, "value": val}


def entry(*changes: dict[str, Any], waba: str = "WABA1") -> dict[str, Any]:
    return {"id": waba, "changes": list(changes)}


def envelope(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": list(entries)}


def body_of(*msgs: dict[str, Any], pnid: str = PNID) -> bytes:
    """A whole POST body carrying `msgs` for one phone number, serialised like Meta (\\u escapes)."""
    return dump(envelope(entry(change(value(list(msgs), pnid=pnid)))))


def dump(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=True).encode()


def headers(body: bytes, secret: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, secret)}


# Meta: Webhooks > messages > interactive; error 131000 "Something went wrong" (Error codes,
# developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes): Meta delivers a message it
# could not process with its type but without the type object, and an `errors` array instead.
INTERACTIVE_WITHOUT_OBJECT: dict[str, Any] = {
    "from": USER,
    "id": "wamid.NOOBJ1",
    "timestamp": TS,
    "type": "interactive",
    "errors": [
        {
            "code": 131000,
            "title": "Something went wrong",
            "message": "Something went wrong",
            "error_data": {"details": "Message failed to send because of an unknown error."},
        }
    ],
}
