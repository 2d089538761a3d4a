"""Abuse and consent: the per-user inbound limit (by Meta's timestamps) and opt-out words/buttons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.abuse import PRUNE_EVERY, InboundLimiter, ends_opt_out, is_opt_out
from alfred_bot.app import create_app
from alfred_bot.config import LimitsConfig, load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.parse import decode_message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import API_TOKEN, ENV, db_rows, make_config, post_webhook, wait_for

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
T0 = 1_760_000_000
LIMITS = {"inbound_per_user": 3, "inbound_window_seconds": 60}
NOTICE = LimitsConfig().limit_notice
OPT_OUT_REPLY = LimitsConfig().opt_out_reply
OTHER = "15550004444"


def _router(seen: list[str]) -> Router:
    router = Router("abuse")

    @router.default
    async def answer(message: Message, ctx: Context) -> None:
        seen.append(message.id)
        ctx.reply(f"ok {message.text}")

    return router


async def _app(aiohttp_client: Any, tmp_path: Path, seen: list[str], **limits: Any) -> tuple[Any, Path]:
    cfg = make_config(tmp_path, limits=limits)
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": _router(seen)}))
    return client, Path(cfg.storage.path)


async def _send(client: Any, db: Path, *msgs: dict[str, Any]) -> None:
    assert await post_webhook(client, payloads.body_of(*msgs)) == 200
    ids = tuple(m["id"] for m in msgs)
    marks = ",".join("?" * len(ids))
    sql = f"SELECT COUNT(*) FROM inbox WHERE state != 'pending' AND event_id IN ({marks})"
    await wait_for(lambda: db_rows(db, sql, ids)[0][0] == len(ids))


def _texts(db: Path, user: str = payloads.USER) -> list[str]:
    rows = db_rows(db, "SELECT payload FROM outbox WHERE recipient = ? AND type = 'text' ORDER BY rowid", (user,))
    return [json.loads(r[0])["text"]["body"] for r in rows]


def _state(db: Path, event_id: str) -> str:
    return str(db_rows(db, "SELECT state FROM inbox WHERE event_id = ?", (event_id,))[0][0])


# ---------------------------------------------------------------------------- the inbound limit, end to end


async def test_a_burst_over_the_limit_is_kept_but_not_handled_with_one_notice(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    seen: list[str] = []
    client, db = await _app(aiohttp_client, tmp_path, seen, **LIMITS)
    burst = [payloads.text(f"m{i}", id=f"wamid.L{i}", timestamp=str(T0 + i * 5)) for i in range(5)]
    await _send(client, db, *burst)

    states = {r[0]: r[1] for r in db_rows(db, "SELECT event_id, state FROM inbox")}
    assert sorted(states.values()) == ["handled"] * 3 + ["limited"] * 2
    assert len(seen) == 3
    assert {i for i, s in states.items() if s == "limited"}.isdisjoint(seen)
    texts = _texts(db)
    assert texts.count(NOTICE) == 1, texts
    assert sorted(seen) == ["wamid.L0", "wamid.L1", "wamid.L2"]  # the first three the user wrote
    assert sorted(t for t in texts if t != NOTICE) == ["ok m0", "ok m1", "ok m2"]
    rows = db_rows(db, "SELECT source_event_id, payload FROM outbox WHERE type = 'text'")
    [notice_for] = [r[0] for r in rows if json.loads(r[1])["text"]["body"] == NOTICE]
    assert states[notice_for] == "limited"

    # Another user in the same minute is not affected.
    await _send(client, db, payloads.text("hello", id="wamid.OTHER1", sender=OTHER, timestamp=str(T0 + 20)))
    assert _state(db, "wamid.OTHER1") == "handled"
    assert _texts(db, OTHER) == ["ok hello"]

    # Still inside the window: limited again, and no second notice.
    await _send(client, db, payloads.text("m5", id="wamid.L5", timestamp=str(T0 + 30)))
    assert _state(db, "wamid.L5") == "limited"
    assert _texts(db).count(NOTICE) == 1

    # A window after the burst the user is answered again.
    await _send(client, db, payloads.text("later", id="wamid.L6", timestamp=str(T0 + 30 + 60)))
    assert _state(db, "wamid.L6") == "handled"
    assert _texts(db)[-1] == "ok later"


async def test_the_limit_is_off_with_zero(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await _app(aiohttp_client, tmp_path, seen, inbound_per_user=0)
    await _send(client, db, *[payloads.text(f"m{i}", id=f"wamid.Z{i}", timestamp=str(T0)) for i in range(30)])
    assert len(seen) == 30
    assert db_rows(db, "SELECT COUNT(*) FROM inbox WHERE state = 'limited'")[0][0] == 0


async def test_no_notice_when_configured_empty(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await _app(aiohttp_client, tmp_path, seen, inbound_per_user=1, limit_notice="")
    await _send(client, db, *[payloads.text(f"m{i}", id=f"wamid.Q{i}", timestamp=str(T0)) for i in range(3)])
    assert len(seen) == 1
    assert _texts(db) == [f"ok {db_rows(db, 'SELECT text FROM inbox WHERE state = ?', ('handled',))[0][0]}"]


# ---------------------------------------------------------------------------- InboundLimiter (unit)


def test_limiter_counts_per_window_by_message_time() -> None:
    limiter = InboundLimiter(3, 60, clock=lambda: 0.0)
    verdicts = [limiter.check("home", "u", T0 + t) for t in (0, 10, 20, 30, 40)]
    assert [(v.allowed, v.notify) for v in verdicts] == [
        (True, False),
        (True, False),
        (True, False),
        (False, True),
        (False, False),
    ]
    # 60 s after the first message it leaves the window, but the limited ones still count.
    assert not limiter.check("home", "u", T0 + 60).allowed
    # A whole window after the last message: allowed again.
    assert limiter.check("home", "u", T0 + 60 + 60).allowed


def test_limiter_judges_a_replayed_backlog_by_when_users_wrote() -> None:
    limiter = InboundLimiter(2, 60, clock=lambda: 0.0)
    # Messages written an hour apart, handled in one go after an outage: none is limited.
    assert all(limiter.check("home", "u", T0 + 3600 * i).allowed for i in range(10))


def test_limiter_separates_users_and_tenants() -> None:
    limiter = InboundLimiter(1, 60, clock=lambda: 0.0)
    assert limiter.check("home", "a", T0).allowed
    assert not limiter.check("home", "a", T0 + 1).allowed
    assert limiter.check("home", "b", T0 + 1).allowed
    assert limiter.check("biz", "a", T0 + 1).allowed


def test_limiter_notifies_once_per_window() -> None:
    limiter = InboundLimiter(1, 60, clock=lambda: 0.0)
    notices = [limiter.check("home", "u", T0 + t).notify for t in range(0, 200, 10)]
    # over the limit from t=10; notices at 10, 70, 130, 190 (one per 60 s of flooding)
    assert [t for t, n in zip(range(0, 200, 10), notices, strict=True) if n] == [10, 70, 130, 190]


def test_limiter_disabled_with_zero() -> None:
    limiter = InboundLimiter(0, 60, clock=lambda: 0.0)
    assert all(limiter.check("home", "u", T0).allowed for _ in range(100))
    assert limiter.tracked == 0


def test_limiter_forgets_quiet_users() -> None:
    now = [0.0]
    limiter = InboundLimiter(5, 60, clock=lambda: now[0])
    limiter.check("home", "quiet", T0)
    limiter.check("home", "busy", T0 + 400)
    assert limiter.tracked == 2
    now[0] = PRUNE_EVERY + 1
    limiter.check("home", "busy", T0 + 401)
    assert limiter.tracked == 1  # "quiet" wrote more than a window before: forgotten


# ---------------------------------------------------------------------------- opt-out


async def _api_send(client: Any, to: str = payloads.USER) -> Any:
    body = {"to": f"+{to}", "type": "template", "template": {"name": "promo", "language": {"code": "en_US"}}}
    return await client.post("/api/messages", json=body, headers=AUTH)


@pytest.mark.parametrize("word", ["STOP", "stop", " Stop. ", "Stop!"])
async def test_stop_opts_out_until_the_user_writes_again(aiohttp_client: Any, tmp_path: Path, word: str) -> None:
    seen: list[str] = []
    client, db = await _app(aiohttp_client, tmp_path, seen)
    await _send(client, db, payloads.text(word, id="wamid.STOP1"))
    assert seen == [], "an opt-out word does not reach the handlers"
    assert _state(db, "wamid.STOP1") == "handled"
    assert _texts(db) == [OPT_OUT_REPLY]
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

    await _send(client, db, payloads.text("hi again", id="wamid.BACK1"))
    assert seen == ["wamid.BACK1"]
    assert db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 0
    accepted = await _api_send(client)
    assert accepted.status == 202
    assert (await accepted.json())["status"] == "queued"


async def test_opt_out_is_per_tenant(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    cfg = make_config(tmp_path)
    routers = {"home": _router(seen), "biz": _router(seen)}
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers=routers))
    db = Path(cfg.storage.path)
    assert await post_webhook(client, payloads.body_of(payloads.text("STOP", id="wamid.PT1"))) == 200
    await wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 1)
    body = {"to": f"+{payloads.USER}", "type": "template", "template": {"name": "p", "language": {"code": "en"}}}
    assert (await client.post("/api/messages", json=body, headers=AUTH)).status == 409
    assert (await client.post("/api/messages", json={**body, "tenant": "biz"}, headers=AUTH)).status == 202


async def test_a_template_button_with_an_opt_out_payload_opts_out(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await _app(aiohttp_client, tmp_path, seen, opt_out_payloads=["STOP_PROMOS"])
    await _send(client, db, dict(payloads.SAMPLES["button"], id="wamid.BTN1"))
    assert seen == []
    assert [tuple(r) for r in db_rows(db, "SELECT tenant, user FROM optouts")] == [("home", payloads.USER)]
    assert _texts(db) == [OPT_OUT_REPLY]
    assert (await _api_send(client)).status == 409


async def test_other_button_payloads_and_stop_in_a_sentence_do_not_opt_out(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await _app(aiohttp_client, tmp_path, seen, opt_out_payloads=["STOP_PROMOS"])
    button = payloads.message("button", {"payload": "MORE_PROMOS", "text": "More"}, id="wamid.BTN2")
    await _send(client, db, payloads.text("stop the music", id="wamid.NS1"), button)
    assert sorted(seen) == ["wamid.BTN2", "wamid.NS1"]
    assert db_rows(db, "SELECT COUNT(*) FROM optouts")[0][0] == 0
    assert (await _api_send(client)).status == 202


async def test_custom_opt_out_words_and_silent_opt_out(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await _app(aiohttp_client, tmp_path, seen, opt_out_keywords=["BAJA", "Cancelar"], opt_out_reply="")
    await _send(client, db, payloads.text("baja", id="wamid.BJ1"), payloads.text("STOP", id="wamid.BJ2", sender=OTHER))
    assert seen == ["wamid.BJ2"]  # STOP is no longer an opt-out word here
    assert [tuple(r) for r in db_rows(db, "SELECT tenant, user FROM optouts")] == [("home", payloads.USER)]
    assert _texts(db) == []  # no opt-out reply configured
    assert _texts(db, OTHER) == ["ok STOP"]


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
