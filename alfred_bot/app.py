"""The application factory: routes, keys and the lifecycle of every long-lived resource.

`create_app` does no I/O. Resources are opened in `cleanup_ctx` generators registered in
dependency order (store → dispatcher) so that shutdown runs in reverse: handlers stop first,
then the store commits what is queued and closes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from alfred_bot import api, keys, webhook
from alfred_bot.config import Config, Secrets
from alfred_bot.dispatch import Dispatcher
from alfred_bot.router import Router, routers_for
from alfred_bot.security import BodyBudget
from alfred_bot.store import SqliteStore, Store

log = logging.getLogger("alfred.app")


def create_app(
    cfg: Config,
    secrets: Secrets,
    *,
    store: Store | None = None,
    routers: dict[str, Router] | None = None,
) -> web.Application:
    """Build the aiohttp app; `store` and `routers` can be injected (tests, other engines)."""
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
    app[keys.DISPATCHER] = Dispatcher(app[keys.STORE], tenant_routers, cfg.dispatch)
    app.router.add_get("/webhook", webhook.verify)
    app.router.add_post("/webhook", webhook.receive)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/api/inbound", api.inbound)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_dispatcher_ctx)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[keys.STORE]
    await store.open()
    log.info("store open")
    yield
    await store.close()
    log.info("store closed")


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    dispatcher = app[keys.DISPATCHER]
    await dispatcher.start()
    yield
    await dispatcher.stop(app[keys.CONFIG].dispatch.shutdown_grace_seconds)
