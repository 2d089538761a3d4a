"""Several nodes on one PostgreSQL database, in one test process: each node is the real app
(webhook, dispatcher, senders) with its own store connection pool, as `python main.py` runs it.

What only a shared database can show end to end: a message is handled by exactly one node and
answered once whichever node took the webhook (and Meta's redelivery to another node changes
nothing), a user's messages are answered in order across nodes, `--role web` takes webhooks
that a `--role worker` node answers (woken by NOTIFY), each sending node takes its share of the
rate, and the operator's commands read the shared database.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import cli, keys
from alfred_bot.app import create_app
from alfred_bot.config import Config, load_secrets
from alfred_bot.store import make_store
from tests import payloads
from tests.conftest import API_TOKEN, PROD_ENV, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph
from tests.pgserver import PgServer

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
pytestmark = pytest.mark.usefixtures("pg_server")


def _config(tmp_path: Path, graph: FakeGraph, url: str, node: str) -> Config:
    """Each node its own local folder (privacy key, media) and the one shared database."""
    folder = tmp_path / node
    return prod_config(folder, graph, storage={"path": str(folder / "alfred.db"), "url": url})


async def _node(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, url: str, name: str, role: str = "all") -> Any:
    return await aiohttp_client(create_app(_config(tmp_path, graph, url, name), load_secrets(PROD_ENV), role=role))


def _replies(graph: FakeGraph) -> list[str]:
    return [t for t in graph.texts() if t.startswith("You said: ")]


async def test_two_nodes_answer_every_message_once(
    pg_url: str, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    a = await _node(aiohttp_client, tmp_path, graph, pg_url, "a")
    b = await _node(aiohttp_client, tmp_path, graph, pg_url, "b")
    bodies = [payloads.body_of(payloads.text(f"m{i}", id=f"wamid.N{i}", sender=f"1555100{i:04d}")) for i in range(30)]
    for i, body in enumerate(bodies):
        assert await post_webhook(a if i % 2 else b, body) == 200
    for body in bodies[:10]:  # Meta redelivers some of them, to the other node
        assert await post_webhook(a, body) == 200
        assert await post_webhook(b, body) == 200
    await wait_for(lambda: len(_replies(graph)) >= 30, timeout=20)
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    assert sorted(_replies(graph)) == sorted(f"You said: m{i}" for i in range(30))
    handled = sum(node.app[keys.TELEMETRY].dispatch["handled"] for node in (a, b))
    assert handled == 30


async def test_a_users_messages_are_answered_in_order_across_nodes(
    pg_url: str, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    a = await _node(aiohttp_client, tmp_path, graph, pg_url, "a")
    b = await _node(aiohttp_client, tmp_path, graph, pg_url, "b")
    for i in range(12):
        body = payloads.body_of(payloads.text(f"step {i}", id=f"wamid.O{i}", sender="15552220000"))
        assert await post_webhook(a if i % 2 else b, body) == 200
    await wait_for(lambda: len(_replies(graph)) >= 12, timeout=20)
    assert _replies(graph) == [f"You said: step {i}" for i in range(12)]


async def test_a_web_node_takes_webhooks_a_worker_node_answers(
    pg_url: str, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    web = await _node(aiohttp_client, tmp_path, graph, pg_url, "web", role="web")
    worker = await _node(aiohttp_client, tmp_path, graph, pg_url, "worker", role="worker")
    assert (await worker.get("/webhook")).status == 404  # webhooks and the API are the web node's
    assert (await worker.get("/api/inbound", headers=AUTH)).status == 404
    body = payloads.body_of(payloads.text("split roles", id="wamid.S1"))
    assert await post_webhook(web, body) == 200
    await wait_for(lambda: _replies(graph) == ["You said: split roles"], timeout=15)
    assert worker.app[keys.TELEMETRY].dispatch["handled"] == 1
    assert web.app[keys.TELEMETRY].dispatch["handled"] == 0
    health = await (await web.get("/healthz")).json()
    assert health["status"] == "ok"  # a web node runs no workers and is healthy without them
    assert (await worker.get("/healthz")).status == 200
    # an API send queued on the web node is sent by the worker
    send = {"to": "15553330000", "type": "template", "template": {"name": "from_the_api", "language": {"code": "en"}}}
    resp = await web.post("/api/messages", json=send, headers=AUTH)
    assert resp.status == 202, await resp.text()
    await wait_for(lambda: any(r.body.get("type") == "template" for r in graph.sends), timeout=15)


async def test_every_node_is_listed_and_sending_nodes_share_the_rate(
    pg_url: str, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    a = await _node(aiohttp_client, tmp_path, graph, pg_url, "a")
    b = await _node(aiohttp_client, tmp_path, graph, pg_url, "b", role="worker")
    c = await _node(aiohttp_client, tmp_path, graph, pg_url, "c", role="web")

    async def listed() -> bool:
        data = await (await c.get("/status.json", headers=AUTH)).json()
        return sorted(n["role"] for n in data["nodes"] if n["alive"]) == ["all", "web", "worker"]

    await wait_for(listed, timeout=10)
    await wait_for(lambda: a.app[keys.CLUSTER].senders == 2 and b.app[keys.CLUSTER].senders == 2, timeout=10)
    page = await (await c.get("/")).text()
    assert re.search(r"3 alive: [a-z, ]+", page)


def test_the_operators_commands_read_the_shared_database(
    pg_url: str,
    tmp_path: Path,
    pg_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[tenants.home]\nphone_number_id = "1234567890"\n')
    monkeypatch.setenv("ALFRED_DATABASE_URL", pg_url)
    assert cli.main(["--config", str(config), "check-config"]) == 0
    said = capsys.readouterr().out
    assert f"PostgreSQL 127.0.0.1:{pg_server.port}/" in said and "postgres@" not in said

    async def first_node() -> None:  # a node creates the schema; the commands only read
        store = make_store(pg_url)
        await store.open()
        await store.close()

    asyncio.run(first_node())
    assert cli.main(["--config", str(config), "dead-letters", "list"]) == 0
    assert "0 dead letter(s)" in capsys.readouterr().out
