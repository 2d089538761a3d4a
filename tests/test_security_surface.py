"""Issue 13, items 4 and 5: what the open status surface may tell, the Host check, and a hostile
orchestrator (answer size, parts, redirects, one tenant's hang against everyone else).

Everything runs through the real app: signed webhooks, real SQLite, the fake Graph API and fake
orchestrators as real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from alfred_bot import hosts, keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError, load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import API_TOKEN, ENV, PROD_ENV, db_rows, make_config, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph, FakeOrchestrator, Reply, graph_error

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
NAME = "Ana Secretname"
TEXT = "my diagnosis is SECRET-TEXT"
HANDLER_ERROR = "SECRET-HANDLER-ERROR"
GRAPH_ERROR = "SECRET-GRAPH-ERROR for this recipient"
PAUSE_REASON = "SECRET-PAUSE-REASON"
DEAD_TO = "15550001234"
WAMID = "wamid.SURFACE1"
#: Nothing of these may appear in the open view: who wrote, what, and what went wrong.
SENSITIVE = (NAME, "SECRET-TEXT", HANDLER_ERROR, "SECRET-GRAPH-ERROR", PAUSE_REASON, WAMID, payloads.USER, DEAD_TO)


# ---------------------------------------------------------------------------- item 4: open view


def _boom() -> Router:
    router = Router("boom")

    @router.default
    async def boom(message: Message, ctx: Context) -> None:
        raise RuntimeError(HANDLER_ERROR)

    return router


@pytest.fixture
async def seeded(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> Any:
    """A failed handler run (known name, text, error), a dead letter (Graph error text), a pause."""
    cfg = prod_config(tmp_path, graph)
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV), routers={"home": _boom(), "biz": _boom()}))
    msg = payloads.text(TEXT, id=WAMID)
    body = payloads.dump(payloads.envelope(payloads.entry(payloads.change(payloads.value([msg], name=NAME)))))
    assert await post_webhook(client, body) == 200
    await wait_for(lambda: bool(db_rows(cfg.storage.path, "SELECT 1 FROM inbox WHERE state = 'failed'")))
    graph.script_for("+" + DEAD_TO, graph_error(131026, message=GRAPH_ERROR))
    template = {"to": DEAD_TO, "type": "template", "template": {"name": "t", "language": {"code": "en"}}}
    assert (await client.post("/api/messages", json=template, headers=AUTH)).status == 202
    await wait_for(lambda: bool(db_rows(cfg.storage.path, "SELECT 1 FROM outbox WHERE state = 'failed'")))
    graph.probe_status = 403  # a permission error pauses "biz" only, and the probes keep failing
    graph.script_for("+15550009999", graph_error(10, 403, message=PAUSE_REASON))
    paused = {**template, "to": "15550009999", "tenant": "biz"}
    assert (await client.post("/api/messages", json=paused, headers=AUTH)).status == 202
    await wait_for(lambda: "biz" in client.app[keys.SENDER].pauses)
    return client


async def _json(client: Any, headers: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    resp = await client.get("/status.json", headers=headers or {})
    assert resp.status == 200
    text = await resp.text()
    return json.loads(text), text


def _assert_open(text: str) -> None:
    for secret in SENSITIVE:
        assert secret not in text, secret
    assert "•" not in text  # not even masked numbers


async def test_open_status_json_has_counts_and_states_only(seeded: Any) -> None:
    data, text = await _json(seeded)
    _assert_open(text)
    assert data["view"] == "open"
    assert data["recent_failures"] == [{"tenant": "home", "at": data["recent_failures"][0]["at"]}]
    [dead] = data["dead_letters"]
    assert set(dead) == {"tenant", "type", "attempts", "error_code", "created_at"}
    assert dead["error_code"] == 131026
    biz = data["tenants"][1]
    assert biz["paused"] == {"kind": biz["paused"]["kind"], "code": 10, "since": biz["paused"]["since"]}
    assert "handler" not in biz


async def test_open_status_page_has_counts_and_states_only(seeded: Any) -> None:
    resp = await seeded.get("/")
    assert resp.status == 200
    html = await resp.text()
    _assert_open(html)
    assert '<p id="open-note" class="note">Open view' in html
    assert "data-retry=" not in html  # retrying needs the token anyway


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_the_api_token_gives_the_detailed_view(seeded: Any, header: str) -> None:
    value = f"Bearer {API_TOKEN}" if header == "Authorization" else API_TOKEN
    data, text = await _json(seeded, {header: value})
    assert data["view"] == "detailed"
    for shown in (NAME, TEXT, HANDLER_ERROR, GRAPH_ERROR, PAUSE_REASON, WAMID, "+15•••••4567"):
        assert shown in text, shown
    assert payloads.USER not in text  # numbers stay masked even here
    html = await (await seeded.get("/", headers={header: value})).text()
    assert NAME in html and HANDLER_ERROR in html and "SECRET-GRAPH-ERROR" in html
    assert '<p id="open-note" class="note" hidden>' in html


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer not-the-token"},
        {"X-API-Key": "not-the-token"},
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
    ],
)
async def test_a_wrong_token_gets_the_open_view(seeded: Any, headers: dict[str, str]) -> None:
    data, text = await _json(seeded, headers)
    assert data["view"] == "open"
    _assert_open(text)


async def test_status_json_is_never_cached(client: Any) -> None:
    resp = await client.get("/status.json", headers=AUTH)
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Authorization" in resp.headers["Vary"]


async def test_no_api_token_configured_means_open_view_for_everyone(aiohttp_client: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "ALFRED_API_TOKEN"}
    client = await aiohttp_client(create_app(make_config(tmp_path), load_secrets(env)))
    data, _ = await _json(client, AUTH)
    assert data["view"] == "open"


# ---------------------------------------------------------------------------- item 4: Host check


PUBLIC = "alfred.example.com"


@pytest.fixture
async def guarded(aiohttp_client: Any, tmp_path: Path) -> Any:
    cfg = make_config(tmp_path, server={"public_hosts": [PUBLIC, "203.0.113.7"]})
    return await aiohttp_client(create_app(cfg, load_secrets(ENV)))


@pytest.mark.parametrize(
    "host", ["evil.example", "alfred.example.com.evil.example", "203.0.113.8", "[2001:db8::1]:8080", "", "a:b:c"]
)
@pytest.mark.parametrize("path", ["/", "/status.json", "/healthz", "/metrics", "/api/tenants", "/static/status.js"])
async def test_a_foreign_host_gets_421_without_detail(guarded: Any, host: str, path: str) -> None:
    resp = await guarded.get(path, headers={"Host": host, **AUTH})
    assert resp.status == 421
    assert await resp.read() == b""


async def test_a_webhook_for_a_foreign_host_is_refused_and_not_stored(guarded: Any, tmp_path: Path) -> None:
    body = payloads.body_of(payloads.text("hi", id="wamid.REBIND"))
    resp = await guarded.post(
        "/webhook", data=body, headers={**payloads.headers(body, ENV["WHATSAPP_APP_SECRET"]), "Host": "evil.example"}
    )
    assert resp.status == 421
    assert db_rows(tmp_path / "alfred.db", "SELECT COUNT(*) FROM inbox")[0][0] == 0
    assert guarded.app[keys.TELEMETRY].webhook["host_refused"] == 1


@pytest.mark.parametrize(
    "host",
    [
        PUBLIC,
        "ALFRED.example.com:443",
        "alfred.example.com.",
        "203.0.113.7:8080",
        "localhost",
        "localhost:8080",
        "127.0.0.1:8080",
        "127.1.2.3",
        "[::1]:8080",
        "app.localhost",
        "10.0.3.7:8080",  # a platform's health checker or scraper on the private network
        "[fdaa:0:1a2b:a7b:1::2]:8080",  # Fly.io's private network (6PN)
        "192.168.1.20",
    ],
)
async def test_public_and_loopback_hosts_are_served(guarded: Any, host: str) -> None:
    resp = await guarded.get("/healthz", headers={"Host": host})
    assert resp.status == 200
    body = payloads.body_of(payloads.text("hi"))
    resp = await guarded.post(
        "/webhook", data=body, headers={**payloads.headers(body, ENV["WHATSAPP_APP_SECRET"]), "Host": host}
    )
    assert resp.status == 200


async def test_without_public_hosts_any_host_is_served(aiohttp_client: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, server={"public_hosts": []})  # the default: no check
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV)))
    assert (await client.get("/healthz", headers={"Host": "evil.example"})).status == 200


def test_allowed_hosts_are_normalised_and_include_a_specific_listen_address() -> None:
    assert hosts.allowed_hosts(["Bot.Example.COM.", "[2001:DB8::1]"], "0.0.0.0") == {"bot.example.com", "2001:db8::1"}
    assert hosts.allowed_hosts([], "10.0.0.5") == {"10.0.0.5"}
    assert hosts.host_name("[::1]:8080") == "::1" and hosts.host_name("[") is None and hosts.host_name(None) is None
    assert hosts.is_loopback("127.9.9.9") and not hosts.is_loopback("localhost.evil.example")


@pytest.mark.parametrize("bad", ["https://alfred.example.com", "alfred.example.com:443", "a/b", "", "[zz::1]"])
def test_public_hosts_must_be_bare_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.public_hosts: give host names"):
        make_config(tmp_path, server={"public_hosts": [bad]})


# ---------------------------------------------------------------------------- item 5: orchestrator


async def _orchestrated(aiohttp_client: Any, tmp_path: Path, url: str, **settings: Any) -> tuple[Any, Path]:
    routers = settings.pop("routers", None)
    orchestrator = {"url": url, "timeout_seconds": 2.0, "retries": 1, **settings.pop("orchestrator", {})}
    cfg = make_config(tmp_path, orchestrator=orchestrator, **settings)
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV, cfg=cfg), routers=routers))
    return client, Path(cfg.storage.path)


def _texts(db: Path, event_id: str) -> list[str]:
    rows = db_rows(
        db, "SELECT payload FROM outbox WHERE source_event_id = ? AND type = 'text' ORDER BY idem_key", (event_id,)
    )
    return [json.loads(r[0])["text"]["body"] for r in rows]


async def _handled(client: Any, db: Path, msg: dict[str, Any], pnid: str = payloads.PNID) -> None:
    assert await post_webhook(client, payloads.body_of(msg, pnid=pnid)) == 200
    sql = "SELECT 1 FROM inbox WHERE event_id = ? AND state != 'pending'"
    await wait_for(lambda: bool(db_rows(db, sql, (msg["id"],))))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator, status: int
) -> None:
    elsewhere: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(await request.read())
        return web.json_response({"response": "stolen"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        target = f"http://127.0.0.1:{runner.addresses[0][1]}/steal"
        orch.script.extend([Reply(status=status, body=b"", headers={"Location": target})] * 3)
        client, db = await _orchestrated(aiohttp_client, tmp_path, orch.url)
        await _handled(client, db, payloads.text("my secret question", id="wamid.REDIR"))
        assert _texts(db, "wamid.REDIR") == ["Lo siento, no pude procesar tu mensaje."]
        assert len(orch.requests) == 1  # a 3xx is not retried either
        assert elsewhere == []  # the user's text never went to the other host
        assert client.app[keys.ORCHESTRATOR].counts["redirects_refused"] == 1
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_oversized_answer_is_a_failure_not_hundreds_of_texts(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator, chunked: bool
) -> None:
    huge = json.dumps({"response": "palabra " * 250_000}).encode()  # 2 MB: 489 texts before the fix
    orch.script.append(Reply(body=huge, chunked=chunked))
    client, db = await _orchestrated(aiohttp_client, tmp_path, orch.url, orchestrator={"retries": 0})
    await _handled(client, db, payloads.text("cuéntame todo", id="wamid.HUGE"))
    assert _texts(db, "wamid.HUGE") == ["Lo siento, no pude procesar tu mensaje."]
    assert client.app[keys.ORCHESTRATOR].counts["answers_too_large"] == 1


async def test_an_answer_becomes_at_most_max_parts_messages(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    words = [f"palabra{i:05d}" for i in range(3000)]  # 3000 x 13 characters: ten messages uncut
    orch.script.append(Reply(body={"response": " ".join(words)}))
    client, db = await _orchestrated(aiohttp_client, tmp_path, orch.url, orchestrator={"max_parts": 3})
    await _handled(client, db, payloads.text("cuéntame todo", id="wamid.PARTS"))
    parts = _texts(db, "wamid.PARTS")
    assert len(parts) == 3
    assert all(0 < len(p) <= 4096 for p in parts)
    assert parts[-1].endswith("…") and not parts[0].endswith("…")
    sent = " ".join(parts).removesuffix("…").split()
    assert sent == words[: len(sent)]  # a prefix, in order, cut between words


async def test_a_hanging_orchestrator_of_one_tenant_does_not_delay_another(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    hold = asyncio.Event()
    orch.default = Reply(body={"response": "late"}, hold=hold)  # every request hangs until released
    ping = Router("ping")

    @ping.command("ping")
    async def pong(message: Message, ctx: Context) -> None:
        ctx.reply("pong")

    try:
        client, db = await _orchestrated(
            aiohttp_client,
            tmp_path,
            orch.url,
            orchestrator={"timeout_seconds": 8.0, "retries": 0},
            dispatch={"shutdown_grace_seconds": 0, "workers": 4},  # fewer workers than hanging users
            routers={"home": Router("home"), "biz": ping},
        )
        # twelve users (one user's messages are handled one at a time, so one user alone holds one worker)
        texts = [payloads.text(f"pregunta {i}", id=f"wamid.HANG{i:02d}", sender=f"1555000{i:04d}") for i in range(12)]
        assert await post_webhook(client, payloads.body_of(*texts)) == 200
        await wait_for(lambda: len(orch.requests) >= 3)  # home holds its workers, hanging
        started = time.monotonic()
        other = payloads.text("/ping", id="wamid.PING", sender="15550002222")
        await _handled(client, db, other, pnid=payloads.BIZ_PNID)
        elapsed = time.monotonic() - started
        assert _texts(db, "wamid.PING") == ["pong"]
        assert elapsed < 2.0, elapsed  # the orchestrator's timeout is 8 s: no worker was free before
        assert len(orch.requests) == 3  # home never held more than its share (4 workers - 1 for biz)
    finally:
        hold.set()
