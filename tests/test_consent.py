"""Consent: opt-out words and buttons (the built-in consent middleware, end to end) and what ends an opt-out."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import LimitsConfig, load_secrets
from alfred_bot.consent import consent_middleware, ends_opt_out, is_opt_out
from alfred_bot.context import Context
from alfred_bot.limits import InboundLimiter, limit_middleware
from alfred_bot.models import Message
from alfred_bot.parse import decode_message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import (
    API_TOKEN,
    ENV,
    db_rows,
    inbox_state,
    make_config,
    outbox_texts,
    post_webhook,
    recording_app,
    recording_router,
    send_and_settle,
    wait_for,
)

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
T0 = 1_760_000_000
OPT_OUT_REPLY = LimitsConfig().opt_out_reply
OTHER = "15550004444"


# ---------------------------------------------------------------------------- opt-out


async def _api_send(client: Any, to: str = payloads.USER) -> Any:
    body = {"to": f"+{to}", "type": "template", "template": {"name": "promo", "language": {"code": "en_US"}}}
    return await client.post("/api/messages", json=body, headers=AUTH)


@pytest.mark.parametrize("word", ["STOP", "stop", " Stop. ", "Stop!"])
async def test_stop_opts_out_until_the_user_writes_again(aiohttp_client: Any, tmp_path: Path, word: str) -> None:
    seen: list[str] = []
    client, db = await recording_app(aiohttp_client, tmp_path, seen)
    await send_and_settle(client, db, payloads.text(word, id="wamid.STOP1"))
    assert seen == [], "an opt-out word does not reach the handlers"
    assert inbox_state(db, "wamid.STOP1") == "handled"
    assert outbox_texts(db) == [OPT_OUT_REPLY]
    assert [tuple(r) for r in db_rows(db, "SELECT tenant, user FROM optouts")] == [("home", payloads.USER)]
    assert client.app[keys.DISPATCHER].counts["opted_out"] == 1

    refused = await _api_send(client)
    assert refused.status == 409
    error = await refused.json()
    assert error["field"] == "to"
    assert "opted out" in error["error"]
    assert db_rows(db, "SELECT COUNT(*) FROM outbox WHERE type = 'template'")[0][0] == 0

    # Another user of the same tenant is not affected.
    assert (await _api_send(client, OTHER)).status == 202

    await send_and_settle(client, db, payloads.text("hi again", id="wamid.BACK1"))
    assert seen == ["wamid.BACK1"]
    assert db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 0
    accepted = await _api_send(client)
    assert accepted.status == 202
    assert (await accepted.json())["status"] == "queued"


async def test_opt_out_is_per_tenant(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    cfg = make_config(tmp_path)
    routers = {"home": recording_router(seen), "biz": recording_router(seen)}
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers=routers))
    db = Path(cfg.storage.path)
    assert await post_webhook(client, payloads.body_of(payloads.text("STOP", id="wamid.PT1"))) == 200
    await wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 1)
    body = {"to": f"+{payloads.USER}", "type": "template", "template": {"name": "p", "language": {"code": "en"}}}
    assert (await client.post("/api/messages", json=body, headers=AUTH)).status == 409
    assert (await client.post("/api/messages", json={**body, "tenant": "biz"}, headers=AUTH)).status == 202


async def test_a_template_button_with_an_opt_out_payload_opts_out(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await recording_app(aiohttp_client, tmp_path, seen, opt_out_payloads=["STOP_PROMOS"])
    await send_and_settle(client, db, dict(payloads.SAMPLES["button"], id="wamid.BTN1"))
    assert seen == []
    assert [tuple(r) for r in db_rows(db, "SELECT tenant, user FROM optouts")] == [("home", payloads.USER)]
    assert outbox_texts(db) == [OPT_OUT_REPLY]
    assert (await _api_send(client)).status == 409


async def test_other_button_payloads_and_stop_in_a_sentence_do_not_opt_out(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await recording_app(aiohttp_client, tmp_path, seen, opt_out_payloads=["STOP_PROMOS"])
    button = payloads.message("button", {"payload": "MORE_PROMOS", "text": "More"}, id="wamid.BTN2")
    await send_and_settle(client, db, payloads.text("stop the music", id="wamid.NS1"), button)
    assert sorted(seen) == ["wamid.BTN2", "wamid.NS1"]
    assert db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 0
    assert (await _api_send(client)).status == 202


async def test_custom_opt_out_words_and_silent_opt_out(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    words = ["BAJA", "Cancelar"]
    client, db = await recording_app(aiohttp_client, tmp_path, seen, opt_out_keywords=words, opt_out_reply="")
    stop = payloads.text("STOP", id="wamid.BJ2", sender=OTHER)
    await send_and_settle(client, db, payloads.text("baja", id="wamid.BJ1"), stop)
    assert seen == ["wamid.BJ2"]  # STOP is no longer an opt-out word here
    assert [tuple(r) for r in db_rows(db, "SELECT tenant, user FROM optouts")] == [("home", payloads.USER)]
    assert outbox_texts(db) == []  # no opt-out reply configured
    assert outbox_texts(db, OTHER) == ["ok STOP"]


async def test_writing_lifts_an_opt_out_even_when_the_bot_fails(aiohttp_client: Any, tmp_path: Path) -> None:
    """The consent verdict is taken before the bot runs: a failing handler does not undo it."""
    cfg = make_config(tmp_path)
    router = Router("broken")

    @router.default
    async def broken(message: Message, ctx: Context) -> None:
        raise RuntimeError("bot bug")

    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": router}))
    db = Path(cfg.storage.path)
    await send_and_settle(client, db, payloads.text("STOP", id="wamid.F1"))
    assert db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 1
    await send_and_settle(client, db, payloads.text("hello?", id="wamid.F2"))
    assert inbox_state(db, "wamid.F2") == "failed"
    assert db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 0
    assert (await _api_send(client)).status == 202


async def test_a_limited_message_does_not_lift_an_opt_out(aiohttp_client: Any, tmp_path: Path) -> None:
    """Consent runs before the limit (STOP is never counted), and a message kept as `limited` was
    not acted on: it says nothing about consent, so the opt-out holds."""
    seen: list[str] = []
    client, db = await recording_app(aiohttp_client, tmp_path, seen, inbound_per_user=1, inbound_window_seconds=60)
    await send_and_settle(client, db, payloads.text("first", id="wamid.LO1", timestamp=str(T0)))
    await send_and_settle(client, db, payloads.text("STOP", id="wamid.LO2", timestamp=str(T0 + 1)))
    await send_and_settle(client, db, payloads.text("more", id="wamid.LO3", timestamp=str(T0 + 2)))
    assert [inbox_state(db, f"wamid.LO{i}") for i in (1, 2, 3)] == ["handled", "handled", "limited"]
    assert seen == ["wamid.LO1"]
    assert db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 1
    assert (await _api_send(client)).status == 409


def _ctx(raw: dict[str, Any]) -> Context:
    return Context(tenant="home", phone_number_id=payloads.PNID, message=_msg(raw), contact=None)


def _bodies(ctx: Context) -> list[str]:
    return [json.loads(r.payload)["text"]["body"] for r in ctx.replies]


async def test_the_consent_middleware_answers_opt_outs_itself_and_records_each_verdict() -> None:
    seen: list[str] = []
    counts: Counter[str] = Counter()
    mounted = recording_router(seen).mount(outer=[consent_middleware(LimitsConfig(), counts)])
    verdicts = {}
    for raw in (
        payloads.text("Stop.", id="wamid.V1"),
        payloads.text("hi", id="wamid.V2"),
        dict(payloads.SAMPLES["reaction"], id="wamid.V3"),
    ):
        ctx = _ctx(raw)
        await mounted.handle(ctx.message, ctx)
        verdicts[ctx.message.id] = (ctx.consent, _bodies(ctx))
    assert verdicts == {
        "wamid.V1": ("out", [OPT_OUT_REPLY]),  # answered here: the bot never sees it
        "wamid.V2": ("in", ["ok hi"]),
        "wamid.V3": (None, ["ok None"]),  # a reaction neither opts out nor lifts an opt-out
    }
    assert seen == ["wamid.V2", "wamid.V3"]
    assert counts == {"opted_out": 1}


async def test_consent_then_limit_in_the_dispatchers_order() -> None:
    seen: list[str] = []
    limiter = InboundLimiter(1, 60, clock=lambda: 0.0)
    limits = LimitsConfig(inbound_per_user=1)
    builtins = [consent_middleware(limits, Counter()), limit_middleware(limiter, limits)]
    mounted = recording_router(seen).mount(outer=builtins)
    outcomes = []
    for i, text in enumerate(["one", "two", "STOP", "three"]):
        ctx = _ctx(payloads.text(text, id=f"wamid.CL{i}", timestamp=str(T0 + i)))
        await mounted.handle(ctx.message, ctx)
        outcomes.append((text, ctx.consent, ctx.limited, _bodies(ctx)))
    notice = limits.limit_notice
    assert outcomes == [
        ("one", "in", False, ["ok one"]),
        ("two", None, True, [notice]),  # limited: no verdict on consent
        ("STOP", "out", False, [OPT_OUT_REPLY]),  # an opt-out is honoured whatever the limit says
        ("three", None, True, []),  # one notice per window
    ]
    assert seen == ["wamid.CL0"]


def _msg(raw: dict[str, Any]) -> Message:
    return decode_message(payloads.dump(raw))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (payloads.text("STOP"), True),
        (payloads.text("  stop.  "), True),
        (payloads.text("Stop!!"), True),
        (payloads.text("stop the music"), False),
        (payloads.text("unstoppable"), False),
        (payloads.text("STOP STOP"), False),
        (payloads.message("image", {"caption": "STOP", "mime_type": "image/jpeg", "sha256": "x", "id": "m"}), False),
        (payloads.message("button", {"payload": "STOP_PROMOS", "text": "Stop"}), True),
        (payloads.message("button", {"payload": "stop_promos", "text": "Stop"}), False),
        (payloads.message("button", {"text": "STOP"}), False),
    ],
)
def test_is_opt_out(raw: dict[str, Any], expected: bool) -> None:
    limits = LimitsConfig(opt_out_payloads=["STOP_PROMOS"])
    assert is_opt_out(_msg(raw), limits) is expected


def _interactive(kind: str, reply: dict[str, Any]) -> dict[str, Any]:
    return payloads.message("interactive", {"type": kind, kind: reply})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (payloads.SAMPLES["text"], True),
        (payloads.SAMPLES["image"], True),
        (payloads.SAMPLES["audio"], True),
        (payloads.SAMPLES["video"], True),
        (payloads.SAMPLES["document"], True),
        (payloads.SAMPLES["sticker"], True),
        (payloads.SAMPLES["location"], True),
        (payloads.SAMPLES["contacts"], True),
        (payloads.SAMPLES["button"], True),
        (payloads.SAMPLES["order"], True),
        (_interactive("button_reply", {"id": "b", "title": "B"}), True),
        (_interactive("list_reply", {"id": "l", "title": "L"}), True),
        (_interactive("nfm_reply", {"name": "flow", "body": "Sent", "response_json": "{}"}), True),
        (_interactive("call_permission_reply", {"response": "accept"}), False),
        (payloads.SAMPLES["reaction"], False),
        (payloads.SAMPLES["system"], False),
        (payloads.SAMPLES["unsupported"], False),
        (payloads.message("unknown"), False),
        (payloads.message("poll", {"question": "?"}), False),
        (payloads.SAMPLES_2025["edit"], False),
        (payloads.SAMPLES_2025["revoke"], False),
        (payloads.SAMPLES_2025["request_welcome"], False),
        (payloads.message("text", {"body": 5}), False),  # kept with a parse error: we cannot tell what it was
        (payloads.message("interactive"), False),  # Meta's 131000 shape: no `interactive` object
    ],
    ids=lambda v: str(v) if isinstance(v, bool) else str(v["type"]) + str((v.get("interactive") or {}).get("type", "")),
)
def test_ends_opt_out(raw: dict[str, Any], expected: bool) -> None:
    assert ends_opt_out(_msg(raw)) is expected
