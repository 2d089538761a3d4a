"""Tracing (issue 14 item 6b): one OpenTelemetry trace per webhook delivery across the async hops.

Everything real: the app via pytest-aiohttp, SQLite under tmp_path, the fake Graph API and the
fake orchestrator as HTTP servers on loopback; the spans land in the SDK's in-memory exporter.
Off (the default) is checked in a fresh interpreter: no OpenTelemetry module is even imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from alfred_bot import logs, tracing
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.graph import send_attributes
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import ACCESS_TOKEN, APP_SECRET, PROD_ENV, db_rows, prod_config, wait_for
from tests.fakes import FakeGraph, FakeOrchestrator, Reply
from tests.test_orchestrator import API_KEY

REPO = Path(__file__).resolve().parent.parent
TEXT = "my secret plans for tuesday"
ANSWER = "the orchestrator's private answer"


@pytest.fixture
async def orch() -> Any:
    fake = FakeOrchestrator(default=Reply(body={"response": ANSWER}))
    await fake.start()
    yield fake
    await fake.close()


async def _run(
    aiohttp_client: Any,
    tmp_path: Path,
    graph: FakeGraph,
    orch: FakeOrchestrator,
    exporter: InMemorySpanExporter | None,
    trace_header: str | None = None,
) -> tuple[str, Path]:
    """A text no route claims → the orchestrator → its answer sent (read receipt + text). Returns
    the trace id the webhook echoed and the database path."""
    cfg = prod_config(tmp_path, graph, orchestrator={"url": orch.url, "timeout_seconds": 2.0, "retries": 0})
    secrets = load_secrets({**PROD_ENV, "ORCHESTRATOR_API_KEY": API_KEY}, cfg=cfg)
    routers = {"home": Router("empty"), "biz": Router("biz")}
    client = await aiohttp_client(create_app(cfg, secrets, routers=routers, span_exporter=exporter))
    body = payloads.body_of(payloads.text(TEXT))
    headers = payloads.headers(body, APP_SECRET)
    if trace_header is not None:
        headers["X-Trace-Id"] = trace_header
    resp = await client.post("/webhook", data=body, headers=headers)
    assert resp.status == 200
    await wait_for(lambda: len(graph.sends) == 2)  # read receipt ("typing…") and the answer
    db = Path(cfg.storage.path)
    await wait_for(lambda: len(db_rows(db, "SELECT 1 FROM outbox WHERE state = 'sent'")) == 2)
    if exporter is not None:
        await wait_for(lambda: len(_named(exporter, "send")) == 2)
    return resp.headers["X-Trace-Id"], db


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    spans = _named(exporter, name)
    assert len(spans) == 1, f"{name}: {len(spans)} spans"
    return spans[0]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_webhook_makes_one_trace_through_commit_handler_orchestrator_and_sends(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, orch: FakeOrchestrator
) -> None:
    exporter = InMemorySpanExporter()
    trace_id, db = await _run(aiohttp_client, tmp_path, graph, orch, exporter)
    spans = exporter.get_finished_spans()
    webhook, commit, handler, call = (_one(exporter, n) for n in ("webhook", "commit", "handler", "orchestrator"))
    sends = _named(exporter, "send")

    assert {s.context.trace_id for s in spans} == {int(trace_id, 16)}  # one trace, Alfred's trace id
    assert webhook.parent is None
    assert webhook.context.span_id == tracing.webhook_span_id(trace_id)
    assert _parent(commit) == _parent(handler) == webhook.context.span_id
    assert all(_parent(s) == webhook.context.span_id for s in sends)  # found from the outbox row's trace id
    assert _parent(call) == handler.context.span_id
    assert webhook.start_time is not None and handler.start_time is not None
    assert commit.end_time is not None and commit.end_time <= handler.start_time  # handled after the commit

    assert webhook.attributes is not None and webhook.attributes["http.response.status_code"] == 200
    assert dict(commit.attributes or {}) == {"alfred.updates": 1, "alfred.fresh": 1}
    assert handler.attributes is not None
    assert handler.attributes["alfred.tenant"] == "home" and handler.attributes["alfred.message_type"] == "text"
    assert handler.attributes["alfred.outcome"] == "handled" and handler.attributes["alfred.replies"] == 2
    ids = {r["id"]: r["type"] for r in db_rows(db, "SELECT id, type FROM outbox")}
    seen = {}
    for send in sends:
        attrs = dict(send.attributes or {})
        assert attrs["alfred.tenant"] == "home" and attrs["http.response.status_code"] == 200
        assert attrs["alfred.outcome"] == "sent" and attrs["alfred.trace_id"] == trace_id
        seen[attrs["alfred.outbox_id"]] = attrs["alfred.type"]
    assert seen == ids  # each Graph call names its outbox row and type

    # the orchestrator got the W3C traceparent of its call's span, beside X-Trace-Id
    (request,) = orch.requests
    assert request.headers["X-Trace-Id"] == trace_id
    assert request.headers["traceparent"] == f"00-{trace_id}-{call.context.span_id:016x}-01"

    # never a phone number, wamid, text, token or key in a span
    dump = json.dumps([json.loads(s.to_json()) for s in spans])
    wamid = db_rows(db, "SELECT event_id FROM inbox")[0]["event_id"]
    for private in (payloads.USER, wamid, TEXT, ANSWER, ACCESS_TOKEN, APP_SECRET, API_KEY):
        assert private not in dump


async def test_a_caller_trace_id_that_is_not_w3c_shaped_is_hashed_into_the_trace_id(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, orch: FakeOrchestrator
) -> None:
    exporter = InMemorySpanExporter()
    trace_id, _ = await _run(aiohttp_client, tmp_path, graph, orch, exporter, trace_header="load-test:42")
    assert trace_id == "load-test:42"
    otel_id = tracing.otel_trace_id(trace_id)
    assert {s.context.trace_id for s in exporter.get_finished_spans()} == {otel_id}
    assert orch.requests[0].headers["X-Trace-Id"] == "load-test:42"
    assert orch.requests[0].headers["traceparent"].startswith(f"00-{otel_id:032x}-")


async def test_off_by_default_no_traceparent_and_the_same_answers(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, orch: FakeOrchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    trace_id, _ = await _run(aiohttp_client, tmp_path, graph, orch, None)
    assert not tracing.on()
    (request,) = orch.requests
    assert request.headers["X-Trace-Id"] == trace_id
    assert "traceparent" not in {h.lower() for h in request.headers}
    assert graph.texts() == [ANSWER]


def _python(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


#: Starts and stops the real app (every cleanup context) and opens one root span through the helpers.
_LIFECYCLE = """
import asyncio, sys, tempfile
from pathlib import Path
from aiohttp import web
from alfred_bot import logs, tracing
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.graph import send_attributes
from tests.conftest import ENV, make_config

async def main():
    cfg = make_config(Path(tempfile.mkdtemp()))
    runner = web.AppRunner(create_app(cfg, load_secrets(ENV)))
    await runner.setup()
    with tracing.root("webhook", "0af7651916cd43dd8448eb211c80319c", {}):
        headers = {}
        tracing.inject(headers)
    await runner.cleanup()
    print("ON" if tracing.on() else "OFF", sorted(headers), file=sys.stderr)
    print("IMPORTED", sorted(m for m in sys.modules if m.startswith("opentelemetry")), file=sys.stderr)

asyncio.run(main())
"""


def test_off_imports_no_opentelemetry_module_and_makes_no_span() -> None:
    done = _python(_LIFECYCLE)
    assert done.returncode == 0, done.stderr
    assert "OFF []" in done.stderr
    assert "IMPORTED []" in done.stderr
    assert done.stdout == ""


def test_console_exporter_batches_and_flushes_on_shutdown() -> None:
    done = _python(_LIFECYCLE, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="alfred-test")
    assert done.returncode == 0, done.stderr
    span = json.loads(done.stdout)  # printed by the batch processor when the app shut down
    assert span["name"] == "webhook"
    assert span["context"]["trace_id"] == "0x0af7651916cd43dd8448eb211c80319c"
    assert span["resource"]["attributes"]["service.name"] == "alfred-test"


def test_a_bad_otel_setting_stops_the_start_with_a_clear_error() -> None:
    done = _python(_LIFECYCLE, OTEL_TRACES_EXPORTER="zipkin")
    assert done.returncode != 0
    assert "OTEL_TRACES_EXPORTER: zipkin not supported" in done.stderr


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": " Console , otlp,console"}, ["console", "otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ["otlp"]),
        # the traces-specific protocol wins over the general one (OTel's precedence)
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            ["otlp"],
        ),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ["console"]),
    ],
)
def test_the_otel_variables_decide_whether_and_where(env: dict[str, str], wanted: list[str]) -> None:
    assert tracing.exporters_wanted(env) == wanted


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"OTEL_TRACES_EXPORTER": "otlp,jaeger"}, "jaeger not supported"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "only http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "grpc"),
    ],
)
def test_what_alfred_cannot_export_is_refused_by_name(env: dict[str, str], error: str) -> None:
    with pytest.raises(tracing.TracingConfigError, match=error):
        tracing.exporters_wanted(env)


def test_service_name_and_ids() -> None:
    assert tracing.service_name({}) == tracing.service_name({"OTEL_SERVICE_NAME": " "}) == "alfred"
    assert tracing.service_name({"OTEL_SERVICE_NAME": "bot-eu"}) == "bot-eu"
    w3c = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.otel_trace_id(w3c) == int(w3c, 16)
    assert tracing.otel_trace_id("0" * 32) != 0  # all zero is invalid in W3C: hashed instead
    assert tracing.otel_trace_id("abc") == tracing.otel_trace_id("abc") != tracing.otel_trace_id("abd")
    assert 0 < tracing.otel_trace_id("abc") < 2**128
    assert 0 < tracing.webhook_span_id(w3c) < 2**64
    assert tracing.webhook_span_id(w3c) == tracing.webhook_span_id(w3c) != tracing.webhook_span_id("abc")


def test_the_otlp_exporter_is_built_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OTLP/HTTP exporter reads its endpoint from OTEL_* itself; nothing is sent until a span ends."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    provider = tracing.build({"OTEL_TRACES_EXPORTER": "otlp"})
    assert provider is not None
    provider.shutdown()
    assert tracing.build({}) is None


@pytest.mark.parametrize(("sampler", "kept"), [("always_on", True), ("always_off", False)])
def test_later_hops_follow_the_webhook_sampling_decision(
    monkeypatch: pytest.MonkeyPatch, sampler: str, kept: bool
) -> None:
    """`follow` rebuilds the webhook span's sampled flag from the trace id (standard OTEL_TRACES_SAMPLER),
    so a handler or send is kept exactly when its webhook span was; a send without a trace id is a root."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    exporter = InMemorySpanExporter()
    provider = tracing.build({}, exporter)
    assert provider is not None
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with tracing.installed(provider):
        with tracing.root("webhook", trace_id, {}):
            pass
        with tracing.follow("handler", trace_id, {"alfred.tenant": "home"}):
            tracing.note({"alfred.outcome": "handled", "alfred.error": None})
        with tracing.follow("send", None, {}) as none:
            assert none is None  # no trace id: nothing to follow
        with tracing.child("send", {}) as span:
            tracing.annotate(span, {"alfred.outbox_id": "o1"})
    provider.shutdown()
    names = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(names) == (["handler", "send", "webhook"] if kept else [])
    if kept:
        assert names["handler"].parent is not None
        assert names["handler"].parent.span_id == names["webhook"].context.span_id
        assert dict(names["handler"].attributes or {}) == {
            "alfred.tenant": "home",
            "alfred.trace_id": trace_id,
            "alfred.outcome": "handled",
        }
        assert names["send"].parent is None and dict(names["send"].attributes or {}) == {"alfred.outbox_id": "o1"}
    assert not tracing.on()


def test_a_send_span_names_the_type_from_the_body_and_nothing_else_of_it() -> None:
    with logs.bound(trace_id="t", tenant="home", message_id="out-1"):
        text = send_attributes(b'{"messaging_product":"whatsapp","to":"15551234567","type":"text","text":{"body":"x"}}')
        receipt = send_attributes(b'{"messaging_product":"whatsapp","status":"read","message_id":"wamid.X"}')
        broken = send_attributes(b"not json")
    assert text == {"alfred.tenant": "home", "alfred.outbox_id": "out-1", "alfred.type": "text"}
    assert receipt["alfred.type"] == "read" and broken["alfred.type"] == "?"
