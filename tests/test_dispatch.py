"""Dispatch: back-pressure, handler failures, exactly-once replies and recovery after restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError
from alfred_bot.context import Context, ReplyError
from alfred_bot.dispatch import Dispatcher
from alfred_bot.fairqueue import FairQueue
from alfred_bot.models import Message
from alfred_bot.parse import decode_message, parse_body
from alfred_bot.router import Router
from alfred_bot.store import SqliteStore, StoreError
from tests import payloads
from tests.conftest import FaultyStore, db_rows, make_config, post_webhook, wait_for


def _count(path: Any, where: str = "") -> int:
    return int(db_rows(path, f"SELECT COUNT(*) FROM {where}")[0][0])


def _reply_texts(path: Any, event_id: str) -> list[str]:
    rows = db_rows(
        path, "SELECT payload FROM outbox WHERE source_event_id = ? AND type = 'text' ORDER BY idem_key", (event_id,)
    )
    return [json.loads(r[0])["text"]["body"] for r in rows]


class Gate:
    """A handler that blocks until released, counting calls per message id."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.calls: dict[str, int] = {}
        self.router = Router("gate")
        self.router.default(self.handle)

    async def handle(self, message: Message, ctx: Context) -> None:
        self.calls[message.id] = self.calls.get(message.id, 0) + 1
        await self.open.wait()
        ctx.reply(f"done {message.text}")


async def test_full_queue_still_answers_200_and_everything_is_handled(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    cfg = make_config(tmp_path, dispatch={"queue_size": 2, "workers": 1})
    gate = Gate()
    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": gate.router, "biz": gate.router}))
    ids = [f"wamid.BP{i:03d}" for i in range(30)]
    for wid in ids:
        assert await post_webhook(client, payloads.body_of(payloads.text(wid, id=wid))) == 200
    dispatcher = client.app[keys.DISPATCHER]
    assert dispatcher.counts["overflow"] > 0
    assert _count(cfg.storage.path, "inbox WHERE state = 'pending'") >= 28
    gate.open.set()
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 30)
    await wait_for(lambda: not dispatcher.scanning)  # the scan's memory of completions is released
    assert gate.calls == dict.fromkeys(ids, 1)
    for wid in ids:
        assert _reply_texts(cfg.storage.path, wid) == [f"done {wid}"]


async def test_handler_error_marks_failed_and_sends_fallback(aiohttp_client: Any, tmp_path: Path, secrets: Any) -> None:
    cfg = make_config(tmp_path, dispatch={"fallback_text": "Lo siento, no pude procesar tu mensaje."})
    router = Router()

    @router.message("text", text="^boom")
    async def boom(message: Message, ctx: Context) -> None:
        ctx.reply("half of a reply")
        raise RuntimeError("kaput")

    @router.default
    async def fine(message: Message, ctx: Context) -> None:
        ctx.reply("fine")

    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": router}))
    body = payloads.body_of(payloads.text("boom", id="wamid.BOOM"), payloads.text("ok", id="wamid.OK"))
    assert await post_webhook(client, body) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state != 'pending'") == 2)
    state, error = db_rows(cfg.storage.path, "SELECT state, error FROM inbox WHERE event_id = 'wamid.BOOM'")[0]
    assert state == "failed"
    assert error == "RuntimeError: kaput"
    assert _reply_texts(cfg.storage.path, "wamid.BOOM") == ["Lo siento, no pude procesar tu mensaje."]
    assert _reply_texts(cfg.storage.path, "wamid.OK") == ["fine"]
    await wait_for(lambda: client.app[keys.DISPATCHER].counts["failed"] == 1)


async def test_handler_timeout_is_a_failure(aiohttp_client: Any, tmp_path: Path, secrets: Any) -> None:
    cfg = make_config(tmp_path, dispatch={"handler_timeout_seconds": 0.1})
    router = Router()

    @router.default
    async def slow(message: Message, ctx: Context) -> None:
        await asyncio.sleep(10)

    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": router}))
    assert await post_webhook(client, payloads.body_of(payloads.text("slow", id="wamid.SLOW"))) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'failed'") == 1)
    assert db_rows(cfg.storage.path, "SELECT error FROM inbox")[0][0] == "handler timed out"
    assert len(_reply_texts(cfg.storage.path, "wamid.SLOW")) == 1


async def test_no_fallback_when_configured_empty(aiohttp_client: Any, tmp_path: Path, secrets: Any) -> None:
    cfg = make_config(tmp_path, dispatch={"fallback_text": ""})
    router = Router()

    @router.default
    async def bad(message: Message, ctx: Context) -> None:
        raise ValueError("nope")

    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": router}))
    assert await post_webhook(client, payloads.body_of(payloads.text("x", id="wamid.NOFB"))) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'failed'") == 1)
    assert _count(cfg.storage.path, "outbox") == 0


async def test_invalid_reply_is_refused_before_queueing() -> None:
    ctx = Context(tenant="home", phone_number_id=payloads.PNID, message=_decode(payloads.text("hi")), contact=None)
    for bad in ("", "   ", "x" * 4097):
        try:
            ctx.reply(bad)
        except ReplyError:
            pass
        else:
            raise AssertionError(f"accepted {bad[:10]!r}")
    assert ctx.replies == []
    ctx.reply("x" * 4096, quote=True)
    payload = json.loads(ctx.replies[0].payload)
    assert payload["context"] == {"message_id": ctx.message.id}
    assert payload["to"] == "+" + payloads.USER


def _decode(msg: dict[str, Any]) -> Message:
    return decode_message(payloads.dump(msg))


async def test_accepted_but_unhandled_messages_are_handled_after_restart(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    cfg = make_config(tmp_path, dispatch={"shutdown_grace_seconds": 0})
    stuck = Gate()
    first = await aiohttp_client(create_app(cfg, secrets, routers={"home": stuck.router}))
    ids = [f"wamid.RS{i}" for i in range(5)]
    for wid in ids:
        assert await post_webhook(first, payloads.body_of(payloads.text(wid, id=wid))) == 200
    await wait_for(lambda: len(stuck.calls) >= 1)
    await first.close()  # shutdown with handlers still busy: nothing is half-written
    assert _count(cfg.storage.path, "inbox WHERE state = 'pending'") == 5
    assert _count(cfg.storage.path, "outbox") == 0

    again = Gate()
    again.open.set()
    second = await aiohttp_client(create_app(cfg, secrets, routers={"home": again.router}))
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 5)
    assert again.calls == dict.fromkeys(ids, 1)
    assert second.app[keys.DISPATCHER].counts["recovered"] == 5
    for wid in ids:
        assert _reply_texts(cfg.storage.path, wid) == [f"done {wid}"]


async def test_echo_handler_replies(client: Any, cfg: Any) -> None:
    long_text = "é" * 5000
    msgs = [
        payloads.text("héllo 👋 \u202e", id="wamid.E1"),
        payloads.text(long_text, id="wamid.E2"),
        dict(payloads.SAMPLES["image"], id="wamid.E3"),
        dict(payloads.SAMPLES["system"], id="wamid.E4"),
    ]
    assert await post_webhook(client, payloads.body_of(*msgs)) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 4)
    assert _reply_texts(cfg.storage.path, "wamid.E1") == ["You said: héllo 👋 \u202e"]
    [cut] = _reply_texts(cfg.storage.path, "wamid.E2")
    assert len(cut) == 4096 and cut.endswith("…") and cut.startswith("You said: ééé")
    assert _reply_texts(cfg.storage.path, "wamid.E3") == ["Thanks, I got your photo."]
    assert _reply_texts(cfg.storage.path, "wamid.E4") == []


async def test_router_order_and_filters() -> None:
    router = Router()
    seen: list[str] = []

    @router.message("text", text=r"^/help")
    async def help_(message: Message, ctx: Context) -> None:
        seen.append("help")

    @router.message("text")
    async def any_text(message: Message, ctx: Context) -> None:
        seen.append("text")

    assert router.handlers_for(_decode(payloads.text("/help me"))) == [help_, any_text]
    assert router.handlers_for(_decode(payloads.text("hi /help"))) == [any_text]
    assert router.handlers_for(_decode(payloads.SAMPLES["image"])) == []


def _latency_count(metrics_text: str, tenant: str) -> float:
    prefix = f'alfred_handler_latency_seconds_count{{tenant="{tenant}"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics_text.splitlines() if line.startswith(prefix))


async def test_only_messages_the_bot_handled_are_timed(aiohttp_client: Any, tmp_path: Path, secrets: Any) -> None:
    """Handler latency is measured inside the built-ins: an opt-out word or a limited message never
    reaches the bot and is not timed, nor is a handler that fails."""
    cfg = make_config(tmp_path, limits={"inbound_per_user": 2, "inbound_window_seconds": 60})
    router = Router()

    @router.message("text", text="^boom$")
    async def boom(message: Message, ctx: Context) -> None:
        raise RuntimeError("kaput")

    @router.default
    async def fine(message: Message, ctx: Context) -> None:
        ctx.reply("fine")

    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": router}))
    t0 = 1_760_000_000
    texts = ["hi", "STOP", "boom", "over the limit"]
    msgs = [payloads.text(t, id=f"wamid.LAT{i}", timestamp=str(t0 + i)) for i, t in enumerate(texts)]
    for msg in msgs:  # one by one: the limit counts in the order the user wrote
        assert await post_webhook(client, payloads.body_of(msg)) == 200
        done = f"inbox WHERE event_id = '{msg['id']}' AND state != 'pending'"
        await wait_for(lambda done=done: _count(cfg.storage.path, done) == 1)
    states = dict(db_rows(cfg.storage.path, "SELECT event_id, state FROM inbox"))
    assert states == {"wamid.LAT0": "handled", "wamid.LAT1": "handled", "wamid.LAT2": "failed", "wamid.LAT3": "limited"}
    text = await (await client.get("/metrics")).text()
    assert _latency_count(text, "home") == 1.0


async def test_worker_survives_a_failing_completion(aiohttp_client: Any, tmp_path: Path, secrets: Any) -> None:
    cfg = make_config(tmp_path)
    store = FaultyStore(Path(cfg.storage.path), complete=[RuntimeError("injected fault")])
    client = await aiohttp_client(create_app(cfg, secrets, store=store))
    assert await post_webhook(client, payloads.body_of(payloads.text("retry me", id="wamid.FLAKY"))) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 1)
    assert _reply_texts(cfg.storage.path, "wamid.FLAKY") == ["You said: retry me"]
    assert (await client.get("/healthz")).status == 200


# ---------------------------------------------------------------------------- fairness between tenants


async def test_fair_queue_caps_a_lane_and_serves_the_least_busy_first() -> None:
    queue: FairQueue[str] = FairQueue(maxsize=10, cap=2)
    for i in range(5):
        queue.put_nowait("a", f"a{i}")
    assert [await queue.get() for _ in range(2)] == [("a", "a0"), ("a", "a1")]
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # lane "a" holds its cap: a2 waits although a worker is free
    queue.put_nowait("b", "b0")
    assert await asyncio.wait_for(waiting, 1) == ("b", "b0")  # another tenant goes straight through
    queue.put_nowait("b", "b1")
    queue.put_nowait("c", "c0")
    queue.done("a")  # busy now: a 1, b 1, c 0
    assert await queue.get() == ("c", "c0")  # the least busy lane first
    assert await queue.get() == ("a", "a2")  # a tie: the lane served longest ago
    assert await queue.get() == ("b", "b1")
    assert (queue.qsize(), queue.depths(), queue.busy()) == (2, {"a": 2}, {"a": 2, "b": 2, "c": 1})


async def test_fair_queue_bound_covers_every_lane_and_put_waits_for_room() -> None:
    queue: FairQueue[str] = FairQueue(maxsize=2, cap=1)
    queue.put_nowait("a", "a0")
    queue.put_nowait("b", "b0")
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("c", "c0")
    putting = asyncio.ensure_future(queue.put("c", "c0"))
    await asyncio.sleep(0.01)
    assert not putting.done()
    assert await queue.get() == ("a", "a0")
    await asyncio.wait_for(putting, 1)
    assert queue.qsize() == 2


async def test_fair_queue_a_cancelled_getter_passes_its_wakeup_on() -> None:
    queue: FairQueue[str] = FairQueue(maxsize=5, cap=1)
    first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0.01)
    queue.put_nowait("a", "a0")  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs: `second` must get the item
    assert await asyncio.wait_for(second, 1) == ("a", "a0")


def test_tenant_cap_leaves_a_worker_for_every_other_tenant(tmp_path: Path) -> None:
    four = make_config(tmp_path, dispatch={"workers": 4}).dispatch
    assert four.tenant_cap(2) == 3  # 4 workers, 2 tenants
    assert four.tenant_cap(1) == 4
    assert four.tenant_cap(9) == 1
    assert make_config(tmp_path).dispatch.tenant_cap(2) == 99  # the default: 100 workers
    assert make_config(tmp_path, dispatch={"max_workers_per_tenant": 2}).dispatch.tenant_cap(2) == 2
    with pytest.raises(ConfigError, match=r"dispatch\.max_workers_per_tenant"):
        make_config(tmp_path, dispatch={"workers": 2, "max_workers_per_tenant": 3})


async def test_a_database_error_inside_a_handler_leaves_the_message_pending(
    aiohttp_client: Any, tmp_path: Path, secrets: Any
) -> None:
    """Not the handler's fault: no apology, no `failed`; the message is handled once the store answers."""
    cfg = make_config(tmp_path)
    router = Router()
    calls: list[str] = []

    @router.default
    async def reads_the_store(message: Message, ctx: Context) -> None:
        calls.append(message.id)
        if len(calls) == 1:
            raise StoreError("database read failed: the database system is shutting down")
        ctx.reply("done")

    client = await aiohttp_client(create_app(cfg, secrets, routers={"home": router}))
    assert await post_webhook(client, payloads.body_of(payloads.text("x", id="wamid.DBDOWN"))) == 200
    await wait_for(lambda: _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 1, timeout=10)
    assert calls == ["wamid.DBDOWN", "wamid.DBDOWN"]
    assert _reply_texts(cfg.storage.path, "wamid.DBDOWN") == ["done"]  # never the fallback


async def test_the_senders_claim_rides_in_the_completions_commit(tmp_path: Path) -> None:
    """The sender is woken before the completion is written (SQLite's one writer): the claim it
    makes lands in the same group, after the completion, so it leases the reply at once and
    the two share one fsync, where a wake after the commit cost a second transaction."""
    cfg = make_config(tmp_path)
    store = SqliteStore(Path(cfg.storage.path))
    await store.open()
    router = Router()

    @router.default
    async def answer(message: Message, ctx: Context) -> None:
        ctx.reply("hello")

    claims: list[asyncio.Future[list[Any]]] = []

    async def claim() -> list[Any]:
        return await store.claim(time.time(), {"home": 10}, 30.0, frozenset())

    def claim_now() -> None:  # what the woken pump does: claim as soon as it runs
        claims.append(asyncio.ensure_future(claim()))

    dispatcher = Dispatcher(store, {"home": router}, cfg, on_replies=claim_now)
    body = payloads.body_of(payloads.text("hi", id="wamid.J1"))
    fresh = await store.ingest(parse_body(body, {payloads.PNID: "home"}))
    before = store.stats()["commits"]
    await dispatcher.start()
    try:
        dispatcher.offer(fresh)
        await wait_for(lambda: bool(claims) and claims[0].done())
        [job] = claims[0].result()
        assert json.loads(job.payload)["text"]["body"] == "hello"
        assert len(claims) == 1  # one wake: the commit needed no second one
        assert store.stats()["commits"] == before + 1
        assert _count(cfg.storage.path, "inbox WHERE state = 'handled'") == 1
    finally:
        await dispatcher.stop()
        await store.close()
