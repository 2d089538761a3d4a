"""Campaigns end to end: the real app, real SQLite, the fake Graph API on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from alfred_bot.app import create_app
from alfred_bot.config import Config, load_secrets
from tests import payloads
from tests.conftest import API_TOKEN, PROD_ENV, db_rows, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
WABA = "102290129340398"
REPO = Path(__file__).resolve().parent.parent
TEMPLATE = {"name": "spring_sale", "language": "en_US"}


def users(n: int, start: int = 0) -> list[str]:
    return [f"1555{i:07d}" for i in range(start, start + n)]


def config(tmp_path: Path, graph: FakeGraph, *, rate: float = 1000, waba: bool = False, **sections: Any) -> Config:
    home: dict[str, Any] = {"phone_number_id": payloads.PNID, **({"waba_id": WABA} if waba else {})}
    tenants = {"home": home, "biz": {"phone_number_id": payloads.BIZ_PNID}}
    outbound = {"rate_per_second": rate, **sections.pop("outbound", {})}
    return prod_config(tmp_path, graph, tenants=tenants, outbound=outbound, **sections)


async def app(aiohttp_client: Any, cfg: Config) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV)))
    return client


async def create(client: TestClient[Any, Any], status: int = 202, **body: Any) -> dict[str, Any]:
    data = {"tenant": "home", "name": "Spring sale", "template": TEMPLATE, **body}
    resp = await client.post("/api/campaigns", json=data, headers=AUTH)
    answer: dict[str, Any] = await resp.json()
    assert resp.status == status, answer
    return answer


async def upload(client: TestClient[Any, Any], csv_text: str | bytes, **fields: str) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    for key, value in {"tenant": "home", "name": "From a sheet", "template": json.dumps(TEMPLATE), **fields}.items():
        form.add_field(key, value)
    data = csv_text.encode() if isinstance(csv_text, str) else csv_text
    form.add_field("file", data, filename="list.csv", content_type="text/csv")
    return await client.post("/api/campaigns", data=form, headers=AUTH)


async def summary(client: TestClient[Any, Any], campaign: str) -> dict[str, Any]:
    resp = await client.get(f"/api/campaigns/{campaign}", headers=AUTH)
    assert resp.status == 200
    found: dict[str, Any] = await resp.json()
    return found


def template_sends(graph: FakeGraph) -> list[dict[str, Any]]:
    return [r.body for r in graph.sends if r.body.get("type") == "template"]


async def settled(graph: FakeGraph, quiet: float = 0.5) -> int:
    """The number of campaign sends once none came for `quiet` seconds."""
    seen = -1
    while seen != len(template_sends(graph)):
        seen = len(template_sends(graph))
        await asyncio.sleep(quiet)
    return seen


async def test_a_json_campaign_sends_each_recipient_their_parameters_once(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await app(aiohttp_client, config(tmp_path, graph))
    recipients = [
        {"to": "+1 555 000-0001", "params": ["Ana", "20%"]},
        {"to": "15550000002", "params": ["Bo", 15]},
        {"to": "0015550000001", "params": ["Ana again", "x"]},  # the first number, written otherwise
        {"to": "US.13491208655302741918", "params": ["Cy", "5%"]},  # a username-only user (BSUID)
    ]
    made = await create(client, recipients=recipients)
    assert (made["state"], made["recipients"], made["queued"], made["duplicates"], made["skipped"]) == (
        "running",
        4,
        3,
        1,
        0,
    )
    await wait_for(lambda: len(template_sends(graph)) == 3)
    by_to = {s["to"]: s["template"] for s in template_sends(graph)}
    assert by_to["+15550000001"]["components"] == [
        {"type": "body", "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "20%"}]}
    ]
    assert by_to["+15550000002"]["components"][0]["parameters"][1]["text"] == "15"
    assert by_to["US.13491208655302741918"]["language"] == {"code": "en_US"}

    async def done() -> bool:
        return (await summary(client, made["id"]))["state"] == "done"

    await wait_for(done)
    sent = db_rows(tmp_path / "alfred.db", "SELECT wamid FROM outbox WHERE recipient = '15550000001'")[0][0]
    # Meta: Webhooks > messages > statuses (delivered, then read)
    body = payloads.dump(
        payloads.envelope(
            payloads.entry(
                payloads.change(payloads.value(statuses=[payloads.status(sent, "read", recipient_id="15550000001")]))
            )
        )
    )
    assert await post_webhook(client, body) == 200
    shown = await summary(client, made["id"])
    assert shown["counts"]["read"] == 1 and shown["counts"]["sent"] == 2 and shown["total"] == 3
    listed = await (await client.get("/api/campaigns?tenant=home", headers=AUTH)).json()
    assert [c["id"] for c in listed] == [made["id"]]
    assert await (await client.get("/api/campaigns?tenant=biz", headers=AUTH)).json() == []
    assert (await client.get("/api/campaigns?tenant=nope", headers=AUTH)).status == 400
    assert (await client.get("/api/campaigns/cmp_nope", headers=AUTH)).status == 404


async def test_a_csv_upload_skips_opted_out_and_marketing_stopped_users(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await app(aiohttp_client, config(tmp_path, graph))
    a, b, c = users(3)
    assert await post_webhook(client, payloads.body_of(payloads.text("STOP", sender=a))) == 200
    # Meta: Webhooks > user_preferences (a user stopped marketing messages in WhatsApp)
    prefs = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": payloads.PNID},
        "user_preferences": [{"wa_id": b, "category": "marketing_messages", "value": "stop", "timestamp": 1760000000}],
    }
    body = payloads.dump(payloads.envelope(payloads.entry(payloads.change(prefs, "user_preferences"))))
    assert await post_webhook(client, body) == 200
    await wait_for(lambda: db_rows(tmp_path / "alfred.db", "SELECT COUNT(*) FROM optouts")[0][0] == 1)
    resp = await upload(client, f"to,param1\n{a},x\n{b},y\n\n{c},z\n+{c},z\n")
    made = await resp.json()
    assert resp.status == 202, made
    assert (made["queued"], made["skipped"], made["duplicates"]) == (1, 2, 1)
    await wait_for(lambda: [s["to"] for s in template_sends(graph)] == [f"+{c}"])
    shown = await summary(client, made["id"])
    assert shown["counts"]["skipped"] == 2 and shown["name"] == "From a sheet"
    # the same list for a UTILITY template: a marketing stop does not apply, the opt-out does
    utility = json.dumps({**TEMPLATE, "category": "UTILITY"})
    again = await (await upload(client, f"{a},x\n{b},y\n", template=utility)).json()
    assert (again["queued"], again["skipped"]) == (1, 1)


async def test_a_bad_recipient_is_a_422_naming_it_and_nothing_is_stored(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await app(aiohttp_client, config(tmp_path, graph))
    resp = await upload(client, "15550000001,a\n15550000002,b\nnot-a-number,c\n")
    answer = await resp.json()
    assert (resp.status, answer["field"]) == (422, "file line 3.to")
    bad = [
        ({"recipients": [{"to": "15550000001"}, {"to": "123"}]}, "recipients[1].to"),
        ({"recipients": []}, "recipients"),
        ({"recipients": [{"to": 5}]}, "recipients[0].to"),
        ({"recipients": [{"to": "15550000001"}], "template": {"name": "Bad Name", "language": "en"}}, "template.name"),
        ({"recipients": [{"to": "15550000001"}], "send_at": "2030-01-01T09:00:00"}, "send_at"),
        ({"recipients": [{"to": "15550000001"}], "send_at": "3030-01-01T09:00:00Z"}, "send_at"),
        ({"recipients": [{"to": "15550000001"}], "tenant": "nope"}, "tenant"),
        ({"recipients": [{"to": "15550000001"}], "name": " "}, "name"),
        (
            {
                "recipients": [{"to": "15550000001", "params": ["x"]}],
                "template": {
                    **TEMPLATE,
                    "components": [{"type": "body", "parameters": [{"type": "text", "text": "y"}]}],
                },
            },
            "recipients[0].params",
        ),
        ({"recipients": [{"to": "15550000001"}], "surprise": 1}, "surprise"),
    ]
    for body, field in bad:
        assert (await create(client, 422, **body))["field"] == field, body
    no_file = aiohttp.FormData(
        {"tenant": "home", "name": "x", "template": json.dumps(TEMPLATE)}, default_to_multipart=True
    )
    resp = await client.post("/api/campaigns", data=no_file, headers=AUTH)
    assert (resp.status, (await resp.json())["field"]) == (422, "file")
    not_text = await upload(client, b"15550000001,\xff\xfe\n")
    assert (not_text.status, (await not_text.json())["field"]) == (422, "file")
    assert await (await client.get("/api/campaigns", headers=AUTH)).json() == []
    assert db_rows(tmp_path / "alfred.db", "SELECT COUNT(*) FROM outbox")[0][0] == 0


async def test_a_list_above_the_cap_is_a_413(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await app(aiohttp_client, config(tmp_path, graph, campaigns={"max_upload_bytes": 2048}))
    too_many = "".join(f"{u},x\n" for u in users(200))
    resp = await upload(client, too_many)
    assert resp.status == 413 and "campaigns.max_upload_bytes" in (await resp.json())["error"]
    assert (await create(client, 413, recipients=[{"to": u} for u in users(200)]))["error"]
    assert (await create(client, 422, recipients=[{"to": u} for u in users(3)], name="n" * 201))["field"] == "name"
    assert await (await client.get("/api/campaigns", headers=AUTH)).json() == []


async def test_campaign_sends_go_below_conversation(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    """500 recipients queued at 100 sends/s (5 s of backlog); then the LAST of them writes: the
    answer goes out at once, ahead of most of the campaign (and of that user's own campaign send)."""
    client = await app(aiohttp_client, config(tmp_path, graph, rate=100))
    listed = users(500)
    made = await create(client, recipients=[{"to": u, "params": [str(i)]} for i, u in enumerate(listed)])
    assert made["queued"] == 500
    await wait_for(lambda: len(template_sends(graph)) >= 20)
    assert await post_webhook(client, payloads.body_of(payloads.text("where is my order?", sender=listed[-1]))) == 200
    await wait_for(lambda: "You said: where is my order?" in graph.texts(), timeout=5)
    kinds = [r.body.get("type") for r in graph.sends if r.body.get("status") != "read"]
    position = kinds.index("text")
    assert position < 100, f"the reply was send number {position} of the campaign's 500"
    campaign_sent = len(template_sends(graph))
    assert campaign_sent < 250  # most of the campaign was still waiting when the user was answered


async def test_pause_resume_and_cancel(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await app(aiohttp_client, config(tmp_path, graph, rate=20))
    made = await create(client, recipients=[{"to": u} for u in users(60)])
    campaign = made["id"]
    await wait_for(lambda: len(template_sends(graph)) >= 5)
    resp = await client.post(f"/api/campaigns/{campaign}/pause", headers=AUTH)
    assert resp.status == 200 and (await resp.json())["state"] == "paused"
    frozen = await settled(graph)  # what was already on the wire or in a lane's queue ends
    await asyncio.sleep(1.0)
    assert len(template_sends(graph)) == frozen < 60
    assert (await client.post(f"/api/campaigns/{campaign}/pause", headers=AUTH)).status == 200  # twice is fine
    assert (await client.post(f"/api/campaigns/{campaign}/resume", headers=AUTH)).status == 200
    await wait_for(lambda: len(template_sends(graph)) >= frozen + 5)
    resp = await client.post(f"/api/campaigns/{campaign}/cancel", headers=AUTH)
    shown = await resp.json()
    assert resp.status == 200 and shown["state"] == "cancelled" and shown["counts"]["cancelled"] > 0
    await settled(graph)
    final = await summary(client, campaign)
    assert final["counts"]["queued"] == 0
    assert (
        len(template_sends(graph)) == final["counts"]["sent"] + final["counts"]["delivered"] + final["counts"]["read"]
    )
    refused = await client.post(f"/api/campaigns/{campaign}/resume", headers=AUTH)
    assert refused.status == 409 and "cancelled" in (await refused.json())["error"]
    assert (await client.post("/api/campaigns/cmp_nope/pause", headers=AUTH)).status == 404
    assert (await client.post(f"/api/campaigns/{campaign}/explode", headers=AUTH)).status == 404


async def test_a_campaign_for_later_waits_scheduled(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await app(aiohttp_client, config(tmp_path, graph))
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).replace(microsecond=0)
    made = await create(client, recipients=[{"to": u} for u in users(3)], send_at=when.astimezone().isoformat())
    shown = await summary(client, made["id"])
    assert (shown["state"], shown["counts"]["queued"]) == ("scheduled", 3)
    assert shown["send_at"] == when.timestamp()
    states = db_rows(tmp_path / "alfred.db", "SELECT DISTINCT state FROM outbox")
    assert [r[0] for r in states] == ["scheduled"]
    await asyncio.sleep(0.3)
    assert template_sends(graph) == []


async def test_a_repeated_request_with_the_same_key_queues_nothing_twice(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await app(aiohttp_client, config(tmp_path, graph))
    body = {"recipients": [{"to": u} for u in users(4)], "idempotency_key": "spring-2026"}
    first, second = await create(client, **body), await create(client, **body)
    assert first["id"] == second["id"] and second["repeated"] is True
    await wait_for(lambda: len(template_sends(graph)) == 4)
    await asyncio.sleep(0.2)
    assert len(template_sends(graph)) == 4


async def test_a_synced_template_is_checked_before_a_campaign(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    # Meta: templates/overview — a NAMED template's body names its variables ({{first_name}})
    graph.add_template(
        WABA,
        "spring_sale",
        category="MARKETING",
        parameter_format="NAMED",
        components=[{"type": "BODY", "text": "Hi {{first_name}}, {{discount}} off today"}],
    )
    graph.add_template(WABA, "paused_sale", status="PAUSED")
    client = await app(aiohttp_client, config(tmp_path, graph, waba=True, templates={"event_poll_seconds": 0.05}))
    await wait_for(lambda: any(r.method == "GET" for r in graph.template_requests))
    await asyncio.sleep(0.1)
    wrong = await create(
        client,
        422,
        recipients=[{"to": "15550000001", "params": ["Ana", "5%"]}, {"to": "15550000002", "params": ["Bo"]}],
    )
    assert wrong["field"] == "recipients[1].params" and "body takes 2 parameter(s), got 1" in wrong["error"]
    paused = await create(
        client,
        422,
        template={"name": "paused_sale", "language": "en_US"},
        recipients=[{"to": "15550000001", "params": ["x"]}],
    )
    assert "PAUSED" in paused["error"]
    made = await create(client, recipients=[{"to": "15550000001", "params": ["Ana", "5%"]}])
    await wait_for(lambda: len(template_sends(graph)) == 1)
    [param, _] = template_sends(graph)[0]["template"]["components"][0]["parameters"]
    assert param == {"type": "text", "text": "Ana", "parameter_name": "first_name"}
    assert (await summary(client, made["id"]))["template"]["category"] == "MARKETING"


async def test_a_restart_mid_campaign_sends_the_rest_and_nothing_twice(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    cfg = config(tmp_path, graph, rate=40)
    first = await app(aiohttp_client, cfg)
    listed = users(120)
    made = await create(first, recipients=[{"to": u} for u in listed])
    await wait_for(lambda: len(template_sends(graph)) >= 20)
    await first.close()  # a graceful stop in the middle of the campaign
    stopped_at = len(template_sends(graph))
    assert stopped_at < 120
    second = await app(aiohttp_client, cfg)
    await wait_for(lambda: len(template_sends(graph)) >= 120, timeout=15)
    await asyncio.sleep(0.3)
    counts = Counter(s["to"] for s in template_sends(graph))
    assert set(counts) == {f"+{u}" for u in listed} and max(counts.values()) == 1
    assert (await summary(second, made["id"]))["state"] == "done"


# ---------------------------------------------------------------------------- kill -9 of a real process


def _write_config(directory: Path, port: int, graph_url: str) -> Path:
    path = directory / "config.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\npath = "{(directory / "alfred.db").as_posix()}"\n'
        f'[graph]\nbase_url = "{graph_url}"\ntimeout_seconds = 1.0\n'
        "[outbound]\nrate_per_second = 30\nworkers = 2\n"
        f'[tenants.home]\nphone_number_id = "{payloads.PNID}"\n'
    )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    async def up() -> bool:
        assert proc.poll() is None, "alfred exited"
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up, timeout=30)


async def test_kill_9_mid_campaign_then_restart_sends_each_once(tmp_path: Path, graph: FakeGraph) -> None:
    port = _free_port()
    cfg = _write_config(tmp_path, port, graph.url)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_"))}, **PROD_ENV}
    start = [sys.executable, "main.py", "--config", str(cfg)]
    log = (tmp_path / "alfred.log").open("ab")
    proc = subprocess.Popen(start, cwd=REPO, env=env, stdout=log, stderr=log)
    listed = users(150)
    try:
        await _serving(port, proc)
        async with aiohttp.ClientSession() as s:
            data = {
                "tenant": "home",
                "name": "kill me",
                "template": TEMPLATE,
                "recipients": [{"to": u} for u in listed],
            }
            async with s.post(f"http://127.0.0.1:{port}/api/campaigns", json=data, headers=AUTH) as r:
                assert r.status == 202, await r.text()
        await wait_for(lambda: len(template_sends(graph)) >= 30, timeout=15)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = len(template_sends(graph))
        assert killed_at < 150
        proc = subprocess.Popen(start, cwd=REPO, env=env, stdout=log, stderr=log)
        await _serving(port, proc)
        # rows the killed process had claimed are due again as soon as the next process opens the
        # database (it holds the lock, so their claimer is gone), not when their lease ends
        await wait_for(lambda: len({s["to"] for s in template_sends(graph)}) == 150, timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        log.close()
    counts = Counter(s["to"] for s in template_sends(graph))
    assert set(counts) == {f"+{u}" for u in listed}
    # at least once at Meta; twice only for a send that was on the wire when the process died
    assert sum(counts.values()) - 150 <= 2
    rows = db_rows(tmp_path / "alfred.db", "SELECT recipient, state FROM outbox WHERE campaign_id IS NOT NULL")
    assert len(rows) == 150 and {r[1] for r in rows} == {"sent"}


# ---------------------------------------------------------------------------- PostgreSQL, two nodes


async def test_on_postgresql_a_web_node_takes_the_campaign_and_a_worker_sends_it(
    pg_url: str, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    def node(name: str) -> Config:
        folder = tmp_path / name
        storage = {"path": str(folder / "alfred.db"), "url": pg_url}
        return config(folder, graph, rate=30, waba=True, storage=storage, templates={"event_poll_seconds": 0.05})

    graph.add_template(WABA, "spring_sale", category="MARKETING")  # body "Hello {{1}}": one parameter
    web = await aiohttp_client(create_app(node("web"), load_secrets(PROD_ENV), role="web"))
    worker = await aiohttp_client(create_app(node("worker"), load_secrets(PROD_ENV), role="worker"))
    assert (await worker.get("/api/campaigns", headers=AUTH)).status == 404  # the API is the web nodes'

    async def synced() -> bool:
        return bool(await (await web.get("/api/templates?tenant=home", headers=AUTH)).json())

    await wait_for(synced)
    listed = users(40)
    assert await post_webhook(web, payloads.body_of(payloads.text("STOP", sender=listed[0]))) == 200
    await wait_for(lambda: "You will not get messages from us any more" in " ".join(graph.texts()), timeout=10)
    wrong = await create(web, 422, recipients=[{"to": listed[1], "params": []}])
    assert wrong["field"] == "recipients[0].params"
    made = await create(web, recipients=[{"to": u, "params": [u[-4:]]} for u in listed])
    assert (made["queued"], made["skipped"]) == (39, 1)
    await wait_for(lambda: len(template_sends(graph)) >= 5, timeout=10)
    assert (await web.post(f"/api/campaigns/{made['id']}/pause", headers=AUTH)).status == 200
    frozen = await settled(graph)
    await asyncio.sleep(0.8)
    assert len(template_sends(graph)) == frozen < 39
    assert (await web.post(f"/api/campaigns/{made['id']}/resume", headers=AUTH)).status == 200
    await wait_for(lambda: len(template_sends(graph)) == 39, timeout=15)
    counts = Counter(s["to"] for s in template_sends(graph))
    assert max(counts.values()) == 1 and f"+{listed[0]}" not in counts

    async def done() -> bool:
        return (await summary(web, made["id"]))["state"] == "done"

    await wait_for(done)
