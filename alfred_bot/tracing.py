"""Optional OpenTelemetry traces: webhook → commit → handler → orchestrator call → send.

Off unless the standard `OTEL_*` variables ask for it (see `exporters_wanted`). Off, this module
imports nothing of OpenTelemetry and every span helper returns one shared no-op context, so the
hot path pays a function call and nothing changes.

One trace per webhook delivery, across tasks and restarts, without storing anything new: the OTel
trace id is Alfred's trace id (already on the inbox and outbox rows) when that is W3C-shaped (32
hex, which `logs.new_trace_id` makes), else a hash of it; the `webhook` span's span id is a hash
of the trace id too. So the handler (a dispatch task, maybe after a restart) and each Graph send
(a lane worker) are made children of the `webhook` span from the trace id alone. The orchestrator
call is a child of the handler span and carries the W3C `traceparent` beside `X-Trace-Id`.

Privacy: span attributes are ids, names, types, counts and codes, never a phone number, a text
or a secret (a user's number is not even in the span names or URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("alfred.tracing")

Attributes = Mapping[str, str | int | float | bool]
EXPORTERS = frozenset({"otlp", "console"})
_HEX32 = re.compile(r"[0-9a-f]{32}")
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()
#: (trace id, span id) the id generator hands out for the next root span (the webhook's), once.
_ROOT_IDS: ContextVar[tuple[int, int] | None] = ContextVar("alfred_root_ids", default=None)


class TracingConfigError(ValueError):
    """The `OTEL_*` variables ask for something Alfred cannot do (the message says what)."""


def exporters_wanted(env: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for ([] means tracing is off, the default).

    On when `OTEL_TRACES_EXPORTER` names `otlp` and/or `console`, or when an OTLP endpoint is set
    (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `otlp`). Off when
    `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Only OTLP over HTTP/protobuf ships.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if "none" in names:
        return []
    unknown = sorted(set(names) - EXPORTERS)
    if unknown:
        supported = "use otlp, console or none"
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} not supported ({supported})")
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    if "otlp" in names:
        _check_protocol(env)
    return list(dict.fromkeys(names))


def _check_protocol(env: Mapping[str, str]) -> None:
    """The OTLP exporter Alfred ships speaks HTTP/protobuf: refuse gRPC or JSON instead of ignoring it."""
    for key in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(key, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise TracingConfigError(f"{key}={protocol[:40]!r}: only http/protobuf is supported")
            return


def service_name(env: Mapping[str, str]) -> str:
    return env.get("OTEL_SERVICE_NAME", "").strip() or "alfred"


def otel_trace_id(trace_id: str) -> int:
    """Alfred's trace id as a W3C trace id: itself when 32 hex (not all zero), else a hash of it."""
    if _HEX32.fullmatch(trace_id) and int(trace_id, 16):
        return int(trace_id, 16)
    return int.from_bytes(hashlib.blake2b(trace_id.encode(), digest_size=16).digest(), "big") or 1


def webhook_span_id(trace_id: str) -> int:
    """The span id of the `webhook` span of this trace: every later hop finds its parent from it."""
    digest = hashlib.blake2b(trace_id.encode(), digest_size=8, person=b"alfred-webhook").digest()
    return int.from_bytes(digest, "big") or 1


class _Active:
    """The installed tracer and the few OpenTelemetry pieces the span helpers need."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace  # noqa: PLC0415 (lazy: off costs no import)
        from opentelemetry.sdk.trace.sampling import Decision  # noqa: PLC0415 (lazy: off costs no import)
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: PLC0415 (lazy: off costs no import)

        self.provider = provider
        self._sample = Decision.RECORD_AND_SAMPLE
        self.tracer: Tracer = provider.get_tracer("alfred_bot")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    def root(self, name: str, trace_id: str, attrs: Attributes) -> AbstractContextManager[Span]:
        token = _ROOT_IDS.set((otel_trace_id(trace_id), webhook_span_id(trace_id)))
        try:
            span = self.tracer.start_span(
                name,
                context=self._trace.set_span_in_context(self._trace.INVALID_SPAN),
                attributes={**attrs, "alfred.trace_id": trace_id},
            )
        finally:
            _ROOT_IDS.reset(token)
        return self._trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True)

    def follow(self, name: str, trace_id: str, attrs: Attributes) -> AbstractContextManager[Span]:
        trace = self._trace
        otel_id = otel_trace_id(trace_id)
        decision = self.provider.sampler.should_sample(None, otel_id, "webhook").decision
        sampled = decision is self._sample
        parent = trace.SpanContext(
            otel_id,
            webhook_span_id(trace_id),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT),
        )
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        attributes = {**attrs, "alfred.trace_id": trace_id}
        return self.tracer.start_as_current_span(name, context=context, attributes=attributes)

    def child(self, name: str, attrs: Attributes) -> AbstractContextManager[Span]:
        return self.tracer.start_as_current_span(name, attributes=attrs)

    def current(self) -> Span | None:
        span = self._trace.get_current_span()
        return span if span.is_recording() else None

    def inject(self, headers: MutableMapping[str, str]) -> None:
        self._propagator.inject(headers)


_ACTIVE: list[_Active] = []  # at most one: the tracer of the running app


def on() -> bool:
    return bool(_ACTIVE)


def root(name: str, trace_id: str, attrs: Attributes) -> AbstractContextManager[Span | None]:
    """A root span (the webhook's) whose ids derive from Alfred's `trace_id` (a no-op when off)."""
    return _ACTIVE[0].root(name, trace_id, attrs) if _ACTIVE else _OFF


def follow(name: str, trace_id: str | None, attrs: Attributes) -> AbstractContextManager[Span | None]:
    """A span under the `webhook` span of `trace_id`, for a hop in another task or process."""
    if not _ACTIVE or not trace_id:
        return _OFF
    return _ACTIVE[0].follow(name, trace_id, attrs)


def child(name: str, attrs: Attributes) -> AbstractContextManager[Span | None]:
    """A span under the current one (a no-op when off)."""
    return _ACTIVE[0].child(name, attrs) if _ACTIVE else _OFF


def annotate(span: Span | None, attrs: Mapping[str, str | int | float | bool | None]) -> None:
    """Set attributes on `span` (None values are skipped; nothing when tracing is off)."""
    if span is not None:
        span.set_attributes({k: v for k, v in attrs.items() if v is not None})


def note(attrs: Mapping[str, str | int | float | bool | None]) -> None:
    """Set attributes on the current span, when tracing is on (for code that did not open it)."""
    if _ACTIVE:
        annotate(_ACTIVE[0].current(), attrs)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the W3C `traceparent` of the current span to outgoing `headers` (nothing when off)."""
    if _ACTIVE:
        _ACTIVE[0].inject(headers)


# ------------------------------------------------------------------------------------ set-up


def build(env: Mapping[str, str], exporter: SpanExporter | None = None) -> TracerProvider | None:
    """The provider the environment asks for (None: off). An injected `exporter` (tests) turns
    tracing on and is exported to synchronously; the configured ones go through a batch processor."""
    kinds = exporters_wanted(env)
    if exporter is None and not kinds:
        return None
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 (lazy: off costs no import)
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 (lazy: off costs no import)
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor  # noqa: PLC0415 (lazy: off costs no import)

    provider = TracerProvider(resource=Resource.create({"service.name": service_name(env)}), id_generator=_ids())
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    for kind in kinds:
        provider.add_span_processor(BatchSpanProcessor(_exporter(kind)))
    return provider


def _exporter(kind: str) -> SpanExporter:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415 (lazy: off costs no import)

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 (lazy: off costs no import)

    return OTLPSpanExporter()  # endpoint, headers, timeout and TLS from the OTEL_EXPORTER_OTLP_* variables


def _ids() -> Any:
    """The SDK's random ids, except for the root span the webhook starts (see `_Active.root`)."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator  # noqa: PLC0415 (lazy: off costs no import)

    class AlfredIds(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            ids = _ROOT_IDS.get()
            return ids[0] if ids is not None else super().generate_trace_id()

        def generate_span_id(self) -> int:
            ids = _ROOT_IDS.get()
            return ids[1] if ids is not None else super().generate_span_id()

    return AlfredIds()


@contextlib.contextmanager
def installed(provider: TracerProvider) -> Iterator[None]:
    """Make `provider` the one the span helpers use while the block runs."""
    _ACTIVE[:] = [_Active(provider)]
    try:
        yield
    finally:
        _ACTIVE.clear()


def lifecycle(
    exporter: SpanExporter | None = None, env: Mapping[str, str] | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's cleanup context: tracing on (if asked) while the app runs; on shutdown the
    provider flushes what is batched and closes its exporters."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        environ = os.environ if env is None else env
        provider = build(environ, exporter)
        if provider is None:
            yield
            return
        log.info(
            "tracing on: service %s, exporters %s",
            service_name(environ),
            ", ".join(exporters_wanted(environ)) or "injected",
        )
        try:
            with installed(provider):
                yield
        finally:  # flush and close even when another part failed to start
            await asyncio.to_thread(provider.shutdown)

    return ctx
