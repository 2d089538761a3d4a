"""Routers: filters, declaration order, CONTINUE, default, middleware and status routes.

Matching is checked on decoded messages (pure); order, CONTINUE, middleware and status routes
run through the real app: signed webhook → SQLite inbox → dispatcher → outbox.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError, load_secrets
from alfred_bot.context import Context, StatusContext
from alfred_bot.loader import load_router, routers_for
from alfred_bot.models import Message, Status
from alfred_bot.parse import decode_message
from alfred_bot.router import CONTINUE, Next, Router
from alfred_bot.text import command_of
from handlers import concierge, echo
from tests import payloads
from tests.conftest import ENV, db_rows, make_config, post_webhook, wait_for


def _decode(msg: dict[str, Any]) -> Message:
    return decode_message(payloads.dump(msg))


def _interactive(kind: str, reply_id: str, title: str = "Pick") -> dict[str, Any]:
    return payloads.message("interactive", {"type": kind, kind: {"id": reply_id, "title": title}})


def _reaction(emoji: str | None) -> dict[str, Any]:
    content: dict[str, Any] = {"message_id": "wamid.OURS1"}
    if emoji is not None:
        content["emoji"] = emoji
    return payloads.message("reaction", content)


def _button(payload: str) -> dict[str, Any]:
    return payloads.message("button", {"payload": payload, "text": payload.title()})


def _ctx(msg: dict[str, Any]) -> Context:
    return Context(tenant="home", phone_number_id=payloads.PNID, message=_decode(msg), contact=None)


async def _noop(message: Message, ctx: Context) -> None:
    return None


def _matches(router: Router, msg: dict[str, Any]) -> bool:
    return bool(router.handlers_for(_decode(msg)))


# ---------------------------------------------------------------------------- matching (pure)


ALL_SAMPLES = {**payloads.SAMPLES, **payloads.SAMPLES_2025}


@pytest.mark.parametrize("kind", sorted(ALL_SAMPLES))
def test_message_type_filter_accepts_only_its_type(kind: str) -> None:
    router = Router()
    router.message(kind)(_noop)
    for other, sample in ALL_SAMPLES.items():
        assert _matches(router, sample) is (other == kind), other


def test_message_without_types_accepts_every_type() -> None:
    router = Router()
    router.message()(_noop)
    assert all(_matches(router, sample) for sample in ALL_SAMPLES.values())


def test_text_regex_searches_the_text_and_captions() -> None:
    texts = Router()
    texts.message("text", text=r"^order \d+$")(_noop)
    assert _matches(texts, payloads.text("order 12"))
    assert not _matches(texts, payloads.text("please order 12"))
    assert not _matches(texts, payloads.text("order twelve"))
    anywhere = Router()
    anywhere.message(text=r"(?i)\bcat\b")(_noop)
    assert _matches(anywhere, payloads.SAMPLES["image"])  # caption "a cat"
    assert _matches(anywhere, payloads.text("my CAT"))
    assert not _matches(anywhere, payloads.text("category"))
    assert not _matches(anywhere, payloads.SAMPLES["sticker"])  # no text at all


@pytest.mark.parametrize("text", ["/help", "help", "HELP me", "  /Help   with billing ", "Help"])
def test_command_matches_the_first_word_with_or_without_slash(text: str) -> None:
    router = Router()
    router.command("help")(_noop)
    assert _matches(router, payloads.text(text))


@pytest.mark.parametrize("text", ["helpful", "/helpme", "I need help", "", "   "])
def test_command_does_not_match_other_words(text: str) -> None:
    router = Router()
    router.command("help")(_noop)
    assert not _matches(router, payloads.text(text))


def test_command_ignores_non_text_messages_even_with_a_matching_title() -> None:
    router = Router()
    router.command("help", "/menu")(_noop)
    assert _matches(router, payloads.text("MENU"))
    image = payloads.message("image", {"caption": "help", "mime_type": "image/jpeg", "sha256": "x", "id": "m9"})
    assert not _matches(router, image)
    assert not _matches(router, _interactive("button_reply", "h1", title="help"))
    assert not _matches(router, _button("help"))


def test_command_needs_a_name() -> None:
    with pytest.raises(ValueError, match="at least one name"):
        Router().command()


def test_command_args_hold_the_rest_of_the_text() -> None:
    assert _ctx(payloads.text("/order 2 pizzas  ")).command_args == "2 pizzas"
    assert _ctx(payloads.text("ORDER   2 pizzas")).command_args == "2 pizzas"
    assert _ctx(payloads.text("help")).command_args == ""
    assert _ctx(payloads.SAMPLES["image"]).command_args == ""  # a caption is not a command
    assert command_of("/Help Me") == ("help", "Me")
    assert command_of("   ") is None


def test_command_word_may_end_at_a_line_break() -> None:
    """Users type "/order", Enter, "2 pizzas": the command is still the first word."""
    router = Router()
    router.command("order")(_noop)
    assert _matches(router, payloads.text("/order\n2 pizzas"))
    assert _matches(router, payloads.text("order\t2 pizzas"))
    assert _ctx(payloads.text("/order\n2 pizzas")).command_args == "2 pizzas"


def test_interactive_by_id_for_button_and_list_replies() -> None:
    router = Router()
    router.interactive("yes-1", "row-7")(_noop)
    assert _matches(router, _interactive("button_reply", "yes-1"))
    assert _matches(router, _interactive("list_reply", "row-7"))
    assert not _matches(router, _interactive("button_reply", "yes-2"))
    assert not _matches(router, _button("yes-1"))  # a template quick reply is not ours
    assert not _matches(router, payloads.text("yes-1"))


def test_interactive_by_pattern_and_any() -> None:
    by_pattern = Router()
    by_pattern.interactive(pattern=r"^size:(s|m|l)$")(_noop)
    assert _matches(by_pattern, _interactive("list_reply", "size:m"))
    assert _matches(by_pattern, _interactive("button_reply", "size:l"))
    assert not _matches(by_pattern, _interactive("list_reply", "size:xl"))
    anything = Router()
    anything.interactive()(_noop)
    assert _matches(anything, _interactive("list_reply", "whatever"))
    assert not _matches(anything, payloads.text("whatever"))


def test_button_by_payload_and_pattern() -> None:
    router = Router()
    router.button("STOP_PROMOS")(_noop)
    assert _matches(router, payloads.SAMPLES["button"])
    assert not _matches(router, _button("MORE_PROMOS"))
    assert not _matches(router, _interactive("button_reply", "STOP_PROMOS"))
    by_pattern = Router()
    by_pattern.button(pattern=r"^PROMO_")(_noop)
    assert _matches(by_pattern, _button("PROMO_SPRING"))
    assert not _matches(by_pattern, _button("STOP_PROMOS"))


def test_reaction_any_or_by_emoji() -> None:
    anything, thumbs, removed = Router(), Router(), Router()
    anything.reaction()(_noop)
    thumbs.reaction("👍")(_noop)
    removed.reaction("")(_noop)
    assert _matches(anything, _reaction("❤️"))
    assert _matches(anything, _reaction(None))
    assert _matches(thumbs, _reaction("👍"))
    assert not _matches(thumbs, _reaction("👎"))
    assert not _matches(thumbs, payloads.text("👍"))
    assert _matches(removed, _reaction(None))  # an absent emoji is a removed reaction
    assert _matches(removed, _reaction(""))
    assert not _matches(removed, _reaction("👍"))


def _call_permission(response: str) -> dict[str, Any]:
    """The user's answer to our call permission request. Meta: Calling > User call permissions,
    developers.facebook.com/docs/whatsapp/cloud-api/calling/user-call-permissions (interactive
    `call_permission_reply`; field names also in whatsapp-api-js ServerInteractiveCallPermissionMessage)."""
    reply = {"response": response, "is_permanent": False, "expiration_timestamp": 1760600000}
    return payloads.message(
        "interactive",
        {"type": "call_permission_reply", "call_permission_reply": {**reply, "response_source": "user_action"}},
        context={"from": "15550001111", "id": "wamid.CPR1"},
    )


def test_call_permission_by_response() -> None:
    accepted, rejected, anything = Router(), Router(), Router()
    accepted.call_permission("accept")(_noop)
    rejected.call_permission("reject")(_noop)
    anything.call_permission()(_noop)
    assert _matches(accepted, _call_permission("accept"))
    assert not _matches(accepted, _call_permission("reject"))
    assert _matches(rejected, _call_permission("reject"))
    assert _matches(anything, _call_permission("accept"))
    assert not _matches(anything, _interactive("button_reply", "accept", title="accept"))
    assert not _matches(anything, payloads.text("accept"))
    taps = Router()
    taps.interactive()(_noop)
    assert not _matches(taps, _call_permission("accept"))  # not a button or list tap


def test_message_kept_with_a_parse_error_goes_to_no_type_route() -> None:
    """A text without its text is routed like an unknown type (to the default), never to a text handler."""
    broken = {**payloads.text("x"), "text": None}
    texts, commands, anything = Router(), Router(), Router()
    texts.message("text")(_noop)
    commands.command("x")(_noop)
    anything.message()(_noop)
    assert not _matches(texts, broken)
    assert not _matches(commands, broken)
    assert _matches(anything, broken)  # a catch-all route still sees it


def test_route_with_custom_filters_needs_all_of_them() -> None:
    router = Router()
    router.route(lambda m: m.type == "text", lambda m: m.sender == "15550000001")(_noop)
    assert _matches(router, payloads.text("x", sender="15550000001"))
    assert not _matches(router, payloads.text("x", sender="15550000002"))


# ---------------------------------------------------------------------------- handle and mount (pure)


def _recording(log: list[str]) -> Router:
    """A bot with its own middleware, a text route that CONTINUEs and a default, logging each step."""
    router = Router("bot")

    @router.use
    async def bot_mw(message: Message, ctx: Context, call_next: Next) -> Any:
        log.append("bot middleware")
        return await call_next()

    @router.message("text")
    async def tag(message: Message, ctx: Context) -> Any:
        log.append("route")
        return CONTINUE

    @router.default
    async def fallback(message: Message, ctx: Context) -> None:
        log.append(f"default {message.type}")

    return router


def _step(log: list[str], name: str, *, stop: bool = False) -> Any:
    async def middleware(message: Message, ctx: Context, call_next: Next) -> Any:
        log.append(name)
        return None if stop else await call_next()

    return middleware


async def test_handle_runs_middleware_then_routes_with_continue_then_the_default() -> None:
    log: list[str] = []
    ctx = _ctx(payloads.text("hi"))
    await _recording(log).handle(ctx.message, ctx)
    assert log == ["bot middleware", "route", "default text"]


async def test_mount_puts_builtins_outside_the_bots_middleware_and_texts_to_the_text_fallback() -> None:
    log: list[str] = []
    bot = _recording(log)

    async def orchestrator(message: Message, ctx: Context) -> None:
        log.append("text fallback")

    mounted = bot.mount(outer=[_step(log, "consent"), _step(log, "limit")], text_fallback=orchestrator)
    for raw in (payloads.text("hi"), payloads.SAMPLES["sticker"], {**payloads.text("x"), "text": None}):
        ctx = _ctx(raw)
        await mounted.handle(ctx.message, ctx)
    assert log == [
        *("consent", "limit", "bot middleware", "route", "text fallback"),  # a text no route ended
        *("consent", "limit", "bot middleware", "default sticker"),  # not a text: the default
        *("consent", "limit", "bot middleware", "default text"),  # a text that did not decode: the default
    ]
    log.clear()
    ctx = _ctx(payloads.text("hi"))
    await bot.handle(ctx.message, ctx)
    assert log == ["bot middleware", "route", "default text"], "the bot's own router is left as declared"


async def test_a_builtin_that_stops_keeps_the_message_from_the_bot() -> None:
    log: list[str] = []
    mounted = _recording(log).mount(outer=[_step(log, "opt-out", stop=True), _step(log, "limit")])
    ctx = _ctx(payloads.text("STOP"))
    await mounted.handle(ctx.message, ctx)
    assert log == ["opt-out"]


async def test_a_mounted_router_shares_the_bots_routes() -> None:
    """Mounting is a view: a route the bot declares later (after the app started) still counts."""
    log: list[str] = []
    bot = Router()
    mounted = bot.mount(outer=[_step(log, "builtin")])

    @bot.command("late")
    async def late(message: Message, ctx: Context) -> None:
        log.append("late route")

    ctx = _ctx(payloads.text("late"))
    await mounted.handle(ctx.message, ctx)
    assert log == ["builtin", "late route"]
    assert mounted.handlers_for(ctx.message) == [late]


def test_fallback_for_names_who_answers_an_unclaimed_message() -> None:
    bot = Router()

    async def orchestrator(message: Message, ctx: Context) -> None:
        return None

    assert bot.fallback_for(_decode(payloads.text("hi"))) is None
    bot.default(_noop)
    mounted = bot.mount(text_fallback=orchestrator)
    assert mounted.fallback_for(_decode(payloads.text("hi"))) is orchestrator
    assert mounted.fallback_for(_decode(payloads.SAMPLES["image"])) is _noop
    assert bot.fallback_for(_decode(payloads.text("hi"))) is _noop


# ---------------------------------------------------------------------------- handler discovery (loader)


def test_routers_for_loads_each_tenants_module(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        tenants={
            "home": {"phone_number_id": payloads.PNID},
            "biz": {"phone_number_id": payloads.BIZ_PNID, "handler": "concierge"},
        },
    )
    assert routers_for(cfg) == {"home": echo.router, "biz": concierge.router}


def test_load_router_errors_name_the_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "handlers.plain", types.ModuleType("handlers.plain"))  # a module, no router
    cases = {"../etc": "is not a module name", "no_such_bot": "no module handlers/no_such_bot.py", "plain": "has no"}
    for module, needle in cases.items():
        with pytest.raises(ConfigError, match=r"^tenants\.biz\.handler: ") as err:
            load_router(module, "tenants.biz.handler")
        assert needle in str(err.value)


# ---------------------------------------------------------------------------- through the dispatcher


async def _app(aiohttp_client: Any, tmp_path: Path, router: Router, **sections: Any) -> tuple[Any, Path]:
    cfg = make_config(tmp_path, **sections)
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": router}))
    return client, Path(cfg.storage.path)


async def _deliver(client: Any, db: Path, *msgs: dict[str, Any]) -> None:
    """Post the messages and wait until every one of them is out of 'pending'."""
    ids = [m["id"] for m in msgs]
    assert await post_webhook(client, payloads.body_of(*msgs)) == 200
    marks = ",".join("?" * len(ids))

    def done() -> bool:
        sql = f"SELECT COUNT(*) FROM inbox WHERE state != 'pending' AND event_id IN ({marks})"
        return int(db_rows(db, sql, tuple(ids))[0][0]) == len(ids)

    await wait_for(done)


def _texts(db: Path, event_id: str) -> list[str]:
    rows = db_rows(
        db, "SELECT payload FROM outbox WHERE source_event_id = ? AND type = 'text' ORDER BY idem_key", (event_id,)
    )
    return [json.loads(r[0])["text"]["body"] for r in rows]


async def test_first_matching_route_wins_in_declaration_order(aiohttp_client: Any, tmp_path: Path) -> None:
    router, seen = Router(), []

    @router.command("help")
    async def help_(message: Message, ctx: Context) -> None:
        seen.append(("help", message.id))
        ctx.reply(f"help: {ctx.command_args or '-'}")

    @router.message("text")
    async def any_text(message: Message, ctx: Context) -> None:
        seen.append(("text", message.id))
        ctx.reply("text")

    @router.default
    async def fallback(message: Message, ctx: Context) -> None:
        seen.append(("default", message.id))
        ctx.reply("default")

    client, db = await _app(aiohttp_client, tmp_path, router)
    msgs = [payloads.text("HELP billing", id="wamid.R1"), payloads.text("hi", id="wamid.R2")]
    await _deliver(client, db, *msgs, dict(payloads.SAMPLES["location"], id="wamid.R3"))
    assert sorted(seen) == [("default", "wamid.R3"), ("help", "wamid.R1"), ("text", "wamid.R2")]
    assert _texts(db, "wamid.R1") == ["help: billing"]
    assert _texts(db, "wamid.R2") == ["text"]
    assert _texts(db, "wamid.R3") == ["default"]
    states = {r[0]: r[1] for r in db_rows(db, "SELECT event_id, state FROM inbox")}
    assert states == {"wamid.R1": "handled", "wamid.R2": "handled", "wamid.R3": "handled"}


async def test_continue_lets_the_next_matching_route_run(aiohttp_client: Any, tmp_path: Path) -> None:
    router, seen = Router(), []

    @router.message("text")
    async def tag(message: Message, ctx: Context) -> Any:
        seen.append("tag")
        ctx.reply("tagged")
        return CONTINUE

    @router.message("image")
    async def image_only(message: Message, ctx: Context) -> None:
        seen.append("image")  # never: does not match a text

    @router.message("text", text="order")
    async def order(message: Message, ctx: Context) -> None:
        seen.append("order")
        ctx.reply("ordered")

    @router.message("text")
    async def after(message: Message, ctx: Context) -> None:
        seen.append("after")  # never: `order` did not return CONTINUE

    @router.default
    async def fallback(message: Message, ctx: Context) -> None:
        seen.append("default")

    client, db = await _app(aiohttp_client, tmp_path, router)
    await _deliver(client, db, payloads.text("order 1", id="wamid.C1"))
    assert seen == ["tag", "order"]
    assert _texts(db, "wamid.C1") == ["tagged", "ordered"]  # replies of both, in order


async def test_default_runs_when_nothing_matched_or_every_route_continued(aiohttp_client: Any, tmp_path: Path) -> None:
    router, seen = Router(), []

    @router.message("text")
    async def first(message: Message, ctx: Context) -> Any:
        seen.append(("first", message.id))
        return CONTINUE

    @router.message("text", text="x")
    async def second(message: Message, ctx: Context) -> Any:
        seen.append(("second", message.id))
        return CONTINUE

    @router.default
    async def fallback(message: Message, ctx: Context) -> None:
        seen.append(("default", message.id))
        ctx.reply(f"default for {message.type}")

    client, db = await _app(aiohttp_client, tmp_path, router, dispatch={"workers": 1})
    await _deliver(client, db, payloads.text("x", id="wamid.D1"), dict(payloads.SAMPLES["sticker"], id="wamid.D2"))
    assert seen == [("first", "wamid.D1"), ("second", "wamid.D1"), ("default", "wamid.D1"), ("default", "wamid.D2")]
    assert _texts(db, "wamid.D1") == ["default for text"]
    assert _texts(db, "wamid.D2") == ["default for sticker"]


async def test_no_route_and_no_default_is_handled_silently(aiohttp_client: Any, tmp_path: Path) -> None:
    router = Router()
    router.message("image")(_noop)
    client, db = await _app(aiohttp_client, tmp_path, router)
    await _deliver(client, db, payloads.text("nobody listens", id="wamid.N1"))
    assert db_rows(db, "SELECT state FROM inbox")[0][0] == "handled"
    assert db_rows(db, "SELECT COUNT(*) FROM outbox")[0][0] == 0


async def test_middleware_order_first_added_is_outermost(aiohttp_client: Any, tmp_path: Path) -> None:
    router, log = Router(), []

    @router.use
    async def outer(message: Message, ctx: Context, call_next: Any) -> Any:
        log.append("outer in")
        result = await call_next()
        log.append("outer out")
        return result

    @router.use
    async def inner(message: Message, ctx: Context, call_next: Any) -> Any:
        log.append("inner in")
        result = await call_next()
        log.append("inner out")
        return result

    @router.default
    async def handler(message: Message, ctx: Context) -> None:
        log.append("handler")
        ctx.reply("done")

    client, db = await _app(aiohttp_client, tmp_path, router)
    await _deliver(client, db, payloads.text("hi", id="wamid.M1"))
    assert log == ["outer in", "inner in", "handler", "inner out", "outer out"]
    assert _texts(db, "wamid.M1") == ["done"]


async def test_middleware_can_short_circuit(aiohttp_client: Any, tmp_path: Path) -> None:
    router, seen = Router(), []
    blocked = {"15550000666"}

    @router.use
    async def gate(message: Message, ctx: Context, call_next: Any) -> Any:
        if message.sender in blocked:
            ctx.reply("You are blocked.")
            return None  # call_next is never called
        return await call_next()

    @router.message("text")
    async def handler(message: Message, ctx: Context) -> None:
        seen.append(message.id)
        ctx.reply("welcome")

    client, db = await _app(aiohttp_client, tmp_path, router)
    await _deliver(
        client, db, payloads.text("hi", id="wamid.B1", sender="15550000666"), payloads.text("hi", id="wamid.B2")
    )
    assert seen == ["wamid.B2"]
    assert _texts(db, "wamid.B1") == ["You are blocked."]
    assert _texts(db, "wamid.B2") == ["welcome"]
    assert {r[0] for r in db_rows(db, "SELECT state FROM inbox")} == {"handled"}


async def test_middleware_can_time_handlers(aiohttp_client: Any, tmp_path: Path) -> None:
    router, timings = Router(), {}

    @router.use
    async def timer(message: Message, ctx: Context, call_next: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call_next()
        finally:
            timings[message.id] = time.perf_counter() - started

    @router.default
    async def slow(message: Message, ctx: Context) -> None:
        await asyncio.sleep(0.05)
        ctx.reply("slow answer")

    client, db = await _app(aiohttp_client, tmp_path, router)
    await _deliver(client, db, payloads.text("hi", id="wamid.T1"))
    assert 0.05 <= timings["wamid.T1"] < 2.0
    assert _texts(db, "wamid.T1") == ["slow answer"]


async def test_middleware_sees_a_handler_error(aiohttp_client: Any, tmp_path: Path) -> None:
    router, seen = Router(), []

    @router.use
    async def observe(message: Message, ctx: Context, call_next: Any) -> Any:
        try:
            return await call_next()
        except RuntimeError as exc:
            seen.append(str(exc))
            raise

    @router.default
    async def broken(message: Message, ctx: Context) -> None:
        raise RuntimeError("broken handler")

    client, db = await _app(aiohttp_client, tmp_path, router, dispatch={"fallback_text": "sorry"})
    await _deliver(client, db, payloads.text("hi", id="wamid.E1"))
    assert seen == ["broken handler"]
    assert db_rows(db, "SELECT state, error FROM inbox")[0][:] == ("failed", "RuntimeError: broken handler")
    assert _texts(db, "wamid.E1") == ["sorry"]


# ---------------------------------------------------------------------------- status routes


def _status_body(wamid: str, state: str, **extra: Any) -> bytes:
    return payloads.dump(
        payloads.envelope(
            payloads.entry(payloads.change(payloads.value(statuses=[payloads.status(wamid, state, **extra)])))
        )
    )


async def test_status_route_runs_for_a_failed_send_and_queues_a_follow_up(aiohttp_client: Any, tmp_path: Path) -> None:
    router, calls = Router(), []

    @router.default
    async def hello(message: Message, ctx: Context) -> None:
        ctx.reply("a free-form reply that will fail")

    @router.status("failed")
    async def on_failed(status: Status, ctx: StatusContext) -> None:
        calls.append((status.id, status.status, ctx.tenant, ctx.recipient))
        ctx.reply_template("we_missed_you", "en_US", body_params=["Ana"])

    @router.status("delivered", "read")
    async def on_progress(status: Status, ctx: StatusContext) -> None:
        calls.append((status.id, status.status, "progress", ""))

    client, db = await _app(aiohttp_client, tmp_path, router, dispatch={"workers": 1})
    await _deliver(client, db, payloads.text("hi", id="wamid.S1"))
    await wait_for(lambda: bool(db_rows(db, "SELECT 1 FROM outbox WHERE state = 'sent' AND wamid IS NOT NULL")))
    [(wamid, outbox_id)] = [tuple(r) for r in db_rows(db, "SELECT wamid, id FROM outbox WHERE type = 'text'")]

    failed = _status_body(wamid, "failed", errors=[{"code": 131026, "title": "Message undeliverable"}])
    assert await post_webhook(client, failed) == 200
    key = f"status:{wamid}:failed:000"
    await wait_for(lambda: bool(db_rows(db, "SELECT 1 FROM outbox WHERE idem_key = ?", (key,))))
    assert calls == [(wamid, "failed", "home", payloads.USER)]
    [row] = db_rows(
        db, "SELECT tenant, recipient, type, payload, source_event_id FROM outbox WHERE idem_key = ?", (key,)
    )
    assert (row["tenant"], row["recipient"], row["type"], row["source_event_id"]) == (
        "home",
        payloads.USER,
        "template",
        None,
    )
    assert json.loads(row["payload"]) == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "+" + payloads.USER,
        "type": "template",
        "template": {
            "name": "we_missed_you",
            "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ana"}]}],
        },
    }
    original = db_rows(db, "SELECT state, error_code FROM outbox WHERE id = ?", (outbox_id,))[0]
    assert tuple(original) == ("failed", 131026)
    await wait_for(lambda: client.app[keys.DISPATCHER].counts["status_handled"] == 1)

    # Meta redelivers the same status: stored once, the handler does not run again. A second,
    # different status behind it (one worker, FIFO) proves the redelivery was not just late.
    assert await post_webhook(client, failed) == 200
    assert await post_webhook(client, _status_body("wamid.OTHER1", "read")) == 200
    await wait_for(lambda: len(calls) == 2)
    await asyncio.sleep(0.05)
    assert calls == [(wamid, "failed", "home", payloads.USER), ("wamid.OTHER1", "read", "progress", "")]
    assert db_rows(db, "SELECT COUNT(*) FROM outbox WHERE type = 'template'")[0][0] == 1
    assert db_rows(db, "SELECT COUNT(*) FROM statuses WHERE wamid = ?", (wamid,))[0][0] == 1


async def test_status_routes_only_run_for_their_states(aiohttp_client: Any, tmp_path: Path) -> None:
    router, calls = Router(), []

    @router.status("failed")
    async def on_failed(status: Status, ctx: StatusContext) -> None:
        calls.append(("failed", status.id))

    @router.status()
    async def on_any(status: Status, ctx: StatusContext) -> None:
        calls.append(("any", status.id))

    client, _ = await _app(aiohttp_client, tmp_path, router, dispatch={"workers": 1})
    assert await post_webhook(client, _status_body("wamid.X1", "delivered")) == 200
    assert await post_webhook(client, _status_body("wamid.X2", "failed")) == 200
    await wait_for(lambda: len(calls) == 3)
    assert calls == [("any", "wamid.X1"), ("failed", "wamid.X2"), ("any", "wamid.X2")]
