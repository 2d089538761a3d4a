"""Conversation state (`ctx.state`, `@router.state`) and scheduled sends (`send_at`, `ctx.schedule`,
`DELETE /api/messages/{id}`, the promoter), through the real app, a real SQLite file and the fake
Graph API on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError, load_secrets
from alfred_bot.context import Context
from alfred_bot.dialog import MAX_AHEAD_SECONDS, DialogState, StateError, UserLocks, send_time
from alfred_bot.models import Message
from alfred_bot.parse import decode_message
from alfred_bot.router import Router
from alfred_bot.schedule import LATE, parse_send_at
from alfred_bot.store import SqliteStore, StoreError
from alfred_bot.store.base import MAX_DIALOG_BYTES, Dialog
from alfred_bot.validate import InvalidMessage
from tests import payloads
from tests.conftest import API_TOKEN, PROD_ENV, db_rows, make_config, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
FAST = {"interval_seconds": 0.05}


def fresh(words: str, **kw: Any) -> dict[str, Any]:
    """A text the user wrote just now (Meta's timestamp opens the 24-hour window)."""
    return payloads.text(words, timestamp=str(int(time.time())), **kw)


# ---------------------------------------------------------------------------- ctx.state, on its own


def test_state_set_update_clear_and_what_is_written() -> None:
    state = DialogState()
    assert (state.step, state.data, state.written()) == (None, {}, None)  # untouched: nothing to write
    state.set("asking", {"what": "plants"}, ttl=60)
    state.update(when="9", step="confirm")
    state.update({"n": 1})
    assert (state.step, state.data, state.get("what"), state.get("nope", 7)) == (
        "confirm",
        {"what": "plants", "when": "9", "n": 1},
        "plants",
        7,
    )
    written = state.written()
    assert written is not None and written.step == "confirm" and json.loads(written.data)["when"] == "9"
    assert written.expires_at is not None and 55 < written.expires_at - time.time() <= 60  # update kept the ttl
    state.clear()
    assert state.written() == Dialog(None, b"{}", None) and Dialog(None).empty
    state.data["x"] = 1  # a copy: the state does not change behind the handler's back
    assert state.data == {}


def test_state_refuses_what_it_cannot_keep() -> None:
    state = DialogState(Dialog("a", b'{"k":1}'))
    with pytest.raises(StateError, match="16384"):
        state.update(blob="x" * MAX_DIALOG_BYTES)
    with pytest.raises(StateError, match="JSON"):
        state.update(when=datetime.now)
    with pytest.raises(StateError, match="string keys"):
        state.set("a", {1: "x"})  # type: ignore[dict-item]
    with pytest.raises(StateError, match="step"):
        state.set("x" * 101)
    with pytest.raises(StateError, match="ttl"):
        state.set("a", ttl=-1)
    assert (state.step, state.data, state.written()) == ("a", {"k": 1}, None)  # a refused change changes nothing


def test_router_state_filters() -> None:
    router = Router()

    async def asking(message: Message, ctx: Context) -> None: ...

    async def idle(message: Message, ctx: Context) -> None: ...

    async def anywhere(message: Message, ctx: Context) -> None: ...

    router.state("asking", "again")(asking)
    router.message("text", state=None)(idle)
    router.message("text")(anywhere)
    msg = decode_message(payloads.dump(payloads.text("hi")))
    assert router.handlers_for(msg, "asking") == [asking, anywhere]
    assert router.handlers_for(msg, "again") == [asking, anywhere]
    assert router.handlers_for(msg, None) == [idle, anywhere]
    assert router.handlers_for(msg, "other") == [anywhere]
    with pytest.raises(ValueError, match="at least one step"):
        router.state()


def test_send_times() -> None:
    now = 1_790_000_000.0  # 2026-09-21
    assert send_time(now + 60, now) == now + 60
    assert send_time(now - 60, now) is None  # the past is now
    assert send_time(timedelta(minutes=5), now) == now + 300
    assert send_time(datetime.fromtimestamp(now + 10, UTC), now) == now + 10
    assert parse_send_at("2027-01-15T09:00:00+01:00", now) == datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert parse_send_at("2027-01-15T08:00:00Z", now) == datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert parse_send_at(int(now) + 5, now) == now + 5
    assert parse_send_at(None, now) is None
    for bad, why in [
        ("2027-01-15T09:00:00", "offset"),
        ("tomorrow", "ISO 8601"),
        (True, "Unix seconds"),
        ([1], "Unix seconds"),
        (math.inf, "finite"),
        (now + MAX_AHEAD_SECONDS + 1, "366 days"),
    ]:
        with pytest.raises(InvalidMessage, match=why) as caught:
            parse_send_at(bad, now)
        assert caught.value.field == "send_at"
    with pytest.raises(InvalidMessage, match="time zone"):
        send_time(datetime(2027, 1, 1), now)  # naive on purpose
    assert send_time(datetime(2027, 1, 1, tzinfo=timezone(timedelta(hours=2))), now) is not None


async def test_user_locks_serialise_one_user_and_forget_idle_users() -> None:
    locks, order = UserLocks(), []

    async def work(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.02)
            order.append(f"{name}-")

    await asyncio.gather(work("u", "a"), work("u", "b"), work("v", "c"))
    assert order.index("a-") < order.index("b+")  # same user: one after the other
    assert order.index("c+") < order.index("a-")  # another user: side by side
    assert len(locks) == 0


def test_config_keys() -> None:
    cfg = make_config(Path("/tmp"), schedule={"interval_seconds": 0.5})
    assert (cfg.schedule.interval_seconds, cfg.tenants["home"].timezone) == (0.5, "UTC")
    tenants = {"home": {"phone_number_id": payloads.PNID, "timezone": "Mars/Olympus"}}
    with pytest.raises(ConfigError, match=r"tenants\.home\.timezone: unknown time zone"):
        make_config(Path("/tmp"), tenants=tenants)
    tenants = {"home": {"phone_number_id": payloads.PNID, "reminder_template": "Bad Name"}}
    with pytest.raises(ConfigError, match=r"tenants\.home\.reminder_template"):
        make_config(Path("/tmp"), tenants=tenants)
    with pytest.raises(ConfigError, match=r"schedule\.interval_seconds"):
        make_config(Path("/tmp"), schedule={"interval_seconds": 0})


# ---------------------------------------------------------------------------- through the app


def counting_router(hold: asyncio.Event | None = None) -> Router:
    """Each text adds one to the user's count (read, wait, write): lost updates would show."""
    router = Router("counting")

    @router.message("text", text="^later")
    async def later(message: Message, ctx: Context) -> None:
        ctx.reply("in a moment", at=timedelta(seconds=0.3))
        ctx.schedule(timedelta(seconds=0.3)).reply_template("we_miss_you", "en_US")

    @router.message("text")
    async def count(message: Message, ctx: Context) -> None:
        n = int(ctx.state.get("n", 0))
        if hold is not None:
            await hold.wait()
        await asyncio.sleep(0.05)
        ctx.state.update(n=n + 1, step="counting")
        ctx.reply(f"n={n + 1}")

    return router


async def _app(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, router: Router, **cfg: Any
) -> TestClient[Any, Any]:
    config = prod_config(tmp_path, graph, schedule=FAST, **cfg)
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(config, load_secrets(PROD_ENV), routers={"home": router})
    )
    return client


async def test_state_goes_with_the_replies_and_one_users_messages_never_race(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """Three texts of one user in one webhook, four handler workers: each handler sees the state
    the previous one wrote (a read-modify-write each), so the count is 3, never less."""
    client = await _app(aiohttp_client, tmp_path, graph, counting_router())
    assert await post_webhook(client, payloads.body_of(fresh("a"), fresh("b"), fresh("c"))) == 200
    await wait_for(lambda: len(graph.texts()) == 3)
    assert graph.texts() == ["n=1", "n=2", "n=3"]
    stored = await client.app[keys.STORE].dialogs.get("home", payloads.USER)
    assert stored is not None and stored.step == "counting" and json.loads(stored.data) == {"n": 3}


async def test_a_handler_stopped_before_its_commit_leaves_neither_state_nor_replies(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """Stop the app while the handler runs (its completion never commits): no reply, no state, the
    message pending; the next start handles it once, state and reply together."""
    hold = asyncio.Event()
    client = await _app(aiohttp_client, tmp_path, graph, counting_router(hold), dispatch={"shutdown_grace_seconds": 0})
    db = tmp_path / "alfred.db"
    assert await post_webhook(client, payloads.body_of(fresh("a", id="wamid.HELD"))) == 200
    await asyncio.sleep(0.2)
    await client.close()
    assert db_rows(db, "SELECT state FROM inbox WHERE event_id = 'wamid.HELD'")[0][0] == "pending"
    assert db_rows(db, "SELECT COUNT(*) FROM dialogs")[0][0] == 0
    assert db_rows(db, "SELECT COUNT(*) FROM outbox WHERE type = 'text'")[0][0] == 0
    again = await _app(aiohttp_client, tmp_path, graph, counting_router())
    await wait_for(lambda: graph.texts() == ["n=1"])
    stored = await again.app[keys.STORE].dialogs.get("home", payloads.USER)
    assert stored is not None and json.loads(stored.data) == {"n": 1}


async def test_a_scheduled_reply_waits_then_the_window_is_checked_again(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """A handler schedules a text and a template for 0.3 s later, answering a message whose
    24-hour window has closed (Meta's timestamp is of 2025): when due, the text fails with the
    reason (no Graph call), the template goes (templates need no window)."""
    # Meta: outside the customer service window only templates may be sent (developers.facebook.com/
    # documentation/business-messaging/whatsapp/messages/send-messages, "Customer service windows")
    client = await _app(aiohttp_client, tmp_path, graph, counting_router())
    db = tmp_path / "alfred.db"
    assert await post_webhook(client, payloads.body_of(payloads.text("later", id="wamid.OLD"))) == 200
    await wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM outbox WHERE source_event_id = 'wamid.OLD'")[0][0] == 2)
    rows = db_rows(db, "SELECT id, type, state, send_at FROM outbox WHERE source_event_id = 'wamid.OLD' ORDER BY type")
    assert [(r["type"], r["state"]) for r in rows] == [("template", "scheduled"), ("text", "scheduled")]
    assert graph.sends == []
    await wait_for(lambda: any(s.body.get("type") == "template" for s in graph.sends))
    text_id = rows[1]["id"]
    resp = await client.get(f"/api/messages/{text_id}", headers=AUTH)
    shown = await resp.json()
    assert (shown["status"], shown["error"]["message"], shown["error"]["needs_template"]) == ("failed", LATE, True)
    assert shown["send_at"] == pytest.approx(rows[1]["send_at"])
    assert graph.texts() == []


async def test_api_send_at_schedules_and_delete_cancels(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await _app(aiohttp_client, tmp_path, graph, counting_router())
    assert await post_webhook(client, payloads.body_of(fresh("hi"))) == 200  # opens the window
    await wait_for(lambda: graph.texts() == ["n=1"])
    soon = datetime.fromtimestamp(time.time() + 0.5, UTC).isoformat()
    body = {"to": payloads.USER, "type": "text", "text": {"body": "scheduled hello"}, "send_at": soon}
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    assert resp.status == 202
    sent = await resp.json()
    assert sent["status"] == "scheduled"
    shown = await (await client.get(f"/api/messages/{sent['id']}", headers=AUTH)).json()
    assert shown["status"] == "scheduled" and shown["send_at"] == pytest.approx(time.time() + 0.5, abs=1)
    later = {**body, "text": {"body": "cancelled hello"}, "send_at": time.time() + 3600}
    cancel_id = (await (await client.post("/api/messages", json=later, headers=AUTH)).json())["id"]
    resp = await client.delete(f"/api/messages/{cancel_id}", headers=AUTH)
    assert (resp.status, await resp.json()) == (200, {"id": cancel_id, "status": "cancelled"})
    assert (await client.delete(f"/api/messages/{cancel_id}", headers=AUTH)).status == 200  # again: still cancelled
    await wait_for(lambda: "scheduled hello" in graph.texts())
    [recorded] = [s.body for s in graph.sends if s.body.get("text", {}).get("body") == "scheduled hello"]
    assert "send_at" not in recorded  # Alfred's own field never goes to Meta
    await wait_for(lambda: _status(client, sent["id"], "sent"))
    resp = await client.delete(f"/api/messages/{sent['id']}", headers=AUTH)
    assert resp.status == 409 and (await resp.json())["status"] in ("sent", "delivered")
    assert (await client.delete("/api/messages/nope", headers=AUTH)).status == 404
    assert (await client.delete(f"/api/messages/{sent['id']}")).status == 401
    assert "cancelled hello" not in graph.texts()


async def _status(client: TestClient[Any, Any], outbox_id: str, wanted: str) -> bool:
    resp = await client.get(f"/api/messages/{outbox_id}", headers=AUTH)
    return bool((await resp.json())["status"] == wanted)


async def test_api_send_at_errors_name_the_field(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await _app(aiohttp_client, tmp_path, graph, counting_router())
    base = {"to": payloads.USER, "type": "template", "template": {"name": "hello", "language": {"code": "en_US"}}}
    for bad in ("2027-01-01T09:00:00", "soon", time.time() + 400 * 86400, False):
        resp = await client.post("/api/messages", json={**base, "send_at": bad}, headers=AUTH)
        assert resp.status == 422
        assert (await resp.json())["field"] == "send_at"
    resp = await client.post("/api/messages", json={**base, "send_at": time.time() - 60}, headers=AUTH)
    assert (resp.status, (await resp.json())["status"]) == (202, "queued")  # the past is now
    assert db_rows(tmp_path / "alfred.db", "SELECT COUNT(*) FROM outbox WHERE state = 'scheduled'")[0][0] == 0


class FlakyDialogs:
    """The real `store.dialogs`, whose first state read fails (the database away for a moment)."""

    def __init__(self, real: Any) -> None:
        self.real, self.failures = real, 1

    async def get(self, tenant: str, user: str) -> Dialog | None:
        if self.failures:
            self.failures -= 1
            raise StoreError("database read failed: connection lost")
        result: Dialog | None = await self.real.get(tenant, user)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_state_read_that_fails_leaves_the_message_pending_not_failed(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    store = SqliteStore(tmp_path / "alfred.db")
    store.dialogs = FlakyDialogs(store.dialogs)  # type: ignore[assignment]
    cfg = prod_config(tmp_path, graph, schedule=FAST)
    app = create_app(cfg, load_secrets(PROD_ENV), store=store, routers={"home": counting_router()})
    client = await aiohttp_client(app)
    assert await post_webhook(client, payloads.body_of(fresh("a", id="wamid.FLAKY"))) == 200
    await wait_for(lambda: graph.texts() == ["n=1"], timeout=10)  # handled on the retry, not failed
    assert db_rows(tmp_path / "alfred.db", "SELECT state FROM inbox WHERE event_id = 'wamid.FLAKY'")[0][0] == "handled"
