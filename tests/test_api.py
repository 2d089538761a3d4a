"""/healthz and /api/inbound."""

from __future__ import annotations

from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from tests import payloads
from tests.conftest import API_TOKEN, ENV, post_webhook, wait_for

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def test_healthz_reports_state(client: Any) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["mode"] == "sandbox"
    assert body["dispatcher"]["running"] is True


async def test_healthz_503_when_workers_stopped(client: Any) -> None:
    await client.app[keys.DISPATCHER].stop(0)
    resp = await client.get("/healthz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "unavailable"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN}, {"Authorization": f"Basic {API_TOKEN}"}],
)
async def test_api_requires_bearer_token(client: Any, headers: dict[str, str]) -> None:
    resp = await client.get("/api/inbound", headers=headers)
    assert resp.status == 401
    body = await resp.json()
    assert API_TOKEN not in str(body)


async def test_api_disabled_without_token(aiohttp_client: Any, cfg: Any) -> None:
    env = {k: v for k, v in ENV.items() if k != "ALFRED_API_TOKEN"}
    client = await aiohttp_client(create_app(cfg, load_secrets(env)))
    resp = await client.get("/api/inbound", headers={"Authorization": "Bearer "})
    assert resp.status == 401
    assert "ALFRED_API_TOKEN" in (await resp.json())["error"]


async def test_inbound_lists_newest_first_with_fields(client: Any) -> None:
    first = payloads.text("first", id="wamid.I1")
    second = dict(payloads.SAMPLES["interactive"], id="wamid.I2")
    assert await post_webhook(client, payloads.body_of(first)) == 200
    assert await post_webhook(client, payloads.body_of(second)) == 200
    resp = await client.get("/api/inbound", headers=AUTH)
    assert resp.status == 200
    items = await resp.json()
    assert [i["id"] for i in items] == ["wamid.I2", "wamid.I1"]
    newest = items[0]
    assert newest["tenant"] == "home"
    assert newest["from"] == payloads.USER
    assert newest["name"] == "Ana"
    assert newest["type"] == "interactive"
    assert newest["timestamp"] == int(payloads.TS)
    assert newest["text"] == "Yes"
    assert newest["context_id"] == "wamid.BIZ1"
    assert items[1]["context_id"] is None
    limited = await (await client.get("/api/inbound?limit=1", headers=AUTH)).json()
    assert [i["id"] for i in limited] == ["wamid.I2"]


async def test_inbound_user_without_phone_number(client: Any) -> None:
    msg = payloads.text("I have a username", id="wamid.U1")
    del msg["from"]
    msg["from_user_id"] = "US.13491208655302741918"
    contacts = [{"profile": {"name": "Nick"}, "user_id": "US.13491208655302741918"}]
    body = payloads.dump(payloads.envelope(payloads.entry(payloads.change(payloads.value([msg], contacts=contacts)))))
    assert await post_webhook(client, body) == 200
    [item] = await (await client.get("/api/inbound", headers=AUTH)).json()
    assert item["from"] is None
    assert item["user_id"] == "US.13491208655302741918"
    assert item["name"] == "Nick"
    await wait_for(lambda: client.app[keys.DISPATCHER].counts["handled"] == 1)


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1001", "1.5"])
async def test_inbound_bad_limit_is_400(client: Any, limit: str) -> None:
    resp = await client.get(f"/api/inbound?limit={limit}", headers=AUTH)
    assert resp.status == 400
    assert "limit" in (await resp.json())["error"]
