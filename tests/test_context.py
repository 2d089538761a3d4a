"""The handler's `ctx`: every reply kind as it lands in the outbox, validation before queueing,
the early read receipt and the conversation history, through the real dispatcher."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.context import Context, ReplyError, StatusContext
from alfred_bot.models import Message, Status
from alfred_bot.parse import decode_message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import ENV, PROD_ENV, db_rows, make_config, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph

TO = "+" + payloads.USER
HEAD = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": TO}


async def _app(aiohttp_client: Any, tmp_path: Path, router: Router, **sections: Any) -> tuple[Any, Path]:
    cfg = make_config(tmp_path, **sections)
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": router}))
    return client, Path(cfg.storage.path)


def _settled(db: Path, event_id: str) -> Callable[[], bool]:
    return lambda: bool(db_rows(db, "SELECT 1 FROM inbox WHERE event_id = ? AND state != 'pending'", (event_id,)))


def _outbox(db: Path, event_id: str) -> list[dict[str, Any]]:
    rows = db_rows(
        db, "SELECT idem_key, type, payload FROM outbox WHERE source_event_id = ? ORDER BY idem_key", (event_id,)
    )
    return [{"idem_key": r["idem_key"], "type": r["type"], "payload": json.loads(r["payload"])} for r in rows]


def _ctx(msg: dict[str, Any] | None = None) -> Context:
    message = decode_message(payloads.dump(msg or payloads.text("hi", id="wamid.UNIT1")))
    return Context(tenant="home", phone_number_id=payloads.PNID, message=message, contact=None)


# ---------------------------------------------------------------------------- every reply kind


async def test_every_reply_kind_lands_in_the_outbox_as_a_cloud_api_payload(aiohttp_client: Any, tmp_path: Path) -> None:
    router = Router()
    contact_card = {
        "name": {"formatted_name": "Ana Pérez", "first_name": "Ana"},
        "phones": [{"phone": "+1 555 000", "type": "CELL"}],
    }

    @router.default
    async def everything(message: Message, ctx: Context) -> None:
        ctx.reply("plain")
        ctx.reply("quoted", quote=True, preview_url=True)
        ctx.reply_buttons("Pick one", [("yes", "Yes"), ("no", "No"), ("later", "x" * 20)], header="H", footer="F")
        ctx.reply_buttons("As a dict", {"a": "Alpha"})
        ctx.reply_list(
            "Menu", "Open menu", {"Drinks": [("tea", "Tea", "hot"), ("cola", "Cola")], "Food": [("soup", "Soup")]}
        )
        ctx.reply_cta("Visit us", "Open site", "https://example.com/shop")
        ctx.reply_template("order_update", "es", body_params=["Ana", "42"])
        ctx.reply_media("image", media_id="1234567890", caption="a picture")
        ctx.reply_media("document", link="https://example.com/a.pdf", filename="a.pdf")
        ctx.reply_location(51.5, -0.12, name="Home", address="1 Road")
        ctx.reply_contacts([contact_card])
        ctx.react("👍")
        ctx.react("", message_id="wamid.EARLIER")

    client, db = await _app(aiohttp_client, tmp_path, router)
    mid = "wamid.ALL1"
    assert await post_webhook(client, payloads.body_of(payloads.text("all", id=mid))) == 200
    await wait_for(_settled(db, mid))
    rows = _outbox(db, mid)
    assert [r["idem_key"] for r in rows] == [f"reply:{mid}:{i:03d}" for i in range(13)]
    got = [r["payload"] for r in rows]
    button = {"type": "reply", "reply": {"id": "yes", "title": "Yes"}}
    expected = [
        {**HEAD, "type": "text", "text": {"body": "plain"}},
        {**HEAD, "type": "text", "text": {"body": "quoted", "preview_url": True}, "context": {"message_id": mid}},
        {
            **HEAD,
            "type": "interactive",
            "interactive": {
                "type": "button",
                "body": {"text": "Pick one"},
                "action": {
                    "buttons": [
                        button,
                        {"type": "reply", "reply": {"id": "no", "title": "No"}},
                        {"type": "reply", "reply": {"id": "later", "title": "x" * 20}},
                    ]
                },
                "header": {"type": "text", "text": "H"},
                "footer": {"text": "F"},
            },
        },
        {
            **HEAD,
            "type": "interactive",
            "interactive": {
                "type": "button",
                "body": {"text": "As a dict"},
                "action": {"buttons": [{"type": "reply", "reply": {"id": "a", "title": "Alpha"}}]},
            },
        },
        {
            **HEAD,
            "type": "interactive",
            "interactive": {
                "type": "list",
                "body": {"text": "Menu"},
                "action": {
                    "button": "Open menu",
                    "sections": [
                        {
                            "title": "Drinks",
                            "rows": [
                                {"id": "tea", "title": "Tea", "description": "hot"},
                                {"id": "cola", "title": "Cola"},
                            ],
                        },
                        {"title": "Food", "rows": [{"id": "soup", "title": "Soup"}]},
                    ],
                },
            },
        },
        {
            **HEAD,
            "type": "interactive",
            "interactive": {
                "type": "cta_url",
                "body": {"text": "Visit us"},
                "action": {
                    "name": "cta_url",
                    "parameters": {"display_text": "Open site", "url": "https://example.com/shop"},
                },
            },
        },
        {
            **HEAD,
            "type": "template",
            "template": {
                "name": "order_update",
                "language": {"code": "es"},
                "components": [
                    {"type": "body", "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "42"}]}
                ],
            },
        },
        {**HEAD, "type": "image", "image": {"id": "1234567890", "caption": "a picture"}},
        {**HEAD, "type": "document", "document": {"link": "https://example.com/a.pdf", "filename": "a.pdf"}},
        {
            **HEAD,
            "type": "location",
            "location": {"latitude": 51.5, "longitude": -0.12, "name": "Home", "address": "1 Road"},
        },
        {**HEAD, "type": "contacts", "contacts": [contact_card]},
        {**HEAD, "type": "reaction", "reaction": {"message_id": mid, "emoji": "👍"}},
        {**HEAD, "type": "reaction", "reaction": {"message_id": "wamid.EARLIER", "emoji": ""}},
    ]
    for index, (actual, wanted) in enumerate(zip(got, expected, strict=True)):
        assert actual == wanted, f"reply {index}"
    assert db_rows(db, "SELECT state FROM inbox WHERE event_id = ?", (mid,))[0][0] == "handled"


async def test_invalid_reply_fails_the_message_and_only_the_fallback_is_queued(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    router, raised = Router(), []

    @router.default
    async def four_buttons(message: Message, ctx: Context) -> None:
        ctx.reply("this reply must not survive the failure")
        before = list(ctx.replies)
        try:
            ctx.reply_buttons("Too many", [("1", "One"), ("2", "Two"), ("3", "Three"), ("4", "Four")])
        except ReplyError as exc:
            raised.append((exc.field, ctx.replies == before))
            raise

    client, db = await _app(aiohttp_client, tmp_path, router, dispatch={"fallback_text": "Sorry, try again."})
    mid = "wamid.FOUR1"
    assert await post_webhook(client, payloads.body_of(payloads.text("menu", id=mid))) == 200
    await wait_for(_settled(db, mid))
    assert raised == [("interactive.action.buttons", True)]  # nothing was queued by the bad call
    state, error = db_rows(db, "SELECT state, error FROM inbox WHERE event_id = ?", (mid,))[0]
    assert state == "failed"
    assert error.startswith("InvalidMessage: interactive.action.buttons: ")
    assert [r["payload"] for r in _outbox(db, mid)] == [{**HEAD, "type": "text", "text": {"body": "Sorry, try again."}}]


# ---------------------------------------------------------------------------- validation (before queueing)


def _choices(n: int, title: str = "Row") -> list[tuple[str, str]]:
    return [(f"id{i}", f"{title} {i}") for i in range(n)]


BAD_REPLIES: list[tuple[str, Callable[[Context], Any], str]] = [
    ("4 buttons", lambda c: c.reply_buttons("t", _choices(4)), "interactive.action.buttons"),
    ("no buttons", lambda c: c.reply_buttons("t", []), "interactive.action.buttons"),
    ("title 21", lambda c: c.reply_buttons("t", [("a", "x" * 21)]), "interactive.action.buttons[0].reply.title"),
    ("same titles", lambda c: c.reply_buttons("t", [("a", "Yes"), ("b", "Yes")]), "buttons[1].reply.title"),
    ("11 rows", lambda c: c.reply_list("t", "Open", {"A": _choices(6), "B": _choices(5)}), "sections"),
    ("row title 25", lambda c: c.reply_list("t", "Open", {"A": [("a", "x" * 25)]}), "rows[0].title"),
    ("list button 21", lambda c: c.reply_list("t", "x" * 21, {"A": [("a", "A")]}), "interactive.action.button"),
    ("cta empty url", lambda c: c.reply_cta("t", "Open", ""), "parameters.url"),
    ("button header 61", lambda c: c.reply_buttons("t", [("a", "A")], header="x" * 61), "interactive.header"),
    ("cta header 61", lambda c: c.reply_cta("t", "Open", "https://e.com", header="x" * 61), "interactive.header"),
    ("button footer 61", lambda c: c.reply_buttons("t", [("a", "A")], footer="x" * 61), "interactive.footer"),
    ("button body 1025", lambda c: c.reply_buttons("x" * 1025, [("a", "A")]), "interactive.body"),
    ("empty text", lambda c: c.reply("  "), "text.body"),
    ("text 4097", lambda c: c.reply("x" * 4097), "text.body"),
    ("media id and link", lambda c: c.reply_media("image", media_id="1", link="https://e.com/a.jpg"), "image"),
    ("media neither", lambda c: c.reply_media("video"), "video"),
    ("sticker caption", lambda c: c.reply_media("sticker", media_id="1", caption="hi"), "sticker.caption"),
    ("media kind", lambda c: c.reply_media("gif", media_id="1"), "type"),
    ("latitude 91", lambda c: c.reply_location(91, 0), "location.latitude"),
    ("longitude -181", lambda c: c.reply_location(0, -181), "location.longitude"),
    ("latitude bool", lambda c: c.reply_location(True, 0), "location.latitude"),
    ("no contacts", lambda c: c.reply_contacts([]), "contacts"),
    ("contact no name", lambda c: c.reply_contacts([{"phones": []}]), "contacts[0].name"),
    ("template no name", lambda c: c.reply_template(""), "template.name"),
]


@pytest.mark.parametrize(("make", "field"), [(m, f) for _, m, f in BAD_REPLIES], ids=[n for n, _, _ in BAD_REPLIES])
def test_bad_replies_raise_naming_the_field_and_queue_nothing(make: Callable[[Context], Any], field: str) -> None:
    ctx = _ctx()
    ctx.reply("kept")
    with pytest.raises(ReplyError) as info:
        make(ctx)
    assert field in str(info.value)
    assert info.value.field.endswith(field) or info.value.field == field or field in info.value.field
    assert [json.loads(r.payload)["type"] for r in ctx.replies] == ["text"]


def test_replies_at_the_limits_are_accepted() -> None:
    ctx = _ctx()
    ctx.reply("x" * 4096)
    ctx.reply_buttons("t", [("a", "x" * 20), ("b", "y" * 20), ("c", "z" * 20)])
    ctx.reply_list("t", "x" * 20, {"A": _choices(4), "B": _choices(6, "Other")})
    ctx.reply_location(90, -180)
    ctx.reply_location(-90, 180)
    assert len(ctx.replies) == 5


def test_react_and_quote_need_a_message() -> None:
    status = Status(id="wamid.S1", status="failed", timestamp=1, recipient_id=payloads.USER)
    ctx = StatusContext(tenant="home", phone_number_id=payloads.PNID, status=status)
    ctx.react("👍")  # a status context reacts to the message the status is about
    assert json.loads(ctx.replies[0].payload)["reaction"] == {"message_id": "wamid.S1", "emoji": "👍"}
    nobody = StatusContext(
        tenant="home", phone_number_id=payloads.PNID, status=Status(id="w", status="read", timestamp=1)
    )
    with pytest.raises(ReplyError, match="to"):
        nobody.reply("hello")


# ---------------------------------------------------------------------------- username-only users

BSUID = "US.13491208655302741918"


def test_reply_to_a_username_only_user_names_them_with_recipient() -> None:
    # Meta: business-scoped-user-ids — no `from`, only `from_user_id`; a send names them with the
    # top-level `recipient` ("`to` required unless `recipient` is provided", calling/call-button-messages)
    msg = payloads.text("hi", id="wamid.U1")
    del msg["from"]
    msg["from_user_id"] = BSUID
    ctx = _ctx(msg)
    ctx.reply("hello", quote=True)
    ctx.reply_template("welcome_back")
    assert ctx.recipient == BSUID
    assert [r.recipient for r in ctx.replies] == [BSUID, BSUID]
    first, second = (json.loads(r.payload) for r in ctx.replies)
    assert first == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "recipient": BSUID,
        "type": "text",
        "text": {"body": "hello"},
        "context": {"message_id": "wamid.U1"},
    }
    assert "to" not in second and second["recipient"] == BSUID


def test_status_reply_to_a_username_only_user_uses_recipient() -> None:
    # Meta: webhooks/reference/messages/status — a username-only recipient has `recipient_user_id`
    status = Status(id="wamid.S2", status="failed", timestamp=1, recipient_user_id=BSUID)
    ctx = StatusContext(tenant="home", phone_number_id=payloads.PNID, status=status)
    ctx.reply_template("we_miss_you")
    payload = json.loads(ctx.replies[0].payload)
    assert payload["recipient"] == BSUID
    assert "to" not in payload
    assert ctx.replies[0].recipient == BSUID


# ---------------------------------------------------------------------------- read receipt


async def test_mark_read_goes_out_before_the_handler_finishes_and_only_once(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    router = Router()
    release = asyncio.Event()

    @router.default
    async def slow(message: Message, ctx: Context) -> None:
        ctx.mark_read()
        await release.wait()
        ctx.reply("finally")

    cfg = prod_config(tmp_path, graph)
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV), routers={"home": router}))
    db, mid = Path(cfg.storage.path), "wamid.READ1"
    assert await post_webhook(client, payloads.body_of(payloads.text("hi", id=mid))) == 200

    def receipt_sent() -> bool:
        return any(r.body.get("status") == "read" for r in graph.sends)

    await wait_for(receipt_sent)
    # The handler still waits: the message is pending, the reply not written, the receipt out.
    assert db_rows(db, "SELECT state FROM inbox WHERE event_id = ?", (mid,))[0][0] == "pending"
    assert [r["type"] for r in _outbox(db, mid)] == ["read"]
    read = next(r for r in graph.sends if r.body.get("status") == "read")
    assert read.body == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": mid,
        "typing_indicator": {"type": "text"},
    }
    release.set()
    await wait_for(_settled(db, mid))
    await wait_for(lambda: len(graph.sends) == 2)
    await asyncio.sleep(0.1)
    assert [r.body.get("status") or r.body["type"] for r in graph.sends] == ["read", "text"]
    assert [r["type"] for r in _outbox(db, mid)] == ["read", "text"]
    assert graph.texts() == ["finally"]


async def test_mark_read_without_typing(aiohttp_client: Any, tmp_path: Path) -> None:
    router = Router()

    @router.default
    async def quiet(message: Message, ctx: Context) -> None:
        ctx.mark_read(typing=False)

    client, db = await _app(aiohttp_client, tmp_path, router)
    mid = "wamid.READ2"
    assert await post_webhook(client, payloads.body_of(payloads.text("hi", id=mid))) == 200
    await wait_for(_settled(db, mid))
    [row] = _outbox(db, mid)
    assert row["payload"] == {"messaging_product": "whatsapp", "status": "read", "message_id": mid}


async def test_fallback_is_still_sent_when_a_handler_fails_after_mark_read(aiohttp_client: Any, tmp_path: Path) -> None:
    """The early receipt takes idem key `reply:<id>:000`; the fallback must not be lost to it."""
    router = Router()

    @router.default
    async def breaks(message: Message, ctx: Context) -> None:
        ctx.mark_read()
        await asyncio.sleep(0.05)  # the early receipt is written meanwhile
        raise RuntimeError("bug after the receipt")

    client, db = await _app(aiohttp_client, tmp_path, router, dispatch={"fallback_text": "Sorry, try again."})
    mid = "wamid.READ3"
    assert await post_webhook(client, payloads.body_of(payloads.text("hi", id=mid))) == 200
    await wait_for(_settled(db, mid))
    assert db_rows(db, "SELECT state FROM inbox WHERE event_id = ?", (mid,))[0][0] == "failed"
    texts = [r["payload"]["text"]["body"] for r in _outbox(db, mid) if r["type"] == "text"]
    assert texts == ["Sorry, try again."], _outbox(db, mid)


# ---------------------------------------------------------------------------- history


async def test_history_returns_both_directions_oldest_first(aiohttp_client: Any, tmp_path: Path) -> None:
    router, seen = Router(), {}

    @router.default
    async def remember(message: Message, ctx: Context) -> None:
        ctx.mark_read()  # receipts are not part of the conversation
        if message.text == "first":
            ctx.reply_buttons("Pick one", [("a", "A"), ("b", "B")])
        else:
            seen[message.id] = await ctx.history()
            seen[f"{message.id}:2"] = await ctx.history(limit=2)
            ctx.reply("second answer")

    client, db = await _app(aiohttp_client, tmp_path, router)
    first_at = int(time.time()) - 30
    first = payloads.text("first", id="wamid.H1", timestamp=str(first_at))
    other_user = payloads.text("not yours", id="wamid.H9", sender="15550009999", timestamp=str(first_at + 1))
    assert await post_webhook(client, payloads.body_of(first, other_user)) == 200
    await wait_for(_settled(db, "wamid.H1"))
    await wait_for(_settled(db, "wamid.H9"))
    await wait_for(lambda: bool(db_rows(db, "SELECT 1 FROM outbox WHERE type = 'interactive' AND state = 'sent'")))
    replied_at = max(r[0] for r in db_rows(db, "SELECT created_at FROM outbox"))
    # The user answers after our reply (Meta's timestamps are whole seconds).
    while time.time() < int(replied_at) + 1:
        await asyncio.sleep(0.02)
    second = payloads.text("second", id="wamid.H2", timestamp=str(int(time.time())))
    assert await post_webhook(client, payloads.body_of(second)) == 200
    await wait_for(_settled(db, "wamid.H2"))

    history = seen["wamid.H2"]
    assert [(h["direction"], h["type"], h["text"]) for h in history] == [
        ("in", "text", "first"),
        ("out", "interactive", "Pick one"),
        ("in", "text", "second"),
    ]
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)
    assert [h.get("state") for h in history] == [None, "sent", None]
    assert [(h["direction"], h["text"]) for h in seen["wamid.H2:2"]] == [("out", "Pick one"), ("in", "second")]
    assert client.app[keys.DISPATCHER].counts["handled"] == 3


async def test_history_keeps_the_order_in_which_one_handler_queued_its_replies(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    router, seen = Router(), {}

    @router.default
    async def talk(message: Message, ctx: Context) -> None:
        if message.text == "first":
            ctx.reply("one")
            ctx.reply("two")
            ctx.reply("three")
        else:
            seen[message.id] = await ctx.history()

    client, db = await _app(aiohttp_client, tmp_path, router)
    first = payloads.text("first", id="wamid.HO1", timestamp=str(int(time.time()) - 30))
    assert await post_webhook(client, payloads.body_of(first)) == 200
    await wait_for(_settled(db, "wamid.HO1"))
    second = payloads.text("again", id="wamid.HO2", timestamp=str(int(time.time()) + 1))
    assert await post_webhook(client, payloads.body_of(second)) == 200
    await wait_for(_settled(db, "wamid.HO2"))
    outgoing = [h["text"] for h in seen["wamid.HO2"] if h["direction"] == "out"]
    assert outgoing == ["one", "two", "three"]
