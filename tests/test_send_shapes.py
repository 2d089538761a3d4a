"""Every send body the Cloud API accepts passes `POST /api/messages` and reaches Meta unchanged.

Through the real app in production mode against the fake Graph API on loopback: each body below is
accepted (202) and the fake Graph API receives exactly what the client sent, minus Alfred's own
`tenant` / `idempotency_key` (plus `messaging_product`, which Meta requires). Shapes follow Meta's
pages (base developers.facebook.com/documentation/business-messaging/whatsapp/, cited per case) and
the bodies pywa (`pywa/_helpers.py` `resolve_recipient`: a BSUID goes in `recipient`, `to` omitted)
sends. The 24-hour window and the opt-out are judged by the id that addresses the user, phone
number or BSUID; a handler's reply to a username-only user names them with `recipient`.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest

from alfred_bot import keys
from tests import payloads
from tests.conftest import API_TOKEN, db_rows, post_webhook, wait_for
from tests.fakes import FakeGraph

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
PHONE = "+" + payloads.USER
BSUID = "US.13491208655302741918"
PARENT_BSUID = "US.ENT.11815799212886844830"
GROUP_ID = "Y2FwaV9ncm91cDoxNzA1NTU1MDEzOToxMjAzNjM0MDQ2OTQyMzM4MjAZD"
HOUR = 3600


# ---------------------------------------------------------------------------- helpers


def _user_message(text: str, *, bsuid: str | None = None, phone: str | None = payloads.USER, at: float) -> bytes:
    """A text from a user; without `phone` it is a username-only user: no `from`, only `from_user_id`
    (Meta: webhooks/reference/messages, business-scoped-user-ids)."""
    msg = payloads.text(text, timestamp=str(int(at)))
    contact: dict[str, Any] = {"profile": {"name": "Nick"}}
    if phone is None:
        del msg["from"]
    else:
        msg["from"] = contact["wa_id"] = phone
    if bsuid is not None:
        msg["from_user_id"] = contact["user_id"] = bsuid
    value = payloads.value([msg], contacts=[contact])
    return payloads.dump(payloads.envelope(payloads.entry(payloads.change(value))))


async def _user_writes(client: Any, *, bsuid: str | None = None, phone: str | None = payloads.USER, ago: float = 0):
    """The user writes (opening the 24-hour window `ago` seconds back); wait until it is handled."""
    handled = client.app[keys.DISPATCHER].counts["handled"]
    body = _user_message("hi", bsuid=bsuid, phone=phone, at=time.time() - ago)
    assert await post_webhook(client, body) == 200
    await wait_for(lambda: client.app[keys.DISPATCHER].counts["handled"] > handled)


async def _send(client: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    return resp.status, await resp.json()


def _expected(body: dict[str, Any]) -> dict[str, Any]:
    """What Meta must receive: the client's body without Alfred's fields, `messaging_product` first."""
    return {
        "messaging_product": "whatsapp",
        **{k: v for k, v in body.items() if k not in ("tenant", "idempotency_key")},
    }


async def _reaches_graph(graph: FakeGraph, expected: dict[str, Any]) -> None:
    await wait_for(lambda: expected in [r.body for r in graph.sends])


def _text(body: str = "hello") -> dict[str, Any]:
    return {"body": body}


# ---------------------------------------------------------------------------- accepted shapes

# (case id, who must have written first: "phone" / "bsuid" / None, the API body)
SHAPES: list[Any] = [
    # pywa's body for a BSUID; Meta calling/call-button-messages-deep-links shows top-level `recipient`
    pytest.param(
        "bsuid",
        {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "recipient": BSUID,
            "type": "text",
            "text": _text(),
        },
        id="recipient-bsuid",
    ),
    # Meta: calling/business-initiated-calls — `recipient` takes "a BSUID or parent BSUID"
    pytest.param("parent", {"recipient": PARENT_BSUID, "type": "text", "text": _text()}, id="recipient-parent-bsuid"),
    # Meta: "if you include both `to` and `recipient`, `to` takes precedence"
    pytest.param("phone", {"to": PHONE, "recipient": BSUID, "type": "text", "text": _text()}, id="to-and-recipient"),
    # Meta: business-phone-numbers/phone-numbers (identity change check): delivered only if the hash matches
    pytest.param(
        "phone",
        {"to": PHONE, "recipient_identity_key_hash": "DF2lS5v2W6x=", "type": "text", "text": _text()},
        id="identity-key-hash",
    ),
    # Meta: groups/ — recipient_type "group", the group id in `to`
    pytest.param(
        None, {"recipient_type": "group", "to": GROUP_ID, "type": "text", "text": _text("hi group")}, id="group"
    ),
    # Meta: calling/call-button-messages-deep-links — interactive voice_call
    pytest.param(
        "phone",
        {
            "to": PHONE,
            "type": "interactive",
            "interactive": {
                "type": "voice_call",
                "body": {"text": "You can call us on WhatsApp now for faster service!"},
                "action": {
                    "name": "voice_call",
                    "parameters": {"display_text": "Call on WhatsApp", "ttl_minutes": 100},
                },
            },
        },
        id="voice_call",
    ),
    # Meta: calling/user-call-permissions — interactive call_permission_request
    pytest.param(
        "phone",
        {
            "to": PHONE,
            "type": "interactive",
            "interactive": {
                "type": "call_permission_request",
                "body": {"text": "We would like to call you about your order."},
                "action": {"name": "call_permission_request"},
            },
        },
        id="call_permission_request",
    ),
    # business-scoped-user-ids: ask a username-only user for their phone number
    pytest.param(
        "bsuid",
        {
            "recipient_type": "individual",
            "recipient": BSUID,
            "type": "interactive",
            "interactive": {
                "type": "request_contact_info",
                "body": {"text": "Please share your phone number so we can finish your request."},
                "action": {"name": "request_contact_info"},
            },
        },
        id="request_contact_info",
    ),
    # Meta: messages/interactive-media-carousel-messages — "between 2 and 10 cards"
    *[
        pytest.param(
            "phone",
            {
                "to": PHONE,
                "type": "interactive",
                "interactive": {
                    "type": "carousel",
                    "body": {"text": "Here are three of our latest arrivals"},
                    "action": {
                        "cards": [
                            {
                                "card_index": i,
                                "type": "cta_url",
                                "header": {"type": "image", "image": {"link": f"https://example.com/{i}.png"}},
                                "body": {"text": f"Plant {i}"},
                                "action": {
                                    "name": "cta_url",
                                    "parameters": {"display_text": "Shop", "url": f"https://example.com/p/{i}"},
                                },
                            }
                            for i in range(count)
                        ]
                    },
                },
            },
            id=f"carousel-{count}",
        )
        for count in (2, 10)
    ],
    # a message type and an interactive type Meta may add: Meta's answer decides
    pytest.param("phone", {"to": PHONE, "type": "hologram", "hologram": {"depth": 3}}, id="unknown-type"),
    pytest.param(
        "phone",
        {"to": PHONE, "type": "interactive", "interactive": {"type": "hologram_picker", "action": {"n": 1}}},
        id="unknown-interactive-type",
    ),
    pytest.param(
        "phone", {"to": PHONE, "type": "text", "text": _text(), "some_field_meta_adds": {"x": 1}}, id="unknown-field"
    ),
    # limits Alfred used to invent (no source in Meta's pages): these bodies are valid
    pytest.param(
        "phone",
        {
            "to": PHONE,
            "type": "document",
            "document": {"link": "https://example.com/report.pdf", "filename": "r" * 300 + ".pdf"},
        },
        id="document-filename-over-240",
    ),
    # Meta: messages/location-messages documents the coordinates as strings
    pytest.param(
        "phone",
        {
            "to": PHONE,
            "type": "location",
            "location": {"latitude": "37.44216251868683", "longitude": "-122.16153582049394", "name": "x" * 1200},
        },
        id="location-as-documented",
    ),
    pytest.param(
        "phone",
        {"to": PHONE, "type": "reaction", "reaction": {"message_id": "wamid." + "A" * 300, "emoji": "\U0001f44d"}},
        id="reaction-long-wamid",
    ),
    pytest.param(
        "phone",
        {"to": PHONE, "type": "image", "image": {"link": "https://example.com/" + "a" * 2100 + ".png"}},
        id="media-link-over-2000",
    ),
]


@pytest.mark.parametrize(("writer", "body"), SHAPES)
async def test_accepted_shape_reaches_graph_unchanged(
    prod: Any, graph: FakeGraph, writer: str | None, body: dict[str, Any]
) -> None:
    if writer == "phone":
        await _user_writes(prod)
    elif writer in ("bsuid", "parent"):
        await _user_writes(prod, bsuid=BSUID if writer == "bsuid" else PARENT_BSUID, phone=None)
    sent = copy.deepcopy(body)
    status, answer = await _send(prod, {**body, "tenant": "home", "idempotency_key": "shape-1"})
    assert status == 202, answer
    await _reaches_graph(graph, _expected(sent))


async def test_template_with_every_alfred_field_reaches_graph_without_them(prod: Any, graph: FakeGraph) -> None:
    body = {"recipient": BSUID, "type": "template", "template": {"name": "hello", "language": {"code": "en_US"}}}
    status, answer = await _send(prod, {**body, "tenant": "home", "idempotency_key": "tpl-1"})
    assert status == 202, answer  # templates need no window, also when addressed by BSUID
    await _reaches_graph(graph, _expected(body))
    [row] = db_rows(
        prod.app[keys.CONFIG].storage.path, "SELECT recipient, payload FROM outbox WHERE id = ?", (answer["id"],)
    )
    assert row["recipient"] == BSUID  # pair limits, history and opt-out follow the id used
    assert json.loads(row["payload"]) == _expected(body)


async def test_missing_recipient_says_to_is_required(prod: Any, graph: FakeGraph) -> None:
    status, answer = await _send(prod, {"type": "template", "template": {"name": "hello", "language": {"code": "en"}}})
    assert status == 422
    assert answer == {"error": "to: is required", "field": "to"}
    assert graph.sends == []


@pytest.mark.parametrize("count", [1, 11])
async def test_carousel_card_count_outside_2_to_10_is_refused(prod: Any, count: int) -> None:
    cards = [{"card_index": i, "type": "cta_url"} for i in range(count)]
    body = {
        "to": PHONE,
        "type": "interactive",
        "interactive": {"type": "carousel", "body": {"text": "x"}, "action": {"cards": cards}},
    }
    status, answer = await _send(prod, body)
    assert (status, answer["field"]) == (422, "interactive.action.cards")


# ---------------------------------------------------------------------------- window and opt-out by BSUID


async def test_window_is_judged_by_the_bsuid_that_addresses_the_user(prod: Any, graph: FakeGraph) -> None:
    body = {"recipient": BSUID, "type": "text", "text": _text("are you there?")}
    status, answer = await _send(prod, body)
    assert status == 422
    assert answer["field"] == "recipient"
    assert "24-hour" in answer["error"]

    await _user_writes(prod, bsuid=BSUID, phone=None, ago=25 * HOUR)  # wrote, but too long ago
    status, answer = await _send(prod, body)
    assert (status, "24-hour" in answer["error"]) == (422, True)

    await _user_writes(prod, bsuid=BSUID, phone=None)
    status, answer = await _send(prod, body)
    assert status == 202, answer
    await _reaches_graph(graph, _expected(body))


async def test_bsuid_send_to_a_user_who_also_has_a_phone_number(prod: Any, graph: FakeGraph) -> None:
    # a user whose messages carry both `from` and `from_user_id`: their BSUID opens the window too
    await _user_writes(prod, bsuid=BSUID)
    body = {"recipient": BSUID, "type": "text", "text": _text("by user id")}
    status, answer = await _send(prod, body)
    assert status == 202, answer
    await _reaches_graph(graph, _expected(body))


async def test_group_send_is_not_blocked_by_a_window(prod: Any, graph: FakeGraph) -> None:
    # groups/pricing: any member's message opens the group's window; Alfred does not track it per group
    body = {"recipient_type": "group", "to": GROUP_ID, "type": "image", "image": {"id": "1013859600285441"}}
    status, answer = await _send(prod, body)
    assert status == 202, answer
    await _reaches_graph(graph, _expected(body))


async def test_opt_out_is_keyed_by_the_bsuid(prod: Any, graph: FakeGraph) -> None:
    handled = prod.app[keys.DISPATCHER].counts["handled"]
    stop = _user_message("STOP", bsuid=BSUID, phone=None, at=time.time())
    assert await post_webhook(prod, stop) == 200
    await wait_for(lambda: prod.app[keys.DISPATCHER].counts["handled"] > handled)
    template = {"recipient": BSUID, "type": "template", "template": {"name": "promo", "language": {"code": "en"}}}
    status, answer = await _send(prod, template)
    assert status == 409
    assert answer["field"] == "recipient"
    assert "opted out" in answer["error"]


async def test_opt_out_under_a_phone_number_covers_the_same_users_bsuid(prod: Any, graph: FakeGraph) -> None:
    # one person, two ids (Meta sends `from` and `from_user_id` side by side): STOP by either blocks both
    handled = prod.app[keys.DISPATCHER].counts["handled"]
    stop = _user_message("STOP", bsuid=BSUID, phone=payloads.USER, at=time.time())
    assert await post_webhook(prod, stop) == 200
    await wait_for(lambda: prod.app[keys.DISPATCHER].counts["handled"] > handled)
    template = {"type": "template", "template": {"name": "promo", "language": {"code": "en"}}}
    for address in ({"recipient": BSUID}, {"to": payloads.USER}):
        status, answer = await _send(prod, {**address, **template})
        assert status == 409, (address, answer)
    await _user_writes(prod, bsuid=BSUID, phone=None)  # writing again under the other id ends it for both
    for address in ({"recipient": BSUID}, {"to": payloads.USER}):
        status, answer = await _send(prod, {**address, **template})
        assert status == 202, (address, answer)


# ---------------------------------------------------------------------------- handler replies


async def test_reply_to_a_username_only_user_uses_recipient(prod: Any, graph: FakeGraph) -> None:
    await _user_writes(prod, bsuid=BSUID, phone=None)
    await wait_for(lambda: any(r.body.get("type") == "text" for r in graph.sends))
    [reply] = [r.body for r in graph.sends if r.body.get("type") == "text"]
    assert reply == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "recipient": BSUID,
        "type": "text",
        "text": {"body": "You said: hi"},
    }
    rows = db_rows(prod.app[keys.CONFIG].storage.path, "SELECT recipient FROM outbox WHERE type = 'text'")
    assert [r["recipient"] for r in rows] == [BSUID]

    # a user whose messages carry a phone number too is still answered on it
    await _user_writes(prod, bsuid="US.99999999999999999999")
    await wait_for(lambda: len([r for r in graph.sends if r.body.get("type") == "text"]) == 2)
    phone_reply = [r.body for r in graph.sends if r.body.get("type") == "text"][1]
    assert (phone_reply["to"], "recipient" in phone_reply) == (PHONE, False)
