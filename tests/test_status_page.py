"""The status page (`GET /`) rendered by the real app: escaping, masking, no secrets, static files.

Hostile input arrives the way it would in production: a signed webhook whose profile name and text
carry markup and a right-to-left override, handled by a router that raises, so the failure is
recorded by the real dispatcher and shown by the real collector.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.parse import parse_body
from alfred_bot.router import Router
from alfred_bot.statuspage import attention, campaigns, charts, page
from alfred_bot.statuspage.activity import RecentActivity
from alfred_bot.store import SqliteStore
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
from tests.contract.helpers import sent_row
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


async def _page(client: Any, headers: dict[str, str] | None = None) -> str:
    resp = await client.get("/", headers=headers or {})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/html"
    return str(await resp.text())


async def _failures(client: Any) -> list[dict[str, Any]]:
    resp = await client.get("/status.json", headers=AUTH)
    failures: list[dict[str, Any]] = (await resp.json())["recent_failures"]
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
    html = await _page(hostile, AUTH)  # the detailed view (names and texts need the token)
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;‹U+202E›evil" in html
    assert "<img" not in html
    assert "hi &lt;img src=x onerror=&#34;alert(2)&#34;&gt; ‹U+202E›gnp.exe" in html
    assert RLO not in html  # the override never reaches the browser as a control character
    assert "RuntimeError: handler exploded" in html
    assert "&lt;b&gt;undeliverable&lt;/b&gt;" in html and "<b>undeliverable" not in html


async def test_phone_numbers_are_masked(hostile: Any) -> None:
    html = await _page(hostile, AUTH)
    for raw in (payloads.USER, "15550001234", "0001234"):
        assert raw not in html
    assert MASKED_USER in html
    assert "+15•••••1234" in html  # the dead letter's recipient
    assert payloads.PNID not in html  # the page does not need Meta's phone number ids either


async def test_no_secret_values_in_page_or_status_json(hostile: Any) -> None:
    for headers in ({}, AUTH):
        html = await _page(hostile, headers)
        data = await (await hostile.get("/status.json", headers=headers)).text()
        for secret in (APP_SECRET, VERIFY_TOKEN, API_TOKEN, ACCESS_TOKEN):
            assert secret not in html
            assert secret not in data


async def test_dead_letter_has_a_retry_button_and_error_name(hostile: Any) -> None:
    html = await _page(hostile, AUTH)
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
    html = await _page(client, AUTH)
    card = html[html.index('data-tenant="home"') : html.index('data-tenant="biz"')]
    assert 'class="card is-paused"' in html
    assert '<div class="pause" role="alert">' in card
    assert "Paused (token):" in card
    assert "Session &lt;expired&gt;" in card
    assert "code 190" in card
    open_card = await _page(client)  # without the token: the pause and its code, not Meta's text
    assert "Session" not in open_card and "code 190" in open_card
    assert "the reason needs the API token" in open_card


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
    assert body == (page.STATIC / Path(path).name).read_bytes()
    assert body.isascii()  # no charset needed to read them right
    # the SVG namespace is a name (createElementNS), never fetched: the only URL allowed
    body = body.replace(b'SVG_NS = "http://www.w3.org/2000/svg";', b"", 1)
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
    odd = {"name": "y", "activity": [{"at": "noon", "inbound": "3", "p95_ms": True}, 5, None]}  # nothing usable
    for data in (
        {},
        {"tenants": [{"name": "x"}], "recent_failures": [{}], "dead_letters": [{}]},
        {"tenants": [odd], "campaigns": [{}, {"counts": "many", "total": "all"}]},
    ):
        html = template.render(app=client.app, rendered_at=0, **page.view(data))
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
    assert page.duration(value) == expected


@pytest.mark.parametrize(
    ("func", "value", "expected"),
    [
        (page.millis, 3.14159, "3.1"),
        (page.millis, 1234.4, "1,234"),
        (page.millis, None, "—"),
        (page.percent, 0.9751, "97.5%"),
        (page.percent, None, "—"),
        (page.count, 12345, "12,345"),
        (page.count, True, "—"),
        (page.utc, 0, "1970-01-01 00:00:00"),
        (page.visible, "a\u202eb\u2066c\x00d\ne", "a‹U+202E›b‹U+2066›c‹U+0000›d\ne"),
        (page.visible, None, ""),
        (page.code_name, 131047, "re-engagement: 24 h window closed"),
        (page.code_name, 999999, ""),
    ],
)
def test_formatters(func: Any, value: Any, expected: str) -> None:
    assert func(value) == expected


def test_outbox_states_keep_lifecycle_order() -> None:
    got = page.ordered_states({"failed": 1, "zeta": 2, "queued": 3, "delivered": 4, "alpha": 5})
    assert got == [("queued", 3), ("delivered", 4), ("failed", 1), ("alpha", 5), ("zeta", 2)]


def test_tenant_view_load_against_limit() -> None:
    t = page.tenant_view({"name": "a", "rate_limit": 80, "outbound_per_minute": 2400})
    assert (t["load"], t["limit_per_minute"]) == (0.5, 4800)
    assert page.tenant_view({"name": "a", "rate_limit": 0, "outbound_per_minute": 5})["load"] is None


# ------------------------------------------------------------------ events that need a person (issue 11)

T0 = 1760000000


def _event(field: str, value: Any, at: int) -> bytes:
    entry = payloads.entry(payloads.change(value, field))
    entry["time"] = at  # Meta: entry.time, the Unix time the webhook was triggered
    return payloads.dump(payloads.envelope(entry))


def _template(template_id: int, name: str, event: str, reason: str | None = None) -> dict[str, Any]:
    # Meta: Webhooks reference > message_template_status_update,
    # developers.facebook.com/docs/whatsapp/business-management-api/webhooks/components (template status)
    return {
        "event": event,
        "message_template_id": template_id,
        "message_template_name": name,
        "message_template_language": "en_US",
        "reason": reason,
    }


#: (field, value) in the order Meta sends them; entry.time increases by one second each.
ATTENTION_EVENTS: list[tuple[str, Any]] = [
    # Meta: account_update reference, developers.facebook.com/docs/whatsapp/cloud-api/webhooks/reference/account_update
    (
        "account_update",
        {
            "event": "ACCOUNT_RESTRICTION",
            "restriction_info": [
                {"restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": "2026-12-01T00:00:00+0000"}
            ],
        },
    ),
    ("account_update", {"event": "DISABLED_UPDATE", "ban_info": {"waba_ban_state": "DISABLE", "waba_ban_date": "x"}}),
    ("account_update", {"event": "PARTNER_APP_INSTALLED", "waba_info": {"waba_id": "WABA1"}}),  # good news
    ("message_template_status_update", _template(111, "promo_spring", "APPROVED")),
    ("message_template_status_update", _template(111, "promo_spring", "PAUSED", "<script>x</script> low quality")),
    ("message_template_status_update", _template(333, "tpl_recovered", "PAUSED", "low quality")),
    ("message_template_status_update", _template(333, "tpl_recovered", "APPROVED")),  # resolved: not shown
    ("message_template_status_update", _template(222, "welcome", "REJECTED", "INVALID_FORMAT")),
    # Meta: phone_number_quality_update reference (display_phone_number, event, current_limit)
    (
        "phone_number_quality_update",
        {"display_phone_number": "15550001111", "event": "DOWNGRADE", "current_limit": "TIER_250"},
    ),
    ("phone_number_quality_update", {"display_phone_number": "15550002222", "event": "ONBOARDING"}),
    # Meta: message_template_quality_update reference (previous_quality_score -> new_quality_score)
    (
        "message_template_quality_update",
        {
            "previous_quality_score": "GREEN",
            "new_quality_score": "RED",
            "message_template_id": 111,
            "message_template_name": "promo_spring",
            "message_template_language": "en_US",
        },
    ),
    ("message_template_status_update", ["not", "an", "object"]),  # kept by the store, ignored here
    ("message_template_status_update", {"event": 7, "message_template_id": 9}),
]

EXPECTED_KINDS = [
    "template quality RED",
    "number quality downgraded",
    "template rejected",
    "template paused",
    "account disabled",
    "account restricted",
]


@pytest.fixture
async def with_events(client: Any) -> Any:
    for n, (field, value) in enumerate(ATTENTION_EVENTS):
        assert await post_webhook(client, _event(field, value, T0 + n)) == 200
    return client


async def test_events_needing_a_person_in_the_open_view(with_events: Any) -> None:
    resp = await with_events.get("/status.json")
    text = await resp.text()
    rows = json.loads(text)["attention"]
    assert [r["kind"] for r in rows] == EXPECTED_KINDS  # newest first, resolved and good news left out
    assert all(set(r) == {"tenant", "field", "kind", "time", "received_at"} for r in rows)
    assert rows[-1] == {**rows[-1], "tenant": None, "field": "account_update", "time": T0}
    for detail in ("promo_spring", "low quality", "INVALID_FORMAT", "RESTRICTED_BIZ", "15550001111", "WABA1"):
        assert detail not in text  # names, reasons and numbers need the token
    html = await _page(with_events)
    assert html.count('<tr class="attention"') == 6
    assert "<strong>account disabled</strong>" in html and "Nothing needs attention." not in html
    assert "promo_spring" not in html


async def test_events_needing_a_person_in_the_detailed_view(with_events: Any) -> None:
    rows = (await (await with_events.get("/status.json", headers=AUTH)).json())["attention"]
    details = {r["kind"]: r["detail"] for r in rows}
    assert details["template paused"] == "promo_spring · en_US · <script>x</script> low quality"
    assert details["template rejected"] == "welcome · en_US · INVALID_FORMAT"
    assert details["account restricted"] == "RESTRICTED_BIZ_INITIATED_MESSAGING"
    assert details["account disabled"].startswith("DISABLE")
    assert details["number quality downgraded"] == "15550001111 · TIER_250"
    assert details["template quality RED"] == "promo_spring · GREEN → RED"
    assert all(r["waba_id"] == "WABA1" for r in rows)
    html = await _page(with_events, AUTH)
    assert "&lt;script&gt;x&lt;/script&gt; low quality" in html and "<script>x" not in html
    assert "tpl_recovered" not in html  # paused, then approved again: nobody needs to act


def test_attention_keeps_a_few_per_tenant_and_reads_values_defensively() -> None:
    def ev(tenant: str | None, n: int) -> dict[str, Any]:
        value = {"event": "paused", "message_template_id": n, "message_template_language": "en"}  # any case
        return {"tenant": tenant, "field": "message_template_status_update", "waba_id": "W", "value": value}

    rows = attention.needing_a_person([ev("home", n) for n in range(9)] + [ev(None, 99)], per_tenant=3)
    assert [(r["tenant"], r["kind"]) for r in rows] == [("home", "template paused")] * 3 + [(None, "template paused")]
    assert attention.classify(
        "account_update", {"event": "DISABLED_UPDATE", "ban_info": {"waba_ban_state": "REINSTATE"}}
    ) == ("", "ban", "")
    assert attention.classify("account_update", {"event": "DISABLED_UPDATE"})[0] == "account disabled"
    assert attention.classify("account_update", {"event": "SOMETHING_NEW"}) is None
    assert attention.classify("user_preferences", {"event": "PAUSED"}) is None
    assert attention.classify("message_template_quality_update", {"new_quality_score": "GREEN"})[0] == ""
    long = attention.classify("message_template_status_update", {"event": "REJECTED", "reason": "x" * 5000})
    assert long is not None and len(long[2]) <= attention.DETAIL_MAX


# ------------------------------------------------------------------ the last hour, the charts, campaigns (issue 17)

POINT_KEYS = {"at", "inbound", "sent", "failed", "p95_ms"}
TENANTS = {payloads.PNID: "home", payloads.BIZ_PNID: "biz"}


def _sum(points: list[dict[str, Any]], key: str) -> int:
    return sum(int(p[key]) for p in points)


async def _status(client: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = await (await client.get("/status.json", headers=headers or {})).json()
    return data


async def test_every_tenant_has_an_hour_of_minutes_in_both_views(client: Any) -> None:
    before = time.time()
    for headers in ({}, AUTH):
        data = await _status(client, headers)
        for tenant in data["tenants"]:
            points = tenant["activity"]
            assert len(points) == 60
            assert all(set(p) == POINT_KEYS for p in points)
            starts = [p["at"] for p in points]
            assert all(b - a == 60 for a, b in itertools.pairwise(starts))
            assert starts[-1] == math.floor(before / 60) * 60 or starts[-1] == math.floor(time.time() / 60) * 60
            assert _sum(points, "inbound") == _sum(points, "sent") == _sum(points, "failed") == 0
            assert {p["p95_ms"] for p in points} == {None}
        assert data["campaigns"] == []


async def test_activity_counts_a_message_its_reply_and_a_refused_send(hostile: Any) -> None:
    """The hostile fixture: one message (its handler failed: the configured fallback text answered
    it, beside a read receipt, which is not a send) and one API send Meta refused for good."""
    await wait_for(lambda: _sent(hostile, 1))
    open_view, detailed = await _status(hostile), await _status(hostile, AUTH)
    home = open_view["tenants"][0]["activity"]
    assert (_sum(home, "inbound"), _sum(home, "sent"), _sum(home, "failed")) == (1, 1, 1)
    assert len([p for p in home if p["p95_ms"] is not None]) == 1  # the fallback is a reply too
    assert detailed["tenants"][0]["activity"][:59] == home[:59]  # the same counts for anyone (no names in them)
    assert _sum(open_view["tenants"][1]["activity"], "inbound") == 0  # biz
    html = await _page(hostile)
    card = html[html.index('data-tenant="home"') : html.index('data-tenant="biz"')]
    assert '<span class="swatch inbound"></span>inbound <b>1</b>' in card
    assert '<span class="swatch failed"></span>failed <b>1</b>' in card
    assert ": 1 inbound, 1 sent, 1 failed; at most 1 in one minute.</desc>" in card
    assert card.count('<rect class="bar inbound"') == 1


async def test_reply_latency_and_axes_on_the_page(client: Any) -> None:
    """The default bot answers "hi": one message, one reply, its p95 from the webhook to Meta's accept."""
    started = time.time()
    assert await post_webhook(client, payloads.body_of(payloads.text("hi"))) == 200
    await wait_for(lambda: _sent(client, 1))
    elapsed_ms = (time.time() - started) * 1000
    points = (await _status(client))["tenants"][0]["activity"]
    latencies = [p["p95_ms"] for p in points if p["p95_ms"] is not None]
    assert len(latencies) == 1 and 0 <= latencies[0] <= elapsed_ms
    html = await _page(client)
    card = html[html.index('data-tenant="home"') : html.index('data-tenant="biz"')]
    counts = card[card.index('data-chart="counts"') : card.index('data-chart="latency"')]
    assert re.findall(r'<text x="34" y="[\d.]+" text-anchor="end">([^<]+)</text>', counts) == ["0", "1", "2"]
    times = re.findall(r'text-anchor="(?:start|middle|end)">(\d\d:\d\d)</text>', counts)
    assert times[0] == charts.hhmm(points[0]["at"]) and times[-1] == charts.hhmm(points[-1]["at"])
    latency = card[card.index('data-chart="latency"') : card.index('data-chart="rates"')]
    assert latency.count('<rect class="bar latency"') == 1
    assert "replies in 1 of 60 minutes; the highest p95 was" in latency
    assert 'role="img" aria-labelledby="chart-1-latency-t chart-1-latency-d"' in latency
    assert '<title id="chart-1-latency-t">home: p95 reply latency per minute in milliseconds' in latency


async def _sent(client: Any, n: int) -> bool:
    return _sum((await _status(client))["tenants"][0]["activity"], "sent") >= n


async def test_kept_minutes_are_not_read_again(tmp_path: Path) -> None:
    """`RecentActivity` reads the whole hour once, then only the minutes after those that ended
    more than `SETTLED` seconds ago, and answers exactly what the store would for the hour."""
    now = [1_767_225_600.0 + 30]
    store = SqliteStore(tmp_path / "a.db", clock=lambda: now[0])
    await store.open()
    try:
        recent = RecentActivity()
        await store.ingest(parse_body(payloads.body_of(payloads.text("one", id="wamid.R1")), TENANTS))
        first = await recent.read(store, now[0], ["home", "biz"])
        assert first == await _direct(store, now[0]) | {"biz": first["biz"]}
        assert _sum(first["home"], "inbound") == 1 and _sum(first["biz"], "inbound") == 0
        now[0] += 2 * 60  # two minutes on: the first message's minute is kept
        await store.ingest(parse_body(payloads.body_of(payloads.text("two", id="wamid.R2")), TENANTS))
        second = await recent.read(store, now[0])
        assert second == await _direct(store, now[0])
        assert [p["inbound"] for p in second["home"]][-3:] == [1, 0, 1]
        # a row stamped into a kept minute (a node whose clock is minutes behind) is not read again
        later = now[0]
        now[0] -= 2 * 60
        await store.ingest(parse_body(payloads.body_of(payloads.text("late", id="wamid.R3")), TENANTS))
        now[0] = later
        assert [p["inbound"] for p in (await _direct(store, now[0]))["home"]][-3:] == [2, 0, 1]
        assert [p["inbound"] for p in (await recent.read(store, now[0]))["home"]][-3:] == [1, 0, 1]
        assert [p["inbound"] for p in (await RecentActivity().read(store, now[0]))["home"]][-3:] == [2, 0, 1]
        now[0] += 60 * 60  # an hour later all have left the window
        assert await recent.read(store, now[0]) == {}
    finally:
        await store.close()


async def _direct(store: SqliteStore, now: float) -> dict[str, list[dict[str, Any]]]:
    return await store.activity(math.floor(now / 60) * 60 - 59 * 60, 60)


def test_charts_scale_and_shapes() -> None:
    assert [charts.nice_max(v) for v in (0, 1, 2, 3, 5, 11, 41, 101, 399, 401)] == [
        2, 2, 2, 4, 10, 20, 100, 200, 400, 1000
    ]  # fmt: skip
    assert [charts.coord(v) for v in (38.0, 107.65, 0.25, 0.35, 97.04999)] == ["38", "107.7", "0.3", "0.4", "97"]
    points = [{"at": 1_767_225_600 + 60 * i, "inbound": 0, "sent": 0, "failed": 0, "p95_ms": None} for i in range(60)]
    points[59] = {**points[59], "inbound": 3, "sent": 5, "failed": 1, "p95_ms": 850.0}
    points[10] = {**points[10], "p95_ms": 120.5}
    counts = charts.counts_chart(points)
    assert (counts["top"], counts["totals"]) == (10, {"inbound": 3, "sent": 5, "failed": 1})
    assert [t["label"] for t in counts["y_ticks"]] == ["0", "5", "10"]
    assert [t["label"] for t in counts["x_ticks"]] == ["00:00", "00:15", "00:30", "00:44", "00:59"]
    assert counts["bars"] == [{"x": "310.2", "y": "71.6", "width": "3.6", "height": "26.4"}]
    assert counts["lines"][0]["d"].endswith(" L307.4,98 L312,54")  # sent: 5 of 10, half-way up
    latency = charts.latency_chart(points)
    assert (latency["top"], latency["minutes_with_replies"], len(latency["bars"])) == (1000, 2, 2)
    assert [t["label"] for t in latency["y_ticks"]] == ["0", "500", "1,000"]
    assert charts.counts_chart([])["lines"][0]["d"] == "" and charts.latency_chart([])["x_ticks"] == []
    rates = charts.rates_chart(0.5, None)
    assert [(r["fill"], r["value"]) for r in rates["rows"]] == [("105", "50.0%"), ("0", "—")]


def test_campaign_progress_and_rates() -> None:
    """Counts are exclusive, by each send's current state (the campaigns API)."""
    summary = {
        "id": "cmp_1", "tenant": "biz", "name": "Spring <sale>", "state": "running",
        "template": {"name": "promo", "language": "en", "category": "MARKETING"}, "created_at": 1.0, "send_at": None,
        "counts": {"queued": 4, "sent": 2, "delivered": 3, "read": 5, "failed": 1, "skipped": 3, "cancelled": 2},
        "total": 20, "failures_by_code": {"131049": 1},
    }  # fmt: skip
    row = campaigns.panel_row(summary, detailed=True)
    assert (row["done"], row["progress"]) == (16, 0.8)  # all but the 4 still waiting
    assert (row["delivered_ratio"], row["read_ratio"]) == (round(8 / 11, 3), round(5 / 11, 3))
    assert (row["name"], row["template"], row["id"]) == ("Spring <sale>", "promo", "cmp_1")
    open_row = campaigns.panel_row(summary, detailed=False)
    assert set(open_row) == set(campaigns.OPEN_KEYS) and "Spring" not in json.dumps(open_row)
    empty = campaigns.panel_row({"state": "loading", "counts": None}, detailed=False)
    assert (empty["total"], empty["progress"], empty["delivered_ratio"]) == (0, None, None)


async def test_campaigns_panel_shows_those_under_way(client: Any) -> None:
    """Created through the API (the real campaigns store): a scheduled campaign is under way, a
    cancelled one is not; its name needs the token."""
    body = {
        "tenant": "biz",
        "name": "Spring <sale>",
        "template": {"name": "promo", "language": "en"},
        "recipients": [{"to": "15550003001"}, {"to": "15550003002"}, {"to": "15550003001"}],
        "send_at": time.time() + 3600,
    }
    resp = await client.post("/api/campaigns", json=body, headers=AUTH)
    assert resp.status == 202, await resp.text()
    kept = (await resp.json())["id"]
    resp = await client.post("/api/campaigns", json={**body, "name": "gone"}, headers=AUTH)
    gone = (await resp.json())["id"]
    assert (await client.post(f"/api/campaigns/{gone}/cancel", headers=AUTH)).status == 200
    await wait_for(lambda: _campaigns(client, 1))
    [row] = (await _status(client, AUTH))["campaigns"]
    assert (row["id"], row["name"], row["tenant"], row["state"]) == (kept, "Spring <sale>", "biz", "scheduled")
    assert (row["total"], row["done"], row["progress"], row["delivered_ratio"]) == (2, 0, 0.0, None)
    [open_row] = (await _status(client))["campaigns"]
    assert "name" not in open_row and "id" not in open_row
    html = await _page(client, AUTH)
    panel = html[html.index('id="campaigns"') : html.index('id="attention-title"')]
    assert f'<tr data-id="{kept}">' in panel and "Spring &lt;sale&gt;" in panel and "gone" not in panel
    assert '<progress max="2" value="0"' in panel and "0 of 2 · 0.0%" in panel
    assert "Spring" not in await _page(client)  # the open view


async def _campaigns(client: Any, n: int) -> bool:
    return len((await _status(client, AUTH))["campaigns"]) == n


async def test_day_rates_are_read_again_as_often_as_they_are_cheap(tmp_path: Path) -> None:
    """A day of sends is read for the 24 h rates again only after (its read time / reader share),
    at most `delivery_every` s later: on a small store at once, on a big one not on every poll."""
    now = 1_767_225_600.0
    store = SqliteStore(tmp_path / "a.db", clock=lambda: now)
    await store.open()
    try:
        expensive = RecentActivity(delivery_every=30.0, reader_share=1e-9)  # any read counts as slow
        cheap = RecentActivity()
        await sent_row(store, "o1", "wamid.O1", now)
        for recent in (expensive, cheap):
            assert await recent.delivery(store, now) == {"home": {"sent": 1, "delivered": 0, "read": 0}}
        # Meta: Webhooks > messages > statuses ("delivered"),
        # developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components#statuses-object
        delivered = payloads.status("wamid.O1", "delivered", timestamp=str(int(now) + 5))
        value = payloads.value(statuses=[delivered])
        await store.ingest(
            parse_body(payloads.dump(payloads.envelope(payloads.entry(payloads.change(value)))), TENANTS)
        )
        assert (await cheap.delivery(store, now + 10))["home"]["delivered"] == 1  # read in under 0.1 s: read again
        assert (await expensive.delivery(store, now + 29))["home"]["delivered"] == 0  # as read 29 s ago
        assert (await expensive.delivery(store, now + 30))["home"]["delivered"] == 1
        assert (await expensive.delivery(store, now + 20))["home"]["delivered"] == 1  # the clock stepped back: read
    finally:
        await store.close()
