"""The one telemetry object (issue 14 item 6): every part counts into the app's `Telemetry`, and
`/healthz`, `/status.json` and `/metrics` read that same object; one function decides the status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from alfred_bot import keys
from alfred_bot.telemetry import RateMeter, Telemetry, health_status
from tests import payloads
from tests.conftest import API_TOKEN, post_webhook, wait_for
from tests.fakes import FakeGraph


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("store_ok", "running", "draining", "expected"),
    [
        (True, True, False, "ok"),
        (False, True, False, "unavailable"),
        (True, False, False, "unavailable"),
        (True, True, True, "draining"),
        (False, False, True, "draining"),  # shutting down is expected: not an outage
    ],
)
def test_health_status_is_decided_in_one_place(store_ok: bool, running: bool, draining: bool, expected: str) -> None:
    assert health_status(store_ok=store_ok, workers_running=running, draining=draining) == expected


def test_rates_cover_the_last_minute_per_tenant() -> None:
    clock = Clock()
    telemetry = Telemetry(["home", "biz"], clock=clock)
    telemetry.received("home", "text")
    telemetry.received("home", "image")
    telemetry.received(None, "text")  # unrouted: counted in /metrics only, no tenant rate
    telemetry.sent("biz")
    telemetry.sent("nobody")  # a tenant not configured is ignored, not an error
    assert telemetry.per_minute("home") == (2, 0)
    assert telemetry.per_minute("biz") == (0, 1)
    assert telemetry.per_minute("nobody") == (0, 0)
    clock.now += 59
    telemetry.received("home", "text")
    assert telemetry.per_minute("home") == (3, 0)
    clock.now += 1  # the first second has left the window
    assert telemetry.per_minute("home") == (1, 0)
    clock.now += 600
    assert telemetry.per_minute("home") == (0, 0)


def test_rate_meter_reuses_its_buckets_after_a_minute() -> None:
    clock = Clock(0.0)
    meter = RateMeter(clock)
    meter.add(5)
    clock.now = 60.5  # same slot, a minute later: the old count must not leak in
    meter.add()
    assert meter.last_minute() == 1


def test_send_latency_window_and_errors_by_code() -> None:
    telemetry = Telemetry(["home"])
    assert telemetry.latency_ms("home") is None
    for seconds in (0.010, 0.020, 0.030, 0.040, 1.0):
        telemetry.send_done("home", "sent", seconds, None)
    telemetry.send_done("home", "failed", 0.05, 131026)
    assert telemetry.latency_ms("home") == {"p50": 40.0, "p95": 1000.0}  # nearest rank of 6 calls
    assert telemetry.errors_by_code("home") == {"131026": 1}
    assert telemetry.errors_by_code("biz") == {}
    text = telemetry.metrics.render().decode()
    assert 'alfred_outbound_sends_total{result="failed",tenant="home"} 1.0' in text


async def test_every_view_reads_the_apps_one_telemetry(
    prod: TestClient[Any, Any], graph: FakeGraph, tmp_path: Path
) -> None:
    app = prod.app
    telemetry = app[keys.TELEMETRY]
    assert await post_webhook(prod, payloads.body_of(payloads.text("hi"))) == 200
    assert await post_webhook(prod, b"{}", secret="wrong") == 403
    await wait_for(lambda: telemetry.dispatch["handled"] == 1 and telemetry.sender["result_sent"] >= 1)
    # the components' counts are read-only views of the same numbers, not copies
    assert app[keys.DISPATCHER].counts["handled"] == 1
    assert app[keys.SENDER].counts["result_sent"] == telemetry.sender["result_sent"]
    with pytest.raises(TypeError):
        app[keys.DISPATCHER].counts["handled"] = 5  # type: ignore[index]
    health = await (await prod.get("/healthz")).json()
    assert health["webhook"]["webhook_200"] == telemetry.webhook["webhook_200"] == 1
    assert health["webhook"]["webhook_403"] == 1
    assert health["dispatcher"]["handled"] == 1
    assert health["sender"]["result_sent"] == telemetry.sender["result_sent"]
    status = await (await prod.get("/status.json", headers={"Authorization": f"Bearer {API_TOKEN}"})).json()
    assert status["dispatcher"] == dict(telemetry.dispatch)
    home = next(t for t in status["tenants"] if t["name"] == "home")
    assert home["inbound_per_minute"] == telemetry.per_minute("home")[0] == 1
    assert home["outbound_per_minute"] == telemetry.per_minute("home")[1] >= 1
    assert home["latency_ms"] == telemetry.latency_ms("home") is not None
    metrics = await (await prod.get("/metrics")).text()
    assert 'alfred_webhook_requests_total{result="403"} 1.0' in metrics


async def test_healthz_and_status_json_agree_while_draining(prod: TestClient[Any, Any]) -> None:
    prod.app[keys.DRAINING].set()
    health = await prod.get("/healthz")
    status = await prod.get("/status.json")
    assert (health.status, (await health.json())["status"]) == (503, "draining")
    assert (status.status, (await status.json())["status"]) == (503, "draining")
