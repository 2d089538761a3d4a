"""Tests for `alfred_bot.validate`: send bodies in, Cloud API payloads out, every refusal naming its field.

Limits and shapes follow /work/shared/reference/meta-cloud-api.md §5 and the Meta pages cited in
`alfred_bot/validate.py`; anything Meta does not document passes through unchanged. Pure unit tests:
no server, no store (tests/test_send_shapes.py sends the same shapes through the real app).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from alfred_bot.validate import (
    InvalidMessage,
    addressee,
    is_group,
    normalize_recipient,
    validate_content,
    validate_send,
)

TO = "+15551234567"
WAMID = "wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"


# --- builders -------------------------------------------------------------------------------------


def send(kind: str, content: Any, **extra: Any) -> dict[str, Any]:
    """An API send body: recipient, type and the object under the key named like the type."""
    return {"to": TO, "type": kind, kind: content, **extra}


def text() -> dict[str, Any]:
    return {"body": "Hello there", "preview_url": False}


def template() -> dict[str, Any]:
    return {
        "name": "order_update",
        "language": {"code": "en_US"},
        "components": [
            {"type": "header", "parameters": [{"type": "image", "image": {"link": "https://example.com/a.png"}}]},
            {"type": "body", "parameters": [{"type": "text", "text": "Ada"}, {"type": "text", "text": "#42"}]},
            {"type": "button", "sub_type": "quick_reply", "index": "0", "parameters": [{"type": "payload"}]},
        ],
    }


def image_by_link() -> dict[str, Any]:
    return {"link": "https://example.com/cat.jpg", "caption": "A cat"}


def video() -> dict[str, Any]:
    return {"id": "1234567890", "caption": "A clip"}


def document() -> dict[str, Any]:
    return {"link": "https://example.com/invoice.pdf", "filename": "invoice.pdf", "caption": "Your invoice"}


def location() -> dict[str, Any]:
    return {"latitude": 48.8584, "longitude": 2.2945, "name": "Eiffel Tower", "address": "Paris"}


def contacts() -> list[dict[str, Any]]:
    return [
        {
            "name": {"formatted_name": "Ada Lovelace", "first_name": "Ada"},
            "phones": [{"phone": "+441234567890", "type": "CELL"}],
        }
    ]


def buttons() -> dict[str, Any]:
    return {
        "type": "button",
        "header": {"type": "text", "text": "Question"},
        "body": {"text": "Shall we?"},
        "footer": {"text": "Pick one"},
        "action": {
            "buttons": [
                {"type": "reply", "reply": {"id": "yes", "title": "Yes"}},
                {"type": "reply", "reply": {"id": "no", "title": "No"}},
                {"type": "reply", "reply": {"id": "maybe", "title": "Maybe"}},
            ]
        },
    }


def list_message() -> dict[str, Any]:
    return {
        "type": "list",
        "header": {"type": "text", "text": "Menu"},
        "body": {"text": "What would you like?"},
        "footer": {"text": "Served daily"},
        "action": {
            "button": "See menu",
            "sections": [
                {
                    "title": "Drinks",
                    "rows": [
                        {"id": "tea", "title": "Tea", "description": "Hot"},
                        {"id": "coffee", "title": "Coffee", "description": "Strong"},
                        {"id": "juice", "title": "Juice", "description": "Fresh"},
                    ],
                },
                {"title": "Food", "rows": [{"id": "cake", "title": "Cake"}, {"id": "bread", "title": "Bread"}]},
            ],
        },
    }


def cta_url() -> dict[str, Any]:
    return {
        "type": "cta_url",
        "body": {"text": "Track your order"},
        "footer": {"text": "Thanks"},
        "action": {"name": "cta_url", "parameters": {"display_text": "Track", "url": "https://example.com/t?o=42"}},
    }


def card(index: int) -> dict[str, Any]:
    """One card of a media carousel (Meta: messages/interactive-media-carousel-messages)."""
    return {
        "card_index": index,
        "type": "cta_url",
        "header": {"type": "image", "image": {"link": f"https://example.com/plant{index}.png"}},
        "body": {"text": f"Plant {index}"},
        "action": {"name": "cta_url", "parameters": {"display_text": "Buy", "url": f"https://example.com/p/{index}"}},
    }


def carousel(count: int = 3) -> dict[str, Any]:
    return {
        "type": "carousel",
        "body": {"text": "Our latest arrivals"},
        "action": {"cards": [card(i) for i in range(count)]},
    }


def rows(count: int, prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "title": f"{prefix} {i}"} for i in range(count)]


def with_sections(*row_counts: int) -> dict[str, Any]:
    msg = list_message()
    msg["action"]["sections"] = [{"title": f"S{i}", "rows": rows(n, f"s{i}r")} for i, n in enumerate(row_counts)]
    return msg


def with_buttons(count: int) -> dict[str, Any]:
    msg = buttons()
    msg["action"]["buttons"] = [{"type": "reply", "reply": {"id": f"b{i}", "title": f"B{i}"}} for i in range(count)]
    return msg


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def put(root: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set the value at a JSON path like `interactive.action.buttons[1].reply.title` (in place)."""
    steps: list[Any] = [int(index) if index else key for key, index in _STEP.findall(path)]
    target: Any = root
    for step in steps[:-1]:
        target = target[step]
    target[steps[-1]] = value
    return root


def drop(root: dict[str, Any], path: str) -> dict[str, Any]:
    """Delete the key at a JSON path (in place)."""
    steps: list[Any] = [int(index) if index else key for key, index in _STEP.findall(path)]
    target: Any = root
    for step in steps[:-1]:
        target = target[step]
    del target[steps[-1]]
    return root


def refused(body: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        validate_send(body)
    return info.value


# --- valid bodies of every type -------------------------------------------------------------------

VALID: list[tuple[str, Callable[[], Any]]] = [
    ("text", text),
    ("template", template),
    ("image", lambda: {"id": "1234567890"}),
    ("image", image_by_link),
    ("audio", lambda: {"id": "998877"}),
    ("audio", lambda: {"link": "http://example.com/voice.ogg"}),
    ("video", video),
    ("document", document),
    ("sticker", lambda: {"link": "https://example.com/s.webp"}),
    ("location", location),
    ("contacts", contacts),
    ("interactive", buttons),
    ("interactive", list_message),
    ("interactive", cta_url),
    ("reaction", lambda: {"message_id": WAMID, "emoji": "\U0001f44d"}),
    ("reaction", lambda: {"message_id": WAMID, "emoji": ""}),
]
VALID_IDS = [
    "text",
    "template",
    "image-id",
    "image-link-caption",
    "audio-id",
    "audio-link",
    "video",
    "document-filename",
    "sticker",
    "location",
    "contacts",
    "interactive-button",
    "interactive-list",
    "interactive-cta_url",
    "reaction",
    "reaction-removal",
]


@pytest.mark.parametrize(("kind", "build"), VALID, ids=VALID_IDS)
def test_valid_body_becomes_cloud_api_payload(kind: str, build: Callable[[], Any]) -> None:
    content = build()
    pristine = copy.deepcopy(content)
    body = send(kind, content, tenant="acme", idempotency_key="order-42-confirmation")

    payload = validate_send(body)

    assert payload == {"messaging_product": "whatsapp", "to": TO, "type": kind, kind: pristine}
    assert content == pristine  # the object is passed through unchanged
    assert "tenant" not in payload
    assert "idempotency_key" not in payload


@pytest.mark.parametrize(("kind", "build"), VALID, ids=VALID_IDS)
def test_validate_content_accepts_every_valid_object(kind: str, build: Callable[[], Any]) -> None:
    assert validate_content(kind, build()) is None


def test_context_is_carried_into_payload_unchanged() -> None:
    body = send("text", text(), context={"message_id": WAMID}, tenant="acme")
    payload = validate_send(body)
    assert payload["context"] == {"message_id": WAMID}
    assert payload == {"messaging_product": "whatsapp", **{k: v for k, v in body.items() if k != "tenant"}}


def test_no_context_key_when_none_given() -> None:
    assert "context" not in validate_send(send("text", text()))


def test_caller_may_repeat_the_fixed_envelope_fields() -> None:
    body = send("text", text(), messaging_product="whatsapp", recipient_type="individual")
    payload = validate_send(body)
    assert payload["messaging_product"] == "whatsapp"
    assert payload["recipient_type"] == "individual"


def test_biz_opaque_callback_data_is_passed_through() -> None:
    payload = validate_send(send("text", text(), biz_opaque_callback_data="campaign-7"))
    assert payload["biz_opaque_callback_data"] == "campaign-7"


def test_template_without_components_passes() -> None:
    body = send("template", {"name": "hello_world", "language": {"code": "en_US"}})
    assert validate_send(body)["template"] == {"name": "hello_world", "language": {"code": "en_US"}}


def test_list_with_single_untitled_section_passes() -> None:
    msg = list_message()
    msg["action"]["sections"] = [{"rows": rows(3, "r")}]
    validate_send(send("interactive", msg))


@pytest.mark.parametrize(("latitude", "longitude"), [(90, 180), (-90, -180), (0, 0), (-90.0, 179.999999)])
def test_location_at_range_edges_passes(latitude: float, longitude: float) -> None:
    validate_send(send("location", {"latitude": latitude, "longitude": longitude}))


# --- recipients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["+1 (555) 123-4567", "15551234567", "+15551234567", "+1-555-123-4567"])
def test_phone_numbers_normalize_to_e164_with_plus(raw: str) -> None:
    assert normalize_recipient(raw) == "+15551234567"


def test_send_payload_carries_normalized_recipient() -> None:
    body = send("text", text())
    body["to"] = "+1 (555) 123-4567"
    assert validate_send(body)["to"] == "+15551234567"


def test_bsuid_is_kept_as_is() -> None:
    assert normalize_recipient("US.13491208655302741918") == "US.13491208655302741918"
    body = send("text", text())
    body["to"] = "US.13491208655302741918"
    assert validate_send(body)["to"] == "US.13491208655302741918"


GARBAGE = ["", "abc", "+12", 123, 15551234567, None, "++1555", "++15551234567", "+1555123456789012", "1-800-FLOWERS"]


@pytest.mark.parametrize("raw", GARBAGE)
def test_garbage_recipient_is_refused(raw: Any) -> None:
    with pytest.raises(InvalidMessage) as info:
        normalize_recipient(raw)
    assert info.value.field == "to"
    assert str(info.value).startswith("to")


@pytest.mark.parametrize("raw", ["", "abc", "+12", 123, None, "++1555"])
def test_send_with_garbage_recipient_is_refused(raw: Any) -> None:
    body = send("text", text())
    body["to"] = raw
    assert refused(body).field == "to"


def test_send_without_recipient_is_refused() -> None:
    body = send("text", text())
    del body["to"]
    error = refused(body)
    assert error.field == "to"
    assert str(error) == "to: is required"


@pytest.mark.parametrize("raw", ["+0123456789", "0123456789", "+00"])
def test_leading_zero_is_not_a_country_code(raw: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        normalize_recipient(raw)
    assert info.value.field == "to"


def test_international_dialling_prefix_becomes_plus() -> None:
    assert normalize_recipient("0015551234567") == "+15551234567"
    assert normalize_recipient("00 44 20 7946 0958") == "+442079460958"


@pytest.mark.parametrize(
    ("key", "value"), [("messaging_product", "sms"), ("recipient_type", "broadcast"), ("recipient_type", ["group"])]
)
def test_foreign_product_or_recipient_type_is_refused_not_rewritten(key: str, value: str) -> None:
    body = send("text", text())
    body[key] = value
    assert refused(body).field == key


def test_unknown_type_passes_through_with_whatever_it_carries() -> None:
    body = {"to": "+15551234567", "type": "poll", "poll": {"question": "?"}, "text": {"body": "x"}}
    assert validate_send(body) == {"messaging_product": "whatsapp", **body}


# --- limits at the boundary -----------------------------------------------------------------------

# (kind, builder, JSON path of the limited string, the limit in characters)
LIMITS: list[tuple[str, Callable[[], Any], str, int]] = [
    ("text", text, "text.body", 4096),
    ("image", image_by_link, "image.caption", 1024),
    ("video", video, "video.caption", 1024),
    ("document", document, "document.caption", 1024),
    ("interactive", buttons, "interactive.body.text", 1024),
    ("interactive", buttons, "interactive.footer.text", 60),
    ("interactive", buttons, "interactive.action.buttons[0].reply.id", 256),
    ("interactive", buttons, "interactive.action.buttons[1].reply.title", 20),
    ("interactive", buttons, "interactive.action.buttons[2].reply.title", 20),
    ("interactive", list_message, "interactive.body.text", 4096),
    ("interactive", list_message, "interactive.header.text", 60),
    ("interactive", list_message, "interactive.footer.text", 60),
    ("interactive", list_message, "interactive.action.button", 20),
    ("interactive", list_message, "interactive.action.sections[0].title", 24),
    ("interactive", list_message, "interactive.action.sections[1].title", 24),
    ("interactive", list_message, "interactive.action.sections[0].rows[1].id", 200),
    ("interactive", list_message, "interactive.action.sections[1].rows[1].title", 24),
    ("interactive", list_message, "interactive.action.sections[0].rows[2].description", 72),
    ("interactive", list_message, "interactive.action.sections[1].rows[0].description", 72),
    ("interactive", cta_url, "interactive.body.text", 1024),
    ("interactive", cta_url, "interactive.footer.text", 60),
    ("interactive", cta_url, "interactive.action.parameters.display_text", 20),
    ("interactive", carousel, "interactive.body.text", 1024),
]
LIMIT_IDS = [f"{build.__name__}:{path}" for _, build, path, _ in LIMITS]


@pytest.mark.parametrize(("kind", "build", "path", "limit"), LIMITS, ids=LIMIT_IDS)
def test_string_exactly_at_limit_passes(kind: str, build: Callable[[], Any], path: str, limit: int) -> None:
    body = put(send(kind, build()), path, "x" * limit)
    payload = validate_send(body)
    assert payload[kind] == body[kind]


@pytest.mark.parametrize(("kind", "build", "path", "limit"), LIMITS, ids=LIMIT_IDS)
def test_string_one_over_limit_names_its_path(kind: str, build: Callable[[], Any], path: str, limit: int) -> None:
    error = refused(put(send(kind, build()), path, "x" * (limit + 1)))
    assert error.field == path
    assert str(error).startswith(path)


@pytest.mark.parametrize(("kind", "build", "path", "limit"), LIMITS, ids=LIMIT_IDS)
def test_limit_also_holds_through_validate_content(kind: str, build: Callable[[], Any], path: str, limit: int) -> None:
    content = put(send(kind, build()), path, "y" * (limit + 1))[kind]
    with pytest.raises(InvalidMessage) as info:
        validate_content(kind, content)
    assert info.value.field == path


@pytest.mark.parametrize(("kind", "build", "path"), [(k, b, p) for k, b, p, _ in LIMITS], ids=LIMIT_IDS)
def test_empty_required_string_is_refused(kind: str, build: Callable[[], Any], path: str) -> None:
    assert refused(put(send(kind, build()), path, "")).field == path


@pytest.mark.parametrize(("count", "ok"), [(1, True), (3, True), (4, False), (0, False)])
def test_button_count(count: int, ok: bool) -> None:
    body = send("interactive", with_buttons(count))
    if ok:
        validate_send(body)
    else:
        assert refused(body).field == "interactive.action.buttons"


@pytest.mark.parametrize(
    ("row_counts", "ok"),
    [((10,), True), ((5, 5), True), ((1,) * 10, True), ((11,), False), ((6, 5), False), ((1,) * 11, False)],
    ids=["10-in-one", "5+5", "10-sections", "11-in-one", "6+5", "11-sections"],
)
def test_list_row_and_section_counts(row_counts: tuple[int, ...], ok: bool) -> None:
    body = send("interactive", with_sections(*row_counts))
    if ok:
        validate_send(body)
    else:
        assert refused(body).field == "interactive.action.sections"


# --- unicode: characters, not bytes ---------------------------------------------------------------


@pytest.mark.parametrize("char", ["é", "\U0001f600", "中"], ids=["e-acute", "emoji", "cjk"])
def test_text_limit_counts_code_points(char: str) -> None:
    body_text = char * 4096
    assert len(body_text.encode()) > 4096
    validate_send(send("text", {"body": body_text}))
    assert refused(send("text", {"body": char * 4097})).field == "text.body"


def test_button_title_limit_counts_code_points() -> None:
    msg = put(buttons(), "action.buttons[0].reply.title", "\U0001f600" * 20)
    validate_send(send("interactive", msg))
    put(msg, "action.buttons[0].reply.title", "é" * 21)
    assert refused(send("interactive", msg)).field == "interactive.action.buttons[0].reply.title"


def test_row_description_limit_counts_code_points() -> None:
    path = "action.sections[0].rows[0].description"
    validate_send(send("interactive", put(list_message(), path, "ü" * 72)))
    error = refused(send("interactive", put(list_message(), path, "ü" * 73)))
    assert error.field == "interactive." + path


# --- structural errors ----------------------------------------------------------------------------


_DROP = object()


def at(case: str, kind: str, build: Callable[[], Any], path: str, value: Any = _DROP, field: str | None = None) -> Any:
    """A structural case: a valid body with the value at `path` replaced (or dropped); refused at `field`."""
    body = send(kind, build())
    if value is _DROP:
        drop(body, path)
    else:
        put(body, path, value)
    return pytest.param(body, field or path, id=case)


def raw(case: str, body: Any, field: str) -> Any:
    return pytest.param(body, field, id=case)


SECTIONS = "interactive.action.sections"
PARAMS = "interactive.action.parameters"

STRUCTURAL = [
    # the body and its type
    raw("body-list", [send("text", text())], "(body)"),
    raw("body-string", '{"to": "+15551234567"}', "(body)"),
    raw("body-none", None, "(body)"),
    raw("missing-type", {"to": TO, "text": text()}, "type"),
    raw("type-not-string", {"to": TO, "type": 5, "text": text()}, "type"),
    raw("empty-type", {"to": TO, "type": "", "text": text()}, "type"),
    # the type's object missing or of the wrong JSON type
    at("text-missing", "text", text, "text"),
    at("text-is-string", "text", text, "text", "hello"),
    at("text-is-list", "text", text, "text", [text()]),
    at("image-missing", "image", image_by_link, "image"),
    at("image-is-string", "image", image_by_link, "image", "https://example.com/a.jpg"),
    at("template-is-list", "template", template, "template", [template()]),
    at("interactive-is-null", "interactive", buttons, "interactive", None),
    at("location-is-list", "location", location, "location", [48.8, 2.3]),
    at("reaction-is-string", "reaction", lambda: {"message_id": WAMID, "emoji": ""}, "reaction", "\U0001f44d"),
    at("contacts-missing", "contacts", contacts, "contacts"),
    at("contacts-is-object", "contacts", contacts, "contacts", contacts()[0]),
    # text
    at("text-without-body", "text", text, "text.body"),
    at("text-body-not-string", "text", text, "text.body", 42),
    at("preview_url-string", "text", text, "text.preview_url", "true"),
    at("preview_url-int", "text", text, "text.preview_url", 1),
    # media
    at("image-id-and-link", "image", image_by_link, "image.id", "1", field="image"),
    at("image-neither", "image", image_by_link, "image.link", field="image"),
    at("document-neither", "document", document, "document.link", field="document"),
    at("audio-caption", "audio", lambda: {"id": "1"}, "audio.caption", "listen"),
    at("sticker-caption", "sticker", lambda: {"id": "1"}, "sticker.caption", "lol"),
    at("image-link-empty", "image", image_by_link, "image.link", ""),
    at("image-caption-not-string", "image", image_by_link, "image.caption", 7),
    # interactive buttons
    at("button-duplicate-titles", "interactive", buttons, "interactive.action.buttons[2].reply.title", "Yes"),
    raw("button-4", send("interactive", with_buttons(4)), "interactive.action.buttons"),
    raw("button-0", send("interactive", with_buttons(0)), "interactive.action.buttons"),
    at("button-list-missing", "interactive", buttons, "interactive.action.buttons"),
    at("button-type-url", "interactive", buttons, "interactive.action.buttons[1].type", "url"),
    at("button-type-missing", "interactive", buttons, "interactive.action.buttons[0].type"),
    at("button-reply-missing", "interactive", buttons, "interactive.action.buttons[1].reply"),
    at("button-title-missing", "interactive", buttons, "interactive.action.buttons[0].reply.title"),
    at("button-body-missing", "interactive", buttons, "interactive.body"),
    at("button-action-missing", "interactive", buttons, "interactive.action"),
    at("interactive-type-not-string", "interactive", buttons, "interactive.type", 3),
    at("interactive-missing-type", "interactive", buttons, "interactive.type"),
    # interactive list
    raw("list-11-rows-two-sections", send("interactive", with_sections(6, 5)), SECTIONS),
    at(
        "list-two-sections-untitled",
        "interactive",
        list_message,
        SECTIONS,
        [{"rows": rows(2, "a")}, {"rows": rows(2, "b")}],
        field=f"{SECTIONS}[0].title",
    ),
    at("list-second-section-untitled", "interactive", list_message, f"{SECTIONS}[1].title"),
    at("list-no-sections", "interactive", list_message, SECTIONS, []),
    at("list-empty-rows", "interactive", list_message, f"{SECTIONS}[1].rows", []),
    at("list-button-missing", "interactive", list_message, "interactive.action.button"),
    at("list-row-title-missing", "interactive", list_message, f"{SECTIONS}[0].rows[1].title"),
    # interactive cta_url
    at("cta-url-empty", "interactive", cta_url, f"{PARAMS}.url", ""),
    at("cta-url-missing", "interactive", cta_url, f"{PARAMS}.url"),
    at("cta-wrong-action-name", "interactive", cta_url, "interactive.action.name", "url"),
    at("cta-parameters-missing", "interactive", cta_url, PARAMS),
    # location
    at("latitude-91", "location", location, "location.latitude", 91),
    at("latitude-minus-90.5", "location", location, "location.latitude", -90.5),
    at("longitude-minus-181", "location", location, "location.longitude", -181),
    at("longitude-180.1", "location", location, "location.longitude", 180.1),
    at("latitude-bool", "location", location, "location.latitude", True),
    at("longitude-bool", "location", location, "location.longitude", False),
    at("latitude-word", "location", location, "location.latitude", "north"),
    at("longitude-string-out-of-range", "location", location, "location.longitude", "181.5"),
    at("latitude-list", "location", location, "location.latitude", [48.85]),
    at("latitude-nan", "location", location, "location.latitude", float("nan")),
    at("longitude-missing", "location", location, "location.longitude"),
    # contacts
    at("contacts-empty", "contacts", contacts, "contacts", []),
    at("contacts-no-formatted_name", "contacts", contacts, "contacts[0].name.formatted_name"),
    raw(
        "contacts-second-no-formatted_name",
        send("contacts", [*contacts(), {"name": {"last_name": "B"}}]),
        "contacts[1].name.formatted_name",
    ),
    at("contacts-no-name", "contacts", contacts, "contacts[0].name"),
    at("contacts-card-not-object", "contacts", contacts, "contacts[0]", "Ada"),
    # template
    at("template-no-language-code", "template", template, "template.language.code"),
    at("template-no-language", "template", template, "template.language"),
    at("template-language-string", "template", template, "template.language", "en_US"),
    at("template-no-name", "template", template, "template.name"),
    at("template-components-object", "template", template, "template.components", {"type": "body"}),
    at("template-component-not-object", "template", template, "template.components[1]", "body"),
    at("template-parameters-object", "template", template, "template.components[1].parameters", {}),
    # reaction
    at("reaction-no-message_id", "reaction", lambda: {"message_id": WAMID, "emoji": "x"}, "reaction.message_id"),
    at("reaction-no-emoji", "reaction", lambda: {"message_id": WAMID, "emoji": "x"}, "reaction.emoji"),
    # context
    raw("context-without-message_id", send("text", text(), context={}), "context.message_id"),
    raw("context-empty-message_id", send("text", text(), context={"message_id": ""}), "context.message_id"),
    raw("context-not-object", send("text", text(), context=WAMID), "context"),
]


@pytest.mark.parametrize(("body", "field"), STRUCTURAL)
def test_structural_error_names_the_field(body: Any, field: str) -> None:
    error = refused(copy.deepcopy(body))
    assert error.field == field
    assert str(error).startswith(field)


def test_unknown_kind_in_validate_content_is_not_checked() -> None:
    assert validate_content("poll", {"question": "?"}) is None
    assert validate_content("poll", None) is None


def test_refusal_leaves_body_untouched() -> None:
    body = send("interactive", with_buttons(4), tenant="acme")
    pristine = copy.deepcopy(body)
    refused(body)
    assert body == pristine


# --- the error type itself ------------------------------------------------------------------------


def test_invalid_message_is_a_value_error_with_field_first() -> None:
    error = InvalidMessage("interactive.action.buttons[1].reply.title", "button titles must be unique")
    assert isinstance(error, ValueError)
    assert error.field == "interactive.action.buttons[1].reply.title"
    assert str(error) == "interactive.action.buttons[1].reply.title: button titles must be unique"


@pytest.mark.parametrize("kind", ["flow", "product", "product_list", "location_request_message"])
def test_other_interactive_kinds_pass_with_an_action(kind: str) -> None:
    content = {"type": kind, "body": {"text": "x"}, "action": {"name": kind}}
    validate_content("interactive", content)
    with pytest.raises(InvalidMessage) as info:
        validate_content("interactive", {"type": kind, "body": {"text": "x"}})
    assert info.value.field == "interactive.action"


# --- shapes Meta documents (or will add) pass through unchanged -----------------------------------

BSUID = "US.13491208655302741918"
PARENT_BSUID = "US.ENT.11815799212886844830"
GROUP_ID = "Y2FwaV9ncm91cDoxNzA1NTU1MDEzOToxMjAzNjM0MDQ2OTQyMzM4MjAZD"

PASSTHROUGH = [
    # Meta: calling/call-button-messages-deep-links — `recipient` instead of `to`
    pytest.param({"recipient": BSUID, "type": "text", "text": {"body": "hi"}}, id="recipient-only"),
    pytest.param({"recipient": PARENT_BSUID, "type": "text", "text": {"body": "hi"}}, id="parent-bsuid"),
    pytest.param({"to": TO, "recipient": BSUID, "type": "text", "text": {"body": "hi"}}, id="to-and-recipient"),
    pytest.param(
        {"recipient_type": "individual", "to": None, "recipient": BSUID, "type": "text", "text": {"body": "hi"}},
        id="to-null-recipient",
    ),
    # Meta: business-phone-numbers/phone-numbers, identity change check
    pytest.param(send("text", text(), recipient_identity_key_hash="DF2lS5v2W6x="), id="identity-key-hash"),
    # Meta: groups/ (recipient_type group, group id in `to`)
    pytest.param({"recipient_type": "group", "to": GROUP_ID, "type": "text", "text": {"body": "hi"}}, id="group"),
    pytest.param(
        send(
            "interactive",
            {
                "type": "voice_call",
                "body": {"text": "Call us"},
                "action": {"name": "voice_call", "parameters": {"display_text": "Call", "ttl_minutes": 100}},
            },
        ),
        id="voice_call",
    ),
    pytest.param(
        send(
            "interactive",
            {
                "type": "call_permission_request",
                "body": {"text": "May we call you?"},
                "action": {"name": "call_permission_request"},
            },
        ),
        id="call_permission_request",
    ),
    pytest.param(
        {
            "recipient": BSUID,
            "type": "interactive",
            "interactive": {
                "type": "request_contact_info",
                "body": {"text": "Share your number?"},
                "action": {"name": "request_contact_info"},
            },
        },
        id="request_contact_info",
    ),
    pytest.param(send("interactive", carousel(2)), id="carousel-2"),
    pytest.param(send("interactive", carousel(10)), id="carousel-10"),
    pytest.param(send("interactive", {"type": "hologram", "anything": [1, 2]}), id="future-interactive"),
    pytest.param({"to": TO, "type": "hologram", "hologram": {"depth": 3}}, id="future-type"),
    pytest.param({"to": TO, "type": "hologram"}, id="future-type-no-object"),
    pytest.param(send("text", text(), priority_hint="high"), id="future-top-level-field"),
    pytest.param(send("audio", {"id": "1", "voice": True}), id="voice-note-flag"),
]


@pytest.mark.parametrize("body", PASSTHROUGH)
def test_documented_and_future_shapes_pass_unchanged(body: dict[str, Any]) -> None:
    pristine = copy.deepcopy(body)
    payload = validate_send({**body, "tenant": "home", "idempotency_key": "k1"})
    assert payload == {"messaging_product": "whatsapp", **pristine}


@pytest.mark.parametrize("count", [0, 1, 11])
def test_carousel_card_count_is_checked(count: int) -> None:
    # Meta: messages/interactive-media-carousel-messages, "between 2 and 10 cards"
    assert refused(send("interactive", carousel(count))).field == "interactive.action.cards"


def test_carousel_needs_body_text_and_object_cards() -> None:
    msg = carousel()
    del msg["body"]
    assert refused(send("interactive", msg)).field == "interactive.body"
    msg = carousel()
    msg["action"]["cards"][1] = "card"
    assert refused(send("interactive", msg)).field == "interactive.action.cards[1]"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"type": "text", "text": {"body": "hi"}}, "to: is required"),
        ({"recipient_type": "group", "recipient": GROUP_ID, "type": "text", "text": {"body": "hi"}}, "to: is required"),
        ({"recipient": "", "type": "text", "text": {"body": "hi"}}, "recipient: must not be empty"),
        ({"recipient": 42, "type": "text", "text": {"body": "hi"}}, "recipient: must be a string"),
        ({"recipient_type": "group", "to": "", "type": "text", "text": {"body": "hi"}}, "to: must not be empty"),
        (send("text", text(), recipient_identity_key_hash=7), "recipient_identity_key_hash: must be a string"),
    ],
    ids=["nobody", "group-without-to", "empty-recipient", "recipient-not-string", "empty-group-id", "hash-not-string"],
)
def test_addressing_errors_name_their_field(body: dict[str, Any], error: str) -> None:
    refusal = refused(body)
    assert str(refusal) == error
    assert refusal.field == error.split(":", maxsplit=1)[0]


def test_missing_recipient_says_is_required() -> None:
    assert str(refused({"type": "template", "template": template()})) == "to: is required"


def test_addressee_is_the_id_meta_uses() -> None:
    assert addressee(validate_send(send("text", text()))) == TO.lstrip("+")
    assert addressee(validate_send({"recipient": BSUID, "type": "text", "text": text()})) == BSUID
    assert addressee(validate_send({"to": TO, "recipient": BSUID, "type": "text", "text": text()})) == TO[1:]
    group = validate_send({"recipient_type": "group", "to": GROUP_ID, "type": "text", "text": text()})
    assert addressee(group) == GROUP_ID
    assert is_group(group)
    assert not is_group(validate_send(send("text", text())))


def test_parent_bsuid_in_to_is_kept_as_is() -> None:
    assert normalize_recipient(PARENT_BSUID) == PARENT_BSUID


# --- no invented limits ---------------------------------------------------------------------------

# Values past limits Alfred used to enforce without any source in Meta's documentation.
UNSOURCED = [
    pytest.param("document", document, "document.filename", "f" * 300 + ".pdf", id="document-filename-240"),
    pytest.param("image", lambda: {"id": "1"}, "image.id", "9" * 300, id="media-id-256"),
    pytest.param("image", image_by_link, "image.link", "https://example.com/" + "a" * 2100, id="media-link-2000"),
    pytest.param("image", image_by_link, "image.link", "ftp://example.com/a.jpg", id="media-link-scheme"),
    pytest.param("location", location, "location.name", "n" * 1500, id="location-name-1000"),
    pytest.param("location", location, "location.address", "a" * 1500, id="location-address-1000"),
    pytest.param("location", location, "location.name", "", id="location-name-empty"),
    pytest.param("contacts", contacts, "contacts[0].name.formatted_name", "A" * 1500, id="formatted-name-1000"),
    pytest.param("template", template, "template.name", "t" * 600, id="template-name-512"),
    pytest.param("template", template, "template.language.code", "x" * 20, id="language-code-15"),
    pytest.param("template", template, "template.components[0].type", "c" * 30, id="component-type-20"),
    pytest.param(
        "reaction", lambda: {"message_id": WAMID, "emoji": "x"}, "reaction.message_id", "w" * 300, id="reaction-id-256"
    ),
    pytest.param("reaction", lambda: {"message_id": WAMID, "emoji": "x"}, "reaction.emoji", "e" * 20, id="emoji-16"),
    pytest.param(
        "interactive",
        cta_url,
        "interactive.action.parameters.url",
        "https://x.example/" + "q" * 2100,
        id="cta-url-2000",
    ),
    pytest.param("interactive", cta_url, "interactive.action.parameters.url", "tel:+15551234567", id="cta-url-scheme"),
    # Meta: messages/location-messages documents latitude/longitude as strings ("37.44216251868683")
    pytest.param("location", location, "location.latitude", "37.44216251868683", id="latitude-string"),
    pytest.param("location", location, "location.longitude", "-122.16153582049394", id="longitude-string"),
]


@pytest.mark.parametrize(("kind", "build", "path", "value"), UNSOURCED)
def test_no_invented_limit(kind: str, build: Callable[[], Any], path: str, value: Any) -> None:
    body = put(send(kind, build()), path, value)
    assert validate_send(body)[kind] == body[kind]


def test_context_message_id_has_no_invented_length() -> None:
    body = send("text", text(), context={"message_id": "wamid." + "x" * 400})
    assert validate_send(body)["context"] == body["context"]
