"""Real-traffic shapes (issue 11): every fixture here is written from Meta's documentation, cited
per fixture, and each test fails on the parser as it was before this issue.

Classes covered: a message with an id is never dropped (kept with its parse error, whatever is
broken); Meta's own `errors` stay attached to their message; edits, revokes, call permission
replies, flow completions and the other documented inbound shapes read with a sensible `text`;
username-only users (BSUID); entry `time` on events and repeated event sequences; dedupe keys
scoped by business phone number.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from alfred_bot.models import InteractiveMessage, UnknownMessage
from alfred_bot.parse import InboundItem, ParsedBody, parse_body
from tests import payloads as p

TENANTS = {p.PNID: "home", p.BIZ_PNID: "biz"}
BSUID = "US.13491208655302741918"

# Meta doc pages cited below (developers.facebook.com):
MESSAGES_REF = "documentation/business-messaging/whatsapp/webhooks/reference/messages"
ERROR_CODES = "docs/whatsapp/cloud-api/support/error-codes"
BSUID_DOC = "documentation/business-messaging/whatsapp/business-scoped-user-ids"


def parse(data: Any) -> ParsedBody:
    return parse_body(p.dump(data), TENANTS)


def parse_value(val: dict[str, Any], *, time: Any = 1760000000) -> ParsedBody:
    entry: dict[str, Any] = p.entry(p.change(val))
    if time is not None:
        entry["time"] = time
    return parse(p.envelope(entry))


def only(msg: Any, **value_kw: Any) -> InboundItem:
    """The one item a body carrying just `msg` gives; nothing may be quarantined."""
    parsed = parse_value(p.value([msg], **value_kw))
    assert parsed.rejected == []
    [item] = parsed.messages
    return item


# ---------------------------------------------------------------------------- never drop a message


def test_known_type_without_its_object_is_kept_with_meta_error() -> None:
    item = only(p.INTERACTIVE_WITHOUT_OBJECT)
    assert isinstance(item.message, UnknownMessage)
    assert (item.message.id, item.message.type, item.message.sender) == ("wamid.NOOBJ1", "interactive", p.USER)
    assert item.message.timestamp == int(p.TS)
    assert item.parse_error is not None and "interactive" in item.parse_error
    assert item.message.parse_error == item.parse_error
    assert [(e.code, e.title) for e in item.errors] == [(131000, "Something went wrong")]
    assert item.errors[0].error_data is not None
    assert item.errors[0].error_data.details == "Message failed to send because of an unknown error."
    assert item.raw == json.dumps(p.INTERACTIVE_WITHOUT_OBJECT).encode()
    assert item.contact is not None and item.contact.wa_id == p.USER


def _msg(**fields: Any) -> dict[str, Any]:
    """A text message (Meta: Webhooks > messages > text, MESSAGES_REF/text) with fields replaced
    (a value of None removes the field)."""
    msg: dict[str, Any] = {
        "from": p.USER,
        "id": "wamid.BROKEN1",
        "timestamp": p.TS,
        "type": "text",
        "text": {"body": "x"},
    }
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not None}


#: Every way a message with an id can be partly broken; expected (type, sender, timestamp) kept.
BROKEN: dict[str, tuple[dict[str, Any], str, str, int]] = {
    "object-missing": (_msg(text=None), "text", p.USER, int(p.TS)),
    "object-null": ({**_msg(), "text": None}, "text", p.USER, int(p.TS)),
    "object-wrong-type": (_msg(text="just a string"), "text", p.USER, int(p.TS)),
    "field-wrong-type": (_msg(text={"body": 42}), "text", p.USER, int(p.TS)),
    "nested-garbage": (_msg(text={"body": [[{"a": [None, {}]}]]}), "text", p.USER, int(p.TS)),
    "type-missing": (_msg(type=None), "unknown", p.USER, int(p.TS)),
    "type-not-string": (_msg(type=["text"]), "unknown", p.USER, int(p.TS)),
    "timestamp-huge": (_msg(timestamp=2**70), "text", p.USER, 0),
    "timestamp-huge-string": (_msg(timestamp=str(2**70)), "text", p.USER, 0),
    "timestamp-missing": (_msg(timestamp=None), "text", p.USER, 0),
    "timestamp-object": (_msg(timestamp={"s": 1}), "text", p.USER, 0),
    "from-wrong-type": (_msg(**{"from": 15551234567}), "text", "", int(p.TS)),
    "from-missing": (_msg(**{"from": None}), "text", "", int(p.TS)),
    "context-wrong-type": (_msg(context="wamid.X"), "text", p.USER, int(p.TS)),
    "media-without-id": (
        {**_msg(type="image", text=None), "image": {"caption": "lost id", "mime_type": "image/jpeg"}},
        "image",
        p.USER,
        int(p.TS),
    ),
    "unknown-type-huge-timestamp": ({**_msg(type="poll", text=None), "timestamp": 2**64}, "poll", p.USER, 0),
    "unknown-type-from-object": ({**_msg(type="poll", text=None), "from": {"n": 1}}, "poll", "", int(p.TS)),
    "unknown-type-bad-context": ({**_msg(type="poll", text=None), "context": [1]}, "poll", p.USER, int(p.TS)),
}


@pytest.mark.parametrize("case", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_message_with_an_id_is_kept_never_rejected(case: tuple[dict[str, Any], str, str, int]) -> None:
    """Whatever is broken, the message is its own item: type as given (or "unknown"), the fields
    that decode, the raw JSON and a short reason; its siblings are untouched."""
    msg, kind, sender, timestamp = case
    before, after = p.text("before", id="wamid.SIB1"), p.text("after", id="wamid.SIB2")
    parsed = parse_value(p.value([before, msg, after]))
    assert parsed.rejected == []
    assert [i.message.id for i in parsed.messages] == ["wamid.SIB1", "wamid.BROKEN1", "wamid.SIB2"]
    first, item, last = parsed.messages
    assert (first.message.text, last.message.text) == ("before", "after")
    assert isinstance(item.message, UnknownMessage)
    assert (item.message.type, item.message.sender, item.message.timestamp) == (kind, sender, timestamp)
    assert item.parse_error
    assert len(item.parse_error) <= 300
    assert item.raw == json.dumps(msg).encode()
    assert item.key == f"{p.PNID}:wamid.BROKEN1"


@pytest.mark.parametrize(
    "msg",
    [_msg(id=None), _msg(id=12345), _msg(id=""), _msg(id={"wamid": "x"})],
    ids=["id-missing", "id-number", "id-empty", "id-object"],
)
def test_only_a_message_without_a_usable_id_is_quarantined(msg: dict[str, Any]) -> None:
    """Nothing can key a message without an id: that one is quarantined; a broken one WITH an id
    beside it is kept."""
    broken = _msg(id="wamid.KEPT1", text={"body": None})
    parsed = parse_value(p.value([msg, broken, p.text("ok", id="wamid.OK1")]))
    assert [i.message.id for i in parsed.messages] == ["wamid.KEPT1", "wamid.OK1"]
    [rejected] = parsed.rejected
    assert rejected.what == "message"
    assert "id" in rejected.reason


def test_username_user_broken_message_takes_the_lone_contacts_user_id() -> None:
    """A broken message of a username-only user (no `from`) still gets its sender from the contact."""
    msg = _msg(**{"from": None, "text": None})
    item = only(msg, contacts=[{"profile": {"name": "anon"}, "user_id": BSUID}])
    assert item.message.sender == BSUID
    assert item.parse_error and "from" not in item.parse_error


# ---------------------------------------------------------------------------- Meta's errors stay attached

# Meta: Webhooks > messages > unsupported (MESSAGES_REF/unsupported): `errors` on the message,
# code 131051 "Message type unknown"; system-level errors come in `value.errors` (MESSAGES_REF/errors).
UNSUPPORTED = {
    "from": p.USER,
    "id": "wamid.UNSUP1",
    "timestamp": p.TS,
    "type": "unsupported",
    "errors": [
        {
            "code": 131051,
            "title": "Message type unknown",
            "message": "Message type unknown",
            "error_data": {"details": "Message type is currently not supported."},
        }
    ],
    "unsupported": {"type": "edit"},
}
VALUE_ERROR = {
    "code": 131000,
    "title": "Something went wrong",
    "message": "Something went wrong",
    "error_data": {"details": "Unknown error."},
    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
}


def test_message_errors_and_value_errors_are_attached_to_the_message() -> None:
    parsed = parse_value(p.value([UNSUPPORTED], errors=[VALUE_ERROR]))
    [item] = parsed.messages
    assert item.parse_error is None
    assert [e.code for e in item.errors] == [131051, 131000]
    assert item.errors[1].href == VALUE_ERROR["href"]
    assert [e.field for e in parsed.events] == []  # carried by the message, not a loose event
    assert item.message.text is None


def test_malformed_error_elements_do_not_lose_the_message() -> None:
    """Keep what decodes: a bad element (string code, no code, not an object, huge code) is dropped."""
    msg = {
        **UNSUPPORTED,
        "errors": [{"code": "x"}, {"title": "no code"}, "oops", {"code": 2**70}, {"code": 131051, "title": "ok"}],
    }
    item = only(msg)
    assert item.parse_error is None
    assert [e.code for e in item.errors] == [131051]
    assert item.message.type == "unsupported"


def test_errors_given_as_one_object_are_read_as_a_list() -> None:
    item = only({**UNSUPPORTED, "errors": {"code": 131051, "title": "Message type unknown"}})
    assert [e.code for e in item.errors] == [131051]


def test_value_errors_without_messages_remain_events() -> None:
    """Meta: Webhooks > messages > errors (MESSAGES_REF/errors): errors not tied to a message."""
    parsed = parse_value(p.value(errors=[VALUE_ERROR]))
    assert parsed.messages == []
    [event] = parsed.events
    assert (event.field, event.phone_number_id, event.time) == ("errors", p.PNID, 1760000000)


# ---------------------------------------------------------------------------- documented shapes

# Meta: Webhooks > messages > edit (MESSAGES_REF/edit): `edit{original_message_id, message{context,
# type, text|image{caption…}}}`; only for WhatsApp Business app ("coexistence") numbers.
EDIT_TEXT = p.message(
    "edit",
    {
        "original_message_id": "wamid.ORIG1",
        "message": {"context": {"id": "wamid.CTX1"}, "type": "text", "text": {"body": "see you at 6, not 5"}},
    },
    id="wamid.EDIT1",
)
EDIT_IMAGE = p.message(
    "edit",
    {
        "original_message_id": "wamid.ORIG2",
        "message": {
            "context": {"id": "wamid.CTX2"},
            "type": "image",
            "image": {
                "caption": "the blue one",
                "mime_type": "image/jpeg",
                "sha256": "abc",
                "id": "1234",
                "url": "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1234",
            },
        },
    },
    id="wamid.EDIT2",
)


@pytest.mark.parametrize(
    ("msg", "text", "original"),
    [
        (EDIT_TEXT, "see you at 6, not 5", "wamid.ORIG1"),
        (EDIT_IMAGE, "the blue one", "wamid.ORIG2"),
        # defensive: the new content flat in `edit`, and a media edit without a caption
        (p.message("edit", {"original_message_id": "wamid.O3", "text": {"body": "flat"}}), "flat", "wamid.O3"),
        (
            p.message("edit", {"original_message_id": "wamid.O4", "message": {"type": "video", "video": {"id": "9"}}}),
            None,
            "wamid.O4",
        ),
    ],
    ids=["text", "image-caption", "flat-text", "video-no-caption"],
)
def test_edit_gives_the_new_text_and_the_original_id(msg: dict[str, Any], text: str | None, original: str) -> None:
    item = only(msg)
    assert item.parse_error is None
    assert item.message.type == "edit"
    assert item.message.text == text
    assert item.message.edited_id == original
    assert item.message.revoked_id is None


def test_revoke_gives_the_revoked_id() -> None:
    """Meta: Webhooks > messages > revoke (MESSAGES_REF/revoke): `revoke{original_message_id}`."""
    item = only(p.message("revoke", {"original_message_id": "wamid.GONE1"}))
    assert item.parse_error is None
    assert (item.message.type, item.message.revoked_id, item.message.text) == ("revoke", "wamid.GONE1", None)
    assert (item.message.edited_id, item.message.call_permission_response, item.message.flow_response) == (None,) * 3


def _call_permission_reply(response: str, **extra: Any) -> dict[str, Any]:
    """Meta: Calling > User call permissions (developers.facebook.com/docs/whatsapp/cloud-api/calling/
    user-call-permissions): an `interactive` message of type `call_permission_reply`; fields as in
    whatsapp-api-js `ServerInteractiveCallPermissionMessage` and pywa `CallPermissionUpdate`."""
    reply = {"response": response, "is_permanent": False, "response_source": "user_action", **extra}
    return p.message(
        "interactive",
        {"type": "call_permission_reply", "call_permission_reply": reply},
        context={"from": "15550001111", "id": "wamid.CPR1"},
    )


@pytest.mark.parametrize("response", ["accept", "reject"])
def test_call_permission_reply_is_read_and_shown(response: str) -> None:
    extra = {"expiration_timestamp": 1760604800} if response == "accept" else {}
    item = only(_call_permission_reply(response, **extra))
    m = item.message
    assert isinstance(m, InteractiveMessage)
    assert item.parse_error is None
    assert m.call_permission_response == response
    assert m.text == response
    assert m.reply_id is None
    reply = m.interactive.call_permission_reply
    assert reply is not None
    assert (reply.is_permanent, reply.response_source) == (False, "user_action")
    assert reply.expiration_timestamp == (1760604800 if response == "accept" else None)


def test_permanent_call_permission_with_string_expiry() -> None:
    item = only(_call_permission_reply("accept", is_permanent=True, expiration_timestamp="1760604800"))
    assert isinstance(item.message, InteractiveMessage)
    assert item.message.interactive.call_permission_reply is not None
    assert item.message.interactive.call_permission_reply.expiration_timestamp == 1760604800


def _flow(response_json: str | None) -> dict[str, Any]:
    """Meta: Flows > Receive flow response (developers.facebook.com/docs/whatsapp/flows/guides/
    receiveflowresponse): `interactive{type: nfm_reply, nfm_reply{name: "flow", body: "Sent",
    response_json: "<JSON string with flow_token>"}}`."""
    nfm: dict[str, Any] = {"name": "flow", "body": "Sent"}
    if response_json is not None:
        nfm["response_json"] = response_json
    return p.message("interactive", {"type": "nfm_reply", "nfm_reply": nfm}, context={"from": "1555", "id": "wamid.F"})


def test_flow_completion_decodes_response_json_and_shows_the_body() -> None:
    answer = {"flow_token": "tok-9", "screen_0_date_0": "2026-12-01", "screen_0_options_1": ["0_a", "1_b"]}
    item = only(_flow(json.dumps(answer)))
    assert item.message.text == "Sent"
    assert item.message.flow_response == answer


@pytest.mark.parametrize(
    "response_json", ["{not json", '["a list"]', "", None], ids=["invalid", "list", "empty", "none"]
)
def test_flow_completion_with_unusable_response_json_is_kept(response_json: str | None) -> None:
    item = only(_flow(response_json))
    assert item.parse_error is None
    assert item.message.text == "Sent"
    assert item.message.flow_response is None


def test_request_welcome_is_a_known_type_without_text() -> None:
    """Meta: Webhooks > messages > request_welcome (MESSAGES_REF/request_welcome): the user opened
    the chat for the first time; the message has no type object."""
    item = only(p.message("request_welcome"))
    assert item.parse_error is None
    assert not isinstance(item.message, UnknownMessage)
    assert (item.message.type, item.message.text) == ("request_welcome", None)


# ---------------------------------------------------------------------------- username-only users (BSUID)


def test_username_only_message_takes_the_lone_contacts_user_id() -> None:
    """Meta: Business-scoped user IDs (BSUID_DOC): a user with a username may come without `from`;
    `contacts[].user_id` carries the BSUID (and `profile.username`)."""
    msg = {"id": "wamid.BSU1", "timestamp": p.TS, "type": "text", "text": {"body": "hi"}}
    contact = {"profile": {"name": "Anon", "username": "@anon"}, "user_id": BSUID}
    item = only(msg, contacts=[contact])
    assert item.parse_error is None
    assert (item.message.sender, item.message.from_, item.message.from_user_id) == (BSUID, None, BSUID)
    assert item.message.text == "hi"
    assert item.contact is not None and item.contact.user_id == BSUID


def test_username_only_status_reads_recipient_user_id() -> None:
    """Meta: Business-scoped user IDs (BSUID_DOC): statuses of a username-only user carry the BSUID."""
    stat = {"id": "wamid.OUTB", "status": "read", "timestamp": p.TS, "recipient_user_id": BSUID}
    [item] = parse_value(p.value(statuses=[stat])).statuses
    assert item.status.recipient_user_id == BSUID
    assert item.recipient == BSUID
    [phone] = parse_value(p.value(statuses=[p.status("wamid.OUTP", "read", recipient_user_id=BSUID)])).statuses
    assert phone.recipient == p.USER  # the phone number wins when both are present


def test_lone_contact_contradicting_from_is_not_attached() -> None:
    """Meta: Webhooks > messages > text (MESSAGES_REF/text): `contacts[].wa_id` describes the sender;
    one naming another number must not lend its name to this sender."""
    item = only(p.text("hi", sender="15550001234"), contacts=[{"profile": {"name": "Eve"}, "wa_id": "15559998888"}])
    assert item.contact is None
    other = only(
        p.text("hi", sender=None, from_user_id="US.1"), contacts=[{"profile": {"name": "Eve"}, "user_id": BSUID}]
    )
    assert other.contact is None
    assert other.message.sender == "US.1"


# ---------------------------------------------------------------------------- events and keys

# Meta: Webhooks > message_template_status_update (developers.facebook.com/documentation/
# business-messaging/whatsapp/webhooks/reference/message_template_status_update): integer `entry.time`.
TEMPLATE = {
    "message_template_id": 123456789,
    "message_template_name": "order_update",
    "message_template_language": "en_US",
    "reason": None,
}


def _template_event(event: str, time: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": "WABA1",
        "changes": [p.change({"event": event, **TEMPLATE}, "message_template_status_update")],
    }
    if time is not None:
        entry["time"] = time
    return entry


@pytest.mark.parametrize(
    ("time", "expected"), [(1760000001, 1760000001), ("1760000001", 1760000001), (None, None), ("soon", None)]
)
def test_event_time_is_the_entry_time(time: Any, expected: int | None) -> None:
    [event] = parse(p.envelope(_template_event("APPROVED", time))).events
    assert event.time == expected
    assert event.waba_id == "WABA1"


def test_entry_with_unusable_time_or_numeric_id_keeps_its_messages() -> None:
    entry = {"id": 102290129340398, "time": {"t": 1}, "changes": [p.change(p.value([p.text("kept")]))]}
    parsed = parse(p.envelope(entry))
    assert parsed.rejected == []
    assert [i.message.text for i in parsed.messages] == ["kept"]


def test_repeated_state_sequence_keeps_every_event_and_dedupes_redeliveries() -> None:
    """APPROVED → PAUSED → APPROVED: three events (distinct times); the same delivery twice: one key."""
    sequence = [_template_event("APPROVED", 1760000001), _template_event("PAUSED", 1760000100)]
    sequence.append(_template_event("APPROVED", 1760000200))
    keys = [e.key for e in parse(p.envelope(*sequence)).events]
    assert len(set(keys)) == 3
    again = parse(p.envelope(_template_event("APPROVED", 1760000001))).events[0].key
    assert again == keys[0]


def test_account_update_offboarded_reconnected_offboarded_keeps_all_three() -> None:
    """Meta: Webhooks > account_update (developers.facebook.com/documentation/business-messaging/
    whatsapp/webhooks/reference/account_update): `event` e.g. PARTNER_REMOVED / ACCOUNT_OFFBOARDED."""

    def entry(event: str, time: int) -> dict[str, Any]:
        return {"id": "WABA1", "time": time, "changes": [p.change({"event": event}, "account_update")]}

    events = parse(
        p.envelope(entry("ACCOUNT_OFFBOARDED", 1), entry("ACCOUNT_RECONNECTED", 2), entry("ACCOUNT_OFFBOARDED", 3))
    )
    assert len({e.key for e in events.events}) == 3
    assert [e.time for e in events.events] == [1, 2, 3]


def test_message_and_status_keys_are_scoped_by_phone_number_id() -> None:
    """A wamid is unique per business number; the same id on two numbers is two messages."""
    body = p.envelope(
        p.entry(
            p.change(p.value([p.text("a", id="wamid.SAME")], statuses=[p.status("wamid.OUTS", "read")])),
            p.change(
                p.value([p.text("b", id="wamid.SAME")], statuses=[p.status("wamid.OUTS", "read")], pnid=p.BIZ_PNID)
            ),
        )
    )
    parsed = parse(body)
    assert [i.key for i in parsed.messages] == [f"{p.PNID}:wamid.SAME", f"{p.BIZ_PNID}:wamid.SAME"]
    assert [s.key for s in parsed.statuses] == [f"{p.PNID}:wamid.OUTS:read", f"{p.BIZ_PNID}:wamid.OUTS:read"]
