"""Tenants with their own credentials: each number sends with its own token, accepts only
webhooks signed by its own app, refuses to start without them, and pauses on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import Config, ConfigError, load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import ACCESS_TOKEN, APP_SECRET, PROD_ENV, db_rows, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph, graph_error

BIZ_TOKEN = "biz-access-token-EAAB-987"
BIZ_SECRET = "biz-app-secret-abcdef"
BIZ_SECRET_OLD = "biz-app-secret-previous-012"
BIZ_ENV = {**PROD_ENV, "BIZ_TOKEN": BIZ_TOKEN, "BIZ_SECRET": BIZ_SECRET}
BIZ_USER = "15557770001"
TENANTS = {
    "home": {"phone_number_id": payloads.PNID},
    "biz": {"phone_number_id": payloads.BIZ_PNID, "access_token_env": "BIZ_TOKEN", "app_secret_env": "BIZ_SECRET"},
}


def _cfg(tmp_path: Path, graph: FakeGraph, **sections: Any) -> Config:
    return prod_config(tmp_path, graph, tenants=TENANTS, **sections)


def _echo(name: str) -> Router:
    router = Router(name)

    @router.default
    async def echo(message: Message, ctx: Context) -> None:
        ctx.reply(f"{ctx.tenant}: {message.text}")

    return router


async def _app(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, env: dict[str, str] | None = None) -> Any:
    cfg = _cfg(tmp_path, graph)
    secrets = load_secrets(BIZ_ENV if env is None else env, cfg=cfg)
    routers = {"home": _echo("home"), "biz": _echo("biz")}
    return await aiohttp_client(create_app(cfg, secrets, routers=routers))


def _db(client: Any) -> Path:
    return Path(client.app[keys.CONFIG].storage.path)


def _count(db: Path, sql: str) -> int:
    return int(db_rows(db, f"SELECT COUNT(*) FROM {sql}")[0][0])


# ---------------------------------------------------------------------------- tokens


async def test_each_tenant_sends_with_its_own_token(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await _app(aiohttp_client, tmp_path, graph)
    home = payloads.body_of(payloads.text("for home", id="wamid.TH1"))
    biz = payloads.body_of(payloads.text("for biz", id="wamid.TB1", sender=BIZ_USER), pnid=payloads.BIZ_PNID)
    assert await post_webhook(client, home, APP_SECRET) == 200
    assert await post_webhook(client, biz, BIZ_SECRET) == 200
    await wait_for(lambda: len(graph.sends) == 2)
    sent = {r.body["text"]["body"]: (r.phone_number_id, r.authorization, r.body["to"]) for r in graph.sends}
    assert sent == {
        "home: for home": (payloads.PNID, f"Bearer {ACCESS_TOKEN}", "+" + payloads.USER),
        "biz: for biz": (payloads.BIZ_PNID, f"Bearer {BIZ_TOKEN}", "+" + BIZ_USER),
    }
    db = _db(client)
    await wait_for(lambda: _count(db, "outbox WHERE state = 'sent'") == 2)


def test_token_for_prefers_the_tenant_token(tmp_path: Path, graph: FakeGraph) -> None:
    secrets = load_secrets(BIZ_ENV, cfg=_cfg(tmp_path, graph))
    assert secrets.mode == "production"
    assert secrets.token_for("biz") == BIZ_TOKEN
    assert secrets.token_for("home") == ACCESS_TOKEN
    assert secrets.tenant_app_secrets == {"biz": (BIZ_SECRET,)}
    for value in (BIZ_TOKEN, BIZ_SECRET, ACCESS_TOKEN):
        assert value in secrets.values()
        assert value not in repr(secrets)


# ---------------------------------------------------------------------------- signatures


async def test_a_body_for_biz_signed_with_the_global_secret_is_refused(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _app(aiohttp_client, tmp_path, graph)
    body = payloads.body_of(payloads.text("forged", id="wamid.X1", sender=BIZ_USER), pnid=payloads.BIZ_PNID)
    assert await post_webhook(client, body, APP_SECRET) == 403
    assert _count(_db(client), "inbox") == 0
    assert _count(_db(client), "statuses") == 0
    assert client.app[keys.TELEMETRY].webhook["webhook_403"] == 1


async def test_a_body_for_home_signed_with_the_biz_secret_is_refused(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _app(aiohttp_client, tmp_path, graph)
    body = payloads.body_of(payloads.text("forged", id="wamid.X2"))
    assert await post_webhook(client, body, BIZ_SECRET) == 403
    statuses = payloads.dump(
        payloads.envelope(payloads.entry(payloads.change(payloads.value(statuses=[payloads.status("wamid.Q")]))))
    )
    assert await post_webhook(client, statuses, BIZ_SECRET) == 403
    assert _count(_db(client), "inbox") == 0
    assert _count(_db(client), "statuses") == 0


async def test_a_mixed_body_needs_a_secret_for_every_number(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _app(aiohttp_client, tmp_path, graph)
    mixed = payloads.dump(
        payloads.envelope(
            payloads.entry(
                payloads.change(payloads.value([payloads.text("home part", id="wamid.MX1")])),
                payloads.change(payloads.value([payloads.text("biz part", id="wamid.MX2")], pnid=payloads.BIZ_PNID)),
            )
        )
    )
    assert await post_webhook(client, mixed, APP_SECRET) == 403
    assert await post_webhook(client, mixed, BIZ_SECRET) == 403
    assert _count(_db(client), "inbox") == 0


async def test_each_number_signed_with_its_own_secret_is_accepted(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _app(aiohttp_client, tmp_path, graph)
    home = payloads.body_of(payloads.text("ok home", id="wamid.OK1"))
    biz = payloads.body_of(payloads.text("ok biz", id="wamid.OK2", sender=BIZ_USER), pnid=payloads.BIZ_PNID)
    assert await post_webhook(client, home, APP_SECRET) == 200
    assert await post_webhook(client, biz, BIZ_SECRET) == 200
    rows = {r["event_id"]: r["tenant"] for r in db_rows(_db(client), "SELECT event_id, tenant FROM inbox")}
    assert rows == {"wamid.OK1": "home", "wamid.OK2": "biz"}


async def test_the_previous_biz_secret_is_accepted_while_rotating(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    env = {**BIZ_ENV, "BIZ_SECRET_PREVIOUS": BIZ_SECRET_OLD}
    client = await _app(aiohttp_client, tmp_path, graph, env=env)
    old = payloads.body_of(payloads.text("old key", id="wamid.ROT1", sender=BIZ_USER), pnid=payloads.BIZ_PNID)
    new = payloads.body_of(payloads.text("new key", id="wamid.ROT2", sender=BIZ_USER), pnid=payloads.BIZ_PNID)
    assert await post_webhook(client, old, BIZ_SECRET_OLD) == 200
    assert await post_webhook(client, new, BIZ_SECRET) == 200
    # ...but the previous biz secret still does not speak for home.
    home = payloads.body_of(payloads.text("nope", id="wamid.ROT3"))
    assert await post_webhook(client, home, BIZ_SECRET_OLD) == 403
    assert {r[0] for r in db_rows(_db(client), "SELECT event_id FROM inbox")} == {"wamid.ROT1", "wamid.ROT2"}


async def test_account_events_from_the_biz_app_are_accepted(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """biz's own Meta app also sends WABA-level webhooks (template status, quality) signed with its
    secret and without a phone number id: refusing them makes Meta retry and disable the webhook."""
    client = await _app(aiohttp_client, tmp_path, graph)
    template = {
        "event": "APPROVED",
        "message_template_id": 987654321,
        "message_template_name": "biz_offer",
        "message_template_language": "en_US",
        "reason": None,
    }
    body = payloads.dump(
        payloads.envelope(payloads.entry(payloads.change(template, "message_template_status_update"), waba="WABA-BIZ"))
    )
    assert await post_webhook(client, body, BIZ_SECRET) == 200
    rows = db_rows(_db(client), "SELECT field, waba_id FROM events")
    assert [tuple(r) for r in rows] == [("message_template_status_update", "WABA-BIZ")]


# ---------------------------------------------------------------------------- production start-up


def test_production_refuses_to_start_without_the_biz_token(tmp_path: Path, graph: FakeGraph) -> None:
    """A tenant that names its own token must not silently send with the global one."""
    env = {k: v for k, v in BIZ_ENV.items() if k != "BIZ_TOKEN"}
    with pytest.raises(ConfigError) as info:
        load_secrets(env, cfg=_cfg(tmp_path, graph))
    message = str(info.value)
    assert "tenants.biz" in message
    assert "BIZ_TOKEN" in message
    for value in env.values():
        assert value not in message


@pytest.mark.parametrize(
    ("drop", "needles"),
    [
        (["BIZ_SECRET"], ["tenants.biz", "BIZ_SECRET"]),
        (["WHATSAPP_ACCESS_TOKEN"], ["tenants.home", "WHATSAPP_ACCESS_TOKEN"]),
        (["WHATSAPP_APP_SECRET"], ["WHATSAPP_APP_SECRET"]),
        (["WHATSAPP_VERIFY_TOKEN"], ["WHATSAPP_VERIFY_TOKEN"]),
    ],
)
def test_production_start_names_what_is_missing_and_no_secret(
    tmp_path: Path, graph: FakeGraph, drop: list[str], needles: list[str]
) -> None:
    env = {k: v for k, v in BIZ_ENV.items() if k not in drop}
    with pytest.raises(ConfigError) as info:
        load_secrets(env, cfg=_cfg(tmp_path, graph))
    message = str(info.value)
    for needle in needles:
        assert needle in message
    for value in BIZ_ENV.values():
        assert value not in message, "a secret value leaked into a ConfigError"


def test_only_tenants_with_own_secrets_need_no_global_app_secret(tmp_path: Path, graph: FakeGraph) -> None:
    tenants = {"biz": TENANTS["biz"]}
    cfg = prod_config(tmp_path, graph, tenants=tenants)
    env = {"WHATSAPP_VERIFY_TOKEN": "v", "BIZ_TOKEN": BIZ_TOKEN, "BIZ_SECRET": BIZ_SECRET}
    secrets = load_secrets(env, cfg=cfg)
    assert secrets.mode == "production"
    assert secrets.token_for("biz") == BIZ_TOKEN


@pytest.mark.parametrize("key", ["access_token_env", "app_secret_env"])
def test_tenant_variable_names_are_checked(tmp_path: Path, graph: FakeGraph, key: str) -> None:
    tenants = {"home": TENANTS["home"], "biz": {**TENANTS["biz"], key: "not a variable"}}
    with pytest.raises(ConfigError, match=rf"tenants\.biz\.{key}"):
        prod_config(tmp_path, graph, tenants=tenants)


# ---------------------------------------------------------------------------- pauses


async def test_a_token_error_on_biz_pauses_biz_only(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    graph.probe_status = 401  # biz's token stays bad: its pause must not lift by itself
    graph.script_for("+" + BIZ_USER, graph_error(190, 401, "Error validating access token"))
    client = await _app(aiohttp_client, tmp_path, graph)
    sender, db = client.app[keys.SENDER], _db(client)
    biz = payloads.body_of(payloads.text("hi biz", id="wamid.PB1", sender=BIZ_USER), pnid=payloads.BIZ_PNID)
    assert await post_webhook(client, biz, BIZ_SECRET) == 200
    await wait_for(lambda: "biz" in sender.pauses)
    assert sender.pauses["biz"].code == 190
    assert "home" not in sender.pauses, "biz has its own token: home's token is fine"

    home = payloads.body_of(payloads.text("hi home", id="wamid.PH1"))
    assert await post_webhook(client, home, APP_SECRET) == 200

    def home_sent() -> bool:
        rows = db_rows(db, "SELECT state FROM outbox WHERE source_event_id = 'wamid.PH1'")
        return [r[0] for r in rows] == ["sent"]

    await wait_for(home_sent, timeout=3.0)
    assert [json.loads(r[0])["to"] for r in db_rows(db, "SELECT payload FROM outbox WHERE state = 'queued'")] == [
        "+" + BIZ_USER
    ]
    health = await (await client.get("/healthz")).json()
    assert set(health["sender"]["paused"]) == {"biz"}
