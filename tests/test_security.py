"""Security cases not covered by test_webhook.py / test_api.py / test_logs.py (see the issue's Security list).

Already covered elsewhere, not repeated here: missing / empty / sha1= / SHA256= / wrong-length /
wrong-secret / other-body signatures, uppercase hex, a one-byte change, rotation with two secrets
(test_webhook.py); body over the limit by Content-Length and chunked with a small limit, a body
stalled mid-way -> 408 (test_webhook.py); the body budget (test_faults.py); Bearer checks on
GET /api/inbound (test_api.py); a sandbox-mode secret scan (test_logs.py).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import io
import json
import logging
import sqlite3
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError, load_secrets
from alfred_bot.graph import GraphTransport, media_url
from alfred_bot.logs import BadRequestFilter, RateLimit, setup_logging
from alfred_bot.media import MediaError
from alfred_bot.outbound.pauses import Pause
from alfred_bot.security import BodyBudget, Redactor
from tests import payloads
from tests.chaos_helpers import fd_limit, raw_exchange
from tests.conftest import (
    ACCESS_TOKEN,
    API_TOKEN,
    APP_SECRET,
    ENV,
    PROD_ENV,
    VERIFY_TOKEN,
    db_rows,
    make_config,
    post_webhook,
    prod_config,
    wait_for,
)
from tests.fakes import FakeGraph, graph_error
from tests.test_logs import saved_logging  # noqa: F401 (a fixture)

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
PREVIOUS_SECRET = "previous-app-secret-rotating-out"
MIB = 1024 * 1024


def _count(path: Any, where: str) -> int:
    return int(db_rows(path, f"SELECT COUNT(*) FROM {where}")[0][0])


def _head(body: bytes, signature: str | None, *, length: int | None = None, extra: str = "") -> bytes:
    sig = f"X-Hub-Signature-256: {signature}\r\n" if signature is not None else ""
    size = len(body) if length is None else length
    return (
        f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{sig}{extra}"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()


BODY = payloads.body_of(payloads.text("secure?", id="wamid.SEC"))
SIG = payloads.headers(BODY, APP_SECRET)["X-Hub-Signature-256"]


# ---------------------------------------------------------------- signatures


@pytest.mark.parametrize(
    "header",
    [
        "sha512=" + hmac.new(APP_SECRET.encode(), BODY, hashlib.sha512).hexdigest(),  # another algorithm
        "sha256=" + hashlib.sha256(BODY).hexdigest(),  # a plain hash, no key
        "sha256=" + hmac.new(BODY, APP_SECRET.encode(), hashlib.sha256).hexdigest(),  # key and message swapped
        "sha256=" + hmac.new(APP_SECRET.encode(), BODY, hashlib.sha3_256).hexdigest(),  # right length, wrong hash
        "sha256=" + hmac.new(b"", BODY, hashlib.sha256).hexdigest(),  # empty secret
        SIG + "," + SIG,  # two values in one header
        "sha256 =" + SIG.removeprefix("sha256="),
    ],
)
async def test_lookalike_signatures_are_403_and_store_nothing(
    client: TestClient[Any, Any], cfg: Any, header: str
) -> None:
    resp = await client.post("/webhook", data=BODY, headers={"X-Hub-Signature-256": header})
    assert resp.status == 403
    assert _count(cfg.storage.path, "inbox") == 0


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b"X-Hub-Signature-256: sha256=\xff\xfe" + b"0" * 60 + b"\r\n", {403}),  # not UTF-8
        (b"X-Hub-Signature-256: sha256=" + b"a" * 20000 + b"\r\n", {400, 403, 431}),  # a huge header
        (b"X-Hub-Signature-256: " + SIG.encode() + b"\r\nX-Hub-Signature-256: sha256=00\r\n", {200, 403}),
    ],
)
async def test_odd_signature_headers_are_never_a_500(
    client: TestClient[Any, Any], cfg: Any, raw: bytes, ok: set[int]
) -> None:
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + raw + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
    )
    status = await raw_exchange(client.server.port, head + BODY)
    assert int(status.split()[1]) in ok, status
    assert (await client.get("/healthz")).status == 200


async def test_forged_body_with_the_right_signature_of_another_body_is_refused_in_a_duplicate_header(
    client: TestClient[Any, Any], cfg: Any
) -> None:
    """Two headers, the first for the forged body made with a wrong secret, the second a valid one
    for a different body: no combination lets the forged body in."""
    forged = payloads.body_of(payloads.text("FORGED", id="wamid.FORGED"))
    for first, second in (("sha256=" + "0" * 64, SIG), (SIG, "sha256=" + "0" * 64)):
        head = _head(forged, first, extra=f"X-Hub-Signature-256: {second}\r\nConnection: close\r\n")
        status = await raw_exchange(client.server.port, head + forged)
        assert status.startswith(b"HTTP/1.1 403"), status
    assert _count(cfg.storage.path, "inbox") == 0


async def test_every_secret_is_compared_in_constant_time(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compare_digest for the signature (both secrets while rotating, even after a match), the
    Bearer token and the verify token; `==` on a secret would leak its prefix by timing."""
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    env = {**ENV, "WHATSAPP_APP_SECRET_PREVIOUS": PREVIOUS_SECRET}
    client = await aiohttp_client(create_app(make_config(tmp_path), load_secrets(env)))
    for secret in (APP_SECRET, PREVIOUS_SECRET, "wrong"):
        calls.clear()
        body = payloads.body_of(payloads.text(secret))
        status = await post_webhook(client, body, secret)
        assert status == (403 if secret == "wrong" else 200)
        assert len(calls) >= 2, f"signed with {secret!r}: only {len(calls)} constant-time comparison(s)"
    calls.clear()
    assert (await client.get("/api/inbound", headers={"Authorization": "Bearer nope"})).status == 401
    assert calls
    calls.clear()
    params = {"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "c"}
    assert (await client.get("/webhook", params=params)).status == 403
    assert calls


# ---------------------------------------------------------------- replays


async def test_concurrent_replays_are_stored_and_answered_once(prod: Any, graph: FakeGraph) -> None:
    """Meta (or an attacker with a captured request) sends the same signed body 20 times at once."""
    body = payloads.body_of(payloads.text("only once", id="wamid.REPLAY"))
    statuses = await asyncio.gather(*(post_webhook(prod, body) for _ in range(20)))
    assert set(statuses) == {200}
    path = prod.app[keys.CONFIG].storage.path
    await wait_for(lambda: _count(path, "outbox WHERE state = 'sent'") == 2)
    await asyncio.sleep(0.2)  # room for a second send, if one were coming
    assert _count(path, "inbox") == 1
    assert graph.texts().count("You said: only once") == 1
    assert sum(1 for r in graph.sends if r.body.get("message_id") == "wamid.REPLAY") == 1


async def test_a_replay_after_a_restart_is_harmless(aiohttp_client: Any, tmp_path: Path, secrets: Any) -> None:
    """Dedupe lives in the database, not in memory: days later, after restarts, a replay does nothing."""
    cfg = make_config(tmp_path)
    body = payloads.body_of(payloads.text("before the restart", id="wamid.OLD"))
    first = await aiohttp_client(create_app(cfg, secrets))
    assert await post_webhook(first, body) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 1)
    await first.close()
    rows_before = _count(cfg.storage.path, "outbox")
    second = await aiohttp_client(create_app(cfg, secrets))
    assert await post_webhook(second, body) == 200
    await asyncio.sleep(0.2)
    assert _count(cfg.storage.path, "inbox") == 1
    assert _count(cfg.storage.path, "outbox") == rows_before


# ---------------------------------------------------------------- limits


async def test_declared_body_over_4mib_is_413_before_it_is_sent(client: TestClient[Any, Any], cfg: Any) -> None:
    """Default limit (4 MiB): a 50 MiB Content-Length is refused from the headers alone."""
    started = time.monotonic()
    status = await raw_exchange(client.server.port, _head(b"", SIG, length=50 * MIB), wait=3)
    assert status.startswith(b"HTTP/1.1 413"), status
    assert time.monotonic() - started < 2


async def test_unsigned_huge_body_is_403_before_it_is_sent(client: TestClient[Any, Any]) -> None:
    status = await raw_exchange(client.server.port, _head(b"", None, length=50 * MIB), wait=3)
    assert status.startswith(b"HTTP/1.1 403"), status


async def test_chunked_body_over_4mib_is_413_without_waiting_for_the_rest(
    client: TestClient[Any, Any], cfg: Any
) -> None:
    """No Content-Length: the server stops at the limit and answers, though 16 MiB were announced."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    head = (
        "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Hub-Signature-256: {SIG}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)

    async def send() -> None:
        writer.write(head)
        for _ in range(4 * 16 + 2):  # 4 MiB + 128 KiB, then silence (the rest never comes)
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        status = await asyncio.wait_for(reader.readline(), 3)
        assert status.startswith(b"HTTP/1.1 413"), status
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    assert _count(cfg.storage.path, "inbox") == 0


async def test_a_dripping_body_is_cut_at_the_deadline_not_per_read(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    """Slowloris on the body: one byte every 50 ms keeps each read short but never finishes."""
    cfg = make_config(tmp_path, webhook={"body_timeout_seconds": 0.5})
    client = await aiohttp_client(create_app(cfg, secrets))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(_head(BODY, SIG))
    started = time.monotonic()

    async def drip() -> None:
        for byte in BODY:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        status = await asyncio.wait_for(reader.readline(), 5)
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status
    assert 0.4 < time.monotonic() - started < 2.0
    assert _count(cfg.storage.path, "inbox") == 0


async def test_many_idle_and_slow_connections_do_not_starve_the_server(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    """300 idle sockets, 50 dripping their headers and 20 dripping a signed body: a genuine
    webhook and /healthz are still answered at once, and the body budget is given back."""
    cfg = make_config(tmp_path, webhook={"body_timeout_seconds": 30})
    client = await aiohttp_client(create_app(cfg, secrets))
    port = client.server.port
    idle: list[Any] = []
    with fd_limit(2048):  # both ends of every socket live in this process
        try:
            for i in range(370):
                idle.append(await asyncio.open_connection("127.0.0.1", port))
                _, writer = idle[-1]
                if 300 <= i < 350:
                    writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Hub-Sig")
                elif i >= 350:
                    writer.write(_head(BODY, SIG) + BODY[:10])
            await asyncio.sleep(0.2)
            assert client.app[keys.BODY_BUDGET].used == 20 * 10  # what arrived, not what was declared
            started = time.monotonic()
            bodies = [payloads.body_of(payloads.text("through", id=f"wamid.IDLE{i}")) for i in range(10)]
            statuses = await asyncio.gather(*(post_webhook(client, b) for b in bodies))
            assert statuses == [200] * 10
            assert (await client.get("/healthz")).status == 200
            assert time.monotonic() - started < 2.0
        finally:
            for _, writer in idle:
                writer.close()
        await wait_for(lambda: client.app[keys.BODY_BUDGET].used == 0)
    assert _count(cfg.storage.path, "inbox") == 10


ROUTES = [
    ("GET", "/api/messages/some-id", None),
    ("POST", "/api/messages", {"to": payloads.USER, "type": "template", "template": {"name": "x"}}),
    ("GET", "/api/tenants", None),
    ("POST", "/api/tenants/home/resume", None),
    ("GET", "/api/inbound?access_token=" + API_TOKEN, None),  # a token in the URL is not a token
]
BAD_AUTH = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
    {"Authorization": f"Bearer {API_TOKEN}x"},
    {"Authorization": f"Bearer {API_TOKEN.upper()}"},
    {"Authorization": f"Token {API_TOKEN}"},
    {"Authorization": API_TOKEN},
    {"X-Api-Token": API_TOKEN},
]


@pytest.mark.parametrize("headers", BAD_AUTH, ids=range(len(BAD_AUTH)))
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1].split("?")[0] for r in ROUTES])
async def test_api_and_admin_actions_refuse_missing_or_wrong_tokens(
    prod: Any, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    sender = prod.app[keys.SENDER]
    sender.pauses["home"] = Pause("account", "blocked", 368, time.time())
    resp = await prod.request(method, path, json=body, headers=headers)
    assert resp.status == 401
    answer = await resp.text()
    assert API_TOKEN not in answer
    assert "home" in sender.pauses  # the admin action did not happen
    assert _count(prod.app[keys.CONFIG].storage.path, "outbox") == 0


# ---------------------------------------------------------------- injection

HOSTILE = "'); DROP TABLE inbox; -- \" OR 1=1 <script>alert('x')</script> \u202egnp.exe <img src=x onerror=alert(1)>"
TABLES = {"inbox", "outbox", "statuses", "events", "rejected"}


async def test_hostile_text_in_every_stored_field_is_kept_verbatim_and_served_as_json(
    prod: Any, graph: FakeGraph
) -> None:
    msg = payloads.text(HOSTILE + " body\u0000end", id="wamid." + HOSTILE, sender=HOSTILE)
    msg["from_user_id"] = "US." + HOSTILE
    msg["context"] = {"from": HOSTILE, "id": "ctx " + HOSTILE}
    contacts = [{"profile": {"name": HOSTILE + " name"}, "wa_id": HOSTILE, "user_id": "US." + HOSTILE}]
    odd = payloads.message(HOSTILE + "type", {"x": HOSTILE}, id="wamid.T" + HOSTILE, sender=HOSTILE)
    body = payloads.dump(
        payloads.envelope(payloads.entry(payloads.change(payloads.value([msg, odd], contacts=contacts))))
    )
    assert await post_webhook(prod, body) == 200
    path = prod.app[keys.CONFIG].storage.path
    [row] = db_rows(path, "SELECT * FROM inbox WHERE type = 'text'")
    assert row["event_id"] == "wamid." + HOSTILE
    assert row["sender"] == row["wa_id"] == HOSTILE
    assert row["user_id"] == "US." + HOSTILE
    assert row["name"] == HOSTILE + " name"
    assert row["text"] == HOSTILE + " body\u0000end"
    assert row["context_id"] == "ctx " + HOSTILE
    [other] = db_rows(path, "SELECT type, event_id FROM inbox WHERE type != 'text'")
    assert tuple(other) == (HOSTILE + "type", "wamid.T" + HOSTILE)
    tables = {r[0] for r in db_rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables >= TABLES
    # the echo goes out with the text untouched, to the id exactly as given
    await wait_for(lambda: f"You said: {HOSTILE} body\u0000end" in graph.texts())
    resp = await prod.get("/api/inbound", headers=AUTH)
    assert resp.status == 200 and resp.content_type == "application/json"
    raw = await resp.read()
    items = json.loads(raw)
    assert {i["text"] for i in items} >= {HOSTILE + " body\u0000end"}
    assert {i["from"] for i in items} == {HOSTILE}
    assert b"\\u0000" in raw and b"\x00" not in raw  # control characters are escaped in JSON


async def test_hostile_values_through_the_api_are_stored_verbatim(prod: Any, graph: FakeGraph) -> None:
    key = "k" + HOSTILE
    template = {"name": "t" + HOSTILE, "language": {"code": "en_US"}}
    send = {"to": payloads.USER, "type": "template", "template": template, "idempotency_key": key}
    first = await prod.post("/api/messages", json=send, headers=AUTH)
    again = await prod.post("/api/messages", json=send, headers=AUTH)
    assert first.status == again.status == 202
    sent = await first.json()
    assert (await again.json())["id"] == sent["id"]  # the hostile key still dedupes exactly
    await wait_for(lambda: any(r.body.get("template") == template for r in graph.sends))
    segment = quote(HOSTILE.replace("/", ""), safe="")
    for method, bad in (("GET", f"/api/messages/{segment}"), ("POST", f"/api/tenants/{segment}/resume")):
        resp = await prod.request(method, bad, headers=AUTH)
        assert resp.status == 404 and resp.content_type == "application/json"
    path = prod.app[keys.CONFIG].storage.path
    payload = json.loads(db_rows(path, "SELECT payload FROM outbox WHERE id = ?", (sent["id"],))[0][0])
    assert payload["template"] == template


async def test_hostile_graph_error_text_is_kept_verbatim_and_served_as_json(prod: Any, graph: FakeGraph) -> None:
    graph.script_for("+" + payloads.USER, graph_error(131026, message=HOSTILE, details=HOSTILE))
    template = {"name": "hello", "language": {"code": "en_US"}}
    resp = await prod.post(
        "/api/messages", json={"to": payloads.USER, "type": "template", "template": template}, headers=AUTH
    )
    outbox_id = (await resp.json())["id"]

    async def failed() -> bool:
        return (await (await prod.get(f"/api/messages/{outbox_id}", headers=AUTH)).json())["status"] == "failed"

    await wait_for(failed)
    resp = await prod.get(f"/api/messages/{outbox_id}", headers=AUTH)
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["message"] == f"(#131026) {HOSTILE}"
    assert error["details"] == HOSTILE


# ---------------------------------------------------------------- secrets


def _blob(path: str) -> bytes:
    """The database as bytes, main file and WAL, as a thief with the disk would see it."""
    conn = sqlite3.connect(path)
    try:
        dump = "\n".join(conn.iterdump()).encode("utf-8", "surrogateescape")
    finally:
        conn.close()
    files = [Path(path), Path(path + "-wal")]
    return dump + b"".join(p.read_bytes() for p in files if p.exists())


async def test_no_secret_in_logs_answers_or_database_during_a_production_run(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, caplog: Any
) -> None:
    """A traffic run that provokes every refusal and echoes the access token back from the Graph API."""
    caplog.set_level(logging.DEBUG)
    env = {**PROD_ENV, "WHATSAPP_APP_SECRET_PREVIOUS": PREVIOUS_SECRET}
    cfg = prod_config(tmp_path, graph, outbound={"unknown_max_attempts": 2})
    client = await aiohttp_client(create_app(cfg, load_secrets(env)))
    graph.probe_status = 401
    graph.script.extend(
        [
            graph_error(190, 401, f"Invalid OAuth access token - Cannot parse access token {ACCESS_TOKEN}"),
            graph_error(131000, 500, f"Something went wrong {ACCESS_TOKEN}"),
            graph_error(131000, 500, f"Something went wrong {ACCESS_TOKEN}"),
        ]
    )
    answers: list[str] = []

    async def keep(resp: Any) -> None:
        answers.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")

    now = str(int(time.time()))
    good = payloads.body_of(payloads.text("hello", id="wamid.SCAN1", timestamp=now))
    signatures = [payloads.headers(good, s)["X-Hub-Signature-256"] for s in (APP_SECRET, PREVIOUS_SECRET)]
    assert await post_webhook(client, good) == 200
    assert await post_webhook(client, payloads.body_of(payloads.text("rot", timestamp=now)), PREVIOUS_SECRET) == 200
    for data, headers in (
        (good + b" ", {"X-Hub-Signature-256": signatures[0]}),
        (b"not json", payloads.headers(b"not json", APP_SECRET)),
        (good, {}),
        (b"x" * (5 * MIB), {"X-Hub-Signature-256": signatures[0]}),
    ):
        await keep(await client.post("/webhook", data=io.BytesIO(data), headers=headers))
    for params in ({"hub.mode": "subscribe", "hub.verify_token": "no", "hub.challenge": "c"},):
        await keep(await client.get("/webhook", params=params))
    await wait_for(lambda: "home" in client.app[keys.SENDER].pauses)  # the token error paused us
    for method, path, body, headers in (
        ("GET", "/api/inbound", None, {"Authorization": f"Bearer {API_TOKEN}x"}),
        ("POST", "/api/messages", {"to": "x"}, AUTH),
        ("POST", "/api/messages", {"to": payloads.USER, "type": "text", "text": {"body": ""}}, AUTH),
        ("GET", "/api/messages/none", None, AUTH),
        ("GET", "/api/tenants", None, AUTH),
        ("GET", "/healthz", None, {}),
        ("GET", "/status.json", None, {}),
        ("GET", "/", None, {}),
    ):
        await keep(await client.request(method, path, json=body, headers=headers))
    client.app[keys.SENDER].resume("home")
    client.app[keys.SENDER].resume("biz")
    path = cfg.storage.path
    await wait_for(lambda: _count(path, "outbox WHERE state IN ('queued', 'sending')") == 0, timeout=10)
    # the echo was kept redacted: on the failed row, or (a read receipt being best-effort, it may
    # have taken the echo and then been dropped as stale) in the log line about it
    stored = _count(path, "outbox WHERE error_message LIKE '%[redacted]%'")
    assert stored + sum("[redacted]" in r.getMessage() for r in caplog.records) >= 1
    for outbox_id in [r[0] for r in db_rows(path, "SELECT id FROM outbox")]:
        await keep(await client.get(f"/api/messages/{outbox_id}", headers=AUTH))
    logs = "\n".join(f"{r.getMessage()} {r.__dict__!r} {r.exc_text or ''}" for r in caplog.records)
    everything = logs.encode() + "\n".join(answers).encode() + _blob(path)
    secrets = {
        "access token": ACCESS_TOKEN,
        "app secret": APP_SECRET,
        "previous app secret": PREVIOUS_SECRET,
        "verify token": VERIFY_TOKEN,
        "api token": API_TOKEN,
        **{f"signature {i}": s.removeprefix("sha256=") for i, s in enumerate(signatures)},
    }
    leaked = [name for name, value in secrets.items() if value.encode() in everything]
    assert leaked == []
    assert len(answers) > 15 and len(caplog.records) > 10  # the scan had something to scan


# ================================================================ issue 13: round two
# Each test below failed on the code before the fix it names (checked by running it there).


async def _hold(port: int, head: bytes, body: bytes = b"", *, peer: str = "127.0.0.2") -> Any:
    """A connection from `peer` (any 127.x address reaches the loopback server on Linux) that sends
    `head` + `body` and then holds the rest back; returns (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(peer, 0))
    writer.write(head + body)
    await writer.drain()
    return reader, writer


def _close_all(held: list[Any]) -> None:
    for _, writer in held:
        writer.close()


async def test_header_only_connections_do_not_starve_intake(client: TestClient[Any, Any], cfg: Any) -> None:
    """Issue 13.1: eight connections send only headers (`X-Hub-Signature-256: x`, a 4 MiB
    Content-Length, no body). The budget was reserved by declared length, so these 8 x 4 MiB took
    all 32 MiB and every genuine webhook got 503. Bytes are now charged as they arrive: none did."""
    port = client.server.port
    held = [await _hold(port, _head(b"", "x", length=4 * MIB), peer=f"127.0.0.{2 + i}") for i in range(8)]
    try:
        await asyncio.sleep(0.2)
        assert client.app[keys.BODY_BUDGET].used == 0
        body = payloads.body_of(payloads.text("still heard", id="wamid.STARVE"))
        assert await post_webhook(client, body) == 200
    finally:
        _close_all(held)
    assert _count(cfg.storage.path, "inbox") == 1


async def test_one_peer_cannot_hold_more_than_its_share_of_the_budget(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    """Issue 13.1: bytes that did arrive are capped per remote address (`max_inflight_per_peer`):
    a third large body from the same host is 503, another host's body is still taken in."""
    webhook = {"max_body_bytes": 100_000, "max_inflight_bytes": 1_000_000, "max_inflight_per_peer": 200_000}
    cfg = make_config(tmp_path, webhook={**webhook, "body_timeout_seconds": 5})
    client = await aiohttp_client(create_app(cfg, secrets))
    port, head = client.server.port, _head(b"", SIG, length=100_000)
    held = [await _hold(port, head, b" " * 90_000) for _ in range(2)]
    try:
        await wait_for(lambda: client.app[keys.BODY_BUDGET].used == 180_000)
        third = await _hold(port, head, b" " * 90_000)
        held.append(third)
        assert (await asyncio.wait_for(third[0].readline(), 3)).startswith(b"HTTP/1.1 503")
        held.append(await _hold(port, head, b" " * 90_000, peer="127.0.0.3"))  # another host: taken in
        await wait_for(lambda: client.app[keys.BODY_BUDGET].used == 270_000)
    finally:
        _close_all(held)
    await wait_for(lambda: client.app[keys.BODY_BUDGET].used == 0)
    assert client.app[keys.BODY_BUDGET].peers == {}


async def test_a_small_signed_webhook_gets_through_when_large_bodies_fill_the_budget(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    """Issue 13.1: eight hosts send large bodies for real (not just headers) and hold the last
    bytes. The large ones may fill 7/8 of the budget; the last eighth is kept for small bodies, so
    Meta's (a few KB) still get 200 and are stored; the large body beyond the share gets 503."""
    webhook = {"max_body_bytes": 100_000, "max_inflight_bytes": 800_000, "max_inflight_per_peer": 100_000}
    cfg = make_config(tmp_path, webhook={**webhook, "body_timeout_seconds": 5})
    client = await aiohttp_client(create_app(cfg, secrets))
    port, head = client.server.port, _head(b"", SIG, length=100_000)
    held = []
    try:
        for i in range(7):
            held.append(await _hold(port, head, b" " * 90_000, peer=f"127.0.0.{2 + i}"))
        await wait_for(lambda: client.app[keys.BODY_BUDGET].used == 630_000)
        eighth = await _hold(port, head, b" " * 90_000, peer="127.0.0.9")
        held.append(eighth)
        assert (await asyncio.wait_for(eighth[0].readline(), 3)).startswith(b"HTTP/1.1 503")
        bodies = [payloads.body_of(payloads.text("small", id=f"wamid.SMALL{i}")) for i in range(5)]
        assert await asyncio.gather(*(post_webhook(client, b) for b in bodies)) == [200] * 5
    finally:
        _close_all(held)
    assert _count(cfg.storage.path, "inbox") == 5


def test_the_budget_charges_what_arrived_per_peer_and_keeps_a_share_for_small_bodies() -> None:
    """Issue 13.1, the accounting on its own: per-peer cap, the reserve, and release."""
    budget = BodyBudget(800, per_peer=400)
    big = budget.lease("a", None)  # chunked: large
    assert big.charge(400) and not big.charge(1)  # the peer's cap
    other = budget.lease("b", 10_000)
    assert other.charge(300) and not other.charge(1)  # 700 = 800 - the reserve of 100: large bodies stop
    small = budget.lease("c", 60)
    assert small.charge(25)  # the reserve, for a peer that holds little
    assert not budget.lease("a", 60).charge(10)  # not for a peer that already holds a lot
    for lease in (big, other, small):
        lease.release()
        lease.release()  # idempotent
    assert (budget.used, budget.peers) == (0, {})
    # the reserve never keeps out a body of the largest allowed size
    assert BodyBudget(800, largest=750).reserve == 50
    assert BodyBudget(800, largest=800).lease("a", None).charge(800)


def _gzip_bomb(size: int) -> bytes:
    """`size` zero bytes, gzip'd: ~1/1000 of the size on the wire."""
    return gzip.compress(b"\0" * size, compresslevel=9)


@pytest.mark.parametrize(
    ("path", "auth"),
    [("/webhook", f"X-Hub-Signature-256: {SIG}\r\n"), ("/api/messages", f"Authorization: Bearer {API_TOKEN}\r\n")],
)
async def test_compressed_bodies_are_415_and_never_inflated(
    client: TestClient[Any, Any], cfg: Any, path: str, auth: str
) -> None:
    """Issue 13.2: aiohttp inflated `Content-Encoding: gzip` bodies before any cap counted them
    (3.9 KB on the wire became 4 MB in memory per connection, and stayed while the last bytes
    were held back). Now: 415 from the headers, and nothing is inflated (memory stays flat)."""
    bomb = _gzip_bomb(4 * MIB - 4096)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n"
    ).encode()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        held = [await _hold(client.server.port, head, bomb[:-8], peer=f"127.0.0.{2 + i}") for i in range(10)]
        try:
            statuses = [await asyncio.wait_for(reader.readline(), 3) for reader, _ in held]
            grown = tracemalloc.get_traced_memory()[1] - base
        finally:
            _close_all(held)
    finally:
        tracemalloc.stop()
    assert all(s.startswith(b"HTTP/1.1 415") for s in statuses), statuses
    assert grown < 8 * MIB, f"memory grew by {grown / MIB:.1f} MiB"  # 10 inflated bodies would be 40 MiB
    assert _count(cfg.storage.path, "inbox") == 0


async def test_identity_content_encoding_is_still_accepted(client: TestClient[Any, Any]) -> None:
    body = payloads.body_of(payloads.text("plain", id="wamid.IDENTITY"))
    headers = {**payloads.headers(body, APP_SECRET), "Content-Encoding": "identity"}
    resp = await client.post("/webhook", data=body, headers=headers)
    assert resp.status == 200


MP = "multipart/form-data; boundary=XyZ"


def _part(disposition: str, data: bytes = b"\xff\xd8\xff jpeg", extra: str = "") -> bytes:
    head = f"--XyZ\r\nContent-Disposition: form-data; {disposition}\r\nContent-Type: image/jpeg\r\n{extra}\r\n"
    return head.encode() + data + b"\r\n--XyZ--\r\n"


NESTED = b"[" * 5000 + b"]" * 5000
MALFORMED = [
    # (path, content type, body): every one was a 500
    ("/api/messages", "application/json", NESTED),
    ("/api/messages", "application/json", b'{"to": "15551234567", "type": "text", "x": ' + NESTED + b"}"),
    ("/api/dead-letters/retry", "application/json", NESTED),
    ("/api/dead-letters/retry", "application/json", b'{"ids": ' + b"[" * 990 + b"]" * 990 + b"}"),
    ("/api/media", "multipart/form-data", _part('name="file"; filename="a.jpg"')),  # no boundary
    ("/api/media", MP, b"garbage, not multipart at all"),
    ("/api/media", 'multipart/form-data; boundary="' + "b" * 100 + '"', b"--x"),  # boundary too long
    ("/api/media", MP, _part("name=\"file\"; filename*=UTF-8''%ff%fe.jpg")),  # filename* not UTF-8
    ("/api/media", MP, _part('name="tenant"', b"home", "Content-Type: text/plain; charset=no-such-charset\r\n")),
    ("/api/media", MP, b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc"),  # cut short
    # siblings that already held (regression): wrong content type, empty, not UTF-8, not multipart
    ("/api/messages", "text/plain", b"\xff\xfe"),
    ("/api/messages", "application/json", b""),
    ("/api/dead-letters/retry", "application/x-www-form-urlencoded", b"ids=1"),
    ("/api/media", "application/json", b"{}"),
]


@pytest.mark.parametrize(("path", "content_type", "body"), MALFORMED, ids=range(len(MALFORMED)))
async def test_malformed_api_bodies_are_4xx_with_a_json_error(
    prod: Any, path: str, content_type: str, body: bytes
) -> None:
    """Issue 13.6: deep JSON (msgspec raises RecursionError), multipart without or with a broken
    boundary, a `filename*` that is not UTF-8, an unknown charset in a part: 400 (was 500)."""
    resp = await prod.post(path, data=body, headers={**AUTH, "Content-Type": content_type})
    assert 400 <= resp.status < 500, (resp.status, await resp.text())
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]
    assert _count(prod.app[keys.CONFIG].storage.path, "outbox") == 0


async def test_crlf_in_an_upload_file_name_never_reaches_the_graph_request(prod: Any, graph: FakeGraph) -> None:
    """Issue 13.6: a `filename*` decoding to CR LF went into the part header of the upload Alfred
    builds for Graph (500). The name is reduced to a plain file name first."""
    body = _part("name=\"file\"; filename*=UTF-8''..%2F..%2Fa%0D%0AX-Evil%3A%201%22.jpg")
    resp = await prod.post("/api/media", data=body, headers={**AUTH, "Content-Type": MP})
    assert resp.status == 201, await resp.text()
    [upload] = graph.uploads
    assert unquote(upload.filename or "") == "a__X-Evil: 1_.jpg"  # aiohttp's form quotes what it sends


async def test_broken_chunked_encoding_is_400_not_500(client: TestClient[Any, Any]) -> None:
    """Issue 13.6/13.10: a chunk size that is not hex, on the webhook and on the API."""
    callers = (("/webhook", f"X-Hub-Signature-256: {SIG}"), ("/api/messages", f"Authorization: Bearer {API_TOKEN}"))
    for path, auth in callers:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        status = await raw_exchange(client.server.port, head + b"zz\r\nxx\r\n0\r\n\r\n")
        assert status.split()[1] == b"400", (path, status)
    assert (await client.get("/healthz")).status == 200


async def test_behind_a_proxy_the_per_peer_cap_uses_the_client_address_header(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    """Issue 13.1 behind Fly.io's proxy: every connection comes from the proxy, so the cap is per
    `webhook.client_ip_header` (set by the proxy) instead of per socket address."""
    webhook = {"max_body_bytes": 100_000, "max_inflight_bytes": 1_000_000, "max_inflight_per_peer": 100_000}
    cfg = make_config(tmp_path, webhook={**webhook, "client_ip_header": "Fly-Client-IP", "body_timeout_seconds": 5})
    client = await aiohttp_client(create_app(cfg, secrets))

    def head(client_ip: str) -> bytes:
        return _head(b"", SIG, length=100_000, extra=f"Fly-Client-IP: {client_ip}\r\n")

    held = [await _hold(client.server.port, head("203.0.113.7"), b" " * 90_000, peer="127.0.0.1")]
    try:
        await wait_for(lambda: client.app[keys.BODY_BUDGET].peers == {"203.0.113.7": 90_000})
        held.append(await _hold(client.server.port, head("203.0.113.7"), b" " * 20_000, peer="127.0.0.1"))
        assert (await asyncio.wait_for(held[-1][0].readline(), 3)).startswith(b"HTTP/1.1 503")
        held.append(await _hold(client.server.port, head("198.51.100.9"), b" " * 20_000, peer="127.0.0.1"))
        await wait_for(lambda: client.app[keys.BODY_BUDGET].peers.get("198.51.100.9") == 20_000)
    finally:
        _close_all(held)


def _fragments(secret: str, width: int = 12) -> set[str]:
    return {secret.lower()[i : i + width] for i in range(len(secret) - width + 1)}


def _leaks(text: str, secrets: list[str]) -> list[str]:
    """Which secrets have a 12-character stretch in `text`, in any letter case."""
    folded = text.lower()
    return [s for s in secrets if any(f in folded for f in _fragments(s))]


def test_redactor_catches_case_fragments_and_embedding_and_leaves_the_rest() -> None:
    """Issue 13.7, the redactor alone: exact-match replace missed all of these."""
    token = "EAAGm0PX4ZCpsBAKZAaKxUeQd6ZAiOPZC0LZBaX4bZAvbZAm0bZB1ZBa9"
    redact = Redactor([token, "tiny5", "  "])
    assert redact(f"Invalid {token.upper()} token") == "Invalid [redacted] token"
    assert redact(f"Cannot parse {token[:14]}…") == "Cannot parse [redacted]…"
    assert redact(f"url?access_token={token[5:40]}&x=1") == "url?access_token=[redacted]&x=1"
    assert redact(f"{token[:12]} and {token[-12:]}") == "[redacted] and [redacted]"
    assert redact(f"{token[:11]} is too short to tell") == f"{token[:11]} is too short to tell"
    assert redact("a TINY5 secret is matched whole") == "a [redacted] secret is matched whole"
    assert redact("İstanbul " + token.lower()) == "İstanbul [redacted]"  # lower() changes the length of İ
    assert redact("nothing to see") == "nothing to see"
    assert Redactor([])("EAAG") == "EAAG" and not Redactor([" "])


async def test_secrets_echoed_in_any_form_are_stored_and_shown_redacted(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, caplog: Any
) -> None:
    """Issue 13.7: a Graph error echoing the token upper-cased, truncated or embedded was stored
    as is: outbox, `/api/messages/{id}`, `/api/dead-letters`, `/status.json` and the log lines.
    Every configured secret (per-tenant tokens too) is now redacted by any 12-character fragment."""
    caplog.set_level(logging.DEBUG)
    biz_token = "biz-own-token-0123456789abcdef"
    env = {**PROD_ENV, "BIZ_TOKEN": biz_token, "ORCHESTRATOR_API_KEY": "ok-7f3a9c2e5b1d8f4a6c0e"}
    tenants = {"home": {"phone_number_id": payloads.PNID}, "biz": {"phone_number_id": payloads.BIZ_PNID}}
    tenants["biz"]["access_token_env"] = "BIZ_TOKEN"
    cfg = prod_config(tmp_path, graph, tenants=tenants)
    secrets = load_secrets(env, cfg=cfg)
    client = await aiohttp_client(create_app(cfg, secrets))
    echoes = {
        "15550000001": (f"Malformed access token {ACCESS_TOKEN.upper()}", "details"),
        "15550000002": ("Cannot parse access token", f"token was {ACCESS_TOKEN[:13]}"),
        "15550000003": (f"x{biz_token}y in a url", f"and {API_TOKEN}, {VERIFY_TOKEN.upper()}, {APP_SECRET}"),
    }
    ids = []
    for to, (message, details) in echoes.items():
        graph.script_for("+" + to, graph_error(131026, message=message, details=details))
        template = {"name": "hello", "language": {"code": "en_US"}}
        send = {"to": to, "type": "template", "template": template, "tenant": "biz" if to.endswith("3") else "home"}
        resp = await client.post("/api/messages", json=send, headers=AUTH)
        ids.append((await resp.json())["id"])
    path = cfg.storage.path
    await wait_for(lambda: _count(path, "outbox WHERE state = 'failed'") == 3)
    logging.getLogger("aiohttp.client").warning("a library echoing %s", ACCESS_TOKEN.lower())
    try:
        raise RuntimeError(f"boom {biz_token[3:20]}")
    except RuntimeError:
        logging.getLogger("alfred.test").exception("with a traceback")
    rows = db_rows(path, "SELECT error_message, error_details FROM outbox")
    shown = [json.dumps([dict(r) for r in rows])]
    for outbox_id in ids:
        shown.append(await (await client.get(f"/api/messages/{outbox_id}", headers=AUTH)).text())
    shown.append(await (await client.get("/api/dead-letters", headers=AUTH)).text())
    shown.append(await (await client.get("/status.json", headers=AUTH)).text())
    shown.append(await (await client.get("/", headers=AUTH)).text())
    assert "[redacted]" in shown[1] and "[redacted]" in shown[-3]  # the echoes were kept, minus the secrets
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "a library echoing [redacted]" in logs and "boom [redacted]" in logs
    for where in [*shown, logs]:
        assert _leaks(where, secrets.values()) == [], where


@pytest.mark.usefixtures("saved_logging")
@pytest.mark.parametrize("library_level", ["INFO", "DEBUG"])
async def test_debug_logging_keeps_the_database_driver_quiet_unless_asked(
    capsys: Any, aiohttp_client: Any, tmp_path: Path, secrets: Any, library_level: str
) -> None:
    """Issue 13.8: at `logging.level = "DEBUG"` aiosqlite logged every query with its parameters
    (raw phone numbers). Libraries now stay at `logging.library_level` (INFO) unless asked."""
    setup_logging("DEBUG", "json", library_level=library_level)
    client = await aiohttp_client(create_app(make_config(tmp_path), secrets))
    assert await post_webhook(client, payloads.body_of(payloads.text("hi", id="wamid.DEBUG"))) == 200
    await wait_for(lambda: _count(client.app[keys.CONFIG].storage.path, "inbox WHERE state = 'handled'") == 1)
    send = {"to": payloads.USER, "type": "text", "text": {"body": "reply"}}  # reads by the user's number
    assert (await client.post("/api/messages", json=send, headers=AUTH)).status in (202, 422)  # 422: window
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    driver = [line for line in lines if line["logger"].startswith("aiosqlite")]
    assert any(line["level"] == "DEBUG" and line["logger"].startswith("alfred.") for line in lines)
    if library_level == "INFO":
        assert driver == []
        assert payloads.USER not in json.dumps(lines)
    else:  # asked for: the test can see the driver's lines (so the assertion above means something)
        assert any(payloads.USER in line["msg"] for line in driver)


async def test_every_answer_carries_frame_and_sniff_protection(client: TestClient[Any, Any]) -> None:
    """Issue 13.10: X-Frame-Options and nosniff on every answer: 404, 405, 401, 403, errors,
    static files, /metrics, JSON and the page (only the page had them)."""
    requests = [
        ("GET", "/no/such/page", {}),
        ("DELETE", "/webhook", {}),
        ("GET", "/api/inbound", {}),
        ("POST", "/webhook", {}),
        ("POST", "/api/messages", {**AUTH, "Content-Type": "application/json"}),
        ("GET", "/metrics", {}),
        ("GET", "/healthz", {}),
        ("GET", "/status.json", {}),
        ("GET", "/", {}),
        ("GET", "/static/status.js", {}),
        ("GET", "/webhook", {}),
    ]
    for method, path, headers in requests:
        resp = await client.request(method, path, headers=headers, data=b"{")
        await resp.read()
        assert resp.headers.get("X-Frame-Options") == "DENY", (method, path, resp.status)
        assert resp.headers.get("X-Content-Type-Options") == "nosniff", (method, path, resp.status)
        assert resp.headers.get("Server") == "alfred", (method, path, resp.status)  # no software versions


MALFORMED_HTTP = [
    b"POST /webhook HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
    b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"POST /api/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, x\r\n\r\n",
]


async def test_malformed_requests_log_one_rate_limited_warning_not_a_traceback(
    client: TestClient[Any, Any], caplog: Any
) -> None:
    """Issue 13.10: each malformed request (anyone can send one) logged a full traceback at ERROR
    from aiohttp.server (log amplification). Now one WARNING line each, at most 10 a minute, and
    the first line after the quiet spell says how many were left out."""
    caplog.set_level(logging.DEBUG)
    [quiet] = [f for f in logging.getLogger("aiohttp.server").filters if isinstance(f, BadRequestFilter)]
    now = [1000.0]
    quiet.limit = RateLimit(per_minute=10, clock=lambda: now[0])
    for i in range(40):
        status = await raw_exchange(client.server.port, MALFORMED_HTTP[i % len(MALFORMED_HTTP)])
        assert status.split()[1] == b"400", status
    now[0] += 61
    await raw_exchange(client.server.port, MALFORMED_HTTP[0])
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.levelname for r in server] == ["WARNING"] * 11
    assert all(r.exc_info is None and not r.exc_text for r in server)
    assert "malformed request from 127.0.0.1 refused (BadHttpMessage" in server[0].getMessage()
    assert server[-1].getMessage().endswith("; 30 more not logged in the last minute")
    assert (await client.get("/healthz")).status == 200


async def test_a_handler_bug_still_logs_its_traceback_at_error(
    aiohttp_client: Any, tmp_path: Path, secrets: Any, caplog: Any
) -> None:
    """The quieting is for malformed requests only: a bug in our code stays loud."""
    app = create_app(make_config(tmp_path), secrets)

    async def broken(request: Any) -> Any:
        raise ZeroDivisionError("a bug")

    app.router.add_get("/broken", broken)
    client = await aiohttp_client(app)
    resp = await client.get("/broken")
    assert resp.status == 500 and resp.headers["X-Frame-Options"] == "DENY"
    [record] = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.levelname == "ERROR" and "ZeroDivisionError" in (record.exc_text or "")


class _ElsewhereGraph(FakeGraph):
    """A Graph API whose media URLs point at another server (a spoofed or compromised answer)."""

    elsewhere = ""

    def _media_info(self, request: Any, media: Any) -> Any:
        answer = super()._media_info(request, media)
        if answer.status == 200 and self.elsewhere:
            info = json.loads(answer.body)
            info["url"] = f"{self.elsewhere}/media-bytes/{media.id}/download"
            return web.json_response(info)
        return answer


async def test_media_download_sends_the_token_only_to_metas_hosts(aiohttp_client: Any, tmp_path: Path) -> None:
    """Issue 13.10: the bearer token went to whatever host the media URL named (only plain http to
    another host was refused). Now only `media.download_hosts` (Meta's CDN) and the Graph API's
    own origin get it; a URL elsewhere is a clear MediaError and is never fetched."""
    graph, thief = _ElsewhereGraph(), FakeGraph()
    await graph.start()
    await thief.start()
    try:
        graph.elsewhere = thief.url  # same host, another port: another origin
        thief.add_media("4321", b"\xff\xd8 stolen?", "image/jpeg")
        graph.add_media("4321", b"\xff\xd8 real", "image/jpeg")
        transport = GraphTransport(prod_config(tmp_path, graph).graph, {payloads.PNID: ACCESS_TOKEN}, connections=2)
        await transport.start()
        try:
            with pytest.raises(MediaError, match="must be https"):
                await transport.download(payloads.PNID, "4321", tmp_path / "media", 1 << 20)
            graph.elsewhere = ""
            got = await transport.download(payloads.PNID, "4321", tmp_path / "media", 1 << 20)
            assert Path(got.path).read_bytes() == b"\xff\xd8 real"
        finally:
            await transport.close()
        assert thief.media_requests == []
    finally:
        await graph.close()
        await thief.close()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1&ext=2&hash=3", True),
        ("https://scontent.xx.fbsbx.com/v/t1/abc", True),
        ("https://LOOKASIDE.FBSBX.COM./x", True),
        ("https://fbsbx.com.evil.example/x", False),
        ("https://evilfbsbx.com/x", False),
        ("https://lookaside.fbsbx.com@evil.example/x", False),
        ("http://lookaside.fbsbx.com/x", False),  # never in clear
        ("https://graph.facebook.com:8443/x", False),  # not the Graph API's origin
        ("https://graph.facebook.com/v23.0/x", True),
        ("https://media.example.org/x", True),  # added in the config
        ("/relative/x", False),
        ("ftp://lookaside.fbsbx.com/x", False),
    ],
)
def test_media_url_allow_list(url: str, allowed: bool, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, media={"download_hosts": ["lookaside.fbsbx.com", "*.fbsbx.com", "media.example.org"]})
    origin, hosts = URL(cfg.graph.base_url).origin(), cfg.media.download_hosts
    if allowed:
        media_url(url, origin, hosts)
    else:
        with pytest.raises(MediaError):
            media_url(url, origin, hosts)


@pytest.mark.parametrize(
    ("section", "values", "error"),
    [
        ("media", {"download_hosts": ["https://lookaside.fbsbx.com/"]}, "media.download_hosts: each entry"),
        ("media", {"download_hosts": ["*"]}, "media.download_hosts: each entry"),
        ("webhook", {"max_inflight_per_peer": 1024}, "webhook.max_inflight_per_peer: must be at least"),
        ("webhook", {"client_ip_header": "Fly Client IP"}, "webhook.client_ip_header: must be a header name"),
    ],
)
def test_the_new_security_keys_are_checked(tmp_path: Path, section: str, values: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, **{section: values})
    assert str(caught.value).startswith(error)


async def test_x_api_key_is_accepted_beside_bearer_in_constant_time(
    prod: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13.11: the orchestrator platform sends `X-API-Key`; same token, same comparison."""
    calls: list[int] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert (await prod.get("/api/tenants", headers={"X-API-Key": API_TOKEN})).status == 200
    assert calls
    for headers in (
        {"X-API-Key": API_TOKEN + "x"},
        {"X-API-Key": API_TOKEN.upper()},
        {"X-API-Key": ""},
        {"Authorization": f"Bearer {API_TOKEN}x", "X-API-Key": API_TOKEN},  # a Bearer given wins
    ):
        resp = await prod.get("/api/tenants", headers=headers)
        assert resp.status == 401 and API_TOKEN not in await resp.text()
    both = {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": API_TOKEN}
    assert (await prod.get("/api/tenants", headers=both)).status == 200
