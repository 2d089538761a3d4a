"""GET /metrics is rendered off the event loop: a slow scrape never holds up webhooks or other requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from alfred_bot import keys
from tests.conftest import wait_for

HOLD_SECONDS = 5.0


class HeldScrape(Collector):
    """A collector that keeps a scrape inside `collect` until the test releases it.

    Rendered on the event loop, it would block the loop, so the test's second request could not
    be answered and `collect` would give up waiting (`timed_out`); rendered in a thread, it waits
    while the loop keeps serving.
    """

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out = False

    def collect(self) -> Iterable[Metric]:
        if self.armed:
            self.entered.set()
            self.timed_out = not self.release.wait(HOLD_SECONDS)
        return []


async def test_a_slow_scrape_does_not_stall_the_event_loop(client: TestClient[Any, Any]) -> None:
    held = HeldScrape()
    client.app[keys.TELEMETRY].metrics.registry.register(held)  # registering collects once: not armed yet
    held.armed = True

    async def scrape() -> tuple[int, str]:
        resp = await client.get("/metrics")
        return resp.status, await resp.text()

    scraping = asyncio.create_task(scrape())
    await wait_for(held.entered.is_set)
    resp = await client.get("/healthz")  # answered while the scrape is still being rendered
    await resp.read()
    held.release.set()
    status, text = await scraping
    assert not held.timed_out, "the scrape blocked the event loop until it gave up"
    assert status == 200
    assert "alfred_webhook_requests_total" in text
