"""Shared fixtures: a real config, real SQLite under tmp_path, the real app via pytest-aiohttp."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from alfred_bot.app import create_app
from alfred_bot.config import Config, Secrets, load_secrets, parse_config
from alfred_bot.store import Completion, PendingMessage, SqliteStore
from tests import payloads
from tests.fakes import FakeGraph

APP_SECRET = "test-app-secret-0123456789"
VERIFY_TOKEN = "test-verify-token"
API_TOKEN = "test-api-token"

ENV = {"WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN, "ALFRED_API_TOKEN": API_TOKEN}


class FaultyStore(SqliteStore):
    """A real store that raises the queued faults on its next calls (fault injection)."""

    def __init__(self, path: Path, **faults: list[BaseException]) -> None:
        super().__init__(path)
        self.faults = faults

    def _fault(self, name: str) -> None:
        queue = self.faults.get(name)
        if queue:
            raise queue.pop(0)

    async def complete(self, done: Completion) -> bool:
        self._fault("complete")
        return await super().complete(done)

    async def pending(self, after_seq: int, limit: int) -> list[PendingMessage]:
        self._fault("pending")
        return await super().pending(after_seq, limit)


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "storage": {"path": str(tmp_path / "alfred.db")},
        # Most tests send many messages from one user: the per-user limit is tested on its own.
        "limits": {"inbound_per_user": 0},
        "tenants": {"home": {"phone_number_id": payloads.PNID}, "biz": {"phone_number_id": payloads.BIZ_PNID}},
    }
    data.update(sections)
    return parse_config(data)


ACCESS_TOKEN = "test-access-token-EAAG"
PROD_ENV = {**ENV, "WHATSAPP_ACCESS_TOKEN": ACCESS_TOKEN}

#: Fast retry settings so the fault tests run in well under a second each.
FAST_OUTBOUND = {
    "backoff_base_seconds": 0.01,
    "backoff_cap_seconds": 0.05,
    "probe_interval_seconds": 0.1,
    "workers": 4,
}


@pytest.fixture
async def graph() -> Any:
    fake = FakeGraph()
    await fake.start()
    yield fake
    await fake.close()


def prod_config(tmp_path: Path, fake: FakeGraph, **sections: dict[str, Any]) -> Config:
    """Production mode against the fake Graph API on loopback."""
    outbound = {**FAST_OUTBOUND, **sections.pop("outbound", {})}
    graph = {"base_url": fake.url, "timeout_seconds": 1.0, **sections.pop("graph", {})}
    return make_config(tmp_path, graph=graph, outbound=outbound, **sections)


@pytest.fixture
async def prod(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> TestClient[Any, Any]:
    """The real app in production mode, sending to the fake Graph API."""
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(prod_config(tmp_path, graph), load_secrets(PROD_ENV))
    )
    return client


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def secrets() -> Secrets:
    return load_secrets(ENV)


@pytest.fixture
async def client(aiohttp_client: Any, cfg: Config, secrets: Secrets) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg, secrets))
    return client


async def post_webhook(client: TestClient[Any, Any], body: bytes, secret: str = APP_SECRET) -> int:
    """POST a signed body; return the status."""
    data: Any = io.BytesIO(body) if len(body) > 1_000_000 else body  # aiohttp warns on large raw bytes
    resp = await client.post("/webhook", data=data, headers=payloads.headers(body, secret))
    await resp.read()
    return resp.status


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def db_rows(path: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read the real database file directly, as an operator would."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()
