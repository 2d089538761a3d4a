"""Operations: /metrics, trace ids through dispatch and sends, the audit trail, retention,
draining on shutdown, and the schema migration from v1."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError, load_secrets
from alfred_bot.logs import ContextFilter, JsonFormatter, bound, new_trace_id
from alfred_bot.privacy import install_key, mask, pseudonym
from alfred_bot.retention import DAY, Retention
from alfred_bot.store import SqliteStore
from alfred_bot.store.sqlite.schema import SCHEMA_VERSION
from tests import payloads
from tests.conftest import API_TOKEN, APP_SECRET, PROD_ENV, db_rows, make_config, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph, graph_error

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def _prod(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, **sections: Any) -> Any:
    cfg = prod_config(tmp_path, graph, **sections)
    return await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV))), cfg


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels_part, _, value = line.rpartition(" ")
            labels = {}
            if "{" in labels_part:
                inner = labels_part[labels_part.index("{") + 1 : labels_part.rindex("}")]
                for pair in filter(None, inner.split(",")):
                    key, _, val = pair.partition("=")
                    labels[key] = val.strip('"')
            samples.append((labels, float(value)))
    return samples


async def test_metrics_count_webhooks_messages_sends_errors_and_latencies(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client, _ = await _prod(aiohttp_client, tmp_path, graph)
    graph.script_for("+15550000002", graph_error(131026))
    body = payloads.body_of(payloads.text("a", sender="15550000001"), payloads.text("b", sender="15550000002"))
    assert await post_webhook(client, body) == 200
    assert await post_webhook(client, b"{}", secret="wrong") == 403
    await wait_for(lambda: len(graph.sends) >= 4)
    await wait_for(lambda: len(db_rows(tmp_path / "alfred.db", "SELECT 1 FROM outbox WHERE state = 'failed'")) == 1)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    requests = {s[0]["result"]: s[1] for s in _samples(text, "alfred_webhook_requests_total")}
    assert requests == {"200": 1.0, "403": 1.0}
    inbound = _samples(text, "alfred_inbound_messages_total")
    assert inbound == [({"tenant": "home", "type": "text"}, 2.0)]
    sends = {s[0]["result"]: s[1] for s in _samples(text, "alfred_outbound_sends_total")}
    assert sends["sent"] == 3.0 and sends["failed"] == 1.0
    assert _samples(text, "alfred_graph_errors_total") == [({"tenant": "home", "code": "131026"}, 1.0)]
    assert ({"tenant": "home"}, 4.0) in _samples(text, "alfred_send_latency_seconds_count")
    assert ({"tenant": "home"}, 2.0) in _samples(text, "alfred_handler_latency_seconds_count")
    assert ({"tenant": "home"}, 1.0) in _samples(text, "alfred_e2e_latency_seconds_count")  # the one reply sent
    outbox = {s[0]["state"]: s[1] for s in _samples(text, "alfred_outbox_messages") if s[0]["tenant"] == "home"}
    assert outbox == {"sent": 3.0, "failed": 1.0}
    assert ({"tenant": "biz"}, 0.0) in _samples(text, "alfred_tenant_paused")
    assert _samples(text, "alfred_dispatch_queue_depth") == [({}, 0.0)]


async def test_two_apps_keep_separate_registries(aiohttp_client: Any, tmp_path: Path) -> None:
    first = await aiohttp_client(create_app(make_config(tmp_path / "a"), load_secrets({})))
    second = await aiohttp_client(create_app(make_config(tmp_path / "b"), load_secrets({})))
    assert await post_webhook(first, b"{}", secret="x") == 403
    text = await (await second.get("/metrics")).text()
    assert _samples(text, "alfred_webhook_requests_total") == []


async def test_paused_tenant_shows_in_metrics(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client, _ = await _prod(aiohttp_client, tmp_path, graph, outbound={"probe_interval_seconds": 60})
    graph.script.append(graph_error(190, status=401))
    assert await post_webhook(client, payloads.body_of(payloads.text("x"))) == 200
    await wait_for(lambda: "home" in client.app[keys.SENDER].pauses)
    text = await (await client.get("/metrics")).text()
    assert ({"tenant": "home"}, 1.0) in _samples(text, "alfred_tenant_paused")


async def test_trace_id_follows_a_message_into_dispatch_and_its_sends(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    context = ContextFilter()
    caplog.handler.addFilter(context)
    try:
        client, cfg = await _prod(aiohttp_client, tmp_path, graph)
        body = payloads.body_of(payloads.text("trace me", id="wamid.TRACE"))
        headers = {**payloads.headers(body, APP_SECRET), "X-Trace-Id": "trace-42"}
        resp = await client.post("/webhook", data=body, headers=headers)
        assert resp.status == 200
        assert resp.headers["X-Trace-Id"] == "trace-42"
        await wait_for(lambda: len(graph.sends) >= 2)
        await wait_for(lambda: len(db_rows(cfg.storage.path, "SELECT 1 FROM audit")) >= 2)
    finally:
        caplog.handler.removeFilter(context)
    traced = [r for r in caplog.records if getattr(r, "trace_id", None) == "trace-42"]
    loggers = {r.name for r in traced}
    assert {"alfred.dispatch"} <= loggers, loggers  # "handled wamid.TRACE in … ms" (debug)
    assert all(getattr(r, "message_id", None) for r in traced if r.name == "alfred.dispatch")
    rows = db_rows(cfg.storage.path, "SELECT trace_id FROM outbox WHERE source_event_id = 'wamid.TRACE'")
    assert [r["trace_id"] for r in rows] == ["trace-42", "trace-42"]
    assert db_rows(cfg.storage.path, "SELECT trace_id FROM inbox")[0]["trace_id"] == "trace-42"
    assert {r["trace_id"] for r in db_rows(cfg.storage.path, "SELECT trace_id FROM audit")} == {"trace-42"}


async def test_a_bad_trace_header_is_replaced(client: Any) -> None:
    body = payloads.body_of(payloads.text("x"))
    headers = {**payloads.headers(body, APP_SECRET), "X-Trace-Id": "a b <script>"}
    resp = await client.post("/webhook", data=body, headers=headers)
    assert resp.status == 200
    assert resp.headers["X-Trace-Id"] != "a b <script>" and len(resp.headers["X-Trace-Id"]) == 32
    assert new_trace_id("ok-1.2:3") == "ok-1.2:3"
    assert new_trace_id("x" * 65) != "x" * 65


def test_json_lines_carry_the_bound_context() -> None:
    record = logging.makeLogRecord({"name": "alfred.t", "levelname": "INFO", "msg": "m"})
    with bound(trace_id="t1", tenant="home", message_id="wamid.1"):
        ContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert (line["trace_id"], line["tenant"], line["message_id"]) == ("t1", "home", "wamid.1")
    outside = logging.makeLogRecord({"name": "alfred.t", "msg": "m"})
    ContextFilter().filter(outside)
    assert "trace_id" not in json.loads(JsonFormatter().format(outside))


async def test_audit_records_every_graph_call_with_masked_recipient(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client, _ = await _prod(aiohttp_client, tmp_path, graph)
    graph.script.append(graph_error(131026))
    row = {"to": "+15551234567", "type": "template", "template": {"name": "hi", "language": {"code": "en"}}}
    resp = await client.post("/api/messages", json=row, headers=AUTH)
    outbox_id = (await resp.json())["id"]
    await wait_for(lambda: len(graph.sends) == 1)
    await wait_for(lambda: len(db_rows(tmp_path / "alfred.db", "SELECT 1 FROM audit")) == 1)
    resp = await client.get("/api/audit", params={"outbox_id": outbox_id}, headers=AUTH)
    [entry] = await resp.json()
    assert entry["tenant"] == "home" and entry["type"] == "template" and entry["outbox_id"] == outbox_id
    assert entry["recipient"] == "+15•••••4567"
    assert entry["http_status"] == 400 and entry["error_code"] == 131026 and entry["fbtrace_id"] == "trace-131026"
    assert entry["outcome"] == "failed" and entry["latency_ms"] >= 0
    assert (await client.get("/api/audit")).status == 401
    assert (await client.get("/api/audit", params={"limit": "0"}, headers=AUTH)).status == 400


def test_mask_and_pseudonym() -> None:
    assert mask("447700900123") == "+44••••••0123"
    assert mask("+15551234567") == "+15•••••4567"
    assert mask("US.abc") == "US.•••"
    assert mask("12") == "•••"
    key = b"k" * 32
    assert pseudonym(key, "15551234567") == pseudonym(key, "15551234567") != pseudonym(b"j" * 32, "15551234567")
    assert pseudonym(key, pseudonym(key, "1")) == pseudonym(key, "1")
    assert "1555" not in pseudonym(key, "15551234567")


def test_install_key_is_private_and_stable(tmp_path: Path) -> None:
    first = install_key(tmp_path)
    assert first == install_key(tmp_path) and len(first) == 32
    assert (tmp_path / "retention-key").stat().st_mode & 0o777 == 0o600


async def _aged_store(tmp_path: Path, now: float) -> SqliteStore:
    """A store with one conversation 40 days old, one 100 days old, and a fresh one."""
    store = SqliteStore(tmp_path / "alfred.db", clock=lambda: now)
    await store.open()
    conn = sqlite3.connect(tmp_path / "alfred.db")
    try:
        rows = ((40, "wamid.OLD", "handled"), (100, "wamid.OLDER", "handled"), (1, "wamid.NEW", "handled"))
        for age, wamid, state in (*rows, (40, "wamid.PENDING", "pending")):
            at = now - age * DAY
            conn.execute(
                "INSERT INTO inbox (event_id, tenant, phone_number_id, sender, wa_id, name, type, timestamp, text, "
                "raw, state, received_at) VALUES (?, 'home', ?, '15551234567', '15551234567', 'Ana', 'text', ?, "
                "'secret plans', ?, ?, ?)",
                (wamid, payloads.PNID, int(at), b'{"text":{"body":"secret plans"}}', state, at),
            )
            conn.execute(
                "INSERT INTO outbox (id, idem_key, tenant, recipient, type, payload, state, due_at, created_at) "
                "VALUES (?, ?, 'home', '15551234567', 'text', ?, 'sent', ?, ?)",
                (f"o-{wamid}", f"k-{wamid}", b'{"text":{"body":"You said: secret plans"}}', at, at),
            )
        conn.execute(
            "INSERT INTO outbox (id, idem_key, tenant, recipient, type, payload, state, due_at, created_at) "
            "VALUES ('o-queued', 'k-queued', 'home', '15551234567', 'text', x'7b7d', 'queued', ?, ?)",
            (now - 40 * DAY, now - 40 * DAY),
        )
        conn.commit()
    finally:
        conn.close()
    return store


async def test_retention_scrubs_after_hot_days_and_deletes_after_delete_days(tmp_path: Path) -> None:
    now = time.time()
    store = await _aged_store(tmp_path, now)
    media = tmp_path / "media" / "home"
    media.mkdir(parents=True)
    (media / "old.jpg").write_bytes(b"x")
    (media / "new.jpg").write_bytes(b"y")
    os.utime(media / "old.jpg", (now - 31 * DAY, now - 31 * DAY))
    key = install_key(tmp_path)
    job = Retention(store, make_config(tmp_path).retention, key, tmp_path / "media", clock=lambda: now)
    try:
        done = await job.run_once()
        again = await job.run_once()
    finally:
        await store.close()
    assert done["deleted"] == 2 and done["media_files"] == 1 and done["scrubbed"] >= 2
    assert again == {"scrubbed": 0, "deleted": 0, "media_files": 0}  # idempotent
    inbox = {r["event_id"]: r for r in db_rows(tmp_path / "alfred.db", "SELECT * FROM inbox")}
    assert set(inbox) == {"wamid.OLD", "wamid.NEW", "wamid.PENDING"}  # 100 days: gone; the wamid stays for dedupe
    old = inbox["wamid.OLD"]
    assert old["text"] is None and old["name"] is None and old["raw"] == b""
    assert old["sender"] == pseudonym(key, "15551234567") == old["wa_id"]
    assert inbox["wamid.NEW"]["text"] == "secret plans"  # still hot
    assert inbox["wamid.PENDING"]["text"] == "secret plans"  # never scrubbed while pending
    outbox = {r["id"]: r for r in db_rows(tmp_path / "alfred.db", "SELECT * FROM outbox")}
    assert set(outbox) == {"o-wamid.OLD", "o-wamid.NEW", "o-wamid.PENDING", "o-queued"}
    assert outbox["o-wamid.OLD"]["payload"] == b"" and outbox["o-wamid.OLD"]["recipient"].startswith("h:")
    assert outbox["o-queued"]["payload"] == b"{}" and outbox["o-queued"]["recipient"] == "15551234567"
    assert not (media / "old.jpg").exists() and (media / "new.jpg").exists()


async def test_retention_scrubs_events_and_status_user_ids_and_keeps_opt_outs(tmp_path: Path) -> None:
    now = time.time()
    store = SqliteStore(tmp_path / "alfred.db", clock=lambda: now)
    await store.open()
    old, older = now - 40 * DAY, now - 100 * DAY

    def age(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO events (key, field, tenant, raw, received_at, time) VALUES "
            "('e-old', 'user_preferences', 'home', ?, ?, 1), ('e-new', 'account_update', NULL, x'7b7d', ?, 2)",
            (b'{"user_preferences":[{"wa_id":"15551234567"}]}', old, now),
        )
        conn.execute(
            "INSERT INTO statuses (key, wamid, tenant, phone_number_id, status, timestamp, recipient_user_id, raw, "
            "received_at) VALUES ('s1', 'wamid.S', 'home', ?, 'read', 1, 'US.1349', x'7b7d', ?)",
            (payloads.PNID, old),
        )
        conn.executemany(
            "INSERT INTO preferences VALUES ('home', ?, 'marketing_messages', ?, NULL, 1, ?)",
            [("15550000001", "stop", older), ("15550000002", "resume", older), ("15550000003", "resume", now)],
        )
        conn.execute("INSERT INTO optouts VALUES ('home', '15550000004', ?)", (older,))

    await store.writer.submit(age)
    key = install_key(tmp_path)
    job = Retention(store, make_config(tmp_path).retention, key, tmp_path / "media", clock=lambda: now)
    try:
        await job.run_once()
        assert await job.run_once() == {"scrubbed": 0, "deleted": 0, "media_files": 0}
        events = {e["time"]: e for e in await store.events(10)}
        assert events[1]["value"] is None and events[1]["field"] == "user_preferences"  # the row stays, not the body
        assert events[2]["value"] == {}
        assert await store.marketing_stopped("home", "15550000001") is True  # a stop is kept as long as it holds
        assert await store.opted_out("home", "15550000004") is True  # so is a STOP: time is not consent
    finally:
        await store.close()
    db = tmp_path / "alfred.db"
    assert db_rows(db, "SELECT recipient_user_id FROM statuses")[0][0] == pseudonym(key, "US.1349")
    assert [r[0] for r in db_rows(db, "SELECT user FROM preferences ORDER BY user")] == ["15550000001", "15550000003"]


async def test_retention_config_keeps_the_redelivery_window(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retention\.delete_days"):
        make_config(tmp_path, retention={"hot_days": 3, "delete_days": 5})
    with pytest.raises(ConfigError, match=r"retention\.delete_days"):
        make_config(tmp_path, retention={"hot_days": 30, "delete_days": 20})


async def test_draining_answers_webhooks_503_and_healthz_says_so(client: Any) -> None:
    client.app[keys.DRAINING].set()
    body = payloads.body_of(payloads.text("late", id="wamid.LATE"))
    assert await post_webhook(client, body) == 503
    health = await client.get("/healthz")
    assert health.status == 503 and (await health.json())["status"] == "draining"
    assert (await (await client.get("/status.json")).json())["draining"] is True
    client.app[keys.DRAINING].clear()
    assert await post_webhook(client, body) == 200  # Meta's redelivery is accepted once we are back


async def test_shutdown_sets_draining_and_releases_cut_off_leases(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    graph.latency = 3.0  # longer than the grace: the send is cut off mid-flight
    client, cfg = await _prod(aiohttp_client, tmp_path, graph, dispatch={"shutdown_grace_seconds": 0.2})
    row = {"to": "+15551234567", "type": "template", "template": {"name": "hi", "language": {"code": "en"}}}
    assert (await client.post("/api/messages", json=row, headers=AUTH)).status == 202
    await wait_for(lambda: len(graph.sends) == 1)
    app = client.app
    started = time.time()
    await client.close()
    assert app[keys.DRAINING].is_set()
    [state] = db_rows(cfg.storage.path, "SELECT state, due_at, attempts FROM outbox")
    assert state["state"] == "queued" and state["attempts"] == 1
    assert state["due_at"] <= started + 5  # released, not leased for ~50 s


async def test_a_v1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "alfred.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE inbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, tenant TEXT, "
        "phone_number_id TEXT NOT NULL, sender TEXT, user_id TEXT, wa_id TEXT, name TEXT, type TEXT NOT NULL, "
        "timestamp INTEGER NOT NULL, text TEXT, context_id TEXT, raw BLOB NOT NULL, state TEXT NOT NULL, "
        "error TEXT, received_at REAL NOT NULL, handled_at REAL);"
        "CREATE TABLE outbox (id TEXT PRIMARY KEY, idem_key TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, "
        "recipient TEXT NOT NULL, type TEXT NOT NULL, payload BLOB NOT NULL, state TEXT NOT NULL DEFAULT 'queued', "
        "priority INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, due_at REAL NOT NULL, "
        "created_at REAL NOT NULL, source_event_id TEXT, wamid TEXT, error_code INTEGER, error_message TEXT, "
        "error_details TEXT, error_fbtrace_id TEXT, error_http_status INTEGER, needs_template INTEGER NOT NULL "
        "DEFAULT 0, sent_at REAL, delivered_at REAL, read_at REAL);"
        "INSERT INTO outbox (id, idem_key, tenant, recipient, type, payload, due_at, created_at) "
        "VALUES ('o1', 'k1', 'home', '1555', 'text', x'7b7d', 0, 0);"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert [j.id for j in await store.claim(time.time(), {"home": 5}, 30, frozenset())] == ["o1"]
        assert await store.audit(10) == []
    finally:
        await store.close()
    assert db_rows(path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    columns = {r["name"] for r in db_rows(path, "PRAGMA table_info(outbox)")}
    assert {"trace_id", "origin_at"} <= columns
