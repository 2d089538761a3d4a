"""The application factory: routes, keys and the lifecycle of every long-lived resource.

`create_app` does no I/O. Resources are opened in `cleanup_ctx` generators registered in
dependency order (store → dispatcher) so that shutdown runs in reverse: handlers stop first,
then the store commits what is queued and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

from alfred_bot import api, api_campaigns, hosts, keys, logs, privacy, schedule, tracing, webhook
from alfred_bot import message_templates as templates
from alfred_bot.bus import node as bus
from alfred_bot.cluster import JOIN_GRACE, SENDING_ROLES, ClusterView
from alfred_bot.config import Config, ConfigError, Secrets
from alfred_bot.context import Services
from alfred_bot.dispatch import Dispatcher
from alfred_bot.graph import GraphTransport, SandboxTransport, Transport
from alfred_bot.loader import routers_for
from alfred_bot.orchestrator import Orchestrator
from alfred_bot.outbound.sender import Sender
from alfred_bot.retention import Retention
from alfred_bot.router import Router
from alfred_bot.security import BodyBudget, Redactor, identity_encoding
from alfred_bot.statuspage import page, routes
from alfred_bot.store import Store, StoreError, configured_store
from alfred_bot.telemetry import Telemetry

log = logging.getLogger("alfred.app")


def create_app(
    cfg: Config,
    secrets: Secrets,
    *,
    store: Store | None = None,
    routers: dict[str, Router] | None = None,
    transport: Transport | None = None,
    span_exporter: SpanExporter | None = None,
    role: str = "all",
) -> web.Application:
    """Build the aiohttp app; store, routers and transport can be injected (tests, other engines).

    `role`: `all` does everything; on a shared database `web` only takes webhooks and serves the
    API and the page, `worker` only runs handlers and sends (and answers probes and /metrics).
    Tracing follows the `OTEL_*` variables (off by default); a `span_exporter` turns it on and
    receives every span as it ends (tests use the SDK's in-memory exporter)."""
    host_check = hosts.make_host_check(cfg.server.public_hosts, cfg.server.host)  # first: DNS rebinding
    app = web.Application(
        client_max_size=cfg.webhook.max_body_bytes,
        middlewares=[host_check, api.api_auth, _plain_bodies],
        # bodies are taken as sent: aiohttp would inflate gzip before any byte cap could count it
        handler_args={"auto_decompress": False},
    )
    app[keys.CONFIG] = cfg
    app[keys.SECRETS] = secrets
    app[keys.STORE] = store = store or configured_store(cfg, role=role)
    if role not in ROLES:
        raise ConfigError(f"--role: must be one of {', '.join(ROLES)}, got {role!r}")
    if role != "all" and not store.shared:
        raise ConfigError(f"--role {role} needs a database shared by several nodes (ALFRED_DATABASE_URL)")
    app[keys.ROLE] = role
    app[keys.ROUTERS] = routers if routers is not None else routers_for(cfg)
    app[keys.TENANTS] = cfg.tenant_by_phone_number_id()
    app[keys.WABAS] = cfg.tenant_by_waba_id()
    app[keys.STARTED_AT] = time.time()
    hook = cfg.webhook
    app[keys.BODY_BUDGET] = BodyBudget(
        hook.max_inflight_bytes, per_peer=hook.max_inflight_per_peer, largest=hook.max_body_bytes
    )
    redactor = Redactor(secrets.values())
    app[keys.TRANSPORT] = transport or _transport(cfg, secrets, redactor)
    app[keys.TELEMETRY] = Telemetry(cfg.tenants)
    app[keys.DRAINING] = asyncio.Event()
    _add_workers(app, cfg, secrets)
    _add_routes(app, role)
    page.setup(app)
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(_drain)
    logs.quiet_bad_requests()
    app.cleanup_ctx.append(_redaction_ctx(redactor))
    app.cleanup_ctx.append(tracing.lifecycle(span_exporter))  # before the workers: flushed after they stop
    for ctx in (_store_ctx, _cluster_ctx, _sender_ctx, _dispatcher_ctx, _retention_ctx):
        app.cleanup_ctx.append(ctx)
    # lifecycle: scheduled sends
    app.cleanup_ctx.append(schedule.lifecycle)  # after the sender: stops before it
    # lifecycle: campaigns and templates
    app.cleanup_ctx.append(templates.sync_ctx)  # after the transport starts, stopped before it closes
    # lifecycle: event bus
    bus.install(app)  # nothing without a Redis URL
    return app


ROLES = ("all", "web", "worker")


#: On every answer (404s, 401s, errors, static files, /metrics): nothing of ours is meant to be
#: framed or content-sniffed, no URL of ours should leak to another site as a referrer, and the
#: server's software and versions are nobody's business (aiohttp would name both).
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Server": "alfred",
}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():  # a route's own stricter value stays (the page's CSP is beside)
        if name == "Server" or name not in response.headers:
            response.headers[name] = value


@web.middleware
async def _plain_bodies(request: web.Request, handler: api.Handler) -> web.StreamResponse:
    """415 for a compressed request body anywhere but `/webhook` (which refuses it itself, counted).

    Nobody needs to send Alfred compressed bodies, and inflating one defeats every byte cap.
    """
    if request.path != "/webhook" and not identity_encoding(request.headers.get("Content-Encoding")):
        response = api.error(415, "Content-Encoding is not supported (send the body as is)")
        response.force_close()  # the body stays unread
        return response
    return await handler(request)


def _redaction_ctx(redactor: Redactor) -> Callable[[web.Application], AsyncIterator[None]]:
    """While the app runs, every log record is redacted of every configured secret."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        uninstall = logs.install_redactor(redactor)
        yield
        uninstall()

    return ctx


def _add_workers(app: web.Application, cfg: Config, secrets: Secrets) -> None:
    """Sender, orchestrator client and dispatcher, sharing the store, transport and telemetry."""
    store, transport, telemetry = app[keys.STORE], app[keys.TRANSPORT], app[keys.TELEMETRY]
    # tenants with their own token form their own group; the rest share the global token
    own = secrets.tenant_tokens
    groups = {name: (t.access_token_env or "") if name in own else "" for name, t in cfg.tenants.items()}
    app[keys.SENDER] = sender = Sender(store, transport, cfg, token_groups=groups, telemetry=telemetry)
    app[keys.ORCHESTRATOR] = orchestrator = Orchestrator(
        cfg.orchestrator, secrets.orchestrator_key, telemetry, connections=cfg.dispatch.workers
    )
    check = functools.partial(templates.check_send, store, cfg)
    services = Services(store, transport, cfg.media_dir(), cfg.media.max_download_bytes, cfg.tenants, check)
    routers: dict[str, Router] = app[keys.ROUTERS]
    app[keys.DISPATCHER] = Dispatcher(
        store,
        routers,
        cfg,
        on_replies=sender.wake,
        orchestrator=orchestrator,
        services=services,
        telemetry=telemetry,
    )


def _add_routes(app: web.Application, role: str) -> None:
    """A worker answers probes, metrics and the page; webhooks and the API are for web nodes."""
    add_get, add_post = app.router.add_get, app.router.add_post
    add_get("/healthz", api.healthz)
    routes.add_routes(app)
    add_get("/metrics", api.metrics)
    if role == "worker":
        return
    add_get("/webhook", webhook.verify)
    add_post("/webhook", webhook.receive)
    add_get("/api/inbound", api.inbound)
    add_get("/api/events", api.events)
    add_post("/api/messages", api.send_message)
    add_get("/api/messages/{id}", api.get_message)
    add_get("/api/tenants", api.tenants)
    add_post("/api/tenants/{name}/resume", api.resume_tenant)
    add_get("/api/dead-letters", api.dead_letters)
    add_post("/api/dead-letters/retry", api.retry_dead_letters)
    add_post("/api/media", api.upload_media)
    add_get("/api/audit", api.audit)
    # routes: scheduled sends
    app.router.add_delete("/api/messages/{id}", api.cancel_message)
    # routes: campaigns and templates
    api_campaigns.add_routes(app)


async def _drain(app: web.Application) -> None:
    """Shutdown began (the listener is closed): answer webhooks on open connections with 503."""
    app[keys.DRAINING].set()
    log.info("draining: webhooks now answer 503 until the process exits")


def _transport(cfg: Config, secrets: Secrets, redactor: Redactor) -> Transport:
    """Production sends to the Graph API; sandbox (no access token) to a local sink."""
    if secrets.mode == "sandbox":
        return SandboxTransport()
    workers = cfg.outbound.worker_count(len(cfg.tenants))
    tokens = {t.phone_number_id: secrets.token_for(name) for name, t in cfg.tenants.items()}
    return GraphTransport(
        cfg.graph,
        {k: v for k, v in tokens.items() if v},
        connections=workers,
        download_connections=cfg.dispatch.workers,
        redactor=redactor,
        download_hosts=cfg.media.download_hosts,
    )


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[keys.STORE]
    await store.open()
    log.info("store open")
    yield
    await store.close()
    log.info("store closed")


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """On a shared database: follow the other nodes (page) and take this node's share of each
    number's rate (sending roles); the other nodes' queued sends wake this node's senders."""
    store = app[keys.STORE]
    if not store.shared:
        yield
        return
    sending = app[keys.ROLE] in SENDING_ROLES
    app[keys.CLUSTER] = view = ClusterView(store, on_share=app[keys.SENDER].split if sending else None)
    await view.refresh()
    if sending:
        store.watch(lambda: None, app[keys.SENDER].wake)
    view.start()
    yield
    await view.stop()


async def _sender_ctx(app: web.Application) -> AsyncIterator[None]:
    transport, sender = app[keys.TRANSPORT], app[keys.SENDER]
    await transport.start()  # the API's media upload uses it on every role
    if app[keys.ROLE] in SENDING_ROLES:
        # joining other nodes: wait until they have seen this one and lowered their share
        await sender.start(hold=JOIN_GRACE if app[keys.STORE].shared else 0.0)
    yield
    await sender.stop(app[keys.CONFIG].dispatch.shutdown_grace_seconds)
    await transport.close()


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    dispatcher, orchestrator = app[keys.DISPATCHER], app[keys.ORCHESTRATOR]
    working = app[keys.ROLE] in SENDING_ROLES
    await orchestrator.start()
    if working:
        await dispatcher.start()
    yield
    if working:
        await dispatcher.stop(app[keys.CONFIG].dispatch.shutdown_grace_seconds)
    await orchestrator.close()


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """The retention job: a pass at start-up, then every `retention.interval_seconds`."""
    cfg = app[keys.CONFIG]
    key = privacy.install_key(Path(cfg.storage.path).parent)
    job = Retention(app[keys.STORE], cfg.retention, key, cfg.media_dir(), media_days=cfg.media.retention_days)
    app[keys.RETENTION] = job

    async def loop() -> None:
        while True:
            try:
                await job.run_once()
            except StoreError as exc:  # a full disk must not end retention for good
                log.error("retention pass failed, next try in %.0f s: %s", cfg.retention.interval_seconds, exc)
            except Exception:  # nor a bug in a pass (the archive encodes rows): personal data must go
                log.exception("retention pass failed, next try in %.0f s", cfg.retention.interval_seconds)
            await asyncio.sleep(cfg.retention.interval_seconds)

    task = asyncio.create_task(loop(), name="alfred-retention")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
