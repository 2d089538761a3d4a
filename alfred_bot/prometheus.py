"""Prometheus metrics (one registry per app, so tests and two apps in one process never mix).
`telemetry.Telemetry` holds one `Metrics` beside the plain counters and the status page's views.

Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units.
Gauges that mirror the store (outbox by state) are refreshed when `/metrics` is scraped.

A scrape is rendered in a worker thread (`scrape`): with many tenants and error codes the text
takes tens of milliseconds to build, which on the event loop would hold up every webhook.
prometheus_client's metrics lock their values, so rendering beside the loop's updates is safe.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from alfred_bot.models import KNOWN_TYPES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Label values that come from signed bodies are bounded (issue 13 item 9): a known set, else
#: "other". Every series costs memory for the process's life, and a body signed by a tenant's own
#: app must not be able to grow /metrics without end.
OTHER = "other"
MESSAGE_TYPES = KNOWN_TYPES | {"unknown"}
#: Webhook fields of a WhatsApp Business Account (Meta: Webhooks > Overview, field list), plus
#: "errors" (our name for `value.errors` without a message).
EVENT_FIELDS = frozenset(
    {
        "account_alerts",
        "account_review_update",
        "account_settings_update",
        "account_update",
        "automatic_events",
        "business_capability_update",
        "business_status_update",
        "calls",
        "errors",
        "flows",
        "group_lifecycle_update",
        "group_participants_update",
        "group_settings_update",
        "group_status_update",
        "history",
        "message_echoes",
        "message_template_components_update",
        "message_template_quality_update",
        "message_template_status_update",
        "messages",
        "partner_solutions",
        "payment_configuration_update",
        "phone_number_name_update",
        "phone_number_quality_update",
        "security",
        "smb_app_state_sync",
        "smb_message_echoes",
        "template_category_update",
        "template_correct_category_detection",
        "tracking_events",
        "user_preferences",
    }
)
#: Graph error codes are many and Meta adds more: the first ones seen keep their own series.
MAX_ERROR_CODES = 64


def message_type_label(kind: str) -> str:
    return kind if kind in MESSAGE_TYPES else OTHER


def event_field_label(field: str) -> str:
    return field if field in EVENT_FIELDS else OTHER


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


class Metrics:
    """Every metric Alfred exports, registered on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.webhook_requests = PromCounter(
            "alfred_webhook_requests", "Webhook POSTs by HTTP result", ["result"], registry=r
        )
        self.inbound_messages = PromCounter(
            "alfred_inbound_messages", "New inbound messages by tenant and type", ["tenant", "type"], registry=r
        )
        self.events = PromCounter("alfred_events", "Other webhook fields received", ["tenant", "field"], registry=r)
        self.parse_errors = PromCounter(
            "alfred_inbound_parse_errors",
            "Messages received that did not decode as their type (stored and routed as unknown)",
            ["tenant", "type"],
            registry=r,
        )
        self.outbound_sends = PromCounter(
            "alfred_outbound_sends", "Graph API send attempts by decision", ["tenant", "result"], registry=r
        )
        self.graph_errors = PromCounter(
            "alfred_graph_errors", "Graph API answers with an error code", ["tenant", "code"], registry=r
        )
        self.send_latency = Histogram(
            "alfred_send_latency_seconds", "Graph API call duration", ["tenant"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.handler_latency = Histogram(
            "alfred_handler_latency_seconds", "Handler run time", ["tenant"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e_latency = Histogram(
            "alfred_e2e_latency_seconds",
            "Webhook received to reply accepted by the Graph API",
            ["tenant"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.ratelimit_wait = Histogram(
            "alfred_ratelimit_wait_seconds", "Time a send waited for its pacing slot", ["tenant"], registry=r
        )
        self.outbox = Gauge("alfred_outbox_messages", "Outbox rows by state", ["tenant", "state"], registry=r)
        self.dispatch_queue = Gauge("alfred_dispatch_queue_depth", "Inbound messages queued in memory", registry=r)
        self.send_queue = Gauge("alfred_send_queue_depth", "Claimed sends waiting for a worker", ["tenant"], registry=r)
        self.paused = Gauge("alfred_tenant_paused", "1 while a tenant's sends are paused", ["tenant"], registry=r)
        self.orchestrator = PromCounter(
            "alfred_orchestrator_requests", "Orchestrator calls by result", ["result"], registry=r
        )
        self._codes: set[str] = set()

    def code_label(self, code: int) -> str:
        """The code as a label, or "other" once `MAX_ERROR_CODES` distinct codes have been seen."""
        label = str(code)
        if label not in self._codes and len(self._codes) < MAX_ERROR_CODES:
            self._codes.add(label)
        return label if label in self._codes else OTHER

    def render(self) -> bytes:
        """The exposition text, built on the calling thread."""
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """The exposition text, built off the event loop (50 tenants' series take about 0.1 s)."""
        return await asyncio.to_thread(generate_latest, self.registry)
