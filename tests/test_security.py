"""Security cases not covered by test_webhook.py / test_api.py / test_logs.py (see the issue's Security list).

Already covered elsewhere, not repeated here: missing / empty / sha1= / SHA256= / wrong-length /
wrong-secret / other-body signatures, uppercase hex, a one-byte change, rotation with two secrets
(test_webhook.py); body over the limit by Content-Length and chunked with a small limit, a body
stalled mid-way -> 408 (test_webhook.py); the body budget (test_faults.py); Bearer checks on
GET /api/inbound (test_api.py); a sandbox-mode secret scan (test_logs.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.sender import Pause
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
            assert client.app[keys.BODY_BUDGET].used == 20 * len(BODY)
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
    assert _count(path, "outbox WHERE error_message LIKE '%[redacted]%'") >= 1  # the echo was stored, redacted
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
