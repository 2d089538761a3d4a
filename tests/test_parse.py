"""Tests for `alfred_bot.parse`: webhook bodies in, typed items out, every malformed part isolated.

Payloads follow /work/shared/reference/meta-cloud-api.md §4; most are built with `tests.payloads`.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from alfred_bot.models import (
    KNOWN_TYPES,
    AudioMessage,
    BaseMessage,
    ButtonMessage,
    ContactsMessage,
    DocumentMessage,
    EditMessage,
    ImageMessage,
    InteractiveMessage,
    LegacyUnknownMessage,
    LocationMessage,
    OrderMessage,
    ReactionMessage,
    RequestWelcomeMessage,
    RevokeMessage,
    StickerMessage,
    SystemMessage,
    TextMessage,
    UnknownMessage,
    UnsupportedMessage,
    VideoMessage,
)
from alfred_bot.parse import (
    EnvelopeError,
    EventItem,
    InboundItem,
    MalformedItem,
    ParsedBody,
    decode_message,
    parse_body,
    read_message,
)
from tests import payloads as p

TENANTS = {p.PNID: "home", p.BIZ_PNID: "biz"}
STRANGER_PNID = "555555555555555"
BSUID = "US.13491208655302741918"


# ---------------------------------------------------------------------------- helpers


def parse(data: Any) -> ParsedBody:
    """Serialise `data` like Meta (ASCII with \\u escapes) and parse it with the test tenants."""
    return parse_body(p.dump(data), TENANTS)


def parse_messages(*msgs: Any, **value_kw: Any) -> ParsedBody:
    """Parse one body whose single `messages` change carries `msgs`."""
    return parse(p.envelope(p.entry(p.change(p.value(list(msgs), **value_kw)))))


def only_item(msg: dict[str, Any]) -> InboundItem:
    """Parse a body carrying just `msg`; return its one inbound item."""
    parsed = parse_messages(msg)
    assert parsed.skipped == 0
    assert len(parsed.messages) == 1
    return parsed.messages[0]


def ids(parsed: ParsedBody) -> list[str]:
    return [item.message.id for item in parsed.messages]


def sample(kind: str, **changes: Any) -> dict[str, Any]:
    """A deep copy of `SAMPLES[kind]` with top-level keys replaced."""
    msg: dict[str, Any] = json.loads(json.dumps(p.SAMPLES[kind]))
    msg.update(changes)
    return msg


def legacy_unknown() -> dict[str, Any]:
    """Meta's legacy `unknown` type: same shape as `unsupported`."""
    return sample("unsupported", type="unknown", id=p.wamid())


# ---------------------------------------------------------------------------- every inbound type

EXPECTED_CLASS: dict[str, type[BaseMessage]] = {
    "text": TextMessage,
    "image": ImageMessage,
    "audio": AudioMessage,
    "video": VideoMessage,
    "document": DocumentMessage,
    "sticker": StickerMessage,
    "location": LocationMessage,
    "contacts": ContactsMessage,
    "interactive": InteractiveMessage,
    "button": ButtonMessage,
    "reaction": ReactionMessage,
    "order": OrderMessage,
    "system": SystemMessage,
    "unsupported": UnsupportedMessage,
    "edit": EditMessage,
    "revoke": RevokeMessage,
    "request_welcome": RequestWelcomeMessage,
}

EXPECTED_TEXT: dict[str, str | None] = {
    "text": "hello",
    "image": "a cat",
    "audio": None,
    "video": "clip",
    "document": "bill",
    "sticker": None,
    "location": None,
    "contacts": None,
    "interactive": "Yes",
    "button": "Stop promotions",
    "reaction": None,
    "order": "please deliver",
    "system": "User changed number",
    "unsupported": None,
    "edit": "fixed typo",
    "revoke": None,
    "request_welcome": None,
}
ALL_SAMPLES = {**p.SAMPLES, **p.SAMPLES_2025}


def test_samples_cover_every_known_type() -> None:
    """The sample sets and the expectations here span every known type but the legacy alias."""
    assert set(ALL_SAMPLES) == set(EXPECTED_CLASS) == set(EXPECTED_TEXT) == KNOWN_TYPES - {"unknown"}


@pytest.mark.parametrize("kind", sorted(ALL_SAMPLES))
def test_sample_decodes_to_its_class(kind: str) -> None:
    """Each sample becomes its own class with the right type, sender, int timestamp, text and routing."""
    msg = ALL_SAMPLES[kind]
    item = only_item(msg)
    m = item.message
    assert type(m) is EXPECTED_CLASS[kind]
    assert m.type == kind
    assert m.id == msg["id"]
    assert m.sender == p.USER
    assert m.timestamp == int(p.TS)
    assert isinstance(m.timestamp, int)
    assert m.text == EXPECTED_TEXT[kind]
    assert item.phone_number_id == p.PNID
    assert item.tenant == "home"
    assert item.contact is not None
    assert item.contact.wa_id == p.USER
    assert item.contact.name == "Ana"


def test_legacy_unknown_type_decodes_to_legacy_class() -> None:
    """`type: "unknown"` is the legacy name of `unsupported`: same payload, its own class."""
    m = only_item(legacy_unknown()).message
    assert isinstance(m, LegacyUnknownMessage)
    assert m.type == "unknown"
    assert m.unsupported is not None
    assert m.unsupported.type == "poll"
    assert m.errors is not None
    assert m.errors[0].code == 131051
    assert m.text is None


def test_text_body() -> None:
    m = only_item(p.text("hi there")).message
    assert isinstance(m, TextMessage)
    assert m.text_.body == "hi there"
    assert m.text == "hi there"


def test_image_fields() -> None:
    m = only_item(p.SAMPLES["image"]).message
    assert isinstance(m, ImageMessage)
    assert (m.image.id, m.image.mime_type, m.image.sha256, m.image.caption) == ("m1", "image/jpeg", "abc", "a cat")
    assert m.image.url is None


def test_image_without_caption_has_no_text_and_keeps_url() -> None:
    """No caption means `.text` is None; the 2025 direct `url` is kept."""
    msg = p.message(
        "image", {"id": "m9", "mime_type": "image/png", "sha256": "h", "url": "https://lookaside.example/m9"}
    )
    m = only_item(msg).message
    assert isinstance(m, ImageMessage)
    assert m.text is None
    assert m.image.url == "https://lookaside.example/m9"


@pytest.mark.parametrize("voice", [True, False])
def test_audio_voice_flag(voice: bool) -> None:
    msg = p.message("audio", {"mime_type": "audio/ogg; codecs=opus", "sha256": "abc", "id": "m2", "voice": voice})
    m = only_item(msg).message
    assert isinstance(m, AudioMessage)
    assert m.audio.voice is voice
    assert m.audio.id == "m2"
    assert m.audio.mime_type == "audio/ogg; codecs=opus"


def test_audio_voice_defaults_to_false() -> None:
    m = only_item(p.message("audio", {"mime_type": "audio/mpeg", "sha256": "abc", "id": "m2"})).message
    assert isinstance(m, AudioMessage)
    assert m.audio.voice is False


def test_video_fields() -> None:
    m = only_item(p.SAMPLES["video"]).message
    assert isinstance(m, VideoMessage)
    assert (m.video.id, m.video.mime_type, m.video.caption) == ("m3", "video/mp4", "clip")


def test_document_filename_and_caption() -> None:
    m = only_item(p.SAMPLES["document"]).message
    assert isinstance(m, DocumentMessage)
    assert m.document.filename == "bill.pdf"
    assert m.document.caption == "bill"
    assert m.document.mime_type == "application/pdf"
    assert m.document.id == "m4"


def test_sticker_fields() -> None:
    m = only_item(
        p.message("sticker", {"mime_type": "image/webp", "sha256": "s", "id": "m5", "animated": True})
    ).message
    assert isinstance(m, StickerMessage)
    assert m.sticker.animated is True
    assert m.sticker.id == "m5"


def test_location_floats() -> None:
    m = only_item(p.SAMPLES["location"]).message
    assert isinstance(m, LocationMessage)
    assert m.location.latitude == 51.5
    assert m.location.longitude == -0.12
    assert isinstance(m.location.latitude, float)
    assert isinstance(m.location.longitude, float)
    assert (m.location.name, m.location.address) == ("Home", "1 Road")


def test_location_integer_coordinates_become_floats() -> None:
    """JSON has one number type: `0` and `10` are valid coordinates."""
    m = only_item(p.message("location", {"latitude": 0, "longitude": 10})).message
    assert isinstance(m, LocationMessage)
    assert (m.location.latitude, m.location.longitude) == (0.0, 10.0)
    assert isinstance(m.location.latitude, float)


def test_shared_contacts_fields() -> None:
    m = only_item(p.SAMPLES["contacts"]).message
    assert isinstance(m, ContactsMessage)
    assert len(m.contacts) == 1
    card = m.contacts[0]
    assert card.name is not None
    assert (card.name.formatted_name, card.name.first_name) == ("Ana Pérez", "Ana")
    assert [(ph.phone, ph.wa_id, ph.type) for ph in card.phones] == [("+1 555 000", "1555000", "CELL")]
    assert [(e.email, e.type) for e in card.emails] == [("ana@example.com", "WORK")]
    assert card.org is not None
    assert card.org.company == "ACME"
    assert card.birthday == "1990-01-01"
    assert card.urls == []
    assert card.addresses == []


def test_interactive_button_reply() -> None:
    m = only_item(p.SAMPLES["interactive"]).message
    assert isinstance(m, InteractiveMessage)
    assert m.interactive.type == "button_reply"
    assert m.reply_id == "yes-1"
    assert m.text == "Yes"
    assert m.context is not None
    assert (m.context.from_, m.context.id) == ("15550001111", "wamid.BIZ1")


def test_interactive_list_reply_keeps_description() -> None:
    row = {"id": "row-2", "title": "Tuesday", "description": "10:00-12:00"}
    msg = p.message("interactive", {"type": "list_reply", "list_reply": row}, context={"from": "1555", "id": "wamid.B"})
    m = only_item(msg).message
    assert isinstance(m, InteractiveMessage)
    assert m.interactive.list_reply is not None
    assert m.interactive.list_reply.description == "10:00-12:00"
    assert m.reply_id == "row-2"
    assert m.text == "Tuesday"


def test_interactive_nfm_reply_keeps_response_json_string() -> None:
    """A Flow answer: `response_json` stays the exact JSON string (with flow_token); no reply id or title."""
    response = json.dumps({"flow_token": "tok-1", "date": "2026-01-01", "choice": ["a", "b"]})
    nfm = {"name": "flow", "body": "Sent", "response_json": response}
    m = only_item(p.message("interactive", {"type": "nfm_reply", "nfm_reply": nfm})).message
    assert isinstance(m, InteractiveMessage)
    assert m.interactive.nfm_reply is not None
    assert m.interactive.nfm_reply.response_json == response
    assert json.loads(m.interactive.nfm_reply.response_json)["flow_token"] == "tok-1"
    assert (m.interactive.nfm_reply.name, m.interactive.nfm_reply.body) == ("flow", "Sent")
    assert m.reply_id is None
    assert m.text == "Sent"  # the flow's body, as WhatsApp shows it in the chat
    assert m.flow_response == {"flow_token": "tok-1", "date": "2026-01-01", "choice": ["a", "b"]}


def test_button_payload_and_text() -> None:
    m = only_item(p.SAMPLES["button"]).message
    assert isinstance(m, ButtonMessage)
    assert m.button.payload == "STOP_PROMOS"
    assert m.button.text == "Stop promotions"
    assert m.text == "Stop promotions"
    assert m.context is not None
    assert m.context.id == "wamid.BIZ2"


def test_reaction_emoji() -> None:
    m = only_item(p.SAMPLES["reaction"]).message
    assert isinstance(m, ReactionMessage)
    assert m.reaction.message_id == "wamid.BIZ3"
    assert m.reaction.emoji == "👍"
    assert m.text is None


@pytest.mark.parametrize("content", [{"message_id": "wamid.BIZ3"}, {"message_id": "wamid.BIZ3", "emoji": ""}])
def test_reaction_without_emoji_is_a_removal(content: dict[str, Any]) -> None:
    """An absent or empty emoji is still a reaction (its removal), not a malformed item."""
    m = only_item(p.message("reaction", content)).message
    assert isinstance(m, ReactionMessage)
    assert m.reaction.message_id == "wamid.BIZ3"
    assert not m.reaction.emoji


def test_order_product_items() -> None:
    m = only_item(p.SAMPLES["order"]).message
    assert isinstance(m, OrderMessage)
    assert m.order.catalog_id == "cat1"
    [item] = m.order.product_items
    assert item.product_retailer_id == "sku1"
    assert item.quantity == 2
    assert isinstance(item.quantity, int)
    assert item.item_price == 9.5
    assert isinstance(item.item_price, float)
    assert item.currency == "EUR"


def test_order_integer_price_is_float() -> None:
    order = {"product_items": [{"product_retailer_id": "s", "quantity": 1, "item_price": 10, "currency": "USD"}]}
    m = only_item(p.message("order", order)).message
    assert isinstance(m, OrderMessage)
    assert m.order.product_items[0].item_price == 10.0
    assert isinstance(m.order.product_items[0].item_price, float)


def test_system_message() -> None:
    """System messages carry no `contacts`; the new wa_id and kind are kept."""
    body = p.envelope(p.entry(p.change(p.value([p.SAMPLES["system"]], contacts=[]))))
    [item] = parse(body).messages
    m = item.message
    assert isinstance(m, SystemMessage)
    assert (m.system.body, m.system.wa_id, m.system.type) == (
        "User changed number",
        "15559990000",
        "user_changed_number",
    )
    assert item.contact is None


def test_unsupported_message_errors() -> None:
    m = only_item(p.SAMPLES["unsupported"]).message
    assert isinstance(m, UnsupportedMessage)
    assert m.unsupported is not None
    assert m.unsupported.type == "poll"
    assert m.errors is not None
    [err] = m.errors
    assert err.code == 131051
    assert err.title == "Message type unknown"
    assert err.error_data is not None
    assert err.error_data.details == "poll"


def test_unsupported_message_without_unsupported_object() -> None:
    """`unsupported{type}` is optional (unconfirmed in Meta's docs)."""
    msg = p.message("unsupported", errors=[{"code": 131051, "title": "Message type unknown"}])
    m = only_item(msg).message
    assert isinstance(m, UnsupportedMessage)
    assert m.unsupported is None
    assert m.errors is not None
    assert m.errors[0].code == 131051


def test_unknown_extra_fields_are_ignored() -> None:
    """Meta adds fields all the time: unknown keys anywhere do not break decoding."""
    msg = p.text("hi", new_top_level={"x": [1, 2]})
    msg["text"]["new_inner"] = True
    m = only_item(msg).message
    assert isinstance(m, TextMessage)
    assert m.text == "hi"


# ---------------------------------------------------------------------------- future types


@pytest.mark.parametrize(
    "msg",
    [
        p.message("poll", {"question": "Lunch?", "options": ["yes", "no"]}),
        p.message("pin", {"original_message_id": "wamid.X", "duration": 86400}),
        p.message("hologram"),
        p.message("poll", {"q": 1}, context={"from": "15550001111", "id": "wamid.BIZ9"}),
    ],
    ids=["poll", "pin", "no-payload", "with-context"],
)
def test_unknown_type_becomes_unknown_message_with_exact_raw(msg: dict[str, Any]) -> None:
    """A type this version does not know is kept whole: type name, head fields and exact raw bytes."""
    item = only_item(msg)
    m = item.message
    assert isinstance(m, UnknownMessage)
    assert item.parse_error is None  # a type we do not know yet is not an error
    assert m.type == msg["type"]
    assert m.id == msg["id"]
    assert m.sender == p.USER
    assert m.timestamp == int(p.TS)
    assert m.text is None
    assert m.raw == json.dumps(msg).encode()
    assert item.raw == m.raw
    if "context" in msg:
        assert m.context is not None
        assert m.context.id == msg["context"]["id"]


def test_unknown_type_raw_is_byte_exact_for_any_formatting() -> None:
    """`raw` is the message's own slice of the body, whatever whitespace Meta used."""
    msg = p.message("poll", {"question": "Lunch? 🍕", "options": ["ja", "nein"]})
    for dumps in (
        lambda d: json.dumps(d, separators=(",", ":"), ensure_ascii=False),
        lambda d: json.dumps(d, separators=(" ,  ", " :\t")),
    ):
        body = dumps(p.envelope(p.entry(p.change(p.value([msg]))))).encode()
        [item] = parse_body(body, TENANTS).messages
        assert isinstance(item.message, UnknownMessage)
        assert item.message.raw == dumps(msg).encode()


def test_unknown_type_for_username_user() -> None:
    msg = p.message("poll", {"q": 1})
    del msg["from"]
    msg["from_user_id"] = BSUID
    m = only_item(msg).message
    assert isinstance(m, UnknownMessage)
    assert m.sender == BSUID


def test_decode_message_accepts_plain_bytes() -> None:
    raw = json.dumps(p.message("poll", {"q": 1}, id="wamid.P")).encode()
    m = decode_message(raw)
    assert isinstance(m, UnknownMessage)
    assert (m.id, m.type, m.raw) == ("wamid.P", "poll", raw)


def test_decode_message_keeps_a_broken_known_type_with_the_reason() -> None:
    """A known type that fails to decode is an `UnknownMessage` of that type plus the reason (a
    restart reads the same back from the stored raw JSON)."""
    raw = json.dumps(p.message("text", {"body": None}, id="wamid.BROKEN")).encode()
    message, problem = read_message(raw)
    assert isinstance(message, UnknownMessage)
    assert (message.id, message.type, message.sender, message.raw) == ("wamid.BROKEN", "text", p.USER, raw)
    assert problem is not None
    assert "text" in problem
    assert decode_message(raw) == message
    for no_id in ({"type": "text", "text": {"body": "x"}}, {"id": 7, "type": "text"}, {"id": ""}, [1], "x"):
        with pytest.raises(MalformedItem):  # only a message without a usable id cannot be kept
            decode_message(json.dumps(no_id).encode())


# ---------------------------------------------------------------------------- context and referral


def test_reply_context_keeps_business_message_id() -> None:
    m = only_item(p.text("re", context={"from": "15550001111", "id": "wamid.BIZ7"})).message
    assert m.context is not None
    assert (m.context.from_, m.context.id) == ("15550001111", "wamid.BIZ7")
    assert m.context.forwarded is False
    assert m.context.frequently_forwarded is False


@pytest.mark.parametrize("flag", ["forwarded", "frequently_forwarded"])
def test_forwarding_flags_without_id(flag: str) -> None:
    m = only_item(p.message("image", {"id": "m1", "mime_type": "image/jpeg"}, context={flag: True})).message
    assert m.context is not None
    assert getattr(m.context, flag) is True
    assert m.context.id is None
    assert m.context.from_ is None


def test_referred_product() -> None:
    ctx = {
        "from": "15550001111",
        "id": "wamid.BIZ8",
        "referred_product": {"catalog_id": "c1", "product_retailer_id": "s1"},
    }
    m = only_item(p.text("is this in stock?", context=ctx)).message
    assert m.context is not None
    assert m.context.referred_product is not None
    assert (m.context.referred_product.catalog_id, m.context.referred_product.product_retailer_id) == ("c1", "s1")
    assert m.context.id == "wamid.BIZ8"


def test_ad_referral_keeps_every_field() -> None:
    referral = {
        "source_url": "https://fb.me/ad",
        "source_id": "ad-42",
        "source_type": "ad",
        "body": "Our best offer",
        "headline": "Sale",
        "media_type": "video",
        "image_url": "https://img.example/1.jpg",
        "video_url": "https://vid.example/1.mp4",
        "thumbnail_url": "https://img.example/t.jpg",
        "ctwa_clid": "ARAkLkA8rmlFeiCktEJQ",
        "welcome_message": {"text": "Hi! How can we help?"},
    }
    m = only_item(p.text("I saw your ad", referral=referral)).message
    assert m.referral is not None
    got = msgspec.to_builtins(m.referral)
    assert got == referral
    assert m.referral.ctwa_clid == "ARAkLkA8rmlFeiCktEJQ"
    assert m.referral.welcome_message is not None
    assert m.referral.welcome_message.text == "Hi! How can we help?"


def test_referral_without_ctwa_clid() -> None:
    """Status-ad placements omit `ctwa_clid`."""
    m = only_item(p.text("hi", referral={"source_type": "ad", "source_id": "ad-1"})).message
    assert m.referral is not None
    assert m.referral.ctwa_clid is None
    assert m.referral.source_id == "ad-1"


# ---------------------------------------------------------------------------- item isolation


def _without(msg: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != key}


#: Messages without a usable id: nothing can key them, so they are quarantined (still kept raw).
BAD_MESSAGES: dict[str, Any] = {
    "missing-id": _without(p.text("x"), "id"),
    "not-an-object-string": "just a string",
    "not-an-object-number": 42,
    "not-an-object-list": [p.text("x")],
    "not-an-object-null": None,
    "unknown-type-missing-id": _without(p.message("poll", {"q": 1}), "id"),
}

#: Messages WITH an id that cannot be read as their type: kept as items with a parse error.
BROKEN_MESSAGES: dict[str, Any] = {
    "text-null": {**p.text("x"), "text": None},
    "text-missing": _without(p.text("x"), "text"),
    "timestamp-abc": p.text("x", timestamp="abc"),
    "timestamp-null": p.text("x", timestamp=None),
    "body-not-string": p.message("text", {"body": 42}),
    "body-object": p.message("text", {"body": {"nested": "x"}}),
    "image-without-id": p.message("image", {"caption": "no id"}),
    "location-string-coords": p.message("location", {"latitude": "north", "longitude": 1.0}),
    "no-sender": _without(p.text("x"), "from"),
    "null-sender": p.text("x", sender=None),
    "empty-sender": p.text("x", sender=""),
    "no-type": _without(p.text("x"), "type"),
    "type-not-string": p.text("x", type=7),
    "unknown-type-bad-timestamp": p.message("poll", {"q": 1}, timestamp="soon"),
    "unknown-type-no-sender": _without(p.message("poll", {"q": 1}), "from"),
}


@pytest.mark.parametrize("bad", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_message_without_usable_id_is_skipped_and_siblings_kept(bad: Any) -> None:
    first, last = p.text("before"), p.text("after")
    parsed = parse_messages(first, bad, last)
    assert ids(parsed) == [first["id"], last["id"]]
    assert [item.message.text for item in parsed.messages] == ["before", "after"]
    assert parsed.skipped == 1


@pytest.mark.parametrize("bad", list(BROKEN_MESSAGES.values()), ids=list(BROKEN_MESSAGES))
def test_broken_message_with_id_is_kept_with_its_parse_error(bad: dict[str, Any]) -> None:
    """Never dropped: the broken one is its own item (raw kept, reason given), its siblings intact."""
    first, last = p.text("before"), p.text("after")
    parsed = parse_messages(first, bad, last)
    assert ids(parsed) == [first["id"], bad["id"], last["id"]]
    assert parsed.skipped == 0
    before, broken, after = parsed.messages
    assert (before.message.text, after.message.text) == ("before", "after")
    assert before.parse_error is None and after.parse_error is None
    assert isinstance(broken.message, UnknownMessage)
    assert broken.parse_error
    assert broken.raw == json.dumps(bad).encode()
    assert broken.message.type == (bad.get("type") if isinstance(bad.get("type"), str) else "unknown")


def test_several_malformed_messages_are_each_counted() -> None:
    good, broken = p.text("ok"), {**p.text("x"), "text": None}
    parsed = parse_messages(None, good, 5, broken)
    assert ids(parsed) == [good["id"], broken["id"]]
    assert parsed.skipped == 2


def test_malformed_contact_is_skipped_message_kept() -> None:
    msg = p.text("hi")
    parsed = parse_messages(msg, contacts=[{"profile": "not an object", "wa_id": p.USER}, 7])
    assert ids(parsed) == [msg["id"]]
    assert parsed.messages[0].contact is None
    assert parsed.skipped == 2


BAD_CHANGES: dict[str, Any] = {
    "no-field": {"value": p.value([p.text("lost")])},
    "no-value": {"field": "messages"},
    "field-not-string": {"field": 3, "value": p.value([p.text("lost")])},
    "value-number": p.change(5),
    "value-list": p.change([p.text("lost")]),
    "value-string": p.change("messages"),
    "messages-not-a-list": p.change({**p.value([]), "messages": {"0": p.text("lost")}}),
    "change-not-an-object": "messages",
    "change-null": None,
}


@pytest.mark.parametrize("bad", list(BAD_CHANGES.values()), ids=list(BAD_CHANGES))
def test_malformed_change_is_skipped_and_others_kept(bad: Any) -> None:
    """Siblings in the same entry and changes in other entries all survive."""
    a, b, c = p.text("a"), p.text("b"), p.text("c")
    body = p.envelope(
        p.entry(p.change(p.value([a])), bad, p.change(p.value([b]))),
        p.entry(p.change(p.value([c], pnid=p.BIZ_PNID)), waba="WABA2"),
    )
    parsed = parse(body)
    assert ids(parsed) == [a["id"], b["id"], c["id"]]
    assert [item.tenant for item in parsed.messages] == ["home", "home", "biz"]
    assert parsed.skipped == 1
    assert parsed.events == []


@pytest.mark.parametrize(
    "val",
    [
        {"messaging_product": "whatsapp", "messages": [p.text("kept")]},
        {"metadata": {"display_phone_number": "1"}, "messages": [p.text("kept")]},
        {"metadata": {"phone_number_id": 123}, "messages": [p.text("kept")]},
    ],
    ids=["no-metadata", "no-pnid", "pnid-not-string"],
)
def test_messages_without_usable_metadata_are_kept_unowned(val: dict[str, Any]) -> None:
    """Without Meta's phone number id no tenant owns the messages, but they are not lost."""
    [item] = parse(p.envelope(p.entry(p.change(val)))).messages
    assert (item.phone_number_id, item.tenant, item.message.text) == ("", None, "kept")


BAD_ENTRIES: dict[str, Any] = {
    "string": "entry",
    "number": 17,
    "null": None,
    "list": [p.entry(p.change(p.value([p.text("lost")])))],
    "changes-object": {"id": "W", "changes": p.change(p.value([p.text("lost")]))},
    "changes-string": {"id": "W", "changes": "messages"},
}


@pytest.mark.parametrize("bad", list(BAD_ENTRIES.values()), ids=list(BAD_ENTRIES))
def test_malformed_entry_is_skipped_and_others_kept(bad: Any) -> None:
    a, b = p.text("a"), p.text("b")
    parsed = parse(p.envelope(p.entry(p.change(p.value([a]))), bad, p.entry(p.change(p.value([b])))))
    assert ids(parsed) == [a["id"], b["id"]]
    assert parsed.skipped == 1


# ---------------------------------------------------------------------------- lenient values


def test_numeric_timestamp_is_accepted() -> None:
    """Group and template webhooks use integer timestamps; messages may too."""
    m = only_item(p.text("x", timestamp=1760000123)).message
    assert m.timestamp == 1760000123


def test_numeric_status_timestamp_is_accepted() -> None:
    parsed = parse(p.envelope(p.entry(p.change(p.value(statuses=[p.status("wamid.S", timestamp=1760000456)])))))
    assert parsed.statuses[0].status.timestamp == 1760000456


@pytest.mark.parametrize("key", ["messages", "statuses", "contacts", "errors"])
def test_null_lists_are_empty(key: str) -> None:
    val = {**p.value(), key: None}
    parsed = parse(p.envelope(p.entry(p.change(val))))
    assert len(parsed) == 0
    assert parsed.skipped == 0


def test_null_statuses_beside_messages() -> None:
    msg = p.text("x")
    val = {**p.value([msg]), "statuses": None}
    parsed = parse(p.envelope(p.entry(p.change(val))))
    assert ids(parsed) == [msg["id"]]
    assert parsed.statuses == []


@pytest.mark.parametrize(
    "body",
    [
        {"object": "whatsapp_business_account", "entry": []},
        {"entry": []},
        {"entry": [{"id": "W"}]},
        {"entry": [{"id": "W", "changes": None}]},
        {"entry": [{"id": "W", "changes": []}]},
        {"object": None, "entry": [], "extra": {"x": 1}},
    ],
    ids=["empty-entry", "no-object", "entry-no-changes", "changes-null", "changes-empty", "object-null-extra"],
)
def test_empty_bodies_parse_to_nothing(body: dict[str, Any]) -> None:
    parsed = parse(body)
    assert len(parsed) == 0
    assert (parsed.messages, parsed.statuses, parsed.events, parsed.skipped) == ([], [], [], 0)


# ---------------------------------------------------------------------------- envelope errors


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"{",
        b'{"entry": []} trailing',
        b"[]",
        b'[{"entry": []}]',
        b'"a json string"',
        b"42",
        b"null",
        b"{}",
        b'{"object": "whatsapp_business_account"}',
        b'{"entry": {}}',
        b'{"entry": "x"}',
        b'{"entry": null}',
    ],
    ids=[
        "not-json",
        "empty",
        "truncated",
        "trailing",
        "array",
        "array-of-envelope",
        "string",
        "number",
        "null",
        "entry-missing",
        "entry-missing-with-object",
        "entry-object",
        "entry-string",
        "entry-null",
    ],
)
def test_envelope_errors(body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        parse_body(body, TENANTS)


def test_envelope_error_is_a_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


def test_lone_surrogate_escape_is_rejected_cleanly() -> None:
    """msgspec refuses an unpaired `\\ud83d` escape; the body is refused as EnvelopeError, not a crash."""
    body = p.body_of(p.text("LONE")).replace(b'"LONE"', b'"\\ud83d"')
    with pytest.raises(EnvelopeError):
        parse_body(body, TENANTS)


# ---------------------------------------------------------------------------- text exactness

TEXTS: dict[str, str] = {
    "emoji": "héllo 👋🏽 家族 👨‍👩‍👧‍👦 🇯🇵",
    "combining": "e\u0301 a\u0308\u0323 \u0915\u094d\u0937 Z\u0351\u036b\u0343",
    "rtl-override": "abc\u202edcba\u202c \u200f\u05e9\u05dc\u05d5\u05dd",
    "control-chars": "".join(chr(c) for c in range(1, 32)) + "\x7f\x85",
    "separators-and-bom": "\u2028line\u2029para\ufeff\u200b\u200d",
    "astral": "𝕏 𝄞 🂡 \U0010fffd",
    "quotes-and-escapes": '"\\/\b\f\n\r\t </script>',
    "long-4096": "a" * 4096,
    "long-over-4096": ("👋x\u0301" * 2000)[:5001],
}


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "utf8"])
@pytest.mark.parametrize("original", list(TEXTS.values()), ids=list(TEXTS))
def test_text_is_exact(original: str, ensure_ascii: bool) -> None:
    """The decoded body equals the original code point for code point, escaped or raw UTF-8."""
    msg = p.text(original)
    body = json.dumps(p.envelope(p.entry(p.change(p.value([msg])))), ensure_ascii=ensure_ascii).encode()
    [item] = parse_body(body, TENANTS).messages
    assert item.message.text == original
    assert [ord(c) for c in item.message.text] == [ord(c) for c in original]
    assert decode_message(item.raw).text == original


def test_surrogate_pair_escapes_decode_to_one_code_point() -> None:
    """Meta escapes astral characters as UTF-16 surrogate pairs: `\\ud83d\\udc4b` is 👋 (U+1F44B)."""
    body = p.body_of(p.text("wave"))
    body = body.replace(b'"wave"', b'"hi \\ud83d\\udc4b \\uD83C\\uDDEF\\uD83C\\uDDF5"')
    [item] = parse_body(body, TENANTS).messages
    assert item.message.text == "hi \U0001f44b \U0001f1ef\U0001f1f5"
    assert len(item.message.text) == 7  # the flag is two regional indicators


def test_long_text_length_preserved() -> None:
    original = "é" * 4097
    m = only_item(p.text(original)).message
    assert m.text == original
    assert len(m.text or "") == 4097


def test_captions_and_titles_are_exact() -> None:
    caption = "cap\u202e 👋\u0301"
    m = only_item(p.message("document", {"id": "d", "caption": caption, "filename": "ف.pdf"})).message
    assert isinstance(m, DocumentMessage)
    assert m.text == caption
    assert m.document.filename == "ف.pdf"


# ---------------------------------------------------------------------------- batching


def test_batch_of_entries_changes_messages_and_statuses() -> None:
    """2 entries × 2 changes × (2 messages + 2 statuses): every item, in order, with its own routing."""
    layout = [("WABA1", [p.PNID, p.BIZ_PNID]), ("WABA2", [STRANGER_PNID, p.PNID])]
    entries, expected_msgs, expected_statuses = [], [], []
    for waba, pnids in layout:
        changes = []
        for pnid in pnids:
            msgs = [p.text(f"{pnid}-m{i}") for i in range(2)]
            stats = [p.status(f"wamid.OUT-{pnid}-{i}", state) for i, state in enumerate(["sent", "read"])]
            changes.append(p.change(p.value(msgs, statuses=stats, pnid=pnid)))
            expected_msgs += [(m["id"], f"{pnid}-m{i}", pnid, TENANTS.get(pnid)) for i, m in enumerate(msgs)]
            expected_statuses += [(s["id"], s["status"], pnid, TENANTS.get(pnid)) for s in stats]
        entries.append(p.entry(*changes, waba=waba))

    parsed = parse(p.envelope(*entries))

    got_msgs = [(i.message.id, i.message.text, i.phone_number_id, i.tenant) for i in parsed.messages]
    got_statuses = [(s.status.id, s.status.status, s.phone_number_id, s.tenant) for s in parsed.statuses]
    assert got_msgs == expected_msgs
    assert got_statuses == expected_statuses
    assert len(parsed) == 16
    assert parsed.skipped == 0
    assert parsed.events == []


def test_unowned_phone_number_id_gives_tenant_none() -> None:
    [item] = parse_messages(p.text("who owns me?"), pnid=STRANGER_PNID).messages
    assert item.phone_number_id == STRANGER_PNID
    assert item.tenant is None


def test_tenant_lookup_is_exact() -> None:
    """No prefix or numeric matching: an int-looking near miss is unowned."""
    parsed = parse_body(p.body_of(p.text("x"), pnid=p.PNID + "0"), TENANTS)
    assert parsed.messages[0].tenant is None
    parsed = parse_body(p.body_of(p.text("x")), {})
    assert parsed.messages[0].tenant is None


def test_batch_with_every_sample_type() -> None:
    msgs = [*p.SAMPLES.values(), legacy_unknown(), p.message("poll", {"q": 1})]
    parsed = parse_messages(*msgs)
    assert [item.message.type for item in parsed.messages] == [m["type"] for m in msgs]
    assert ids(parsed) == [m["id"] for m in msgs]


# ---------------------------------------------------------------------------- senders and contacts


def test_username_user_without_phone_number() -> None:
    """2026 usernames: `from_user_id` only on the message, `user_id` only on the contact."""
    msg = _without(p.text("hi"), "from") | {"from_user_id": BSUID}
    contact = {"profile": {"name": "anon"}, "user_id": BSUID}
    [item] = parse_messages(msg, contacts=[contact]).messages
    assert item.message.sender == BSUID
    assert item.message.from_ is None
    assert item.message.from_user_id == BSUID
    assert item.contact is not None
    assert item.contact.user_id == BSUID
    assert item.contact.wa_id is None
    assert item.contact.name == "anon"


def test_username_user_matched_among_several_contacts() -> None:
    msg = _without(p.text("hi"), "from") | {"from_user_id": BSUID}
    contacts = [
        {"profile": {"name": "other"}, "user_id": "US.1"},
        {"profile": {"name": "anon"}, "user_id": BSUID},
        {"profile": {"name": "phone"}, "wa_id": p.USER},
    ]
    [item] = parse_messages(msg, contacts=contacts).messages
    assert item.contact is not None
    assert item.contact.name == "anon"


def test_phone_preferred_as_sender_when_both_ids_present() -> None:
    msg = p.text("hi", from_user_id=BSUID)
    contact = {"profile": {"name": "Ana"}, "wa_id": p.USER, "user_id": BSUID, "identity_key_hash": "h1"}
    [item] = parse_messages(msg, contacts=[contact]).messages
    assert item.message.sender == p.USER
    assert item.message.from_user_id == BSUID
    assert item.contact is not None
    assert item.contact.identity_key_hash == "h1"


def test_empty_from_falls_back_to_user_id() -> None:
    m = only_item(p.text("hi", sender="", from_user_id=BSUID)).message
    assert m.sender == BSUID


def test_contacts_matched_by_wa_id() -> None:
    """Several senders in one change: each message gets its own contact."""
    a, b = p.text("from a", sender="111"), p.text("from b", sender="222")
    contacts = [{"profile": {"name": "B"}, "wa_id": "222"}, {"profile": {"name": "A"}, "wa_id": "111"}]
    parsed = parse_messages(a, b, contacts=contacts)
    assert [(i.message.sender, i.contact.name if i.contact else None) for i in parsed.messages] == [
        ("111", "A"),
        ("222", "B"),
    ]


def test_no_contact_when_several_and_none_match() -> None:
    contacts = [{"profile": {"name": "B"}, "wa_id": "222"}, {"profile": {"name": "A"}, "wa_id": "111"}]
    [item] = parse_messages(p.text("x", sender="333"), contacts=contacts).messages
    assert item.contact is None


def test_single_contact_contradicting_from_is_not_the_sender() -> None:
    """A lone contact whose `wa_id` names another number describes someone else: never attach its
    name (or ids) to this sender."""
    contact = {"profile": {"name": "Ana"}, "wa_id": "5491155551234"}
    [item] = parse_messages(p.text("hola", sender="54911155551234"), contacts=[contact]).messages
    assert item.contact is None
    assert item.message.sender == "54911155551234"
    [lone] = parse_messages(p.text("hola"), contacts=[{"profile": {"name": "Ana"}}]).messages
    assert lone.contact is not None  # a lone contact without ids contradicts nothing: it is the sender
    assert lone.contact.name == "Ana"


def test_contact_without_profile_has_no_name() -> None:
    [item] = parse_messages(p.text("x"), contacts=[{"wa_id": p.USER}]).messages
    assert item.contact is not None
    assert item.contact.name is None


# ---------------------------------------------------------------------------- statuses


def parse_statuses(*stats: Any, pnid: str = p.PNID) -> ParsedBody:
    return parse(p.envelope(p.entry(p.change(p.value(statuses=list(stats), pnid=pnid)))))


@pytest.mark.parametrize("state", ["sent", "delivered", "read", "played", "failed"])
def test_status_states(state: str) -> None:
    [item] = parse_statuses(p.status("wamid.OUT1", state)).statuses
    assert item.status.id == "wamid.OUT1"
    assert item.status.status == state
    assert item.status.timestamp == int(p.TS)
    assert item.status.recipient_id == p.USER
    assert item.key == f"{p.PNID}:wamid.OUT1:{state}"
    assert item.phone_number_id == p.PNID
    assert item.tenant == "home"


def test_failed_status_errors() -> None:
    err = {
        "code": 131049,
        "title": "This message was not delivered to maintain healthy ecosystem engagement.",
        "message": "This message was not delivered to maintain healthy ecosystem engagement.",
        "error_data": {"details": "In order to maintain a healthy ecosystem engagement, the message failed."},
        "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
    }
    [item] = parse_statuses(p.status("wamid.OUT2", "failed", errors=[err])).statuses
    assert item.status.errors is not None
    [got] = item.status.errors
    assert got.code == 131049
    assert got.title == err["title"]
    assert got.message == err["message"]
    assert got.error_data is not None
    assert got.error_data.details == err["error_data"]["details"]
    assert got.href == err["href"]
    assert item.key == f"{p.PNID}:wamid.OUT2:failed"


def test_status_pricing_and_callback_data() -> None:
    pricing = {"billable": True, "pricing_model": "PMP", "type": "regular", "category": "utility"}
    stat = p.status("wamid.OUT3", "sent", pricing=pricing, biz_opaque_callback_data="order-77")
    [item] = parse_statuses(stat).statuses
    assert item.status.pricing is not None
    assert msgspec.to_builtins(item.status.pricing) == pricing
    assert item.status.biz_opaque_callback_data == "order-77"


def test_group_status() -> None:
    stat = p.status(
        "wamid.OUT4", "read", recipient_id="GROUP-1", recipient_type="group", recipient_participant_id="1555"
    )
    [item] = parse_statuses(stat).statuses
    assert (item.status.recipient_id, item.status.recipient_type, item.status.recipient_participant_id) == (
        "GROUP-1",
        "group",
        "1555",
    )


def test_status_raw_is_exact() -> None:
    stat = p.status("wamid.OUT5", "delivered", conversation={"id": "c1", "origin": {"type": "service"}})
    [item] = parse_statuses(stat).statuses
    assert item.raw == json.dumps(stat).encode()


def test_status_key_distinguishes_states_and_matches_redeliveries() -> None:
    a = parse_statuses(p.status("wamid.K", "delivered"), p.status("wamid.K", "read")).statuses
    b = parse_statuses(p.status("wamid.K", "read")).statuses
    assert [s.key for s in a] == [f"{p.PNID}:wamid.K:delivered", f"{p.PNID}:wamid.K:read"]
    assert b[0].key == a[1].key
    other = parse_statuses(p.status("wamid.K", "read"), pnid=p.BIZ_PNID).statuses
    assert other[0].key != a[1].key  # message ids are scoped by phone number


def test_status_errors_that_are_not_a_list_are_read_leniently() -> None:
    """A lone error object is taken as a one-item list; a malformed element is dropped, not the status."""
    [lone, mixed] = parse_statuses(
        p.status("wamid.E1", "failed", errors={"code": 131047}),
        p.status("wamid.E2", "failed", errors=[{"code": "not a number"}, {"code": 131026}]),
    ).statuses
    assert [e.code for e in lone.status.errors or ()] == [131047]
    assert [e.code for e in mixed.status.errors or ()] == [131026]


BAD_STATUSES: dict[str, Any] = {
    "missing-id": _without(p.status("x"), "id"),
    "missing-status": _without(p.status("x"), "status"),
    "timestamp-abc": p.status("x", timestamp="abc"),
    "not-an-object": "wamid.X",
    "null": None,
}


@pytest.mark.parametrize("bad", list(BAD_STATUSES.values()), ids=list(BAD_STATUSES))
def test_malformed_status_is_skipped_and_siblings_kept(bad: Any) -> None:
    parsed = parse_statuses(p.status("wamid.A", "sent"), bad, p.status("wamid.B", "read"))
    assert [s.status.id for s in parsed.statuses] == ["wamid.A", "wamid.B"]
    assert parsed.skipped == 1


def test_status_in_same_change_as_bad_message() -> None:
    """A bad message does not sink a status of the same change."""
    val = p.value([None], statuses=[p.status("wamid.C", "delivered")])
    parsed = parse(p.envelope(p.entry(p.change(val))))
    assert [s.status.id for s in parsed.statuses] == ["wamid.C"]
    assert parsed.messages == []
    assert parsed.skipped == 1


# ---------------------------------------------------------------------------- other fields and errors

TEMPLATE_STATUS = {
    "event": "APPROVED",
    "message_template_id": 123456789012345,
    "message_template_name": "order_update",
    "message_template_language": "en_US",
    "reason": None,
}


def test_message_template_status_update_event() -> None:
    """Integer entry `time` and integer `message_template_id` are fine; raw is the exact value."""
    body = p.envelope(
        {"id": "WABA9", "time": 1760000999, "changes": [p.change(TEMPLATE_STATUS, "message_template_status_update")]}
    )
    parsed = parse(body)
    [event] = parsed.events
    assert event.field == "message_template_status_update"
    assert event.waba_id == "WABA9"
    assert event.phone_number_id is None
    assert event.tenant is None
    assert event.raw == json.dumps(TEMPLATE_STATUS).encode()
    assert json.loads(event.raw)["message_template_id"] == 123456789012345
    assert parsed.messages == []
    assert parsed.skipped == 0


@pytest.mark.parametrize(
    ("field", "val"),
    [
        ("account_update", {"phone_number": "15550001111", "event": "VERIFIED_ACCOUNT"}),
        (
            "phone_number_quality_update",
            {"display_phone_number": "15550001111", "event": "FLAGGED", "current_limit": "TIER_1K"},
        ),
        ("account_alerts", {"entity_type": "WABA", "entity_id": "1", "alert_info": {"alert_severity": "WARNING"}}),
        ("some_future_field", [1, "two", None]),
        ("security", "plain string value"),
    ],
    ids=["account_update", "quality_update", "account_alerts", "future-list", "future-string"],
)
def test_other_fields_become_events(field: str, val: Any) -> None:
    [event] = parse(p.envelope(p.entry(p.change(val, field), waba="WABA3"))).events
    assert isinstance(event, EventItem)
    assert (event.field, event.waba_id, event.phone_number_id, event.tenant) == (field, "WABA3", None, None)
    assert event.raw == json.dumps(val).encode()


@pytest.mark.parametrize(("pnid", "tenant"), [(p.BIZ_PNID, "biz"), (STRANGER_PNID, None)])
def test_other_field_with_metadata_is_routed(pnid: str, tenant: str | None) -> None:
    val = {"metadata": {"phone_number_id": pnid, "display_phone_number": "1"}, "message_echoes": [{"id": "e"}]}
    [event] = parse(p.envelope(p.entry(p.change(val, "smb_message_echoes")))).events
    assert (event.phone_number_id, event.tenant) == (pnid, tenant)


def test_value_errors_become_error_events() -> None:
    errs = [
        {
            "code": 131000,
            "title": "Something went wrong",
            "message": "Something went wrong",
            "error_data": {"details": "x"},
        },
        {"code": 130429, "title": "Rate limit hit"},
    ]
    parsed = parse(p.envelope(p.entry(p.change(p.value(errors=errs, pnid=p.BIZ_PNID)), waba="WABA5")))
    assert [(e.field, e.phone_number_id, e.tenant, e.waba_id) for e in parsed.events] == [
        ("errors", p.BIZ_PNID, "biz", "WABA5"),
        ("errors", p.BIZ_PNID, "biz", "WABA5"),
    ]
    assert [e.raw for e in parsed.events] == [json.dumps(e).encode() for e in errs]
    assert parsed.messages == []
    assert parsed.statuses == []


def test_event_key_equal_for_identical_redeliveries() -> None:
    body = p.envelope(p.entry(p.change(TEMPLATE_STATUS, "message_template_status_update")))
    first, second = parse(body).events[0], parse(body).events[0]
    assert first == second
    assert first.key == second.key
    assert len(first.key) == 64


@pytest.mark.parametrize(
    ("field", "val", "waba"),
    [
        ("message_template_status_update", {**TEMPLATE_STATUS, "event": "REJECTED"}, "WABA1"),
        ("message_template_status_update", {**TEMPLATE_STATUS, "message_template_id": 1}, "WABA1"),
        ("message_template_quality_update", TEMPLATE_STATUS, "WABA1"),
        ("message_template_status_update", TEMPLATE_STATUS, "WABA2"),
    ],
    ids=["other-event", "other-template", "other-field", "other-waba"],
)
def test_event_key_differs_for_different_content(field: str, val: Any, waba: str) -> None:
    base = parse(p.envelope(p.entry(p.change(TEMPLATE_STATUS, "message_template_status_update")))).events[0]
    other = parse(p.envelope(p.entry(p.change(val, field), waba=waba))).events[0]
    assert other.key != base.key


def test_event_key_differs_for_different_errors() -> None:
    errs = [{"code": 131000, "title": "a"}, {"code": 131000, "title": "b"}]
    events = parse(p.envelope(p.entry(p.change(p.value(errors=errs))))).events
    assert events[0].key != events[1].key


# ---------------------------------------------------------------------------- raw round trip

ROUND_TRIP: dict[str, dict[str, Any]] = {
    **p.SAMPLES,
    "unknown": legacy_unknown(),
    "poll": p.message("poll", {"q": "?"}),
    "username": _without(p.text("u"), "from") | {"from_user_id": BSUID},
    "referral": p.text("ad", referral={"source_type": "ad", "ctwa_clid": "c", "welcome_message": {"text": "w"}}),
    "nfm": p.message("interactive", {"type": "nfm_reply", "nfm_reply": {"response_json": '{"flow_token":"t"}'}}),
}


@pytest.mark.parametrize("msg", list(ROUND_TRIP.values()), ids=list(ROUND_TRIP))
def test_raw_round_trips_to_an_equal_message(msg: dict[str, Any]) -> None:
    """`InboundItem.raw` is the message's exact JSON, and decodes back to an equal message."""
    item = only_item(msg)
    assert item.raw == json.dumps(msg).encode()
    again = decode_message(item.raw)
    assert again == item.message
    assert type(again) is type(item.message)


# ---------------------------------------------------------------------------- fixed bugs (regressions)


@pytest.mark.parametrize(
    ("placeholder", "item_level"),
    [("BADBYTE", True), ("BADNAME", True), ("BADSTATUS", True), ("BADWABA", False), ("BADOBJ", False)],
    ids=["in-message", "in-contact", "in-status", "in-entry-id", "in-object"],
)
def test_invalid_utf8_is_an_envelope_error_or_an_isolated_skip(placeholder: str, item_level: bool) -> None:
    """Invalid UTF-8 is refused as EnvelopeError or its item skipped; never another exception."""
    good = p.text("good")
    val = p.value(
        [p.text("BADBYTE"), good],
        statuses=[p.status("BADSTATUS")],
        contacts=[{"profile": {"name": "BADNAME"}, "wa_id": p.USER}],
    )
    env = p.envelope(p.entry(p.change(val), waba="BADWABA"))
    env["object"] = "BADOBJ"
    body = p.dump(env).replace(f'"{placeholder}"'.encode(), b'"\xff\xfe"')
    assert body.count(b"\xff") == 1
    try:
        parsed = parse_body(body, TENANTS)
    except EnvelopeError:
        return
    if item_level:  # a message, contact or status: skipped alone, the good message survives
        assert good["id"] in ids(parsed)
        assert parsed.skipped == 1


def test_event_key_differs_for_same_error_on_two_phone_numbers() -> None:
    err = {"code": 131000, "title": "Something went wrong"}
    body = p.envelope(
        p.entry(p.change(p.value(errors=[err], pnid=p.PNID)), p.change(p.value(errors=[err], pnid=p.BIZ_PNID)))
    )
    events = parse(body).events
    assert [(e.phone_number_id, e.tenant) for e in events] == [(p.PNID, "home"), (p.BIZ_PNID, "biz")]
    assert events[0].key != events[1].key


@pytest.mark.parametrize("obj", [5, {"x": 1}, ["whatsapp_business_account"]], ids=["number", "object", "list"])
def test_wrong_typed_object_field_does_not_fail_the_body(obj: Any) -> None:
    msg = p.text("keep me")
    env = p.envelope(p.entry(p.change(p.value([msg]))))
    env["object"] = obj
    assert ids(parse(env)) == [msg["id"]]
