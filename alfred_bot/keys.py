"""Every typed `web.AppKey` in one place: no string keys, no globals."""

from __future__ import annotations

import asyncio

from aiohttp import web

from alfred_bot.cluster import ClusterView
from alfred_bot.config import Config, Secrets
from alfred_bot.dispatch import Dispatcher
from alfred_bot.graph import Transport
from alfred_bot.orchestrator import Orchestrator
from alfred_bot.outbound.sender import Sender
from alfred_bot.retention import Retention
from alfred_bot.router import Router
from alfred_bot.security import BodyBudget
from alfred_bot.store import Store
from alfred_bot.telemetry import Telemetry

CONFIG = web.AppKey("config", Config)
SECRETS = web.AppKey("secrets", Secrets)
STORE = web.AppKey("store", Store)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SENDER = web.AppKey("sender", Sender)
TRANSPORT = web.AppKey("transport", Transport)
ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)
ROUTERS = web.AppKey("routers", dict[str, Router])
#: phone_number_id -> tenant name, for routing inbound updates.
TENANTS = web.AppKey("tenants", dict[str, str])
WABAS = web.AppKey("wabas", dict[str, str])  # WhatsApp Business Account id -> its one tenant
STARTED_AT = web.AppKey("started_at", float)
#: all | web (webhooks, API, page) | worker (handlers and sends): `python main.py serve --role`.
ROLE = web.AppKey("role", str)
#: The other nodes on a shared database (absent on the embedded one).
CLUSTER = web.AppKey("cluster", ClusterView)
#: Every counter, rate, latency window and Prometheus metric of the app (see telemetry.py).
TELEMETRY = web.AppKey("telemetry", Telemetry)
RETENTION = web.AppKey("retention", Retention)
#: Set when shutdown starts: webhooks answer 503 (Meta redelivers) while work drains.
DRAINING = web.AppKey("draining", asyncio.Event)
#: Bytes of not-yet-verified webhook bodies held in memory (bounded, see webhook.BodyBudget).
BODY_BUDGET = web.AppKey("body_budget", BodyBudget)
