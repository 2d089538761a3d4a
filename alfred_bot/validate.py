"""Validate Cloud API message objects before they are queued (limits from the reference, §5).

A refused message raises `InvalidMessage` naming the field (`interactive.action.buttons[1].reply.title`),
so the API answers 422 and nothing is queued. Meta would refuse these sends with code 100 or 131009
anyway, after spending an attempt and a slot of the number's throughput.
"""

from __future__ import annotations

import re
from typing import Any

MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
TYPES = MEDIA_TYPES | {"text", "template", "location", "contacts", "interactive", "reaction"}
CAPTIONED = frozenset({"image", "video", "document"})
TOP_LEVEL = frozenset(
    {
        "to",
        "type",
        "tenant",
        "idempotency_key",
        "context",
        "messaging_product",
        "recipient_type",
        "biz_opaque_callback_data",
    }
)

_PHONE = re.compile(r"\+?[1-9][0-9]{5,14}")  # E.164: a country code never starts with 0
_BSUID = re.compile(r"[A-Z]{2}\.[A-Za-z0-9]{1,128}")
_URL = re.compile(r"https?://\S+", re.IGNORECASE)


class InvalidMessage(ValueError):
    """A message the Cloud API would refuse; `field` is the JSON path of the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidMessage(path, "must be an object")
    return value


def _text(obj: dict[str, Any], key: str, path: str, *, high: int, low: int = 1, required: bool = True) -> str | None:
    value = obj.get(key)
    where = f"{path}.{key}" if path else key
    if value is None:
        if required:
            raise InvalidMessage(where, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidMessage(where, "must be a string")
    if not low <= len(value) <= high:
        raise InvalidMessage(where, f"must be {low}–{high} characters (got {len(value)})")
    return value


def _url(obj: dict[str, Any], key: str, path: str) -> None:
    value = _text(obj, key, path, high=2000)
    if value is not None and not _URL.fullmatch(value):
        raise InvalidMessage(f"{path}.{key}", "must be an http(s) URL")


def normalize_recipient(value: Any) -> str:
    """E.164 with '+' for phone numbers (Meta prefixes the business's own country code otherwise),
    or a business-scoped user id (`US.1234…`) as given."""
    if not isinstance(value, str):
        raise InvalidMessage("to", "must be a string")
    compact = re.sub(r"[\s\-().]", "", value) if not _BSUID.fullmatch(value) else value
    if _BSUID.fullmatch(compact):
        return compact
    if compact.startswith("00"):  # the international dialling prefix written instead of '+'
        compact = "+" + compact[2:]
    if not _PHONE.fullmatch(compact):
        raise InvalidMessage("to", "must be a phone number in international format (e.g. +15551234567) or a user id")
    return "+" + compact.lstrip("+")


def _text_message(obj: dict[str, Any], path: str) -> None:
    _text(obj, "body", path, high=4096)
    if "preview_url" in obj and not isinstance(obj["preview_url"], bool):
        raise InvalidMessage(f"{path}.preview_url", "must be true or false")


def _media(kind: str, obj: dict[str, Any], path: str) -> None:
    has_id, has_link = obj.get("id") is not None, obj.get("link") is not None
    if has_id == has_link:
        raise InvalidMessage(path, "needs exactly one of `id` (uploaded media) or `link`")
    if has_id:
        _text(obj, "id", path, high=256)
    else:
        _url(obj, "link", path)
    if kind in CAPTIONED:
        _text(obj, "caption", path, high=1024, required=False)
    elif "caption" in obj:
        raise InvalidMessage(f"{path}.caption", f"{kind} messages take no caption")
    if kind == "document":
        _text(obj, "filename", path, high=240, required=False)


def _template(obj: dict[str, Any], path: str) -> None:
    _text(obj, "name", path, high=512)
    language = _obj(obj.get("language"), f"{path}.language")
    _text(language, "code", f"{path}.language", high=15)
    components = obj.get("components", [])
    if not isinstance(components, list):
        raise InvalidMessage(f"{path}.components", "must be a list")
    for i, comp in enumerate(components):
        where = f"{path}.components[{i}]"
        _text(_obj(comp, where), "type", where, high=20)
        if "parameters" in comp and not isinstance(comp["parameters"], list):
            raise InvalidMessage(f"{where}.parameters", "must be a list")


def _location(obj: dict[str, Any], path: str) -> None:
    for key, bound in (("latitude", 90), ("longitude", 180)):
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not -bound <= value <= bound:
            raise InvalidMessage(f"{path}.{key}", f"must be a number between -{bound} and {bound}")
    _text(obj, "name", path, high=1000, required=False)
    _text(obj, "address", path, high=1000, required=False)


def _contacts(value: Any, path: str) -> None:
    if not isinstance(value, list) or not value:
        raise InvalidMessage(path, "must be a non-empty list of contacts")
    for i, card in enumerate(value):
        where = f"{path}[{i}]"
        name = _obj(_obj(card, where).get("name"), f"{where}.name")
        _text(name, "formatted_name", f"{where}.name", high=1000)


def _reaction(obj: dict[str, Any], path: str) -> None:
    _text(obj, "message_id", path, high=256)
    _text(obj, "emoji", path, high=16, low=0)


def _buttons(action: dict[str, Any], path: str) -> None:
    buttons = action.get("buttons")
    if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
        raise InvalidMessage(f"{path}.buttons", "must be a list of 1–3 buttons")
    titles: set[str] = set()
    for i, button in enumerate(buttons):
        where = f"{path}.buttons[{i}]"
        if _obj(button, where).get("type") != "reply":
            raise InvalidMessage(f"{where}.type", 'must be "reply"')
        reply = _obj(button.get("reply"), f"{where}.reply")
        _text(reply, "id", f"{where}.reply", high=256)
        title = _text(reply, "title", f"{where}.reply", high=20)
        if title in titles:
            raise InvalidMessage(f"{where}.reply.title", "button titles must be unique")
        titles.add(title or "")


def _sections(action: dict[str, Any], path: str) -> None:
    _text(action, "button", path, high=20)
    sections = action.get("sections")
    if not isinstance(sections, list) or not 1 <= len(sections) <= 10:
        raise InvalidMessage(f"{path}.sections", "must be a list of 1–10 sections")
    rows = 0
    for i, section in enumerate(sections):
        where = f"{path}.sections[{i}]"
        _text(_obj(section, where), "title", where, high=24, required=len(sections) > 1)
        items = section.get("rows")
        if not isinstance(items, list) or not items:
            raise InvalidMessage(f"{where}.rows", "must be a non-empty list")
        for j, row in enumerate(items):
            at = f"{where}.rows[{j}]"
            _text(_obj(row, at), "id", at, high=200)
            _text(row, "title", at, high=24)
            _text(row, "description", at, high=72, required=False)
        rows += len(items)
    if rows > 10:
        raise InvalidMessage(f"{path}.sections", f"at most 10 rows in all sections (got {rows})")


def _header(value: Any, path: str, *, text_only: bool) -> None:
    """A text header (≤ 60 characters) or, for buttons and CTA URLs, an image/video/document."""
    header = _obj(value, path)
    kind = header.get("type")
    allowed = ("text",) if text_only else ("text", "image", "video", "document")
    if kind not in allowed:
        raise InvalidMessage(f"{path}.type", f"must be one of {', '.join(allowed)}")
    if kind == "text":
        _text(header, "text", path, high=60)
    else:
        media = str(kind)
        _media(media, _obj(header.get(media), f"{path}.{media}"), f"{path}.{media}")


#: Interactive kinds we pass through with only their shape checked (limits not in the reference).
OTHER_INTERACTIVE = frozenset(
    {"flow", "product", "product_list", "catalog_message", "location_request_message", "address_message"}
)


def _interactive(obj: dict[str, Any], path: str) -> None:
    kind = obj.get("type")
    limits = {"button": 1024, "list": 4096, "cta_url": 1024}
    if kind in OTHER_INTERACTIVE:
        _obj(obj.get("action"), f"{path}.action")
        return
    if kind not in limits:
        raise InvalidMessage(f"{path}.type", f"must be one of {', '.join(sorted(limits.keys() | OTHER_INTERACTIVE))}")
    _text(_obj(obj.get("body"), f"{path}.body"), "text", f"{path}.body", high=limits[kind])
    if "footer" in obj:
        _text(_obj(obj["footer"], f"{path}.footer"), "text", f"{path}.footer", high=60)
    if "header" in obj:
        _header(obj["header"], f"{path}.header", text_only=kind == "list")
    action = _obj(obj.get("action"), f"{path}.action")
    if kind == "button":
        _buttons(action, f"{path}.action")
    elif kind == "list":
        _sections(action, f"{path}.action")
    else:
        if action.get("name") != "cta_url":
            raise InvalidMessage(f"{path}.action.name", 'must be "cta_url"')
        params = _obj(action.get("parameters"), f"{path}.action.parameters")
        _text(params, "display_text", f"{path}.action.parameters", high=20)
        _url(params, "url", f"{path}.action.parameters")


def validate_content(kind: str, content: Any) -> None:
    """Check one message object of type `kind` (the value under the key named like the type)."""
    if kind not in TYPES:
        raise InvalidMessage("type", f"must be one of {', '.join(sorted(TYPES))}")
    if kind == "contacts":
        _contacts(content, kind)
        return
    obj = _obj(content, kind)
    if kind in MEDIA_TYPES:
        _media(kind, obj, kind)
        return
    checks = {
        "text": _text_message,
        "template": _template,
        "location": _location,
        "interactive": _interactive,
        "reaction": _reaction,
    }
    checks[kind](obj, kind)


def validate_send(body: Any) -> dict[str, Any]:
    """Validate an API send body; return the Cloud API payload (without our own keys)."""
    obj = _obj(body, "(body)")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise InvalidMessage("type", "is required")
    if kind not in TYPES:
        raise InvalidMessage("type", f"must be one of {', '.join(sorted(TYPES))}")
    for key, only in (("messaging_product", "whatsapp"), ("recipient_type", "individual")):
        if obj.get(key, only) != only:
            raise InvalidMessage(key, f'must be "{only}" (group sends are not supported)')
    extra = set(obj) - TOP_LEVEL - {kind}
    if extra:
        raise InvalidMessage(sorted(extra)[0], "unknown field")
    validate_content(kind, obj.get(kind))
    payload: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": normalize_recipient(obj.get("to")),
        "type": kind,
        kind: obj[kind],
    }
    if "context" in obj:
        _text(_obj(obj["context"], "context"), "message_id", "context", high=256)
        payload["context"] = {"message_id": obj["context"]["message_id"]}
    if "biz_opaque_callback_data" in obj:
        payload["biz_opaque_callback_data"] = _text(obj, "biz_opaque_callback_data", "", high=512)
    return payload
