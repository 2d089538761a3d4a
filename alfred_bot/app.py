"""The application factory: routes, keys and the lifecycle of every long-lived resource.

`create_app` does no I/O. Resources are opened in `cleanup_ctx` generators registered in
dependency order (store → dispatcher) so that shutdown runs in reverse: handlers stop first,
then the store commits what is queued and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from alfred_bot import api, keys, privacy, statuspage, webhook
from alfred_bot.config import Config, Secrets
from alfred_bot.context import Services
from alfred_bot.dispatch import Dispatcher
from alfred_bot.graph import GraphTransport, SandboxTransport, Transport
from alfred_bot.meters import Meters
from alfred_bot.metrics import Metrics
from alfred_bot.orchestrator import Orchestrator
from alfred_bot.retention import Retention
from alfred_bot.router import Router, routers_for
from alfred_bot.security import BodyBudget
from alfred_bot.sender import Sender
from alfred_bot.store import SqliteStore, Store, StoreError

log = logging.getLogger("alfred.app")


def create_app(
    cfg: Config,
    secrets: Secrets,
    *,
    store: Store | None = None,
    routers: dict[str, Router] | None = None,
    transport: Transport | None = None,
) -> web.Application:
    """Build the aiohttp app; store, routers and transport can be injected (tests, other engines)."""
    app = web.Application(client_max_size=cfg.webhook.max_body_bytes, middlewares=[api.api_auth])
    app[keys.CONFIG] = cfg
    app[keys.SECRETS] = secrets
    app[keys.STORE] = store or SqliteStore(Path(cfg.storage.path))
    app[keys.ROUTERS] = routers if routers is not None else routers_for(cfg)
    app[keys.TENANTS] = cfg.tenant_by_phone_number_id()
    app[keys.STATS] = Counter()
    app[keys.STARTED_AT] = time.time()
    app[keys.BODY_BUDGET] = BodyBudget(cfg.webhook.max_inflight_bytes)
    app[keys.TRANSPORT] = transport or _transport(cfg, secrets)
    app[keys.METRICS] = Metrics()
    app[keys.METERS] = Meters(list(cfg.tenants))
    app[keys.DRAINING] = asyncio.Event()
    _add_workers(app, cfg, secrets)
    _add_routes(app)
    statuspage.setup(app)
    app.on_shutdown.append(_drain)
    for ctx in (_store_ctx, _sender_ctx, _dispatcher_ctx, _retention_ctx):
        app.cleanup_ctx.append(ctx)
    return app


def _add_workers(app: web.Application, cfg: Config, secrets: Secrets) -> None:
    """Sender, orchestrator client and dispatcher, sharing the store, transport and metrics."""
    store, transport, metrics = app[keys.STORE], app[keys.TRANSPORT], app[keys.METRICS]
    # tenants with their own token form their own group; the rest share the global token
    own = secrets.tenant_tokens
    groups = {name: (t.access_token_env or "") if name in own else "" for name, t in cfg.tenants.items()}
    app[keys.SENDER] = sender = Sender(store, transport, cfg, token_groups=groups, metrics=metrics)
    sender.on_sent = app[keys.METERS].sent
    app[keys.ORCHESTRATOR] = orchestrator = Orchestrator(cfg.orchestrator, secrets.orchestrator_key, metrics)
    services = Services(store, transport, cfg.media_dir(), cfg.media.max_download_bytes)
    routers: dict[str, Router] = app[keys.ROUTERS]
    app[keys.DISPATCHER] = Dispatcher(
        store,
        routers,
        cfg,
        on_replies=sender.wake,
        orchestrator=orchestrator,
        services=services,
        metrics=metrics,
    )


def _add_routes(app: web.Application) -> None:
    add_get, add_post = app.router.add_get, app.router.add_post
    add_get("/webhook", webhook.verify)
    add_post("/webhook", webhook.receive)
    add_get("/healthz", api.healthz)
    add_get("/status.json", api.status_json)
    add_get("/metrics", api.metrics)
    add_get("/api/inbound", api.inbound)
    add_post("/api/messages", api.send_message)
    add_get("/api/messages/{id}", api.get_message)
    add_get("/api/tenants", api.tenants)
    add_post("/api/tenants/{name}/resume", api.resume_tenant)
    add_get("/api/dead-letters", api.dead_letters)
    add_post("/api/dead-letters/retry", api.retry_dead_letters)
    add_post("/api/media", api.upload_media)
    add_get("/api/audit", api.audit)


async def _drain(app: web.Application) -> None:
    """Shutdown began (the listener is closed): answer webhooks on open connections with 503."""
    app[keys.DRAINING].set()
    log.info("draining: webhooks now answer 503 until the process exits")


def _transport(cfg: Config, secrets: Secrets) -> Transport:
    """Production sends to the Graph API; sandbox (no access token) to a local sink."""
    if secrets.mode == "sandbox":
        return SandboxTransport()
    workers = cfg.outbound.worker_count(len(cfg.tenants))
    tokens = {t.phone_number_id: secrets.token_for(name) for name, t in cfg.tenants.items()}
    return GraphTransport(cfg.graph, {k: v for k, v in tokens.items() if v}, connections=workers)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[keys.STORE]
    await store.open()
    log.info("store open")
    yield
    await store.close()
    log.info("store closed")


async def _sender_ctx(app: web.Application) -> AsyncIterator[None]:
    transport, sender = app[keys.TRANSPORT], app[keys.SENDER]
    await transport.start()
    await sender.start()
    yield
    await sender.stop(app[keys.CONFIG].dispatch.shutdown_grace_seconds)
    await transport.close()


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    dispatcher, orchestrator = app[keys.DISPATCHER], app[keys.ORCHESTRATOR]
    await orchestrator.start()
    await dispatcher.start()
    yield
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
            await asyncio.sleep(cfg.retention.interval_seconds)

    task = asyncio.create_task(loop(), name="alfred-retention")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
