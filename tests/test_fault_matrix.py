"""The fault matrix (docs: ../shared/reference/reliability.md), end to end: real app, real SQLite,
a fake Graph API on loopback. One test (or case) per row that other files do not already cover.

| row | fault | covered by |
|---|---|---|
| F1 | 429 / 130429 / 4 / 80007, Retry-After | here (every code, Retry-After honoured); test_sender (130429 slows) |
| F2 | 131056 pair rate | test_sender::test_pair_limit_delays_only_that_recipient |
| F3 | 5xx, 131016, 131057, 2, 133004 | here (each code; dead letter only after max attempts / max age) |
| F3 | reset, refused, slow answer > timeout | test_sender (reset, refused, slow); here: hang, stall, cut, garbage |
| F4 | 131000, 1, non-JSON, empty body | here (limited retries, raw answer kept); test_sender (131000) |
| F5 | 100 / 131026 / 131009 / 132001 / ... | here (one attempt, no storm); test_sender (131026) |
| F6 | 131047 (sync) | here; async as a `failed` status: test_sender |
| F7 | 190 / 0 / 10 / codeless 401 | here (who pauses, queue kept, probe resumes); test_sender (190) |
| F8 | 368 / 131048 / 131031 / 131042 | here (only that number pauses); test_sender (368) |
| F9 | disk full on our side | here (under load, API, sender settle); test_webhook/test_faults (webhook 503) |
| F10 | power loss | here (pragmas in force; what a crash right after the 200 leaves on disk) |
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import dispatch, keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from tests import payloads
from tests.chaos_helpers import RawGraph, SettleFaultStore, fill_up, make_room
from tests.conftest import API_TOKEN, APP_SECRET, PROD_ENV, db_rows, post_webhook, prod_config, wait_for
from tests.fakes import Answer, FakeGraph, graph_error

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
TO = "+" + payloads.USER


async def _app(aiohttp_client: Any, tmp_path: Path, fake: Any, **sections: Any) -> tuple[Any, Any]:
    cfg = prod_config(tmp_path, fake, **sections)
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV)))
    return client, cfg


async def _template(client: Any, name: str, to: str = payloads.USER, tenant: str = "home") -> str:
    """One business-initiated send (no read receipt, no 24-hour window): its outbox id."""
    body = {"to": to, "type": "template", "template": {"name": name, "language": {"code": "en_US"}}, "tenant": tenant}
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    assert resp.status == 202, await resp.text()
    outbox_id: str = (await resp.json())["id"]
    return outbox_id


def _row(cfg: Any, outbox_id: str) -> sqlite3.Row:
    return db_rows(cfg.storage.path, "SELECT * FROM outbox WHERE id = ?", (outbox_id,))[0]


def _state(cfg: Any, outbox_id: str) -> str:
    return str(_row(cfg, outbox_id)["state"])


def _sends(graph: FakeGraph, name: str) -> list[float]:
    return [r.at for r in graph.sends if r.body.get("template", {}).get("name") == name]


# ---------------------------------------------------------------- F1 throughput, Retry-After


@pytest.mark.parametrize(
    ("answer", "slows"),
    [
        (graph_error(130429, 400), True),
        (graph_error(130429, 429), True),
        (graph_error(4, 400), True),
        (graph_error(80007, 400), True),
        (Answer(status=429, body=b"<html>Too Many Requests</html>"), True),
        (Answer(status=503, body=b""), False),
    ],
    ids=["130429@400", "130429@429", "4", "80007", "429-html", "503-empty"],
)
async def test_f1_retry_after_is_honoured_and_throttles_slow_the_number(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, answer: Answer, slows: bool
) -> None:
    """Backoff here is at most 0.05 s: a second attempt 0.4 s later can only come from Retry-After."""
    client, cfg = await _app(aiohttp_client, tmp_path, graph)
    graph.script_for(TO, Answer(answer.status, answer.body, headers={"Retry-After": "0.4"}))
    outbox_id = await _template(client, "throttled")
    await wait_for(lambda: _state(cfg, outbox_id) == "sent")
    first, second = _sends(graph, "throttled")
    assert second - first >= 0.38
    assert _row(cfg, outbox_id)["attempts"] == 2
    assert client.app[keys.SENDER].slowed("home") is slows


# ---------------------------------------------------------------- F3 transient


TRANSIENT = {
    "2": graph_error(2, 503),
    "131016": graph_error(131016, 503),
    "131057": graph_error(131057, 400),
    "133004": graph_error(133004, 503),
    "500-html": Answer(status=500, body=b"<html>oops</html>"),
    "502-empty": Answer(status=502, body=b""),
    "504-json-no-code": Answer(status=504, body={"error": {"message": "gateway"}}),
}


@pytest.mark.parametrize("kind", TRANSIENT)
async def test_f3_transient_errors_dead_letter_only_after_max_attempts(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, kind: str
) -> None:
    client, cfg = await _app(aiohttp_client, tmp_path, graph, outbound={"max_attempts": 3})
    graph.script_for(TO, *[TRANSIENT[kind]] * 2)
    survives = await _template(client, "two-failures-then-ok")
    await wait_for(lambda: _state(cfg, survives) == "sent")
    assert _row(cfg, survives)["attempts"] == 3
    graph.script_for(TO, *[TRANSIENT[kind]] * 3)
    gives_up = await _template(client, "three-failures")
    await wait_for(lambda: _state(cfg, gives_up) == "failed")
    row = _row(cfg, gives_up)
    assert row["attempts"] == 3 and "gave up after 3 attempts" in row["error_message"]
    await asyncio.sleep(0.1)
    assert len(_sends(graph, "three-failures")) == 3  # no fourth attempt


async def test_f3_transient_errors_dead_letter_after_max_age(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client, cfg = await _app(aiohttp_client, tmp_path, graph, outbound={"max_age_seconds": 0.3})
    graph.script_for(TO, *[graph_error(131016, 503)] * 200)
    outbox_id = await _template(client, "too-old")
    await wait_for(lambda: _state(cfg, outbox_id) == "failed")
    assert "too old" in _row(cfg, outbox_id)["error_message"]


@pytest.mark.parametrize("behaviour", ["hang", "stall_body", "close_body", "garbage"])
async def test_f3_graph_api_misbehaving_below_http_is_retried(
    aiohttp_client: Any, tmp_path: Path, behaviour: str
) -> None:
    """A Graph API that accepts the connection and then hangs, stalls or cuts its answer, or is not HTTP."""
    raw = RawGraph(behaviour)
    await raw.start()
    try:
        client, cfg = await _app(aiohttp_client, tmp_path, raw, graph={"timeout_seconds": 0.3})
        outbox_id = await _template(client, behaviour)
        await wait_for(lambda: _state(cfg, outbox_id) == "sent")
        assert _row(cfg, outbox_id)["attempts"] == 2
        assert [r["template"]["name"] for r in raw.requests] == [behaviour, behaviour]
    finally:
        await raw.close()


async def test_f3_a_hanging_graph_api_blocks_no_webhook_loses_nothing_and_recovers(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """Every send hangs for a while (an outage: after 5 failures in a row attempts stop counting,
    so nothing is dead-lettered for it); webhooks are answered at once meanwhile."""
    raw = RawGraph(*["hang"] * 12)
    await raw.start()
    try:
        client, cfg = await _app(aiohttp_client, tmp_path, raw, graph={"timeout_seconds": 0.2}, outbound={"workers": 2})
        ids = [await _template(client, f"hang{i}", to=f"1555000{i:04d}") for i in range(4)]
        await wait_for(lambda: len(raw.requests) >= 2)
        started = time.monotonic()
        for i in range(5):  # every send worker is stuck on the Graph API meanwhile
            body = payloads.body_of(payloads.text("still here", id=f"wamid.HANG{i}"))
            assert await post_webhook(client, body) == 200
        assert time.monotonic() - started < 1.0
        await wait_for(lambda: all(_state(cfg, i) == "sent" for i in ids), timeout=15)
        assert (await client.get("/healthz")).status == 200
        assert len(raw.requests) >= 12 + 4
    finally:
        await raw.close()


# ---------------------------------------------------------------- F4 unknown answers


UNKNOWN = {
    "131000": graph_error(131000, 500),
    "1": graph_error(1, 400),
    "400-html": Answer(status=400, body=b"<html><body>Bad Request</body></html>"),
    "403-not-json": Answer(status=403, body=b"forbidden, says a proxy"),
    "400-empty": Answer(status=400, body=b""),
}


@pytest.mark.parametrize("kind", UNKNOWN)
async def test_f4_unknown_answers_get_a_few_attempts_then_dead_letter_with_the_answer_kept(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, kind: str
) -> None:
    client, cfg = await _app(aiohttp_client, tmp_path, graph, outbound={"unknown_max_attempts": 3})
    graph.script_for(TO, *[UNKNOWN[kind]] * 3)
    outbox_id = await _template(client, "unknown")
    await wait_for(lambda: _state(cfg, outbox_id) == "failed")
    row = _row(cfg, outbox_id)
    assert row["attempts"] == 3
    assert len(_sends(graph, "unknown")) == 3
    answer = UNKNOWN[kind]
    if isinstance(answer.body, dict):
        assert row["error_code"] == answer.body["error"]["code"]
    else:  # a codeless answer: what Meta said, and its HTTP status, must be readable by the operator
        assert row["error_http_status"] == answer.status
        message = (await (await client.get(f"/api/messages/{outbox_id}", headers=AUTH)).json())["error"]["message"]
        assert f"HTTP {answer.status}" in message, message
        assert answer.body.decode()[:20] in message


@pytest.mark.parametrize("body", [b"", b"<html>accepted</html>", b'{"messages": []}'], ids=["empty", "html", "no-id"])
async def test_f4_a_2xx_without_a_readable_id_is_sent_not_resent(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, body: bytes
) -> None:
    client, cfg = await _app(aiohttp_client, tmp_path, graph)
    graph.script_for(TO, Answer(status=200, body=body))
    outbox_id = await _template(client, "odd-success")
    await wait_for(lambda: _state(cfg, outbox_id) == "sent")
    await asyncio.sleep(0.1)
    assert len(_sends(graph, "odd-success")) == 1
    assert _row(cfg, outbox_id)["wamid"] is None


# ---------------------------------------------------------------- F5 / F6 permanent


@pytest.mark.parametrize("code", [100, 131008, 131009, 131051, 132000, 132001, 131047])
async def test_f5_f6_permanent_errors_are_one_attempt_and_no_storm(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, code: int
) -> None:
    client, cfg = await _app(aiohttp_client, tmp_path, graph)
    graph.script_for(TO, graph_error(code, details=f"details of {code}"))
    outbox_id = await _template(client, "permanent")
    await wait_for(lambda: _state(cfg, outbox_id) == "failed")
    await asyncio.sleep(0.2)
    row = _row(cfg, outbox_id)
    assert (row["attempts"], row["error_code"], row["error_details"]) == (1, code, f"details of {code}")
    assert bool(row["needs_template"]) is (code == 131047)
    assert len(_sends(graph, "permanent")) == 1
    other = await _template(client, "next one")  # the number keeps sending
    await wait_for(lambda: _state(cfg, other) == "sent")


# ---------------------------------------------------------------- F7 / F8 pauses


@pytest.mark.parametrize(
    ("answer", "paused"),
    [
        (graph_error(190, 400), {"home", "biz"}),
        (graph_error(0, 401), {"home", "biz"}),
        (graph_error(10, 403), {"home"}),
        (graph_error(200, 403), {"home"}),
        (Answer(status=401, body=b"<html>Unauthorized</html>"), {"home", "biz"}),
    ],
    ids=["190", "0", "10", "200", "401-codeless"],
)
async def test_f7_token_and_permission_errors_pause_keep_the_queue_and_a_probe_resumes(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, answer: Answer, paused: set[str]
) -> None:
    client, cfg = await _app(aiohttp_client, tmp_path, graph)
    graph.probe_status = 401
    graph.script_for(TO, answer)
    first = await _template(client, "first")
    sender = client.app[keys.SENDER]
    await wait_for(lambda: set(sender.pauses) == paused)
    assert {p.kind for p in sender.pauses.values()} == {"token"}
    queued = [await _template(client, f"waits{i}", to=f"1555000{i:04d}") for i in range(3)]
    biz = await _template(client, "biz", to="15550009999", tenant="biz")
    if "biz" not in paused:
        await wait_for(lambda: _state(cfg, biz) == "sent")  # the other number keeps going
    await asyncio.sleep(0.3)  # several probes fail meanwhile
    assert graph.probes >= 2
    assert {_state(cfg, i) for i in [first, *queued]} == {"queued"}  # kept, never failed
    assert not any(n.startswith("waits") for n in map(lambda r: r.body["template"]["name"], graph.sends))
    graph.probe_status = 200
    await wait_for(lambda: not sender.pauses)
    await wait_for(lambda: {_state(cfg, i) for i in [first, *queued, biz]} == {"sent"})


@pytest.mark.parametrize("code", [131048, 131031, 131042])
async def test_f8_account_problems_pause_only_that_number_until_resumed(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, code: int
) -> None:
    client, cfg = await _app(aiohttp_client, tmp_path, graph)
    graph.script_for(TO, graph_error(code, 403))
    held = await _template(client, "held")
    sender = client.app[keys.SENDER]
    await wait_for(lambda: "home" in sender.pauses)
    assert sender.pauses["home"].kind == "account" and sender.pauses["home"].code == code
    biz = await _template(client, "biz", to="15550009999", tenant="biz")
    await wait_for(lambda: _state(cfg, biz) == "sent")
    await asyncio.sleep(0.3)  # probes do not lift an account problem
    assert set(sender.pauses) == {"home"} and _state(cfg, held) == "queued"
    assert (await client.post("/api/tenants/home/resume", headers=AUTH)).status == 200
    await wait_for(lambda: _state(cfg, held) == "sent")


# ---------------------------------------------------------------- F9 disk full


async def _fill(client: Any, spare_pages: int | None = None) -> None:
    """No room at all, or (with `spare_pages`) room for a few more pages."""
    writer = client.app[keys.STORE].writer
    if spare_pages is None:
        await writer.read(fill_up)
        return
    pages = await writer.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await writer.read(lambda c: c.execute(f"PRAGMA max_page_count = {pages + spare_pages}").fetchone())


async def _free(client: Any) -> None:
    await client.app[keys.STORE].writer.read(make_room)


async def test_f9_disk_full_under_load_never_acks_what_it_did_not_store_and_recovers(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLITE_FULL while 40 webhooks race in: a 200 is always stored, a 5xx never; when space returns
    Meta's redeliveries are accepted, and every message is answered exactly once (the handler's
    completion, which hit the full disk too, is retried without running the handler twice)."""
    monkeypatch.setattr(dispatch, "RETRY_DELAY", 0.02)
    client, cfg = await _app(aiohttp_client, tmp_path, graph)
    texts = {f"wamid.FULL{i:02d}": f"full {i} " + "z" * 3000 for i in range(40)}
    bodies = {w: payloads.body_of(payloads.text(t, id=w, timestamp=str(int(time.time())))) for w, t in texts.items()}
    await _fill(client, spare_pages=8)
    statuses = dict(zip(bodies, await asyncio.gather(*(post_webhook(client, b) for b in bodies.values())), strict=True))
    assert set(statuses.values()) <= {200, 503}
    assert 503 in statuses.values()
    stored = {r[0] for r in db_rows(cfg.storage.path, "SELECT event_id FROM inbox")}
    assert stored == {w for w, s in statuses.items() if s == 200}
    resp = await client.post(
        "/api/messages", json={"to": payloads.USER, "type": "text", "text": {"body": "x"}}, headers=AUTH
    )
    assert resp.status in (422, 503)  # never a 500, never a 202 that was not stored
    await asyncio.sleep(0.1)
    await _free(client)
    for wamid, status in statuses.items():  # Meta redelivers everything that did not get its 200
        if status != 200:
            assert await post_webhook(client, bodies[wamid]) == 200
    await wait_for(lambda: sorted(graph.texts()) == sorted(f"You said: {t}"[:4096] for t in texts.values()), timeout=10)
    await asyncio.sleep(0.2)
    assert len(graph.texts()) == len(texts)  # exactly once each


async def test_f9_api_sends_on_a_full_disk_are_503_never_an_unstored_202(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """API sends until the outbox's pages are full too: each 202 is stored, the first 503 is not,
    and the client's retry with the same idempotency key succeeds once space returns."""
    client, cfg = await _app(aiohttp_client, tmp_path, graph, outbound={"rate_per_second": 0.1})  # nothing drains

    def send(i: int) -> dict[str, Any]:
        template = {"name": f"t{i}-" + "x" * 500, "language": {"code": "en_US"}}
        return {"to": payloads.USER, "type": "template", "template": template, "idempotency_key": f"full-{i}"}

    await _fill(client)
    answers: dict[str, int] = {}
    for i in range(300):
        answers[f"full-{i}"] = (await client.post("/api/messages", json=send(i), headers=AUTH)).status
        if answers[f"full-{i}"] != 202:
            break
    assert list(answers.values())[-1] == 503, answers
    assert set(answers.values()) == {202, 503} or set(answers.values()) == {503}
    keys_stored = {r[0] for r in db_rows(cfg.storage.path, "SELECT idem_key FROM outbox")}
    assert keys_stored == {f"api:home:{k}" for k, status in answers.items() if status == 202}
    await _free(client)
    last = len(answers) - 1
    resp = await client.post("/api/messages", json=send(last), headers=AUTH)
    assert resp.status == 202
    assert f"api:home:full-{last}" in {r[0] for r in db_rows(cfg.storage.path, "SELECT idem_key FROM outbox")}


async def test_f9_status_webhooks_on_a_full_disk_are_503_never_200(client: Any, cfg: Any) -> None:
    statuses = [payloads.status(f"wamid.OUT{i}", "read", biz_opaque_callback_data="y" * 400) for i in range(60)]
    body = payloads.dump(payloads.envelope(payloads.entry(payloads.change(payloads.value(statuses=statuses)))))
    await _fill(client)
    assert await post_webhook(client, body) == 503
    assert db_rows(cfg.storage.path, "SELECT COUNT(*) FROM statuses")[0][0] == 0
    await _free(client)
    assert await post_webhook(client, body) == 200
    assert db_rows(cfg.storage.path, "SELECT COUNT(*) FROM statuses")[0][0] == 60


async def test_f9_a_send_whose_outcome_cannot_be_recorded_is_not_sent_twice(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """Meta accepted the send, then recording `sent` fails (SQLITE_FULL, I/O error). The outcome
    must be kept and its commit retried, as the dispatcher does for a handler's outcome; otherwise
    the row stays `sending` until its lease (30 s+) runs out and is then sent a second time."""
    cfg = prod_config(tmp_path, graph)
    store = SettleFaultStore(Path(cfg.storage.path), fail=1)
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV), store=store))
    outbox_id = await _template(client, "recorded late")
    await wait_for(lambda: len(_sends(graph, "recorded late")) == 1)
    assert store.failed == [outbox_id]
    await wait_for(lambda: _state(cfg, outbox_id) == "sent", timeout=3)
    assert _row(cfg, outbox_id)["wamid"] is not None
    assert len(_sends(graph, "recorded late")) == 1


# ---------------------------------------------------------------- F10 power loss


async def test_f10_durability_pragmas_are_in_force_on_the_writer(client: Any, cfg: Any) -> None:
    """WAL + synchronous=FULL: every commit is fsynced before the 200 (power loss keeps it)."""
    writer = client.app[keys.STORE].writer
    mode = await writer.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    sync = await writer.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    assert (mode, sync) == ("wal", 2)
    conn = sqlite3.connect(cfg.storage.path)  # WAL is a property of the file: any reader sees it
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_f10_the_files_on_disk_hold_the_message_at_the_moment_of_the_200(
    client: Any, cfg: Any, tmp_path: Path
) -> None:
    """Copy the database and its WAL right after the 200, as a crash at that instant would leave
    them (no close, no checkpoint): the copy opens cleanly and holds the message."""
    body = payloads.body_of(payloads.text("on disk", id="wamid.DISK"))
    assert await post_webhook(client, body) == 200
    crash = tmp_path / "crash"
    crash.mkdir()
    for suffix in ("", "-wal"):
        source = Path(cfg.storage.path + suffix)
        if source.exists():
            shutil.copyfile(source, crash / f"alfred.db{suffix}")
    rows = db_rows(crash / "alfred.db", "SELECT event_id, text FROM inbox")
    assert [tuple(r) for r in rows] == [("wamid.DISK", "on disk")]
    assert db_rows(crash / "alfred.db", "PRAGMA integrity_check")[0][0] == "ok"


async def test_f10_a_large_body_is_not_acked_before_it_is_durable(client: Any, cfg: Any) -> None:
    """A 3 MB batch (Meta's maximum) is one commit: all 1000 messages are in the files at the 200."""
    msgs = [payloads.text("y" * 3000, id=f"wamid.BIG{i:04d}") for i in range(1000)]
    body = payloads.body_of(*msgs)
    status = await client.post("/webhook", data=io.BytesIO(body), headers=payloads.headers(body, APP_SECRET))
    assert status.status == 200
    assert db_rows(cfg.storage.path, "SELECT COUNT(*) FROM inbox")[0][0] == 1000
