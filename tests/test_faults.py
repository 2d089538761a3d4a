"""Faults and hostile input found in review: each keeps its promise (nothing lost, nobody stuck)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import dispatch, keys
from alfred_bot.app import create_app
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.parse import parse_body
from alfred_bot.router import Router
from alfred_bot.store import SqliteStore, StoreError
from tests import payloads
from tests.conftest import API_TOKEN, FaultyStore, db_rows, make_config, post_webhook, wait_for


def _count(path: Any, where: str) -> int:
    return int(db_rows(path, f"SELECT COUNT(*) FROM {where}")[0][0])


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "RETRY_DELAY", 0.01)


async def test_out_of_range_integers_are_kept_with_a_parse_error_not_a_500(client: Any, cfg: Any) -> None:
    huge = payloads.text("huge", id="wamid.HUGE", timestamp=str(2**64 - 1))
    bad_status = payloads.status("wamid.X", "failed", errors=[{"code": 10**19, "title": "?"}])
    body = payloads.dump(
        payloads.envelope(
            payloads.entry(
                payloads.change(payloads.value([huge, payloads.text("fine", id="wamid.FINE")])),
                payloads.change(payloads.value(statuses=[bad_status])),
            )
        )
    )
    assert await post_webhook(client, body) == 200
    rows = db_rows(cfg.storage.path, "SELECT event_id, parse_error FROM inbox ORDER BY seq")
    assert [r["event_id"] for r in rows] == ["wamid.HUGE", "wamid.FINE"]  # a message with an id is never dropped
    assert "timestamp" in rows[0]["parse_error"] and rows[1]["parse_error"] is None
    # a status whose error code SQLite cannot hold is kept; only the unusable error is left out
    [status] = db_rows(cfg.storage.path, "SELECT wamid, status, error_code FROM statuses")
    assert (status["wamid"], status["status"], status["error_code"]) == ("wamid.X", "failed", None)
    assert db_rows(cfg.storage.path, "SELECT what FROM rejected") == []


async def test_malformed_items_are_kept_once(client: Any, cfg: Any) -> None:
    broken = payloads.message("image", {"caption": "no image object"}, id="wamid.BROKEN")
    no_id = payloads.message("image", {"caption": "no id"}, id="wamid.NOID")
    del no_id["id"]
    body = payloads.body_of(broken, no_id, payloads.text("ok", id="wamid.OK"))
    for _ in range(2):  # a redelivery is not stored twice
        assert await post_webhook(client, body) == 200
    rows = db_rows(cfg.storage.path, "SELECT event_id, type, parse_error FROM inbox ORDER BY seq")
    assert [(r["event_id"], r["type"]) for r in rows] == [("wamid.BROKEN", "image"), ("wamid.OK", "text")]
    assert "image" in rows[0]["parse_error"]
    [row] = db_rows(cfg.storage.path, "SELECT what, reason, raw FROM rejected")  # no id: quarantined, once
    assert row["what"] == "message"
    assert json.loads(row["raw"]) == no_id


async def test_deeply_nested_body_is_never_a_500(client: Any) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    for body in (b'{"entry": [' + nested + b"]}", b'{"entry": [], "x": ' + nested + b"}"):
        assert await post_webhook(client, body) in (200, 400)
    assert (await client.get("/healthz")).status == 200


async def test_non_utf8_authorization_is_401_not_500(client: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET /api/inbound HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 401")
    ok = await client.get("/api/inbound", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert ok.status == 200


async def test_body_budget_refuses_bodies_beyond_it_then_recovers(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    cfg = make_config(
        tmp_path, webhook={"max_body_bytes": 4096, "max_inflight_bytes": 4096, "body_timeout_seconds": 0.5}
    )
    client = await aiohttp_client(create_app(cfg, secrets))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: 4000\r\n\r\n{"
        + b" " * 3998  # bytes are charged as they arrive: send all but the last one
    )
    await writer.drain()
    await asyncio.sleep(0.1)  # the slow body now holds the whole budget
    body = payloads.body_of(payloads.text("waiting", id="wamid.BUDGET"))
    assert await post_webhook(client, body) == 503
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 408")
    writer.close()
    assert await post_webhook(client, body) == 200
    assert client.app[keys.BODY_BUDGET].used == 0


async def test_disk_full_fails_every_webhook_of_the_group(client: Any, cfg: Any) -> None:
    writer = client.app[keys.STORE].writer
    pages = await writer.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await writer.read(lambda c: c.execute(f"PRAGMA max_page_count = {pages}").fetchone())
    small = [payloads.body_of(payloads.text("s", id=f"wamid.G{i}")) for i in range(3)]
    big = payloads.body_of(*[payloads.text("z" * 2000) for _ in range(50)])
    statuses = await asyncio.gather(*(post_webhook(client, b) for b in (small[0], big, small[1], small[2])))
    assert statuses[1] == 503  # the big body cannot fit
    # whatever shared its commit failed with it: a 200 is always stored, a 503 never
    assert _count(cfg.storage.path, "inbox") == statuses.count(200)
    assert client.app[keys.STORE].stats()["commits"] < 5


async def test_catch_up_survives_a_read_error(
    aiohttp_client: Any, tmp_path: Path, secrets: Any, fast_retries: None
) -> None:
    cfg = make_config(tmp_path)
    seed = SqliteStore(Path(cfg.storage.path))
    await seed.open()
    await seed.ingest(
        parse_body(payloads.body_of(payloads.text("left over", id="wamid.LEFT")), {payloads.PNID: "home"})
    )
    await seed.close()
    client = await aiohttp_client(
        create_app(
            cfg, secrets, store=FaultyStore(Path(cfg.storage.path), pending=[RuntimeError("injected read fault")])
        )
    )
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 1)
    assert (await client.get("/healthz")).status == 200


async def test_failed_commit_is_retried_without_rerunning_the_handler(
    aiohttp_client: Any, tmp_path: Path, secrets: Any, fast_retries: None
) -> None:
    cfg = make_config(tmp_path)
    calls: list[str] = []
    router = Router()

    @router.default
    async def once(message: Message, ctx: Context) -> None:
        calls.append(message.id)
        ctx.reply("only once")

    store = FaultyStore(Path(cfg.storage.path), complete=[StoreError("disk full"), StoreError("disk full")])
    client = await aiohttp_client(create_app(cfg, secrets, store=store, routers={"home": router}))
    assert await post_webhook(client, payloads.body_of(payloads.text("x", id="wamid.RETRY"))) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 1)
    assert calls == ["wamid.RETRY"]
    assert _count(cfg.storage.path, "outbox") == 1


async def test_handler_raising_cancelled_error_is_a_failure_not_a_dead_worker(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    cfg = make_config(tmp_path, dispatch={"workers": 1})
    router = Router()

    @router.message("text", text="^cancel")
    async def cancels(message: Message, ctx: Context) -> None:
        raise asyncio.CancelledError

    @router.default
    async def fine(message: Message, ctx: Context) -> None:
        ctx.reply("fine")

    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": router}))
    body = payloads.body_of(payloads.text("cancel me", id="wamid.CXL"), payloads.text("next", id="wamid.NEXT"))
    assert await post_webhook(client, body) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state != 'pending'") == 2)
    states = dict(db_rows(cfg.storage.path, "SELECT event_id, state FROM inbox"))
    assert states == {"wamid.CXL": "failed", "wamid.NEXT": "handled"}
    assert (await client.get("/healthz")).status == 200


async def test_handler_error_text_that_cannot_be_stored_is_escaped(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    cfg = make_config(tmp_path)
    router = Router()

    @router.default
    async def bad(message: Message, ctx: Context) -> None:
        raise ValueError("lone surrogate \ud800 here")

    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": router}))
    assert await post_webhook(client, payloads.body_of(payloads.text("x", id="wamid.SUR"))) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'failed'") == 1)
    assert db_rows(cfg.storage.path, "SELECT error FROM inbox")[0][0] == "ValueError: lone surrogate \\ud800 here"


async def test_scan_memory_is_released_between_scans(client: Any, cfg: Any) -> None:
    for i in range(20):
        assert await post_webhook(client, payloads.body_of(payloads.text("m", id=f"wamid.MEM{i}"))) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 20)
    assert not client.app[keys.DISPATCHER].scanning


async def test_second_process_on_the_same_database_is_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "alfred.db")
    await first.open()
    second = SqliteStore(tmp_path / "alfred.db")
    with pytest.raises(StoreError, match="in use by another Alfred"):
        await second.open()
    await second.close()
    await first.close()
    again = SqliteStore(tmp_path / "alfred.db")
    await again.open()  # the lock is released with the first store
    await again.close()
