"""Real traffic end to end (issue 11), always through signed webhooks into the real app with the
default echo bot: what ends an opt-out, how the default bot answers each kind, messages that do
not decode are kept and shown, Meta's errors and the new message details in `/api/inbound`, the
events API, marketing preferences, and `played` only for audio.

Fixtures are written from Meta's documentation (pages cited at each), see also
`tests/test_real_traffic_parse.py` for the parser's view of the same shapes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.models import WRITTEN, AudioMessage, TextMessage
from handlers import echo
from tests import payloads as p
from tests.conftest import API_TOKEN, db_rows, post_webhook, wait_for

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
MESSAGES_REF = "developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/reference/messages"


def _flow() -> dict[str, Any]:
    """Meta: Flows > Receive flow response (developers.facebook.com/docs/whatsapp/flows/guides/
    receiveflowresponse): `interactive{type: nfm_reply, nfm_reply{name, body, response_json}}`."""
    nfm = {"name": "flow", "body": "Sent", "response_json": json.dumps({"flow_token": "tok-1", "date": "2026-12-01"})}
    return p.message("interactive", {"type": "nfm_reply", "nfm_reply": nfm}, context={"from": "1555", "id": "wamid.F"})


def _call_permission(response: str = "accept") -> dict[str, Any]:
    """Meta: Calling > User call permissions (developers.facebook.com/docs/whatsapp/cloud-api/calling/
    user-call-permissions): an `interactive` message of type `call_permission_reply`."""
    reply = {"response": response, "is_permanent": False, "response_source": "user_action"}
    return p.message("interactive", {"type": "call_permission_reply", "call_permission_reply": reply})


def _list_reply() -> dict[str, Any]:
    """Meta: Webhooks > messages > interactive (MESSAGES_REF/interactive): a tapped list row."""
    row = {"id": "slot-1", "title": "10:00", "description": "Morning"}
    return p.message(
        "interactive", {"type": "list_reply", "list_reply": row}, context={"from": "1555", "id": "wamid.L"}
    )


CANNOT = echo.CANNOT_DISPLAY
#: (kind, message, ends an opt-out, the default bot's answer or None for silence)
KINDS: list[tuple[str, dict[str, Any], bool, str | None]] = [
    ("text", p.text("hello again"), True, "You said: hello again"),
    ("image", p.SAMPLES["image"], True, "Thanks, I got your photo."),
    ("audio", p.SAMPLES["audio"], True, "Thanks, I got your voice message."),
    ("video", p.SAMPLES["video"], True, "Thanks, I got your video."),
    ("document", p.SAMPLES["document"], True, "Thanks, I got your document."),
    ("sticker", p.SAMPLES["sticker"], True, "Thanks for the sticker!"),
    ("location", p.SAMPLES["location"], True, "Thanks, I got your location."),
    ("contacts", p.SAMPLES["contacts"], True, "Thanks, I got the contact details."),
    ("button_reply", p.SAMPLES["interactive"], True, "Thanks, I got your answer."),
    ("list_reply", _list_reply(), True, "Thanks, I got your choice."),
    ("nfm_reply", _flow(), True, "Thanks, I got your form."),
    # Meta: Webhooks > messages > button (MESSAGES_REF/button): a template quick-reply tap
    (
        "button",
        p.message("button", {"payload": "MORE_INFO", "text": "Tell me more"}),
        True,
        "Thanks, I got your answer.",
    ),
    ("order", p.SAMPLES["order"], True, "Thanks, I got your order."),
    ("reaction", p.SAMPLES["reaction"], False, None),
    ("revoke", p.SAMPLES_2025["revoke"], False, None),
    ("edit", p.SAMPLES_2025["edit"], False, None),
    ("system", p.SAMPLES["system"], False, None),
    ("unsupported", p.SAMPLES["unsupported"], False, CANNOT),
    # Meta: Webhooks > messages > unknown (MESSAGES_REF/unknown): the legacy name of `unsupported`
    ("unknown", p.message("unknown", errors=[{"code": 131051, "title": "Message type unknown"}]), False, CANNOT),
    ("a type added later", p.message("poll", {"question": "Lunch?"}), False, CANNOT),
    ("parse error", p.INTERACTIVE_WITHOUT_OBJECT, False, CANNOT),
    ("request_welcome", p.SAMPLES_2025["request_welcome"], False, echo.GREETING),
    ("call_permission_reply", _call_permission(), False, "Thanks, I noted your answer about calls."),
]


def _db(client: Any) -> Path:
    return Path(client.app[keys.CONFIG].storage.path)


def _state(db: Path, event_id: str) -> str | None:
    rows = db_rows(db, "SELECT state FROM inbox WHERE event_id = ?", (event_id,))
    return str(rows[0][0]) if rows else None


async def _deliver(client: Any, *msgs: dict[str, Any], **value_kw: Any) -> None:
    """POST the messages signed, and wait until each one left `pending`."""
    body = p.dump(p.envelope(p.entry(p.change(p.value(list(msgs), **value_kw)))))
    assert await post_webhook(client, body) == 200
    db = _db(client)
    for msg in msgs:
        await wait_for(lambda m=msg: _state(db, m["id"]) not in (None, "pending"))


def _replies(db: Path, event_id: str, kind: str = "text") -> list[Any]:
    rows = db_rows(
        db, "SELECT payload FROM outbox WHERE source_event_id = ? AND type = ? ORDER BY idem_key", (event_id, kind)
    )
    return [json.loads(r[0]) for r in rows]


async def _api_template(client: Any) -> int:
    body = {"to": f"+{p.USER}", "type": "template", "template": {"name": "promo", "language": {"code": "en_US"}}}
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    await resp.read()
    return int(resp.status)


# ---------------------------------------------------------------------------- consent and the default bot


@pytest.mark.parametrize(("kind", "msg", "ends", "reply"), KINDS, ids=[k[0] for k in KINDS])
async def test_each_kind_after_stop_consent_and_polite_answer(
    client: Any, kind: str, msg: dict[str, Any], ends: bool, reply: str | None
) -> None:
    db = _db(client)
    await _deliver(client, p.text("STOP", id="wamid.STOP1"))
    assert await _api_template(client) == 409

    message = dict(msg, id="wamid.KIND1")
    await _deliver(client, message)
    texts = [r["text"]["body"] for r in _replies(db, "wamid.KIND1")]
    assert texts == ([reply] if reply else []), kind
    # silence means no read receipt either; every answer comes with one
    assert len(_replies(db, "wamid.KIND1", "read")) == (1 if reply else 0)
    assert await _api_template(client) == (202 if ends else 409), f"{kind} must {'' if ends else 'not '}end an opt-out"


async def test_no_reply_names_an_internal_type(client: Any) -> None:
    """Every kind at once: no answer of the default bot contains a type name of Meta's."""
    msgs = [dict(m, id=f"wamid.ALL{i}") for i, (_, m, _, _) in enumerate(KINDS)]
    await _deliver(client, *msgs)
    db = _db(client)
    bodies = [json.loads(r[0])["text"]["body"] for r in db_rows(db, "SELECT payload FROM outbox WHERE type = 'text'")]
    # Meta's names that are not words a person would use here ("image": we say "photo")
    names = {
        "reaction",
        "request_welcome",
        "unsupported",
        "unknown",
        "interactive",
        "nfm_reply",
        "button_reply",
        "list_reply",
        "call_permission",
        "system",
        "revoke",
        "poll",
        "image",
    }
    leaked = [b for b in bodies if not b.startswith(echo.PREFIX) and any(n in b.lower() for n in names)]
    assert len(bodies) == sum(1 for k in KINDS if k[3]) and leaked == []


# ---------------------------------------------------------------------------- never drop a message


async def test_a_message_that_does_not_decode_is_stored_shown_counted_and_answered(client: Any) -> None:
    db = _db(client)
    no_sender = {"id": "wamid.NOSENDER", "timestamp": p.TS, "type": "text", "text": {"body": "who am I"}}
    body = p.dump(p.envelope(p.entry(p.change(p.value([p.INTERACTIVE_WITHOUT_OBJECT, no_sender], contacts=[])))))
    assert await post_webhook(client, body) == 200
    await wait_for(lambda: _state(db, "wamid.NOOBJ1") == "handled")

    # no sender: kept, failed with the reason, never dispatched (nothing to answer to)
    assert _state(db, "wamid.NOSENDER") == "failed"
    assert db_rows(db, "SELECT COUNT(*) FROM outbox WHERE source_event_id = 'wamid.NOSENDER'")[0][0] == 0
    assert db_rows(db, "SELECT COUNT(*) FROM rejected")[0][0] == 0  # nothing went to the side table

    # the broken interactive is routed like an unknown type: the polite "cannot display" answer
    assert [r["text"]["body"] for r in _replies(db, "wamid.NOOBJ1")] == [CANNOT]

    items = {i["id"]: i for i in await (await client.get("/api/inbound", headers=AUTH)).json()}
    broken = items["wamid.NOOBJ1"]
    assert broken["type"] == "interactive" and broken["state"] == "handled"
    assert "interactive" in broken["parse_error"]
    assert broken["errors"] == [
        {
            "code": 131000,
            "title": "Something went wrong",
            "message": "Something went wrong",
            "details": "Message failed to send because of an unknown error.",
        }
    ]
    lost = items["wamid.NOSENDER"]
    assert lost["state"] == "failed" and lost["from"] is None and "from" in lost["error"]
    assert lost["parse_error"] == lost["error"]

    metrics = await (await client.get("/metrics")).text()
    assert 'alfred_inbound_parse_errors_total{tenant="home",type="interactive"} 1.0' in metrics
    assert 'alfred_inbound_parse_errors_total{tenant="home",type="text"} 1.0' in metrics
    health = await (await client.get("/healthz")).json()
    assert health["webhook"]["parse_errors"] == 2


async def test_value_errors_stay_attached_to_their_message(client: Any) -> None:
    """Meta: Webhooks > messages > errors (MESSAGES_REF/errors): `value.errors` beside the messages."""
    value_error = {
        "code": 131051,
        "title": "Message type unknown",
        "error_data": {"details": "Message type is unknown"},
    }
    await _deliver(client, dict(p.SAMPLES["unsupported"], id="wamid.UNS1"), errors=[value_error])
    [item] = await (await client.get("/api/inbound", headers=AUTH)).json()
    assert [(e["code"], e["details"]) for e in item["errors"]] == [
        (131051, "poll"),
        (131051, "Message type is unknown"),
    ]
    assert item["parse_error"] is None


async def test_inbound_shows_edits_revokes_call_permissions_and_flows(client: Any) -> None:
    edit = dict(p.SAMPLES_2025["edit"], id="wamid.ED1")
    revoke = dict(p.SAMPLES_2025["revoke"], id="wamid.RV1")
    call = dict(_call_permission("reject"), id="wamid.CP1")
    flow = dict(_flow(), id="wamid.FL1")
    await _deliver(client, edit, revoke, call, flow, p.text("plain", id="wamid.PL1"))
    items = {i["id"]: i for i in await (await client.get("/api/inbound", headers=AUTH)).json()}
    assert (items["wamid.ED1"]["text"], items["wamid.ED1"]["edited_id"]) == ("fixed typo", "wamid.ORIGINAL1")
    assert items["wamid.RV1"]["revoked_id"] == "wamid.ORIGINAL2"
    assert (items["wamid.CP1"]["call_permission"], items["wamid.CP1"]["text"]) == ("reject", "reject")
    assert items["wamid.FL1"]["flow_response"] == {"flow_token": "tok-1", "date": "2026-12-01"}
    assert items["wamid.FL1"]["text"] == "Sent"
    plain = items["wamid.PL1"]
    assert [plain[k] for k in ("edited_id", "revoked_id", "call_permission", "flow_response", "parse_error")] == [
        None
    ] * 5
    assert plain["errors"] == []


# ---------------------------------------------------------------------------- events


def _template(event: str, at: int, template_id: int = 7) -> dict[str, Any]:
    """Meta: Webhooks > message_template_status_update (developers.facebook.com/documentation/
    business-messaging/whatsapp/webhooks/reference/message_template_status_update)."""
    value = {
        "event": event,
        "message_template_id": template_id,
        "message_template_name": "promo",
        "message_template_language": "en_US",
        "reason": None,
    }
    return {"id": "WABA1", "time": at, "changes": [p.change(value, "message_template_status_update")]}


async def _events(client: Any, query: str = "") -> Any:
    resp = await client.get(f"/api/events{query}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_events_api_keeps_every_update_newest_first(client: Any) -> None:
    for event, at in (("APPROVED", 1760000001), ("PAUSED", 1760000100), ("APPROVED", 1760000200)):
        assert await post_webhook(client, p.dump(p.envelope(_template(event, at)))) == 200
    assert await post_webhook(client, p.dump(p.envelope(_template("APPROVED", 1760000001)))) == 200  # redelivery
    # a field this version does not know is kept too, routed by its metadata
    unknown = {"metadata": {"phone_number_id": p.BIZ_PNID}, "anything": [1, 2, {"deep": True}]}
    entry = {"id": "WABA2", "time": 1760000300, "changes": [p.change(unknown, "brand_new_field")]}
    assert await post_webhook(client, p.dump(p.envelope(entry))) == 200

    events = await _events(client)
    assert [(e["field"], e["time"]) for e in events] == [
        ("brand_new_field", 1760000300),
        ("message_template_status_update", 1760000200),
        ("message_template_status_update", 1760000100),
        ("message_template_status_update", 1760000001),
    ]
    assert [e["value"].get("event") for e in events[1:]] == ["APPROVED", "PAUSED", "APPROVED"]
    newest = events[0]
    assert (newest["tenant"], newest["phone_number_id"], newest["waba_id"]) == ("biz", p.BIZ_PNID, "WABA2")
    assert newest["value"] == unknown
    assert all(isinstance(e["received_at"], float) for e in events)
    assert events[1]["tenant"] is None and events[1]["phone_number_id"] is None

    assert len(await _events(client, "?field=message_template_status_update")) == 3
    assert [e["field"] for e in await _events(client, "?tenant=biz")] == ["brand_new_field"]
    assert await _events(client, "?tenant=home") == []
    assert len(await _events(client, "?limit=2")) == 2


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("?limit=0", "limit"),
        ("?limit=abc", "limit"),
        ("?limit=1001", "limit"),
        ("?field=", "field"),
        ("?field=a%20b", "field"),
        ("?field=" + "f" * 101, "field"),
        ("?tenant=nobody", "tenant"),
        ("?tenant=", "tenant"),
    ],
)
async def test_events_api_rejects_bad_params_naming_them(client: Any, query: str, param: str) -> None:
    resp = await client.get(f"/api/events{query}", headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["error"].startswith(f"{param}:")


async def test_events_api_needs_the_token(client: Any) -> None:
    assert (await client.get("/api/events")).status == 401
    assert (await client.get("/api/events", headers={"Authorization": "Bearer wrong"})).status == 401


def _preferences(value: str, timestamp: int, user: str = p.USER, pnid: str = p.PNID) -> bytes:
    """Meta: Webhooks > user_preferences (developers.facebook.com/documentation/business-messaging/
    whatsapp/webhooks/reference/user_preferences): `timestamp` is an integer."""
    detail = f"User requested to {value} marketing messages"
    val = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": pnid},
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": user}],
        "user_preferences": [
            {"wa_id": user, "detail": detail, "category": "marketing_messages", "value": value, "timestamp": timestamp}
        ],
    }
    return p.dump(p.envelope({"id": "WABA1", "time": timestamp, "changes": [p.change(val, "user_preferences")]}))


async def test_marketing_preferences_latest_by_meta_timestamp_per_tenant(client: Any) -> None:
    store = client.app[keys.STORE]
    assert await store.marketing_stopped("home", p.USER) is False
    assert await post_webhook(client, _preferences("stop", 1760000100)) == 200
    assert await store.marketing_stopped("home", p.USER) is True
    assert await store.marketing_stopped("biz", p.USER) is False  # per tenant
    assert await post_webhook(client, _preferences("resume", 1760000300)) == 200
    assert await store.marketing_stopped("home", p.USER) is False
    # an older `stop` arriving late (webhooks are unordered) does not win
    assert await post_webhook(client, _preferences("stop", 1760000200)) == 200
    assert await store.marketing_stopped("home", p.USER) is False
    # another user of the same tenant, and the same user on the other number
    assert await post_webhook(client, _preferences("stop", 1760000400, user="15550009999")) == 200
    assert await post_webhook(client, _preferences("stop", 1760000400, pnid=p.BIZ_PNID)) == 200
    assert await store.marketing_stopped("home", "15550009999") is True
    assert await store.marketing_stopped("biz", p.USER) is True
    assert await store.marketing_stopped("home", p.USER) is False

    shown = await _events(client, "?field=user_preferences&tenant=home")
    assert [e["value"]["user_preferences"][0]["value"] for e in shown] == ["stop", "stop", "resume", "stop"]
    assert shown[0]["time"] == 1760000400


# ---------------------------------------------------------------------------- statuses


async def _sent_wamid(client: Any, outbox_id: str) -> str:
    db = _db(client)
    await wait_for(lambda: db_rows(db, "SELECT wamid FROM outbox WHERE id = ?", (outbox_id,))[0][0] is not None)
    return str(db_rows(db, "SELECT wamid FROM outbox WHERE id = ?", (outbox_id,))[0][0])


async def _statuses(client: Any, *statuses: dict[str, Any]) -> None:
    body = p.dump(p.envelope(p.entry(p.change(p.value(statuses=list(statuses))))))
    assert await post_webhook(client, body) == 200


async def _send(client: Any, kind: str, content: Any) -> str:
    resp = await client.post("/api/messages", json={"to": f"+{p.USER}", "type": kind, kind: content}, headers=AUTH)
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["id"])


async def test_played_moves_only_audio_and_never_a_text_sideways(client: Any) -> None:
    await _deliver(client, p.text("open the window", id="wamid.W1", timestamp=str(int(time.time()))))
    text_id = await _send(client, "text", {"body": "hello"})
    audio_id = await _send(client, "audio", {"id": "media-1"})
    text_wamid, audio_wamid = await _sent_wamid(client, text_id), await _sent_wamid(client, audio_id)

    # Meta: Webhooks > statuses (MESSAGES_REF/status): `played` is sent for voice messages only
    await _statuses(client, p.status(text_wamid, "delivered"), p.status(text_wamid, "read"))
    await _statuses(client, p.status(text_wamid, "played"))
    await _statuses(client, p.status(audio_wamid, "delivered"), p.status(audio_wamid, "played"))
    text = await (await client.get(f"/api/messages/{text_id}", headers=AUTH)).json()
    audio = await (await client.get(f"/api/messages/{audio_id}", headers=AUTH)).json()
    assert text["status"] == "read"
    assert audio["status"] == "played" and audio["read_at"] is not None and audio["delivered_at"] is not None
    # and a late `read` never moves the played audio back
    await _statuses(client, p.status(audio_wamid, "read"))
    assert (await (await client.get(f"/api/messages/{audio_id}", headers=AUTH)).json())["status"] == "played"


async def test_status_of_a_username_only_user_keeps_the_recipient_user_id(client: Any) -> None:
    """Meta: Business-scoped user IDs (developers.facebook.com/documentation/business-messaging/
    whatsapp/business-scoped-user-ids): statuses carry `recipient_user_id`, maybe no `recipient_id`."""
    status = {"id": "wamid.OUTBSUID", "status": "delivered", "timestamp": p.TS, "recipient_user_id": "US.1349"}
    await _statuses(client, status)
    rows = db_rows(_db(client), "SELECT recipient_id, recipient_user_id FROM statuses")
    assert [tuple(r) for r in rows] == [(None, "US.1349")]


def test_echo_acknowledges_exactly_the_messages_a_user_writes() -> None:
    """One list of "what a user writes" (`models.WRITTEN`): the echo bot has words for each of them."""
    assert set(echo.ACKNOWLEDGE) | {TextMessage, AudioMessage} == set(WRITTEN)
