"""Validate Cloud API message objects before they are queued, and pass everything else through.

Only what Meta documents is checked (each limit below cites its page; base
`developers.facebook.com/documentation/business-messaging/whatsapp/`). A refused message raises
`InvalidMessage` naming the field (`interactive.action.buttons[1].reply.title`), so the API answers
422 and nothing is queued: Meta would refuse it anyway, after spending an attempt and a slot of the
number's throughput. Anything the reference does not describe — a message type, an interactive
type, a top-level field Meta adds next month — passes through **unchanged**, and Meta's own answer
(recorded on the outbox row) decides. Alfred invents no limits of its own.
"""

from __future__ import annotations

import math
import re
from typing import Any

MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
TYPES = MEDIA_TYPES | {"text", "template", "location", "contacts", "interactive", "reaction"}
CAPTIONED = frozenset({"image", "video", "document"})
#: Alfred's own fields of an API send: never sent to Meta.
ALFRED_FIELDS = ("tenant", "idempotency_key")
#: `recipient_type` values of the Send API (reference §5, [M-send]); absent means individual.
RECIPIENT_TYPES = frozenset({"individual", "group"})

_PHONE = re.compile(r"\+?[1-9][0-9]{5,14}")  # E.164: a country code never starts with 0
# BSUID: ISO country code + "." + up to 128 alphanumerics; a parent BSUID has an "ENT." segment
# (reference §4.6; Meta: calling/business-initiated-calls, `recipient` "BSUID or parent BSUID").
_BSUID = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{1,128}")


class InvalidMessage(ValueError):
    """A message the Cloud API would refuse; `field` is the JSON path of the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidMessage(path, "must be an object")
    return value


def _text(
    obj: dict[str, Any], key: str, path: str, *, high: int | None = None, low: int = 1, required: bool = True
) -> str | None:
    """A string field; `high` only where Meta documents a maximum (characters, not bytes)."""
    value = obj.get(key)
    where = f"{path}.{key}" if path else key
    if value is None:
        if required:
            raise InvalidMessage(where, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidMessage(where, "must be a string")
    if len(value) < low:
        raise InvalidMessage(where, "must not be empty")
    if high is not None and len(value) > high:
        raise InvalidMessage(where, f"must be {low}–{high} characters (got {len(value)})")
    return value


def normalize_recipient(value: Any) -> str:
    """E.164 with '+' for phone numbers (Meta prefixes the business's own country code otherwise,
    reference §5 [M-send]), or a business-scoped user id (`US.1234…`) as given."""
    if not isinstance(value, str):
        raise InvalidMessage("to", "must be a string")
    if _BSUID.fullmatch(value):
        return value
    compact = re.sub(r"[\s\-().]", "", value)  # Meta accepts these separators [M-send]
    if compact.startswith("00"):  # the international dialling prefix written instead of '+'
        compact = "+" + compact[2:]
    if not _PHONE.fullmatch(compact):
        raise InvalidMessage("to", "must be a phone number in international format (e.g. +15551234567) or a user id")
    return "+" + compact.lstrip("+")


# ---------------------------------------------------------------------------- message objects


def _text_message(obj: dict[str, Any], path: str) -> None:
    _text(obj, "body", path, high=4096)  # [M-textsend] messages/text-messages: body ≤ 4096
    if "preview_url" in obj and not isinstance(obj["preview_url"], bool):
        raise InvalidMessage(f"{path}.preview_url", "must be true or false")


def _media(kind: str, obj: dict[str, Any], path: str) -> None:
    """messages/image-messages (and audio, video, document, sticker): `id` if uploaded, `link` if
    hosted, "otherwise omit"; caption ≤ 1024 for image/video/document, none on audio or sticker."""
    has_id, has_link = obj.get("id") is not None, obj.get("link") is not None
    if has_id == has_link:
        raise InvalidMessage(path, "needs exactly one of `id` (uploaded media) or `link`")
    _text(obj, "id" if has_id else "link", path)
    if kind in CAPTIONED:
        _text(obj, "caption", path, high=1024, required=False)
    elif kind in MEDIA_TYPES and "caption" in obj:
        raise InvalidMessage(f"{path}.caption", f"{kind} messages take no caption")
    if kind == "document":
        _text(obj, "filename", path, required=False)  # messages/document-messages: no documented maximum


def _template(obj: dict[str, Any], path: str) -> None:
    """messages/template-messages: `name` and `language.code` required; components are passed on."""
    _text(obj, "name", path)
    language = _obj(obj.get("language"), f"{path}.language")
    _text(language, "code", f"{path}.language")
    components = obj.get("components", [])
    if not isinstance(components, list):
        raise InvalidMessage(f"{path}.components", "must be a list")
    for i, comp in enumerate(components):
        where = f"{path}.components[{i}]"
        _text(_obj(comp, where), "type", where)
        if "parameters" in comp and not isinstance(comp["parameters"], list):
            raise InvalidMessage(f"{where}.parameters", "must be a list")


def _degrees(value: Any) -> float | None:
    """A number, or a numeric string: Meta's own example sends coordinates as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _location(obj: dict[str, Any], path: str) -> None:
    """messages/location-messages: latitude and longitude required, "in decimal degrees" (so within
    ±90 / ±180), documented as strings (`"37.44216251868683"`); name and address optional."""
    for key, bound in (("latitude", 90), ("longitude", 180)):
        value = _degrees(obj.get(key))
        if value is None or not math.isfinite(value) or not -bound <= value <= bound:
            raise InvalidMessage(f"{path}.{key}", f"must be a number (or numeric string) between -{bound} and {bound}")
    _text(obj, "name", path, required=False, low=0)
    _text(obj, "address", path, required=False, low=0)


def _contacts(value: Any, path: str) -> None:
    """messages/contacts-messages: a list of cards, each with `name.formatted_name` (required)."""
    if not isinstance(value, list) or not value:
        raise InvalidMessage(path, "must be a non-empty list of contacts")
    for i, card in enumerate(value):
        where = f"{path}[{i}]"
        name = _obj(_obj(card, where).get("name"), f"{where}.name")
        _text(name, "formatted_name", f"{where}.name")


def _reaction(obj: dict[str, Any], path: str) -> None:
    """messages/reaction-messages: the message id, and an emoji ("" removes the reaction)."""
    _text(obj, "message_id", path)
    _text(obj, "emoji", path, low=0)


# ---------------------------------------------------------------------------- interactive


def _buttons(action: dict[str, Any], path: str) -> None:
    """messages/interactive-reply-buttons-messages: up to 3 buttons, id ≤ 256, label ≤ 20, unique."""
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
    """messages/interactive-list-messages: button ≤ 20; ≤ 10 sections, title ≤ 24 (required when
    more than one); ≤ 10 rows in all, id ≤ 200, title ≤ 24, description ≤ 72."""
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


def _cta_url(action: dict[str, Any], path: str) -> None:
    """messages/interactive-cta-url-messages: button label ≤ 20 and a URL (no documented maximum)."""
    if action.get("name") != "cta_url":
        raise InvalidMessage(f"{path}.name", 'must be "cta_url"')
    params = _obj(action.get("parameters"), f"{path}.parameters")
    _text(params, "display_text", f"{path}.parameters", high=20)
    _text(params, "url", f"{path}.parameters")


def _carousel(action: dict[str, Any], path: str) -> None:
    """messages/interactive-media-carousel-messages: "between 2 and 10 cards"; each card is passed on."""
    cards = action.get("cards")
    if not isinstance(cards, list) or not 2 <= len(cards) <= 10:
        raise InvalidMessage(f"{path}.cards", "must be a list of 2–10 cards")
    for i, card in enumerate(cards):
        _obj(card, f"{path}.cards[{i}]")


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


#: Interactive types whose limits Meta documents: body maximum and the check of their `action`.
_FRAMED = {
    "button": (1024, _buttons),  # interactive-reply-buttons-messages: body ≤ 1024
    "list": (4096, _sections),  # interactive-list-messages: body ≤ 4096
    "cta_url": (1024, _cta_url),  # interactive-cta-url-messages: body ≤ 1024
    "carousel": (1024, _carousel),  # interactive-media-carousel-messages: body required, ≤ 1024
}
#: Documented interactive types Alfred checks only for their `action` object; any other type
#: (`voice_call`, `call_permission_request`, `request_contact_info`, one Meta adds later) passes as given.
OTHER_INTERACTIVE = frozenset(
    {"flow", "product", "product_list", "catalog_message", "location_request_message", "address_message"}
)


def _interactive(obj: dict[str, Any], path: str) -> None:
    kind = _text(obj, "type", path)
    if kind in OTHER_INTERACTIVE:
        _obj(obj.get("action"), f"{path}.action")
        return
    framed = _FRAMED.get(kind or "")
    if framed is None:
        return  # a type Meta documents elsewhere or adds later: Meta decides
    body_max, check_action = framed
    _text(_obj(obj.get("body"), f"{path}.body"), "text", f"{path}.body", high=body_max)
    if kind != "carousel":  # a carousel's header and footer are refused by Meta, not by us
        if "footer" in obj:  # footer ≤ 60 (buttons, list and CTA URL pages)
            _text(_obj(obj["footer"], f"{path}.footer"), "text", f"{path}.footer", high=60)
        if "header" in obj:
            _header(obj["header"], f"{path}.header", text_only=kind == "list")
    check_action(_obj(obj.get("action"), f"{path}.action"), f"{path}.action")


_CHECKS = {
    "text": _text_message,
    "template": _template,
    "location": _location,
    "interactive": _interactive,
    "reaction": _reaction,
}


def validate_content(kind: str, content: Any) -> None:
    """Check one message object of type `kind` (the value under the key named like the type).

    A type the reference does not describe is not checked: Meta's answer decides."""
    if kind not in TYPES:
        return
    if kind == "contacts":
        _contacts(content, kind)
        return
    obj = _obj(content, kind)
    if kind in MEDIA_TYPES:
        _media(kind, obj, kind)
    else:
        _CHECKS[kind](obj, kind)


# ---------------------------------------------------------------------------- the send body


def _recipient_type(obj: dict[str, Any]) -> str:
    value = obj.get("recipient_type", "individual")
    if not isinstance(value, str) or value not in RECIPIENT_TYPES:
        raise InvalidMessage("recipient_type", 'must be "individual" or "group"')
    return str(value)


def _address(obj: dict[str, Any], payload: dict[str, Any], recipient_type: str) -> None:
    """Who the send goes to. An individual by phone number or BSUID in `to`, and/or by BSUID in
    `recipient` (Meta: "`to` required unless `recipient` is provided… if you include both, `to`
    takes precedence", calling/business-initiated-calls and calling/call-button-messages-deep-links);
    a group by its id in `to` (groups/: recipient_type "group")."""
    to, recipient = obj.get("to"), obj.get("recipient")
    if to is None and (recipient is None or recipient_type == "group"):
        raise InvalidMessage("to", "is required")
    if to is not None:
        if recipient_type == "group":
            _text(obj, "to", "")
        else:
            payload["to"] = normalize_recipient(to)
    if recipient is not None:
        _text(obj, "recipient", "")


def _envelope(obj: dict[str, Any]) -> None:
    """Top-level fields the reference documents; any other one is passed through as given."""
    if obj.get("messaging_product", "whatsapp") != "whatsapp":
        raise InvalidMessage("messaging_product", 'must be "whatsapp"')
    if "context" in obj:
        _text(_obj(obj["context"], "context"), "message_id", "context")
    # messages reference: "an arbitrary 512B string" (also calling docs: "Maximum 512 characters")
    _text(obj, "biz_opaque_callback_data", "", high=512, required=False)
    # business-phone-numbers/phone-numbers (identity change check): the hash the user must still have
    _text(obj, "recipient_identity_key_hash", "", required=False)


def validate_send(body: Any) -> dict[str, Any]:
    """Validate an API send body; return the Cloud API payload: the body as given, without
    Alfred's own fields, with `messaging_product` filled in and a phone number in `to` written
    as `+` and digits (the same number, in the one format Meta cannot misread)."""
    obj = _obj(body, "(body)")
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidMessage("type", "is required")
    recipient_type = _recipient_type(obj)
    _envelope(obj)
    payload: dict[str, Any] = {"messaging_product": "whatsapp"}
    payload.update((k, v) for k, v in obj.items() if k not in ALFRED_FIELDS)
    _address(obj, payload, recipient_type)
    if kind in TYPES:
        validate_content(kind, obj.get(kind))
    return payload


def addressee(payload: dict[str, Any]) -> str:
    """The id a validated payload addresses (outbox `recipient`: pair limits, history, window,
    opt-out): `to` wins over `recipient`, as at Meta; a phone number without its '+'."""
    to = payload.get("to")
    if isinstance(to, str) and to:
        return to.removeprefix("+") if payload.get("recipient_type", "individual") == "individual" else to
    return str(payload.get("recipient", ""))


def is_group(payload: dict[str, Any]) -> bool:
    return payload.get("recipient_type") == "group"
