"""The Redis Streams event bus end to end (issue 16): the real app on SQLite, a real redis-server
(tests/redisserver.py: loopback, temp dir, AOF on) and the fake Graph API on loopback.

- every accepted message and status reaches `alfred-ingest`, every send outcome `alfred-events`
  (through the feed: committed first, published after; Redis down delays, never loses);
- `alfred-outbox` requests are judged like `POST /api/messages`, queued then acknowledged,
  invalid ones dead-lettered with the reason; a request delivered twice is sent once; an entry a
  dead consumer held is reclaimed (XAUTOCLAIM) within seconds; nothing is left pending.

Meta: Webhooks > messages (messages and statuses objects),
developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from alfred_bot.app import create_app
from alfred_bot.bus.consumer import OutboxConsumer
from alfred_bot.bus.health import BUS
from alfred_bot.config import RedisConfig, load_secrets
from tests import payloads
from tests.conftest import PROD_ENV, db_rows, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph
from tests.redisserver import RedisServer, redis_server  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = {"type": "template", "template": {"name": "order_ready", "language": {"code": "en"}}}


def _request(to: str = "15553330000", **extra: Any) -> dict[bytes, bytes]:
    return {b"message": json.dumps({"to": to, **TEMPLATE, **extra}).encode()}


async def _app(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, url: str, **redis: Any) -> Any:
    cfg = prod_config(tmp_path, graph, redis={"url": url, "claim_idle_seconds": 0.5, **redis})
    return await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV)))


@pytest.fixture
async def rds(redis_server: RedisServer) -> Any:  # noqa: F811
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _entries(rds: Redis, stream: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"event"]) for _, fields in await rds.xrange(stream)]


async def _sends(rds: Redis) -> list[dict[str, Any]]:
    return [e for e in await _entries(rds, "alfred-events") if e["kind"] == "send"]


async def test_messages_and_statuses_reach_alfred_ingest(
    redis_server: RedisServer, rds: Redis, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph  # noqa: F811
) -> None:
    app = await _app(aiohttp_client, tmp_path, graph, redis_server.url)
    body = payloads.body_of(payloads.text("where is my order?", id="wamid.IN1"))
    assert await post_webhook(app, body) == 200
    assert await post_webhook(app, body) == 200  # Meta's redelivery: stored once, published once
    await wait_for(lambda: len(graph.texts()) == 1, timeout=10)  # the echo bot's reply
    wamid = "wamid.FAKE000001"  # the fake Graph API's first message id (the receipt gets none)
    value = payloads.value(statuses=[payloads.status(wamid, "delivered")])
    status = payloads.dump(payloads.envelope(payloads.entry(payloads.change(value))))
    assert await post_webhook(app, status) == 200

    async def published() -> bool:
        kinds = [e["kind"] for e in await _entries(rds, "alfred-ingest")]
        return kinds == ["message", "status"]

    await wait_for(published, timeout=10)
    message, delivered = await _entries(rds, "alfred-ingest")
    assert (message["tenant_id"], message["id"], message["text"], message["type"]) == (
        "home", "wamid.IN1", "where is my order?", "text",
    )  # fmt: skip
    assert message["trace_id"] and message["dedupe_id"] == f"message:{payloads.PNID}:wamid.IN1"
    assert (delivered["tenant_id"], delivered["status"], delivered["id"]) == ("home", "delivered", wamid)

    async def told() -> bool:
        return [e["state"] for e in await _sends(rds) if e["type"] == "text"] == ["queued", "sent", "delivered"]

    await wait_for(told, timeout=10)  # the reply's outcomes, the last one from the status webhook
    reply = [e for e in await _sends(rds) if e["type"] == "text"]
    assert {e["reply_to"] for e in reply} == {"wamid.IN1"} and {e["trace_id"] for e in reply} == {message["trace_id"]}
    assert reply[1]["wamid"] == wamid and reply[0]["outbox_id"] == reply[2]["outbox_id"]


async def test_a_redis_outage_delays_entries_and_loses_none(
    redis_server: RedisServer, rds: Redis, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph  # noqa: F811
) -> None:
    app = await _app(aiohttp_client, tmp_path, graph, redis_server.url)
    redis_server.kill()
    for i in range(5):  # webhooks are still taken: the feed keeps the entries in the database
        assert await post_webhook(app, payloads.body_of(payloads.text(f"m{i}", id=f"wamid.D{i}"))) == 200
    db = Path(app.app[BUS].store.path)  # type: ignore[attr-defined]

    async def said_degraded() -> bool:
        health = await (await app.get("/healthz")).json()
        return bool(health["redis"]["status"] == "degraded" and health["redis"]["relay"]["backlog"])

    await wait_for(said_degraded, timeout=10)
    health = await (await app.get("/healthz")).json()
    assert health["status"] == "ok"  # sending goes on, on this node's share of the rate
    assert health["redis"]["pacing"]["mode"] == "fallback"
    assert health["redis"]["pacing"]["lanes"] == {"home": "fallback", "biz": "fallback"}
    page = await (await app.get("/status.json")).json()  # the status page's data says it too
    assert page["redis"]["status"] == "degraded" and page["redis"]["pacing"]["mode"] == "fallback"
    html = await (await app.get("/")).text()  # and the page shows it at a glance
    assert 'id="redis" class="badge warn"' in html and "redis degraded" in html
    assert db_rows(db, "SELECT COUNT(*) FROM feed WHERE stream = 'ingest'")[0][0] == 5
    redis_server.start()  # same port, same AOF

    async def all_published() -> bool:
        ids = {e["id"] for e in await _entries(rds, "alfred-ingest")}
        return ids == {f"wamid.D{i}" for i in range(5)}

    await wait_for(all_published, timeout=15)
    await wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM feed WHERE stream = 'ingest'")[0][0] == 0)


async def test_entries_committed_before_a_crash_are_published_after_restart(
    redis_server: RedisServer, rds: Redis, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph  # noqa: F811
) -> None:
    app = await _app(aiohttp_client, tmp_path, graph, "redis://127.0.0.1:1/0")  # a Redis nobody answers
    for i in range(3):
        assert await post_webhook(app, payloads.body_of(payloads.text(f"m{i}", id=f"wamid.R{i}"))) == 200
    await app.close()
    again = await _app(aiohttp_client, tmp_path, graph, redis_server.url)  # the restart finds Redis

    async def published() -> bool:
        return {e["id"] for e in await _entries(rds, "alfred-ingest")} == {"wamid.R0", "wamid.R1", "wamid.R2"}

    await wait_for(published, timeout=10)
    await wait_for(lambda: again.app[BUS].relay.published >= 3)  # the replies' outcomes too


async def test_bus_requests_are_sent_and_their_outcomes_told(
    redis_server: RedisServer, rds: Redis, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph  # noqa: F811
) -> None:
    await _app(aiohttp_client, tmp_path, graph, redis_server.url)
    first = await rds.xadd("alfred-outbox", _request(idempotency_key="order-7"))
    second = await rds.xadd("alfred-outbox", _request(idempotency_key="order-7"))  # the agent asked twice
    third = await rds.xadd("alfred-outbox", _request(to="15553330001"))  # no key: the entry id is the key
    assert first and second
    await wait_for(lambda: len(graph.sends) == 2, timeout=10)

    async def told() -> bool:
        return sorted((e["idempotency_key"], e["state"]) for e in await _sends(rds)) == sorted(
            [("order-7", "queued"), ("order-7", "sent"), (third.decode(), "queued"), (third.decode(), "sent")]
        )

    await wait_for(told, timeout=10)
    assert sorted(r.body["to"] for r in graph.sends) == ["+15553330000", "+15553330001"]
    pending = await rds.xpending("alfred-outbox", "alfred")
    assert pending["pending"] == 0


async def test_invalid_requests_go_to_the_dead_stream_with_the_reason(
    redis_server: RedisServer, rds: Redis, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph  # noqa: F811
) -> None:
    app = await _app(aiohttp_client, tmp_path, graph, redis_server.url)
    bad = [
        {b"message": b"{not json"},
        {b"text": b"no message field"},
        _request(tenant="nobody"),
        {b"message": json.dumps({"to": "15553330000", "type": "text", "text": {}}).encode()},  # the API's 422
        {b"message": json.dumps({"to": "15553330000", "type": "text", "text": {"body": "hi"}}).encode()},  # window
    ]
    ids = [await rds.xadd("alfred-outbox", fields) for fields in bad]

    async def buried() -> bool:
        return await rds.xlen("alfred-outbox-dead") == len(bad)

    await wait_for(buried, timeout=10)
    dead = {fields[b"entry_id"]: fields for _, fields in await rds.xrange("alfred-outbox-dead")}
    assert set(dead) == set(ids)
    assert dead[ids[0]][b"reason"] == b"message: not valid JSON" and dead[ids[0]][b"message"] == b"{not json"
    assert b"message" in dead[ids[1]][b"reason"] and dead[ids[1]][b"text"] == b"no message field"
    assert dead[ids[2]][b"field"] == b"tenant" and b"nobody" in dead[ids[2]][b"reason"]
    assert dead[ids[3]][b"http_status"] == b"422" and dead[ids[3]][b"field"].startswith(b"text")
    assert b"24-hour" in dead[ids[4]][b"reason"]
    assert (await rds.xpending("alfred-outbox", "alfred"))["pending"] == 0
    assert graph.sends == []
    assert app.app[BUS].consumer.counts["dead"] == len(bad)  # type: ignore[union-attr]


async def test_an_entry_a_dead_consumer_held_is_reclaimed_and_sent_once(
    redis_server: RedisServer, rds: Redis, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph  # noqa: F811
) -> None:
    await rds.xgroup_create("alfred-outbox", "alfred", id="0", mkstream=True)
    entry = await rds.xadd("alfred-outbox", _request(idempotency_key="held"))
    # another node read it, queued it (the same key through the API) and died before its XACK
    assert await rds.xreadgroup("alfred", "ghost", {"alfred-outbox": ">"}, count=1)
    app = await _app(aiohttp_client, tmp_path, graph, redis_server.url)
    api = {"Authorization": f"Bearer {PROD_ENV['ALFRED_API_TOKEN']}"}
    body = {"to": "15553330000", **TEMPLATE, "idempotency_key": "held"}
    resp = await app.post("/api/messages", json=body, headers=api)
    assert resp.status == 202
    await wait_for(lambda: len(graph.sends) == 1, timeout=10)

    async def reclaimed() -> bool:
        return bool((await rds.xpending("alfred-outbox", "alfred"))["pending"] == 0)

    await wait_for(reclaimed, timeout=10)  # claim_idle_seconds = 0.5
    assert app.app[BUS].consumer.counts["reclaimed"] == 1  # type: ignore[union-attr]
    await asyncio.sleep(0.3)  # room for a second send to show up
    assert len(graph.sends) == 1  # delivered twice (the ghost, then this node): sent once
    assert (await rds.xrange("alfred-outbox"))[0][0] == entry


async def test_without_redis_nothing_changes(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    app = await aiohttp_client(create_app(prod_config(tmp_path, graph), load_secrets(PROD_ENV)))
    assert await post_webhook(app, payloads.body_of(payloads.text("hi", id="wamid.N1"))) == 200
    await wait_for(lambda: len(graph.texts()) == 1, timeout=10)
    health = await (await app.get("/healthz")).json()
    assert "redis" not in health and BUS not in app.app
    assert db_rows(tmp_path / "alfred.db", "SELECT COUNT(*) FROM feed")[0][0] == 0


async def test_a_request_the_store_cannot_take_yet_stays_pending_and_is_retried(
    redis_server: RedisServer, rds: Redis  # noqa: F811
) -> None:
    """The API answers 503 while the database is down: the entry is not acknowledged (nothing is
    dead-lettered) and is tried again from this consumer's pending list until it is stored."""
    answers = [(503, {"error": "temporarily unable to queue the message"})] * 2 + [(202, {"id": "o1"})]
    seen: list[Any] = []

    async def submit(body: Any) -> tuple[int, dict[str, Any]]:
        seen.append(body)
        return answers.pop(0)

    client = Redis.from_url(redis_server.url)
    consumer = OutboxConsumer(client, RedisConfig(), submit, name="n1", block=0.1)
    entry = await rds.xadd("alfred-outbox", _request())
    consumer.start()
    try:
        await wait_for(lambda: consumer.counts["queued"] == 1, timeout=10)
    finally:
        await consumer.stop()
        await client.aclose()
    assert consumer.counts["retried"] == 2 and consumer.counts["dead"] == 0
    assert [b["idempotency_key"] for b in seen] == [entry.decode()] * 3  # the same request each time
    assert (await rds.xpending("alfred-outbox", "alfred"))["pending"] == 0
    assert await rds.xlen("alfred-outbox-dead") == 0


async def test_the_example_agent_answers_through_the_bus(
    redis_server: RedisServer, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph  # noqa: F811
) -> None:
    """examples/agent.py as the README shows it: reads alfred-ingest in its own group and replies
    through alfred-outbox; Alfred sends the reply (within the user's 24-hour window)."""
    app = await _app(aiohttp_client, tmp_path, graph, redis_server.url)
    env = {**os.environ, "REDIS_URL": redis_server.url}
    agent = subprocess.Popen([sys.executable, str(REPO / "examples" / "agent.py")], env=env)
    try:
        now = str(int(time.time()))  # the window is judged by Meta's timestamp: the user writes now
        body = payloads.body_of(payloads.text("shout this", id="wamid.AG1", timestamp=now))
        assert await post_webhook(app, body) == 200
        await wait_for(lambda: "SHOUT THIS" in graph.texts(), timeout=15)
    finally:
        agent.kill()
        agent.wait(timeout=10)
    assert graph.texts().count("SHOUT THIS") == 1


async def test_a_request_that_breaks_the_consumer_is_dead_lettered_not_lost(
    redis_server: RedisServer, rds: Redis  # noqa: F811
) -> None:
    async def submit(body: Any) -> tuple[int, dict[str, Any]]:
        if body["to"] == "15550000666":
            raise RuntimeError("a bug")
        return 202, {"id": "o1"}

    client = Redis.from_url(redis_server.url)
    consumer = OutboxConsumer(client, RedisConfig(), submit, name="n1", block=0.1)
    broken = await rds.xadd("alfred-outbox", _request(to="15550000666"))
    await rds.xadd("alfred-outbox", _request())
    consumer.start()
    try:
        await wait_for(lambda: consumer.counts["queued"] == 1, timeout=10)  # the next one still goes
    finally:
        await consumer.stop()
        await client.aclose()
    [(_, dead)] = await rds.xrange("alfred-outbox-dead")
    assert dead[b"entry_id"] == broken and dead[b"reason"] == b"internal error (RuntimeError)"
    assert (await rds.xpending("alfred-outbox", "alfred"))["pending"] == 0
