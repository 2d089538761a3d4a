"""Shared fixtures: a real config, real SQLite under tmp_path, the real app via pytest-aiohttp."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from alfred_bot.app import create_app
from alfred_bot.config import Config, Secrets, load_secrets, parse_config
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.router import Router
from alfred_bot.store import Completion, PendingMessage, SqliteStore
from tests import payloads
from tests.fakes import FakeGraph, FakeOrchestrator

#: `pg_server` / `pg_url`: a throwaway PostgreSQL server for the tests of the shared engine.
pytest_plugins = ("tests.pgserver",)

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


@pytest.fixture
async def orch() -> Any:
    """The fake agent platform (a real server on loopback), closed after the test."""
    fake = FakeOrchestrator()
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


# ------------------------------------------- a recording bot, end to end (consent and limit tests)


def recording_router(seen: list[str], name: str = "recording") -> Router:
    """A default route that records each message id it handles and answers `ok <text>`."""
    router = Router(name)

    @router.default
    async def answer(message: Message, ctx: Context) -> None:
        seen.append(message.id)
        ctx.reply(f"ok {message.text}")

    return router


async def recording_app(aiohttp_client: Any, tmp_path: Path, seen: list[str], **limits: Any) -> tuple[Any, Path]:
    """The real app with `recording_router` for tenant "home" and the given `[limits]`; and its database."""
    cfg = make_config(tmp_path, limits=limits)
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": recording_router(seen)}))
    return client, Path(cfg.storage.path)


async def send_and_settle(client: Any, db: Path, *msgs: dict[str, Any]) -> None:
    """Post `msgs` in one signed webhook and wait until none of them is still pending."""
    assert await post_webhook(client, payloads.body_of(*msgs)) == 200
    ids = tuple(m["id"] for m in msgs)
    marks = ",".join("?" * len(ids))
    sql = f"SELECT COUNT(*) FROM inbox WHERE state != 'pending' AND event_id IN ({marks})"
    await wait_for(lambda: db_rows(db, sql, ids)[0][0] == len(ids))


def outbox_texts(db: Path, user: str = payloads.USER) -> list[str]:
    """The text bodies queued for `user`, oldest first."""
    rows = db_rows(db, "SELECT payload FROM outbox WHERE recipient = ? AND type = 'text' ORDER BY rowid", (user,))
    return [json.loads(r[0])["text"]["body"] for r in rows]


def inbox_state(db: Path, event_id: str) -> str:
    """The inbox state of one message."""
    return str(db_rows(db, "SELECT state FROM inbox WHERE event_id = ?", (event_id,))[0][0])


# ---------------------------------------------------------------------------- leaving at the end

_SESSION_STATUS: list[int] = []
#: Threads the interpreter ends by itself at exit (idle executor workers are joined, not waited on).
_BENIGN_THREADS = ("ThreadPoolExecutor-", "asyncio_")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Why: a thread a test left running (a database connection nobody closed) keeps the
    interpreter from exiting after every result and the coverage report are printed, and CI then
    times out on a run whose tests all passed. Name such threads, with their stacks, and leave at
    once with the session's own status."""
    stuck = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and not t.name.startswith(_BENIGN_THREADS)
    ]
    if not stuck or not _SESSION_STATUS:
        return
    frames = sys._current_frames()
    print(f"\n{len(stuck)} thread(s) still running after the tests; leaving without waiting for them:", file=sys.stderr)
    for thread in stuck:
        frame = frames.get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "  (no stack)\n"
        print(f"- {thread.name}\n{stack}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_SESSION_STATUS[-1])
