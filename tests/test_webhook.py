"""POST/GET /webhook against the real app and a real SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import SANDBOX_APP_SECRET, load_secrets
from tests import payloads
from tests.conftest import APP_SECRET, ENV, VERIFY_TOKEN, db_rows, make_config, post_webhook, wait_for


def _count(cfg: Any, table: str) -> int:
    return int(db_rows(cfg.storage.path, f"SELECT COUNT(*) FROM {table}")[0][0])


# ---------------------------------------------------------------- verify handshake


async def test_handshake_echoes_challenge(client: TestClient[Any, Any]) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    resp = await client.get("/webhook", params=params)
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert await resp.text() == "1158201444"


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "x"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "x"},
        {"hub.verify_token": VERIFY_TOKEN, "hub.challenge": "x"},
        {"hub.mode": "subscribe", "hub.challenge": "x"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN + "x", "hub.challenge": "x"},
    ],
)
async def test_handshake_refuses(client: TestClient[Any, Any], params: dict[str, str]) -> None:
    resp = await client.get("/webhook", params=params)
    assert resp.status == 403
    assert "x" not in (await resp.text()).replace("verification", "")


async def test_handshake_refused_when_no_verify_token_configured(aiohttp_client: Any, cfg: Any) -> None:
    env = {k: v for k, v in ENV.items() if k != "WHATSAPP_VERIFY_TOKEN"}
    client = await aiohttp_client(create_app(cfg, load_secrets(env)))
    resp = await client.get("/webhook", params={"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "c"})
    assert resp.status == 403


# ---------------------------------------------------------------- signatures


def _sig(body: bytes, secret: str = APP_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


BODY = payloads.body_of(payloads.text("signed?", id="wamid.SIG"))


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha256=" + _sig(BODY, "wrong-secret"),
        "sha1=" + _sig(BODY),
        "SHA256=" + _sig(BODY),
        _sig(BODY),
        "sha256=" + _sig(BODY)[:-2],
        "sha256=" + _sig(BODY) + "00",
        "sha256=" + _sig(BODY + b" "),
        "sha256=" + _sig(BODY[:-1]),
        "sha256=" + "zz" * 32,
        "sha256= " + _sig(BODY)[1:],
    ],
)
async def test_bad_signature_is_403_and_stores_nothing(
    client: TestClient[Any, Any], cfg: Any, header: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["X-Hub-Signature-256"] = header
    resp = await client.post("/webhook", data=BODY, headers=headers)
    assert resp.status == 403
    assert _count(cfg, "inbox") == 0


async def test_one_byte_changed_body_is_refused(client: TestClient[Any, Any], cfg: Any) -> None:
    tampered = BODY.replace(b"signed?", b"signed!")
    resp = await client.post("/webhook", data=tampered, headers={"X-Hub-Signature-256": "sha256=" + _sig(BODY)})
    assert resp.status == 403
    assert _count(cfg, "inbox") == 0


async def test_uppercase_hex_of_the_right_digest_is_accepted(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/webhook", data=BODY, headers={"X-Hub-Signature-256": "sha256=" + _sig(BODY).upper()})
    assert resp.status == 200


async def test_signature_is_over_raw_escaped_bytes(client: TestClient[Any, Any], cfg: Any) -> None:
    """Meta signs its \\u-escaped bytes; the text must still decode exactly."""
    text = "äöå 👋 \u202eevil"
    body = payloads.body_of(payloads.text(text, id="wamid.ESC"))
    assert b"\\u00e4" in body and b"\\ud83d" in body
    reencoded = json.dumps(json.loads(body), ensure_ascii=False).encode()
    resp = await client.post("/webhook", data=body, headers={"X-Hub-Signature-256": "sha256=" + _sig(reencoded)})
    assert resp.status == 403
    assert await post_webhook(client, body) == 200
    assert db_rows(cfg.storage.path, "SELECT text FROM inbox")[0][0] == text


async def test_previous_app_secret_accepted_while_rotating(aiohttp_client: Any, cfg: Any) -> None:
    env = {**ENV, "WHATSAPP_APP_SECRET": "new-secret", "WHATSAPP_APP_SECRET_PREVIOUS": APP_SECRET}
    client = await aiohttp_client(create_app(cfg, load_secrets(env)))
    assert await post_webhook(client, payloads.body_of(payloads.text("a")), "new-secret") == 200
    assert await post_webhook(client, payloads.body_of(payloads.text("b")), APP_SECRET) == 200
    assert await post_webhook(client, payloads.body_of(payloads.text("c")), "other") == 403


async def test_sandbox_secret_when_no_app_secret(aiohttp_client: Any, cfg: Any) -> None:
    client = await aiohttp_client(create_app(cfg, load_secrets({})))
    body = payloads.body_of(payloads.text("hi"))
    resp = await client.post("/webhook", data=body)
    assert resp.status == 403
    assert await post_webhook(client, body, SANDBOX_APP_SECRET) == 200


# ---------------------------------------------------------------- envelope, size, time


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{",
        b"[]",
        b'"text"',
        b"{}",
        b'{"entry": {}}',
        b'{"entry": null}',
        b'{"object": "x"}',
        b"",
        b'{"entry": [{"id": "\xff"}]}',
    ],
)
async def test_broken_envelope_is_400(client: TestClient[Any, Any], cfg: Any, body: bytes) -> None:
    assert await post_webhook(client, body) == 400
    assert _count(cfg, "inbox") == 0


async def test_empty_entry_list_is_fine(client: TestClient[Any, Any]) -> None:
    assert await post_webhook(client, b'{"object":"whatsapp_business_account","entry":[]}') == 200


async def test_too_large_by_content_length_is_413(aiohttp_client: Any, tmp_path: Any, secrets: Any) -> None:
    cfg = make_config(tmp_path, webhook={"max_body_bytes": 4096})
    client = await aiohttp_client(create_app(cfg, secrets))
    big = payloads.body_of(payloads.text("x" * 5000))
    assert await post_webhook(client, big) == 413
    assert await post_webhook(client, payloads.body_of(payloads.text("small"))) == 200


async def test_too_large_chunked_is_413(aiohttp_client: Any, tmp_path: Any, secrets: Any) -> None:
    cfg = make_config(tmp_path, webhook={"max_body_bytes": 4096})
    client = await aiohttp_client(create_app(cfg, secrets))
    big = payloads.body_of(payloads.text("x" * 5000))

    async def chunks() -> Any:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    resp = await client.post("/webhook", data=chunks(), headers=payloads.headers(big, APP_SECRET))
    assert resp.status == 413


async def test_default_limit_accepts_meta_sized_bodies(client: TestClient[Any, Any], cfg: Any) -> None:
    """Meta sends up to 3 MB; the default 4 MiB limit must take it."""
    msgs = [payloads.text("y" * 3000) for _ in range(1000)]
    body = payloads.body_of(*msgs)
    assert 3_000_000 < len(body) < 4 * 1024 * 1024
    assert await post_webhook(client, body) == 200
    assert _count(cfg, "inbox") == 1000


async def test_slow_body_is_cut_off_with_408(aiohttp_client: Any, tmp_path: Any, secrets: Any) -> None:
    cfg = make_config(tmp_path, webhook={"body_timeout_seconds": 0.3})
    client = await aiohttp_client(create_app(cfg, secrets))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    body = payloads.body_of(payloads.text("drip"))
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Hub-Signature-256: {payloads.headers(body, APP_SECRET)['X-Hub-Signature-256']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body[:10])
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 408")
    writer.close()
    assert _count(cfg, "inbox") == 0


# ---------------------------------------------------------------- storage and dedupe


async def test_every_type_is_stored_and_answered(client: TestClient[Any, Any], cfg: Any) -> None:
    msgs = [dict(m, id=f"wamid.ALL.{kind}") for kind, m in payloads.SAMPLES.items()]
    msgs.append(payloads.message("poll", {"question": "?"}, id="wamid.ALL.poll"))
    assert await post_webhook(client, payloads.body_of(*msgs)) == 200
    rows = {r["event_id"]: r for r in db_rows(cfg.storage.path, "SELECT * FROM inbox")}
    assert {r["type"] for r in rows.values()} == {*payloads.SAMPLES, "poll"}
    assert rows["wamid.ALL.image"]["text"] == "a cat"
    assert rows["wamid.ALL.interactive"]["text"] == "Yes"
    assert rows["wamid.ALL.interactive"]["context_id"] == "wamid.BIZ1"
    assert rows["wamid.ALL.text"]["name"] == "Ana"
    await wait_for(lambda: _count(cfg, "inbox WHERE state = 'handled'") == len(msgs))
    # echo answers every type but `system` and `reaction` (silence), each with a read receipt first
    assert _count(cfg, "outbox WHERE type = 'text'") == len(msgs) - 2
    assert _count(cfg, "outbox WHERE type = 'read'") == len(msgs) - 2


async def test_batch_of_entries_changes_statuses_and_fields(client: TestClient[Any, Any], cfg: Any) -> None:
    body = payloads.dump(
        payloads.envelope(
            payloads.entry(
                payloads.change(payloads.value([payloads.text("one"), payloads.text("two")])),
                payloads.change(
                    payloads.value(statuses=[payloads.status("wamid.OUT1"), payloads.status("wamid.OUT1", "read")])
                ),
            ),
            payloads.entry(
                payloads.change(payloads.value([payloads.text("three")], pnid=payloads.BIZ_PNID)),
                payloads.change({"event": "APPROVED", "message_template_id": 7}, "message_template_status_update"),
                payloads.change(payloads.value(errors=[{"code": 131000, "title": "Something went wrong"}])),
                waba="WABA2",
            ),
        )
    )
    assert await post_webhook(client, body) == 200
    tenants = sorted(r[0] for r in db_rows(cfg.storage.path, "SELECT tenant FROM inbox"))
    assert tenants == ["biz", "home", "home"]
    assert [r[0] for r in db_rows(cfg.storage.path, "SELECT key FROM statuses ORDER BY key")] == [
        f"{payloads.PNID}:wamid.OUT1:delivered",  # scoped by phone number id (issue 13.3)
        f"{payloads.PNID}:wamid.OUT1:read",
    ]
    assert sorted(r[0] for r in db_rows(cfg.storage.path, "SELECT field FROM events")) == [
        "errors",
        "message_template_status_update",
    ]


async def test_malformed_items_are_skipped_siblings_kept(client: TestClient[Any, Any], cfg: Any) -> None:
    bad_text = payloads.message("text", None, id="wamid.BAD")
    bad_text["text"] = None  # has an id: kept as an unknown message with its parse error
    no_id = payloads.message("text", {"body": "who?"})
    del no_id["id"]  # no id: nothing to keep it under, skipped
    good = (payloads.text("good", id="wamid.GOOD1"), payloads.text("also", id="wamid.GOOD2"))
    body = payloads.body_of(good[0], bad_text, no_id, good[1])
    assert await post_webhook(client, body) == 200
    rows = db_rows(cfg.storage.path, "SELECT event_id, parse_error FROM inbox ORDER BY event_id")
    assert [r["event_id"] for r in rows] == ["wamid.BAD", "wamid.GOOD1", "wamid.GOOD2"]
    assert rows[0]["parse_error"] and rows[1]["parse_error"] is None
    health = await (await client.get("/healthz")).json()
    assert health["webhook"]["items_skipped"] == 1
    assert health["webhook"]["parse_errors"] == 1


async def test_redelivery_is_stored_dispatched_and_answered_once(client: TestClient[Any, Any], cfg: Any) -> None:
    body = payloads.body_of(payloads.text("once", id="wamid.DUP"))
    for _ in range(3):
        assert await post_webhook(client, body) == 200
    await wait_for(lambda: _count(cfg, "inbox WHERE state = 'handled'") == 1)
    again = payloads.body_of(payloads.text("once", id="wamid.DUP"), payloads.text("new", id="wamid.NEW"))
    assert await post_webhook(client, again) == 200
    await wait_for(lambda: _count(cfg, "inbox WHERE state = 'handled'") == 2)
    await asyncio.sleep(0.05)
    assert _count(cfg, "inbox") == 2
    assert _count(cfg, "outbox WHERE source_event_id = 'wamid.DUP' AND type = 'text'") == 1


async def test_duplicate_status_and_event_stored_once(client: TestClient[Any, Any], cfg: Any) -> None:
    body = payloads.dump(
        payloads.envelope(
            payloads.entry(
                payloads.change(payloads.value(statuses=[payloads.status("wamid.S", "sent")])),
                payloads.change({"event": "APPROVED", "message_template_id": 1}, "message_template_status_update"),
            )
        )
    )
    assert await post_webhook(client, body) == 200
    assert await post_webhook(client, body) == 200
    assert _count(cfg, "statuses") == 1
    assert _count(cfg, "events") == 1


async def test_unknown_phone_number_id_is_acknowledged_not_dispatched(client: TestClient[Any, Any], cfg: Any) -> None:
    stray = "111111111111111"
    body = payloads.dump(
        payloads.envelope(
            payloads.entry(
                payloads.change(payloads.value([payloads.text("who?", id="wamid.STRAY")], pnid=stray)),
                payloads.change(payloads.value(statuses=[payloads.status("wamid.S1")], pnid=stray)),
            )
        )
    )
    assert await post_webhook(client, body) == 200
    rows = db_rows(cfg.storage.path, "SELECT tenant, state FROM inbox")
    assert [tuple(r) for r in rows] == [(None, "unrouted")]
    await asyncio.sleep(0.05)
    assert _count(cfg, "outbox") == 0
    health = await (await client.get("/healthz")).json()
    assert health["webhook"]["updates_unrouted"] == 2
    assert db_rows(cfg.storage.path, "SELECT tenant FROM statuses")[0][0] is None


async def test_disk_full_is_503_then_recovers(client: TestClient[Any, Any], cfg: Any) -> None:
    """SQLITE_FULL (forced with max_page_count) must never be answered 200."""
    writer = client.app[keys.STORE].writer  # type: ignore[attr-defined]
    pages = await writer.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await writer.read(lambda c: c.execute(f"PRAGMA max_page_count = {pages}").fetchone())
    big = payloads.body_of(*[payloads.text("z" * 2000) for _ in range(50)])
    assert await post_webhook(client, big) == 503
    assert _count(cfg, "inbox") == 0
    await writer.read(lambda c: c.execute("PRAGMA max_page_count = 1073741823").fetchone())
    assert await post_webhook(client, big) == 200
    assert _count(cfg, "inbox") == 50


async def test_closed_store_is_503(client: TestClient[Any, Any]) -> None:
    await client.app[keys.STORE].close()
    assert await post_webhook(client, payloads.body_of(payloads.text("late"))) == 503
    assert (await client.get("/healthz")).status == 503
