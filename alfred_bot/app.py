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

from alfred_bot import api, keys, media, webhook
from alfred_bot.config import Config, Secrets
from alfred_bot.context import Services
from alfred_bot.dispatch import Dispatcher
from alfred_bot.graph import GraphTransport, SandboxTransport, Transport
from alfred_bot.meters import Meters
from alfred_bot.orchestrator import Orchestrator
from alfred_bot.router import Router, routers_for
from alfred_bot.security import BodyBudget
from alfred_bot.sender import Sender
from alfred_bot.store import SqliteStore, Store

log = logging.getLogger("alfred.app")

MEDIA_SWEEP_SECONDS = 3600.0


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
    tenant_routers = routers if routers is not None else routers_for(cfg)
    app[keys.ROUTERS] = tenant_routers
    app[keys.TENANTS] = cfg.tenant_by_phone_number_id()
    app[keys.STATS] = Counter()
    app[keys.STARTED_AT] = time.time()
    app[keys.BODY_BUDGET] = BodyBudget(cfg.webhook.max_inflight_bytes)
    app[keys.TRANSPORT] = transport or _transport(cfg, secrets)
    # tenants with their own token form their own group; the rest share the global token
    own = secrets.tenant_tokens
    groups = {name: (t.access_token_env or "") if name in own else "" for name, t in cfg.tenants.items()}
    app[keys.SENDER] = sender = Sender(app[keys.STORE], app[keys.TRANSPORT], cfg, token_groups=groups)
    app[keys.METERS] = meters = Meters(list(cfg.tenants))
    sender.on_sent = meters.sent
    app[keys.ORCHESTRATOR] = orchestrator = Orchestrator(cfg.orchestrator, secrets.orchestrator_key)
    services = Services(app[keys.STORE], app[keys.TRANSPORT], cfg.media_dir(), cfg.media.max_download_bytes)
    app[keys.DISPATCHER] = Dispatcher(
        app[keys.STORE], tenant_routers, cfg, on_replies=sender.wake, orchestrator=orchestrator, services=services
    )
    app.router.add_get("/webhook", webhook.verify)
    app.router.add_post("/webhook", webhook.receive)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/status.json", api.status_json)
    app.router.add_get("/api/inbound", api.inbound)
    app.router.add_post("/api/messages", api.send_message)
    app.router.add_get("/api/messages/{id}", api.get_message)
    app.router.add_get("/api/tenants", api.tenants)
    app.router.add_post("/api/tenants/{name}/resume", api.resume_tenant)
    app.router.add_get("/api/dead-letters", api.dead_letters)
    app.router.add_post("/api/dead-letters/retry", api.retry_dead_letters)
    app.router.add_post("/api/media", api.upload_media)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_sender_ctx)
    app.cleanup_ctx.append(_dispatcher_ctx)
    app.cleanup_ctx.append(_media_ctx)
    return app


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


async def _media_ctx(app: web.Application) -> AsyncIterator[None]:
    """Retention of downloaded media: a sweep at start-up and then every hour."""
    cfg = app[keys.CONFIG]

    async def sweep() -> None:
        while True:
            removed = await asyncio.to_thread(media.prune, cfg.media_dir(), cfg.media.retention_days * 86400)
            if removed:
                log.info("media retention: removed %d file(s)", removed)
            await asyncio.sleep(MEDIA_SWEEP_SECONDS)

    task = asyncio.create_task(sweep(), name="alfred-media-retention")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
