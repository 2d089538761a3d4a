"""The orchestrator bridge: unrouted texts go to a (fake, loopback) agent platform as an envelope,
its `response` comes back to the user; every failure sends the fallback and is counted."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import ConfigError, OrchestratorConfig, load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.orchestrator import Orchestrator, orchestrator_fallback, split_text
from alfred_bot.parse import decode_message
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import ENV, db_rows, make_config, post_webhook, wait_for
from tests.fakes import FakeOrchestrator, Reply

FALLBACK = "Lo siento, no pude procesar tu mensaje."
API_KEY = "orch-secret-key-123"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _app(
    aiohttp_client: Any,
    tmp_path: Path,
    url: str,
    *,
    router: Router | None = None,
    env: dict[str, str] | None = None,
    **orchestrator: Any,
) -> tuple[Any, Path]:
    settings = {"url": url, "timeout_seconds": 0.5, "retries": 1, **orchestrator}
    cfg = make_config(tmp_path, orchestrator=settings)
    secrets = load_secrets({**ENV, "ORCHESTRATOR_API_KEY": API_KEY} if env is None else env, cfg=cfg)
    routers = {"home": router or Router("empty"), "biz": Router("biz")}
    client = await aiohttp_client(create_app(cfg, secrets, routers=routers))
    return client, Path(cfg.storage.path)


async def _send(client: Any, db: Path, *msgs: dict[str, Any], pnid: str = payloads.PNID) -> None:
    assert await post_webhook(client, payloads.body_of(*msgs, pnid=pnid)) == 200
    for msg in msgs:
        await wait_for(
            lambda m=msg: bool(
                db_rows(db, "SELECT 1 FROM inbox WHERE event_id = ? AND state != 'pending'", (m["id"],))
            ),
        )


def _texts(db: Path, event_id: str) -> list[str]:
    rows = db_rows(
        db, "SELECT payload FROM outbox WHERE source_event_id = ? AND type = 'text' ORDER BY idem_key", (event_id,)
    )
    return [json.loads(r[0])["text"]["body"] for r in rows]


def _counts(client: Any) -> Any:
    return client.app[keys.DISPATCHER].counts


# ---------------------------------------------------------------------------- the happy path


async def test_unrouted_text_is_forwarded_as_the_envelope_and_the_answer_sent_back(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    orch.script.append(Reply(body={"response": "¡Hola Ana! ¿En qué te ayudo?", "trace_id": "ignored"}))
    client, db = await _app(aiohttp_client, tmp_path, orch.url)
    await _send(client, db, payloads.text("hola, necesito ayuda", id="wamid.O1"))

    [seen] = orch.requests
    body = seen.body
    trace_id = body["trace_id"]
    assert isinstance(trace_id, str) and len(trace_id) >= 16
    assert body == {
        "trace_id": trace_id,
        "sender_agent": "whatsapp_adapter",
        "receiver_agent": "orchestrator",
        "message_type": "orchestration_request",
        "payload": {
            "user_message": "hola, necesito ayuda",
            "user_id": payloads.USER,
            "session_id": f"whatsapp_{payloads.USER}",
            "metadata": {
                "source": "whatsapp",
                "message_id": "wamid.O1",
                "phone_number": payloads.USER,
                "tenant": "home",
            },
        },
    }
    assert seen.headers["X-Trace-Id"] == trace_id
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert _texts(db, "wamid.O1") == ["¡Hola Ana! ¿En qué te ayudo?"]
    types = [r[0] for r in db_rows(db, "SELECT type FROM outbox WHERE source_event_id = 'wamid.O1' ORDER BY idem_key")]
    assert types == ["read", "text"]  # the user sees "typing…" while the orchestrator thinks
    assert db_rows(db, "SELECT state FROM inbox")[0][0] == "handled"
    assert _counts(client)["orchestrator_failed"] == 0
    assert client.app[keys.ORCHESTRATOR].counts["requests"] == 1


async def test_each_message_gets_its_own_trace_id_and_its_tenant(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    client, db = await _app(aiohttp_client, tmp_path, orch.url)
    await _send(client, db, payloads.text("one", id="wamid.T1"))
    await _send(client, db, payloads.text("two", id="wamid.T2"))
    await _send(client, db, payloads.text("three", id="wamid.T3", sender="15550002222"), pnid=payloads.BIZ_PNID)
    assert len(orch.requests) == 3
    traces = {r.body["trace_id"] for r in orch.requests}
    assert len(traces) == 3
    assert all(r.headers["X-Trace-Id"] == r.body["trace_id"] for r in orch.requests)
    by_message = {r.body["payload"]["metadata"]["message_id"]: r.body["payload"] for r in orch.requests}
    assert by_message["wamid.T3"]["metadata"]["tenant"] == "biz"
    assert by_message["wamid.T3"]["session_id"] == "whatsapp_15550002222"
    assert by_message["wamid.T1"]["metadata"]["tenant"] == "home"
    assert _texts(db, "wamid.T3") == ["default answer"]


async def test_no_authorization_header_without_an_api_key(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    client, db = await _app(aiohttp_client, tmp_path, orch.url, env=dict(ENV))
    await _send(client, db, payloads.text("hi", id="wamid.K1"))
    [seen] = orch.requests
    assert "Authorization" not in seen.headers
    assert _texts(db, "wamid.K1") == ["default answer"]


async def test_api_key_comes_from_the_configured_variable(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    env = {**ENV, "AGENTS_KEY": "other-key-456", "ORCHESTRATOR_API_KEY": "not-this-one"}
    client, db = await _app(aiohttp_client, tmp_path, orch.url, env=env, api_key_env="AGENTS_KEY")
    await _send(client, db, payloads.text("hi", id="wamid.K2"))
    assert orch.requests[0].headers["Authorization"] == "Bearer other-key-456"


async def test_routes_and_default_come_first_and_only_texts_are_forwarded(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    router, seen = Router(), []

    @router.command("help")
    async def help_(message: Message, ctx: Context) -> None:
        seen.append("help")
        ctx.reply("local help")

    @router.default
    async def fallback(message: Message, ctx: Context) -> None:
        seen.append(f"default {message.type}")
        ctx.reply("default handler")

    client, db = await _app(aiohttp_client, tmp_path, orch.url, router=router)
    image = dict(payloads.SAMPLES["image"], id="wamid.R3")
    await _send(client, db, payloads.text("/help", id="wamid.R1"), payloads.text("what?", id="wamid.R2"), image)
    assert [r.body["payload"]["user_message"] for r in orch.requests] == ["what?"]
    assert sorted(seen) == ["default image", "help"]
    assert _texts(db, "wamid.R1") == ["local help"]
    assert _texts(db, "wamid.R2") == ["default answer"]
    assert _texts(db, "wamid.R3") == ["default handler"]


async def test_the_orchestrator_is_a_text_fallback_for_whichever_router_mounts_it(orch: FakeOrchestrator) -> None:
    """`orchestrator_fallback` is an ordinary handler: mounted as a router's text fallback it takes
    the texts no route claims; the bot's own router is left as declared (its default answers)."""
    orch.script.append(Reply(body={"response": "from the agents"}))
    cfg = OrchestratorConfig(url=orch.url, timeout_seconds=0.5, retries=0)
    counts: Counter[str] = Counter()
    assert orchestrator_fallback(None, cfg, counts) is None
    assert orchestrator_fallback(Orchestrator(OrchestratorConfig(), None), cfg, counts) is None  # no url: off
    bot = Router("bot")

    @bot.default
    async def default(message: Message, ctx: Context) -> None:
        ctx.reply("the bot's default")

    def ctx_for(text: str) -> Context:
        message = decode_message(payloads.dump(payloads.text(text)))
        return Context(tenant="home", phone_number_id=payloads.PNID, message=message, contact=None)

    client = Orchestrator(cfg, API_KEY)
    await client.start()
    try:
        mounted = bot.mount(text_fallback=orchestrator_fallback(client, cfg, counts))
        asked, plain = ctx_for("hola"), ctx_for("hola")
        await mounted.handle(asked.message, asked)
        await bot.handle(plain.message, plain)
    finally:
        await client.close()
    assert [(r.type, json.loads(r.payload).get("text")) for r in asked.replies] == [
        ("read", None),  # "typing…" while the orchestrator thinks
        ("text", {"body": "from the agents"}),
    ]
    assert [json.loads(r.payload)["text"]["body"] for r in plain.replies] == ["the bot's default"]
    assert [r.body["payload"]["user_message"] for r in orch.requests] == ["hola"]
    assert counts == {}


async def test_answer_inside_payload_is_accepted(aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator) -> None:
    orch.script.append(Reply(body={"trace_id": "x", "payload": {"response": "nested answer"}}))
    client, db = await _app(aiohttp_client, tmp_path, orch.url)
    await _send(client, db, payloads.text("hi", id="wamid.P1"))
    assert _texts(db, "wamid.P1") == ["nested answer"]


async def test_long_answers_are_split_into_whatsapp_sized_messages(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    words = [f"palabra{i:05d}" for i in range(900)]  # 900 x 13 characters, about 11 700 in all
    answer = " ".join(words)
    orch.script.append(Reply(body={"response": answer}))
    client, db = await _app(aiohttp_client, tmp_path, orch.url)
    await _send(client, db, payloads.text("cuéntame todo", id="wamid.L1"))
    parts = _texts(db, "wamid.L1")
    assert len(parts) == 3
    assert all(0 < len(p) <= 4096 for p in parts)
    assert " ".join(parts).split() == words  # cut between words, nothing lost or reordered


def test_split_text_cuts_at_line_breaks_and_hard_cuts_a_long_word() -> None:
    assert split_text("short") == ["short"]
    assert split_text("a" * 4096) == ["a" * 4096]
    text = "x" * 3000 + "\n" + "y" * 3000
    assert split_text(text) == ["x" * 3000, "y" * 3000]
    assert split_text("z" * 5000) == ["z" * 4096, "z" * 904]
    assert split_text("   ") == []


def test_split_text_stops_at_max_parts_with_an_ellipsis() -> None:
    assert split_text("z" * 5000, max_parts=1) == ["z" * 4095 + "…"]
    words = "uno dos " * 3000  # 24 000 characters: 6 messages uncut
    parts = split_text(words, max_parts=2)
    assert len(parts) == 2 and parts[1].endswith(("uno…", "dos…"))  # cut between words
    assert all(len(p) <= 4096 for p in parts)
    assert split_text("short", max_parts=1) == ["short"]
    assert split_text("a" * 8192, max_parts=2) == ["a" * 4096, "a" * 4096]  # fits exactly: no cut


# ---------------------------------------------------------------------------- failures


FAILURES = [
    ("slow", [Reply(body={"response": "too late"}, delay=0.6)], 0, 1),
    ("slow-retried", [Reply(body={"response": "late"}, delay=0.6), Reply(body={"response": "late"}, delay=0.6)], 1, 2),
    ("http-500", [Reply(status=500, body={"error": "boom"})] * 3, 2, 3),
    ("http-503-html", [Reply(status=503, body=b"<html>down</html>")] * 2, 1, 2),
    ("http-429", [Reply(status=429, body={"error": "slow down"})] * 2, 1, 2),
    ("http-400", [Reply(status=400, body={"error": "bad request"})], 2, 1),
    ("http-401", [Reply(status=401, body={"error": "bad key"})], 2, 1),
    ("bad-json", [Reply(body=b"<html>not json</html>")], 2, 1),
    ("json-list", [Reply(body=b'["response"]')], 2, 1),
    ("no-response", [Reply(body={"trace_id": "t", "payload": {"status": "ok"}})], 2, 1),
    ("empty-response", [Reply(body={"response": "   "})], 2, 1),
    ("response-not-text", [Reply(body={"response": {"text": "hi"}})], 2, 1),
]


@pytest.mark.parametrize(("script", "retries", "attempts"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
async def test_every_failure_sends_the_fallback_once_and_is_counted(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator, script: list[Reply], retries: int, attempts: int
) -> None:
    orch.script.extend(script)
    client, db = await _app(aiohttp_client, tmp_path, orch.url, timeout_seconds=0.25, retries=retries)
    await _send(client, db, payloads.text("hola", id="wamid.F1"))
    assert _texts(db, "wamid.F1") == [FALLBACK]
    assert len(orch.requests) == attempts
    assert _counts(client)["orchestrator_failed"] == 1
    assert client.app[keys.ORCHESTRATOR].counts["failures"] == 1
    assert client.app[keys.ORCHESTRATOR].counts["retries"] == attempts - 1
    assert db_rows(db, "SELECT state FROM inbox")[0][0] == "handled"  # the user heard back


async def test_connection_refused_sends_the_fallback(aiohttp_client: Any, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1/orchestrate"
    client, db = await _app(aiohttp_client, tmp_path, url, retries=1)
    await _send(client, db, payloads.text("hola", id="wamid.F2"))
    assert _texts(db, "wamid.F2") == [FALLBACK]
    assert _counts(client)["orchestrator_failed"] == 1
    assert client.app[keys.ORCHESTRATOR].counts["retries"] == 1


async def test_a_retry_that_succeeds_sends_the_answer(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    orch.script.extend([Reply(status=502, body=b"bad gateway"), Reply(body={"response": "second time lucky"})])
    client, db = await _app(aiohttp_client, tmp_path, orch.url, retries=1)
    await _send(client, db, payloads.text("hola", id="wamid.S1"))
    assert _texts(db, "wamid.S1") == ["second time lucky"]
    assert len(orch.requests) == 2
    assert orch.requests[0].body == orch.requests[1].body  # the same envelope, same trace id
    assert _counts(client)["orchestrator_failed"] == 0


async def test_a_slow_first_attempt_then_success(aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator) -> None:
    orch.script.extend([Reply(body={"response": "late"}, delay=0.6), Reply(body={"response": "in time"})])
    client, db = await _app(aiohttp_client, tmp_path, orch.url, timeout_seconds=0.25, retries=1)
    await _send(client, db, payloads.text("hola", id="wamid.S2"))
    assert _texts(db, "wamid.S2") == ["in time"]
    assert _counts(client)["orchestrator_failed"] == 0


async def test_custom_fallback_text(aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator) -> None:
    orch.script.append(Reply(status=400))
    client, db = await _app(aiohttp_client, tmp_path, orch.url, fallback_text="Try again later.")
    await _send(client, db, payloads.text("hola", id="wamid.C1"))
    assert _texts(db, "wamid.C1") == ["Try again later."]


async def test_webhook_answers_before_the_orchestrator_is_done(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    hold = asyncio.Event()
    orch.script.append(Reply(body={"response": "thought about it"}, hold=hold))
    client, db = await _app(aiohttp_client, tmp_path, orch.url, timeout_seconds=2.0, retries=0)
    assert await post_webhook(client, payloads.body_of(payloads.text("think", id="wamid.W1"))) == 200
    await wait_for(lambda: len(orch.requests) == 1)
    # Meta already has its 200; the orchestrator is still thinking inside a dispatch worker.
    assert db_rows(db, "SELECT state FROM inbox")[0][0] == "pending"
    assert _texts(db, "wamid.W1") == []
    hold.set()
    await wait_for(lambda: _texts(db, "wamid.W1") == ["thought about it"])
    assert db_rows(db, "SELECT state FROM inbox")[0][0] == "handled"


async def test_at_the_default_config_many_users_wait_on_the_orchestrator_at_once(
    aiohttp_client: Any, tmp_path: Path, orch: FakeOrchestrator
) -> None:
    """A slow agent must not queue everyone behind a few handler workers: 40 users' texts are
    all with the orchestrator at the same moment (with 4 workers the 40th waited ten answers)."""
    hold = asyncio.Event()
    orch.script.extend(Reply(body={"response": "thought about it"}, hold=hold) for _ in range(40))
    client, db = await _app(aiohttp_client, tmp_path, orch.url, timeout_seconds=5.0, retries=0)
    msgs = [payloads.text(f"question {i}", id=f"wamid.Q{i}", sender=f"1555000{i:04d}") for i in range(40)]
    assert await post_webhook(client, payloads.body_of(*msgs)) == 200
    await wait_for(lambda: len(orch.requests) == 40)
    hold.set()
    await wait_for(lambda: all(_texts(db, f"wamid.Q{i}") == ["thought about it"] for i in range(40)))


# ---------------------------------------------------------------------------- configuration


def test_retries_times_timeout_must_stay_below_the_handler_timeout(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/v1/orchestrate"
    with pytest.raises(ConfigError, match=r"orchestrator\.timeout_seconds.*dispatch\.handler_timeout_seconds"):
        make_config(tmp_path, orchestrator={"url": url, "timeout_seconds": 10, "retries": 2})  # 30 s == 30 s
    with pytest.raises(ConfigError, match=r"orchestrator\.timeout_seconds"):
        make_config(
            tmp_path,
            orchestrator={"url": url, "timeout_seconds": 4, "retries": 1},
            dispatch={"handler_timeout_seconds": 5},
        )
    ok = make_config(tmp_path, orchestrator={"url": url, "timeout_seconds": 9.9, "retries": 2})
    assert ok.orchestrator.retries == 2
    # Without a url the bridge is off and the product is not checked.
    off = make_config(tmp_path, orchestrator={"timeout_seconds": 60, "retries": 5})
    assert off.orchestrator.url == ""


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"url": "ftp://agents.local/x"}, "orchestrator.url"),
        ({"url": "http://127.0.0.1:9/x", "retries": 6}, "orchestrator.retries"),
        ({"url": "http://127.0.0.1:9/x", "retries": -1}, "orchestrator.retries"),
        ({"url": "http://127.0.0.1:9/x", "timeout_seconds": 0}, "orchestrator.timeout_seconds"),
        ({"url": "http://127.0.0.1:9/x", "api_key_env": "not a name"}, "orchestrator.api_key_env"),
        ({"urll": "http://127.0.0.1:9/x"}, "orchestrator.urll"),
    ],
)
def test_bad_orchestrator_settings_name_the_key(tmp_path: Path, section: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        make_config(tmp_path, orchestrator=section)


def test_the_api_key_never_appears_in_the_secrets_repr(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, orchestrator={"url": "http://127.0.0.1:9/x"})
    secrets = load_secrets({**ENV, "ORCHESTRATOR_API_KEY": API_KEY}, cfg=cfg)
    assert secrets.orchestrator_key == API_KEY
    assert API_KEY in secrets.values()
    assert API_KEY not in repr(secrets)
