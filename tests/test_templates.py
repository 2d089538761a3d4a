"""Templates end to end: the sync from the fake Graph API (paged), the list, the 422 checks of
template sends, the resync on template webhooks, and creation / deletion passed through to Graph."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from alfred_bot.app import create_app
from alfred_bot.config import Config, load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import ACCESS_TOKEN, API_TOKEN, PROD_ENV, post_webhook, prod_config, wait_for
from tests.fakes import Answer, FakeGraph, graph_error

WABA = "102290129340398"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
#: Meta: templates/components — a text header with one variable, a body with two, a URL button with one.
ORDER_UPDATE = [
    {"type": "HEADER", "format": "TEXT", "text": "Order {{1}}"},
    {"type": "BODY", "text": "Hi {{1}}, your order ships on {{2}}."},
    {"type": "FOOTER", "text": "Reply STOP to opt out"},
    {
        "type": "BUTTONS",
        "buttons": [
            {"type": "URL", "text": "Track", "url": "https://example.com/track/{{1}}"},
            {"type": "QUICK_REPLY", "text": "Stop"},
        ],
    },
]


def config(tmp_path: Path, graph: FakeGraph, **templates: Any) -> Config:
    tenants = {
        "home": {"phone_number_id": payloads.PNID, "waba_id": WABA},
        "biz": {"phone_number_id": payloads.BIZ_PNID},  # no waba_id: never checked
    }
    return prod_config(tmp_path, graph, tenants=tenants, templates={"event_poll_seconds": 0.05, **templates})


def account(graph: FakeGraph) -> None:
    """Five templates: three pages of two (the fake pages like Graph, with `after` cursors)."""
    graph.add_template(WABA, "order_update", components=ORDER_UPDATE)
    graph.add_template(WABA, "order_update", "es")
    graph.add_template(WABA, "hello_world", components=[{"type": "BODY", "text": "Hello!"}])
    graph.add_template(WABA, "paused_one", status="PAUSED")
    graph.add_template(
        WABA,
        "promo",
        category="MARKETING",
        components=[{"type": "HEADER", "format": "IMAGE"}, {"type": "BODY", "text": "{{1}} off"}],
    )


async def started(aiohttp_client: Any, cfg: Config, graph: FakeGraph) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV)))

    async def synced() -> bool:
        resp = await client.get("/api/templates?tenant=home", headers=AUTH)
        return len(await resp.json()) == sum(len(v) for v in graph.templates.values())

    await wait_for(synced)
    return client


def send(
    name: str, language: str = "en_US", components: list[dict[str, Any]] | None = None, **kw: Any
) -> dict[str, Any]:
    template: dict[str, Any] = {"name": name, "language": {"code": language}}
    if components is not None:
        template["components"] = components
    return {"to": "+15551234567", "type": "template", "template": template, **kw}


def text_params(n: int) -> list[dict[str, str]]:
    return [{"type": "text", "text": f"v{i}"} for i in range(n)]


ORDER_OK = [
    {"type": "header", "parameters": text_params(1)},
    {"type": "body", "parameters": text_params(2)},
    {"type": "button", "sub_type": "url", "index": "0", "parameters": text_params(1)},
]


async def test_the_sync_reads_every_page_and_lists_parameter_counts(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    account(graph)
    client = await started(aiohttp_client, config(tmp_path, graph), graph)
    listed = await (await client.get("/api/templates?tenant=home", headers=AUTH)).json()
    by_key = {(t["name"], t["language"]): t for t in listed}
    assert by_key[("order_update", "en_US")]["parameters"] == {"header": 1, "body": 2, "button[0]": 1}
    assert by_key[("hello_world", "en_US")]["parameters"] == {"body": 0}
    assert by_key[("promo", "en_US")]["parameters"] == {"header": 1, "body": 1}
    assert by_key[("paused_one", "en_US")]["status"] == "PAUSED"
    assert by_key[("promo", "en_US")]["category"] == "MARKETING"
    lists = [r for r in graph.template_requests if r.method == "GET"]
    assert [r.query.get("after") for r in lists[:3]] == [None, "2", "4"]  # followed the cursors to the end
    assert all(r.authorization == f"Bearer {ACCESS_TOKEN}" for r in lists)
    assert await (await client.get("/api/templates?tenant=biz", headers=AUTH)).json() == []
    assert (await client.get("/api/templates?tenant=nope", headers=AUTH)).status == 400


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (send("no_such"), "template.name", "'no_such' is not among"),
        (send("order_update", "de"), "template.language.code", "no language 'de' (has: en_US, es)"),
        (send("paused_one", components=[{"type": "body", "parameters": text_params(1)}]), "template.name", "PAUSED"),
        (
            send("order_update", components=ORDER_OK[1:]),
            "template.components[header]",
            "header takes 1 parameter(s), got 0",
        ),
        (
            send("order_update", components=[ORDER_OK[0], {"type": "body", "parameters": text_params(3)}, ORDER_OK[2]]),
            "template.components[body]",
            "'order_update' (en_US): body takes 2 parameter(s), got 3",
        ),
        (
            send("hello_world", components=[{"type": "body", "parameters": text_params(1)}]),
            "template.components[body]",
            "takes 0",
        ),
    ],
)
async def test_a_template_send_that_meta_would_refuse_is_a_422_naming_template_and_component(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, body: dict[str, Any], field: str, words: str
) -> None:
    account(graph)
    client = await started(aiohttp_client, config(tmp_path, graph), graph)
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    answer = await resp.json()
    assert resp.status == 422, answer
    assert answer["field"] == field and words in answer["error"]
    assert graph.sends == []


async def test_a_matching_template_send_is_queued_and_unsynced_tenants_are_not_checked(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    account(graph)
    client = await started(aiohttp_client, config(tmp_path, graph), graph)
    with_quick_reply = [
        *ORDER_OK,
        {
            "type": "button",
            "sub_type": "quick_reply",
            "index": "1",
            "parameters": [{"type": "payload", "payload": "STOP"}],
        },
    ]
    for body in (
        send("order_update", components=ORDER_OK),
        send("order_update", components=with_quick_reply),
        send("no_such_at_all", tenant="biz"),
    ):
        resp = await client.post("/api/messages", json=body, headers=AUTH)
        assert resp.status == 202, await resp.text()
    await wait_for(lambda: len(graph.sends) == 3)


async def test_a_template_webhook_triggers_a_resync(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    account(graph)
    client = await started(aiohttp_client, config(tmp_path, graph), graph)
    assert (await client.post("/api/messages", json=send("hello_world"), headers=AUTH)).status == 202
    graph.templates[WABA][2]["status"] = "PAUSED"
    # Meta: webhooks/reference/message_template_status_update (`event`, integer template id)
    value = {
        "event": "PAUSED",
        "message_template_id": int(graph.templates[WABA][2]["id"]),
        "message_template_name": "hello_world",
        "message_template_language": "en_US",
        "reason": None,
    }
    hook = payloads.dump(
        payloads.envelope(payloads.entry(payloads.change(value, "message_template_status_update"), waba=WABA))
    )
    assert await post_webhook(client, hook) == 200

    async def refused() -> bool:
        return (await client.post("/api/messages", json=send("hello_world"), headers=AUTH)).status == 422

    await wait_for(refused)
    # a burst of webhooks is not a burst of Graph calls: the next re-list waits out EVENT_SYNC_GAP
    lists = len(graph.template_requests)
    assert await post_webhook(client, hook.replace(b'"PAUSED"', b'"APPROVED"', 1)) == 200
    await asyncio.sleep(0.5)
    assert len(graph.template_requests) == lists
    stored = await client.get("/api/events?field=message_template_status_update", headers=AUTH)
    assert len(await stored.json()) == 2  # the second webhook was stored, its re-list waits


async def test_the_periodic_sync_picks_up_changes_and_a_failed_sync_keeps_the_set(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    account(graph)
    client = await started(aiohttp_client, config(tmp_path, graph, sync_interval_seconds=1), graph)
    graph.template_script.append(graph_error(80007, status=400))  # rate limited: this sync fails
    graph.add_template(WABA, "brand_new")
    before = len(graph.template_requests)
    await wait_for(lambda: len(graph.template_requests) > before, timeout=5)
    listed = await (await client.get("/api/templates?tenant=home", headers=AUTH)).json()
    assert len(listed) in (5, 6)  # the failed sync kept the 5 templates (the next one may already have added one)

    async def six() -> bool:
        return len(await (await client.get("/api/templates?tenant=home", headers=AUTH)).json()) == 6

    await wait_for(six, timeout=5)


async def test_create_is_validated_then_passed_through(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await started(aiohttp_client, config(tmp_path, graph), graph)
    good = {
        "tenant": "home",
        "name": "order_ready",
        "category": "UTILITY",
        "language": "en_US",
        "components": [{"type": "BODY", "text": "Your order {{1}} is ready.", "example": {"body_text": [["42"]]}}],
    }
    bad = [
        ({**good, "name": "Order-Ready"}, "name"),
        ({**good, "name": "x" * 513}, "name"),
        ({**good, "category": "PROMO"}, "category"),
        ({**good, "language": "english"}, "language"),
        ({**good, "components": [{"type": "FOOTER", "text": "x"}]}, "components"),
        ({**good, "components": [{"type": "BODY", "text": "x" * 1025}]}, "components[0].text"),
        ({**good, "components": [{"type": "BODY", "text": "a"}, {"type": "BODY", "text": "b"}]}, "components[1].type"),
        ({**good, "tenant": "biz"}, "tenant"),  # no waba_id
    ]
    for body, field in bad:
        resp = await client.post("/api/templates", json=body, headers=AUTH)
        assert (resp.status, (await resp.json())["field"]) == (422, field), body
    assert graph.template_requests == [] or all(r.method == "GET" for r in graph.template_requests)
    resp = await client.post("/api/templates", json=good, headers=AUTH)
    assert resp.status == 201, await resp.text()
    made = await resp.json()
    assert made["status"] == "PENDING" and made["id"]
    [create] = [r for r in graph.template_requests if r.method == "POST"]
    assert create.body["name"] == "order_ready" and "tenant" not in create.body
    listed = await (await client.get("/api/templates?tenant=home", headers=AUTH)).json()
    assert [(t["name"], t["status"], t["parameters"]) for t in listed] == [("order_ready", "PENDING", {"body": 1})]
    # not approved yet: sending it is refused before Meta would
    refused = await client.post("/api/messages", json=send("order_ready"), headers=AUTH)
    assert refused.status == 422 and "PENDING" in (await refused.json())["error"]


def _new_template(name: str, category: str) -> dict[str, Any]:
    """A valid `POST /api/templates` body."""
    return {
        "tenant": "home",
        "name": name,
        "category": category,
        "language": "en",
        "components": [{"type": "BODY", "text": "Hi"}],
    }


async def test_metas_refusals_are_relayed(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await started(aiohttp_client, config(tmp_path, graph), graph)
    graph.template_script.append(graph_error(100, message="Invalid parameter", details="name already exists"))
    good = _new_template("dup", "MARKETING")
    resp = await client.post("/api/templates", json=good, headers=AUTH)
    answer = await resp.json()
    assert resp.status == 400 and answer["graph_error"]["code"] == 100 and "code 100" in answer["error"]
    graph.template_script.append(Answer(status=500, body=b"<html>oops</html>"))
    assert (await client.post("/api/templates", json=good, headers=AUTH)).status == 502
    unknown = await client.delete("/api/templates/never_was?tenant=home", headers=AUTH)
    assert unknown.status == 400 and "wasn't found" in (await unknown.json())["error"]


async def test_delete_passes_through_and_forgets(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    account(graph)
    client = await started(aiohttp_client, config(tmp_path, graph), graph)
    es_id = graph.templates[WABA][1]["id"]
    resp = await client.delete(f"/api/templates/order_update?tenant=home&hsm_id={es_id}", headers=AUTH)
    assert resp.status == 200 and (await resp.json())["forgotten"] == 1
    resp = await client.delete("/api/templates/order_update?tenant=home", headers=AUTH)
    assert resp.status == 200
    names = {t["name"] for t in await (await client.get("/api/templates?tenant=home", headers=AUTH)).json()}
    assert "order_update" not in names and {t["name"] for t in graph.templates[WABA]} == names
    deletes = [r for r in graph.template_requests if r.method == "DELETE"]
    assert [r.query for r in deletes] == [{"name": "order_update", "hsm_id": es_id}, {"name": "order_update"}]
    assert (await client.delete("/api/templates/Bad-Name?tenant=home", headers=AUTH)).status == 422
    assert (await client.delete("/api/templates/x?tenant=home&hsm_id=abc", headers=AUTH)).status == 422


async def test_sandbox_mode_cannot_reach_graph(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    cfg = config(tmp_path, graph)
    env = {k: v for k, v in PROD_ENV.items() if k != "WHATSAPP_ACCESS_TOKEN"}
    client = await aiohttp_client(create_app(cfg, load_secrets(env)))
    good = _new_template("x", "UTILITY")
    resp = await client.post("/api/templates", json=good, headers=AUTH)
    assert resp.status == 503 and "sandbox" in (await resp.json())["error"]
    # never synced: template sends are not checked (as before)
    assert (await client.post("/api/messages", json=send("anything"), headers=AUTH)).status == 202


async def test_an_unreachable_graph_is_a_503_and_no_sync(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    cfg = config(tmp_path, graph, sync_interval_seconds=1)
    await graph.close()  # nothing listens there any more: every call is refused
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV)))
    good = {"tenant": "home", "name": "x", "category": "UTILITY", "language": "en", "components": [
        {"type": "BODY", "text": "Hi"}]}  # fmt: skip
    resp = await client.post("/api/templates", json=good, headers=AUTH)
    assert resp.status == 503 and "connection failed" in (await resp.json())["error"]
    assert (await client.delete("/api/templates/x?tenant=home", headers=AUTH)).status == 503
    # never synced: sends are not checked, as without a waba_id
    assert (await client.post("/api/messages", json=send("anything"), headers=AUTH)).status == 202


async def test_a_handlers_template_reply_is_checked_like_an_api_send(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """Meta would refuse a paused template: the handler fails (its fallback goes), nothing is queued for Meta."""
    account(graph)
    router = Router()

    @router.default
    async def answer(message: Message, ctx: Context) -> None:
        text = message.text or ""
        ctx.reply_template("paused_one" if text == "bad" else "hello_world", language="en_US")

    cfg = config(tmp_path, graph)
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV), routers={"home": router}))

    async def synced() -> bool:
        return len(await (await client.get("/api/templates?tenant=home", headers=AUTH)).json()) == 5

    await wait_for(synced)
    assert await post_webhook(client, payloads.body_of(payloads.text("bad", id="wamid.TBAD"))) == 200
    assert await post_webhook(client, payloads.body_of(payloads.text("good", id="wamid.TGOOD"))) == 200
    await wait_for(lambda: any(r.body.get("type") == "template" for r in graph.sends))
    await wait_for(lambda: any("Sorry" in t for t in graph.texts()))
    sent = [r.body["template"]["name"] for r in graph.sends if r.body.get("type") == "template"]
    assert sent == ["hello_world"]
    inbound = {m["id"]: m for m in await (await client.get("/api/inbound", headers=AUTH)).json()}
    assert inbound["wamid.TBAD"]["state"] == "failed" and "paused_one" in inbound["wamid.TBAD"]["error"]
    assert inbound["wamid.TGOOD"]["state"] == "handled"
