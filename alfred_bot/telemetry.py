"""Every number Alfred keeps about itself, in one object: `Telemetry`.

One store of truth for what `/healthz`, `/status.json`, the status page and `/metrics` show:

- the plain counters each part keeps (`webhook`, `dispatch`, `sender`, `orchestrator`), the
  numbers `/healthz` and `/status.json` print under those parts' names;
- per-tenant message rates over the last minute (`RateMeter`: sixty one-second buckets, fixed memory);
- recent Graph call latencies (for p50/p95) and errors by code, per tenant, for the status page;
- the Prometheus metrics (`prometheus.Metrics`, one registry per app).

It is built once by the app and handed to each part that counts (webhook, dispatcher and its
built-in middleware, orchestrator, sender) as a constructor argument, so two apps in one process,
or a test's app beside another, never share a number. `health_status` is the one place that
decides "ok / draining / unavailable".
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Literal

from alfred_bot.prometheus import Metrics, message_type_label, percentile

RECENT = 512  # send latencies kept per tenant for the status page's p50/p95
WINDOW = 60  # seconds a rate meter covers

HealthStatus = Literal["ok", "draining", "unavailable"]


def health_status(*, store_ok: bool, workers_running: bool, draining: bool) -> HealthStatus:
    """Draining wins (shutdown is expected, probes should not page); else ok only if all is up."""
    if draining:
        return "draining"
    return "ok" if store_ok and workers_running else "unavailable"


class RateMeter:
    """Events in the last 60 seconds, in one-second buckets."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets = [0] * WINDOW
        self._stamps = [-1] * WINDOW

    def add(self, n: int = 1) -> None:
        second = math.floor(self._clock())
        slot = second % WINDOW
        if self._stamps[slot] != second:
            self._stamps[slot] = second
            self._buckets[slot] = 0
        self._buckets[slot] += n

    def last_minute(self) -> int:
        now = math.floor(self._clock())
        return sum(b for b, s in zip(self._buckets, self._stamps, strict=True) if now - WINDOW < s <= now)


class Telemetry:
    """Counters, rate meters, latency windows and the Prometheus metrics of one app."""

    def __init__(
        self,
        tenants: Iterable[str] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        #: Webhook outcomes (`webhook_200`, `updates_unrouted`, `host_refused`, …): /healthz "webhook".
        self.webhook: Counter[str] = Counter()
        #: Inbound handling (`handled`, `failed`, `overflow`, `recovered`, `opted_out`, …).
        self.dispatch: Counter[str] = Counter(handled=0, failed=0, overflow=0, recovered=0)
        #: Outbound sends (`result_sent`, `error_<code>`, `paced_waits`, `settle_retries`, …).
        self.sender: Counter[str] = Counter()
        #: Orchestrator calls (`requests`, `retries`, `failures`, …).
        self.orchestrator: Counter[str] = Counter()
        names = list(tenants)
        self._inbound = {name: RateMeter(clock) for name in names}
        self._outbound = {name: RateMeter(clock) for name in names}
        self._latencies: dict[str, deque[float]] = {}
        self._errors: dict[str, Counter[str]] = {}

    # ------------------------------------------------------------------ recording

    def webhook_answered(self, status: int) -> None:
        """The webhook answered a POST with `status` (200 after the commit, or a refusal)."""
        self.webhook[f"webhook_{status}"] += 1
        self.metrics.webhook_requests.labels(str(status)).inc()

    def received(self, tenant: str | None, kind: str) -> None:
        """A new inbound message of type `kind` was committed for `tenant` (None: unrouted)."""
        if tenant in self._inbound:
            self._inbound[tenant].add()
        self.metrics.inbound_messages.labels(tenant or "", message_type_label(kind)).inc()

    def sent(self, tenant: str) -> None:
        """Meta accepted a send of `tenant`'s (the outbound rate)."""
        if tenant in self._outbound:
            self._outbound[tenant].add()

    def send_done(self, tenant: str, result: str, seconds: float, code: int | None) -> None:
        """One Graph API call finished with decision `result` after `seconds`."""
        self.metrics.outbound_sends.labels(tenant, result).inc()
        self.metrics.send_latency.labels(tenant).observe(seconds)
        self._latencies.setdefault(tenant, deque(maxlen=RECENT)).append(seconds)
        if code is not None:
            label = self.metrics.code_label(code)
            self.metrics.graph_errors.labels(tenant, label).inc()
            self._errors.setdefault(tenant, Counter())[label] += 1

    # ------------------------------------------------------------------ reading

    def per_minute(self, tenant: str) -> tuple[int, int]:
        """Inbound and outbound messages of `tenant` in the last minute."""
        inbound, outbound = self._inbound.get(tenant), self._outbound.get(tenant)
        return (inbound.last_minute() if inbound else 0, outbound.last_minute() if outbound else 0)

    def latency_ms(self, tenant: str) -> dict[str, float] | None:
        """p50/p95 of the tenant's recent Graph calls, in milliseconds."""
        recent = list(self._latencies.get(tenant, ()))
        p50, p95 = percentile(recent, 0.5), percentile(recent, 0.95)
        if p50 is None or p95 is None:
            return None
        return {"p50": round(p50 * 1000, 1), "p95": round(p95 * 1000, 1)}

    def errors_by_code(self, tenant: str) -> dict[str, int]:
        """Graph error codes the tenant's sends met (labels bounded as in /metrics)."""
        return dict(self._errors.get(tenant, {}))
