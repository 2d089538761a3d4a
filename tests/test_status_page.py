"""The status page (`GET /`) rendered by the real app: escaping, masking, no secrets, static files.

Hostile input arrives the way it would in production: a signed webhook whose profile name and text
carry markup and a right-to-left override, handled by a router that raises, so the failure is
recorded by the real dispatcher and shown by the real collector.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import pytest

from alfred_bot import keys, statuspage
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import (
    ACCESS_TOKEN,
    API_TOKEN,
    APP_SECRET,
    PROD_ENV,
    VERIFY_TOKEN,
    post_webhook,
    prod_config,
    wait_for,
)
from tests.fakes import FakeGraph, graph_error

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
RLO = "\u202e"
HOSTILE_NAME = f"<script>alert(1)</script>{RLO}evil"
HOSTILE_TEXT = f'hi <img src=x onerror="alert(2)"> {RLO}gnp.exe'
MASKED_USER = "+15•••••4567"  # payloads.USER = 15551234567


def _boom_router() -> Router:
    router = Router("boom")

    @router.default
    async def boom(message: Message, ctx: Context) -> None:
        raise RuntimeError("handler exploded")

    return router


def _hostile_body() -> bytes:
    msg = payloads.text(HOSTILE_TEXT, id="wamid.HOSTILE")
    return payloads.dump(payloads.envelope(payloads.entry(payloads.change(payloads.value([msg], name=HOSTILE_NAME)))))


async def _page(client: Any) -> str:
    resp = await client.get("/")
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/html"
    return str(await resp.text())


async def _failures(client: Any) -> list[dict[str, Any]]:
    failures: list[dict[str, Any]] = (await (await client.get("/status.json")).json())["recent_failures"]
    return failures


@pytest.fixture
async def hostile(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> Any:
    """Production mode (fake Graph): one failed handler run with hostile text, one dead letter, one pause."""
    cfg = prod_config(tmp_path, graph)
    routers = {"home": _boom_router(), "biz": _boom_router()}
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV), routers=routers))
    assert await post_webhook(client, _hostile_body()) == 200
    await wait_for(lambda: _has_failure(client))
    # a dead letter whose error message (Meta's text) carries markup too
    graph.script_for("+15550001234", graph_error(131026, message="<b>undeliverable</b>"))
    body = {"to": "15550001234", "type": "template", "template": {"name": "t", "language": {"code": "en"}}}
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    assert resp.status == 202
    dead_id = (await resp.json())["id"]
    await wait_for(lambda: _state(client, dead_id, "failed"))
    return client


async def _has_failure(client: Any) -> bool:
    return bool(await _failures(client))


async def _state(client: Any, outbox_id: str, state: str) -> bool:
    resp = await client.get(f"/api/messages/{outbox_id}", headers=AUTH)
    return bool((await resp.json())["status"] == state)


async def test_page_renders_every_tenant_with_security_headers(client: Any) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    html = await resp.text()
    for name in ("home", "biz"):
        assert f'data-tenant="{name}"' in html
    assert 'id="mode" class="badge mode-sandbox"' in html
    assert f'<dd id="version">{(await (await client.get("/status.json")).json())["version"]}</dd>' in html
    assert "No failures." in html and "No dead letters." in html
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


async def test_page_has_no_inline_script_and_no_external_resources(client: Any) -> None:
    html = await _page(client)
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts == [
        next(s for s in scripts if "status.js" in s),
        '<script type="application/json" id="graph-codes">',
    ]
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html)  # no CDN, no external font
    assert not re.findall(r"<[^>]*\son\w+\s*=", html)  # no inline event handlers


async def test_hostile_name_and_text_are_shown_as_text(hostile: Any) -> None:
    [failure] = await _failures(hostile)
    assert failure["name"] == HOSTILE_NAME  # the collector keeps it raw: the view must escape it
    html = await _page(hostile)
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;‹U+202E›evil" in html
    assert "<img" not in html
    assert "hi &lt;img src=x onerror=&#34;alert(2)&#34;&gt; ‹U+202E›gnp.exe" in html
    assert RLO not in html  # the override never reaches the browser as a control character
    assert "RuntimeError: handler exploded" in html
    assert "&lt;b&gt;undeliverable&lt;/b&gt;" in html and "<b>undeliverable" not in html


async def test_phone_numbers_are_masked(hostile: Any) -> None:
    html = await _page(hostile)
    for raw in (payloads.USER, "15550001234", "0001234"):
        assert raw not in html
    assert MASKED_USER in html
    assert "+15•••••1234" in html  # the dead letter's recipient
    assert payloads.PNID not in html  # the page does not need Meta's phone number ids either


async def test_no_secret_values_in_page_or_status_json(hostile: Any) -> None:
    html = await _page(hostile)
    data = await (await hostile.get("/status.json")).text()
    for secret in (APP_SECRET, VERIFY_TOKEN, API_TOKEN, ACCESS_TOKEN):
        assert secret not in html
        assert secret not in data


async def test_dead_letter_has_a_retry_button_and_error_name(hostile: Any) -> None:
    html = await _page(hostile)
    dead = re.findall(
        r'<tr data-id="([^"]+)">\s*<td class="time">[^<]+</td>\s*<td>home</td>\s*<td class="phone">', html
    )
    assert len(dead) == 2  # the failure row and the dead letter row
    dead_id = (await (await hostile.get("/api/dead-letters", headers=AUTH)).json())[0]["id"]
    assert f'data-retry="{dead_id}" disabled>Retry</button>' in html  # enabled by status.js with a token
    assert 'title="message undeliverable">131026</span>' in html
    assert '131026 <span class="code-name">message undeliverable</span> <b>×1</b>' in html


async def test_pause_reason_is_prominent_and_escaped(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await aiohttp_client(create_app(prod_config(tmp_path, graph), load_secrets(PROD_ENV)))
    graph.probe_status = 401  # the pause holds: probes keep failing
    graph.script_for("+" + payloads.USER, graph_error(190, 401, message="Session <expired>"))
    body = {"to": payloads.USER, "type": "template", "template": {"name": "t", "language": {"code": "en"}}}
    assert (await client.post("/api/messages", json=body, headers=AUTH)).status == 202
    await wait_for(lambda: bool(client.app[keys.SENDER].pauses))
    html = await _page(client)
    card = html[html.index('data-tenant="home"') : html.index('data-tenant="biz"')]
    assert 'class="card is-paused"' in html
    assert '<div class="pause" role="alert">' in card
    assert "Paused (token):" in card
    assert "Session &lt;expired&gt;" in card
    assert "code 190" in card


async def test_page_is_503_while_unavailable(client: Any) -> None:
    await client.app[keys.DISPATCHER].stop(0)
    resp = await client.get("/")
    assert resp.status == 503
    assert '<span id="health" class="badge bad">unavailable</span>' in await resp.text()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/static/status.js", ("text/javascript", "application/javascript")), ("/static/status.css", ("text/css",))],
)
async def test_static_files_are_served_with_their_types(client: Any, path: str, content_type: tuple[str, ...]) -> None:
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type in content_type
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    body = await resp.read()
    assert body == (statuspage.STATIC / Path(path).name).read_bytes()
    assert body.isascii()  # no charset needed to read them right
    for external in (b"http:", b"https:", b"@import", b"url(", b"innerHTML", b"eval("):
        assert external not in body  # no CDN, no web font, no HTML injection sink


async def test_static_urls_in_the_page_resolve(client: Any) -> None:
    html = await _page(client)
    for url in re.findall(r'(?:href|src)="(/static/[^"]+)"', html):
        resp = await client.get(url.replace("&amp;", "&"))
        assert resp.status == 200, url


@pytest.mark.parametrize("path", ["/static/../alfred_bot/config.py", "/static/%2e%2e/main.py", "/static/nope.js"])
async def test_static_does_not_serve_outside_its_folder(client: Any, path: str) -> None:
    resp = await client.get(path)
    assert resp.status in (403, 404)
    assert b"import" not in await resp.read()


async def test_missing_keys_do_not_break_the_page(client: Any) -> None:
    """Render the real template with a bare minimum and with a tenant missing every optional key."""
    template = aiohttp_jinja2.get_env(client.app).get_template("status.html")
    for data in ({}, {"tenants": [{"name": "x"}], "recent_failures": [{}], "dead_letters": [{}]}):
        html = template.render(app=client.app, rendered_at=0, **statuspage.view(data))
        assert "Alfred status" in html
        assert "—" in html


async def test_page_and_json_agree_after_a_webhook(client: Any) -> None:
    assert await post_webhook(client, payloads.body_of(payloads.text("hi"))) == 200
    await wait_for(lambda: _inbound(client, 1))
    html = await _page(client)
    card = html[html.index('data-tenant="home"') : html.index('data-tenant="biz"')]
    assert '<span data-field="inbound">1</span>' in card


async def _inbound(client: Any, n: int) -> bool:
    data = await (await client.get("/status.json")).json()
    return bool(data["tenants"][0]["inbound_per_minute"] == n)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "—"), (5, "5 s"), (65, "1 m 5 s"), (3 * 3600 + 120, "3 h 2 m"), (2 * 86400 + 3600, "2 d 1 h")],
)
def test_duration(value: Any, expected: str) -> None:
    assert statuspage.duration(value) == expected


@pytest.mark.parametrize(
    ("func", "value", "expected"),
    [
        (statuspage.millis, 3.14159, "3.1"),
        (statuspage.millis, 1234.4, "1,234"),
        (statuspage.millis, None, "—"),
        (statuspage.percent, 0.9751, "97.5%"),
        (statuspage.percent, None, "—"),
        (statuspage.count, 12345, "12,345"),
        (statuspage.count, True, "—"),
        (statuspage.utc, 0, "1970-01-01 00:00:00"),
        (statuspage.visible, "a\u202eb\u2066c\x00d\ne", "a‹U+202E›b‹U+2066›c‹U+0000›d\ne"),
        (statuspage.visible, None, ""),
        (statuspage.code_name, 131047, "re-engagement: 24 h window closed"),
        (statuspage.code_name, 999999, ""),
    ],
)
def test_formatters(func: Any, value: Any, expected: str) -> None:
    assert func(value) == expected


def test_outbox_states_keep_lifecycle_order() -> None:
    got = statuspage.ordered_states({"failed": 1, "zeta": 2, "queued": 3, "delivered": 4, "alpha": 5})
    assert got == [("queued", 3), ("delivered", 4), ("failed", 1), ("alpha", 5), ("zeta", 2)]


def test_tenant_view_load_against_limit() -> None:
    t = statuspage.tenant_view({"name": "a", "rate_limit": 80, "outbound_per_minute": 2400})
    assert (t["load"], t["limit_per_minute"]) == (0.5, 4800)
    assert statuspage.tenant_view({"name": "a", "rate_limit": 0, "outbound_per_minute": 5})["load"] is None
