"""Helpers for the fault, security and fuzz suites: raw sockets, a raw-TCP Graph API, fault stores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alfred_bot.store import Settlement, SqliteStore, StoreError

OK_BODY = b'{"messaging_product":"whatsapp","contacts":[],"messages":[{"id":"wamid.RAW%06d"}]}'


async def raw_exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; return the status line of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), wait)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.contextmanager
def fd_limit(wanted: int) -> Iterator[int]:
    """Raise the soft open-files limit towards `wanted` (never above the hard limit); restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft if soft >= wanted else min(wanted, hard if hard != resource.RLIM_INFINITY else wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class RawGraph:
    """A Graph API spoken over raw TCP, so it can misbehave below HTTP.

    Each POST (per connection, keep-alive) takes the next behaviour from `script`, then "ok":
    `hang` (never answers), `stall_body` (headers and part of the body, then nothing),
    `close_body` (headers and part of the body, then closes), `garbage` (not HTTP at all).
    A hanging answer lasts until the client gives up and closes, or until `close()`.
    """

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ids = 0
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        """Stop listening, end every connection, and wait until each handler has returned."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            writer.close()
        await asyncio.wait_for(self._idle.wait(), 5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        self._idle.clear()
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()
            if not self._conns:
                self._idle.set()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
        post = head.startswith(b"POST")
        if post:
            self.requests.append(json.loads(body))
        behaviour = self.script.pop(0) if self.script and post else "ok"
        return await self._answer(behaviour, reader, writer)

    async def _answer(self, behaviour: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        partial = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"messag'
        if behaviour in ("stall_body", "close_body"):
            writer.write(partial)
            await writer.drain()
        if behaviour in ("hang", "stall_body"):
            await reader.read()  # silence until the other side closes
        if behaviour == "garbage":
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()
        if behaviour != "ok":
            return False
        self._ids += 1
        body = OK_BODY % self._ids
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        return True


def fill_up(conn: sqlite3.Connection) -> None:
    """Make the database really full: no more pages, and the free room in the last ones used up.

    Runs on the writer's connection (`writer.read(fill_up)`); `PRAGMA max_page_count` is how the
    issue suggests forcing SQLITE_FULL without filling the real disk.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS ballast (b BLOB)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    for size in (4096, 1024, 256, 64, 16, 1):
        with contextlib.suppress(sqlite3.OperationalError):  # "database or disk is full"
            for _ in range(1000):
                conn.execute("INSERT INTO ballast VALUES (zeroblob(?))", (size,))


def make_room(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA max_page_count = 1073741823")


class SettleFaultStore(SqliteStore):
    """A real store whose next `fail` settles of a *sent* outcome raise, as on SQLITE_FULL."""

    def __init__(self, path: Path, fail: int = 1) -> None:
        super().__init__(path)
        self.fail = fail
        self.failed: list[str] = []

    async def settle(self, result: Settlement, now: float) -> None:
        if result.state == "sent" and self.fail > 0:
            self.fail -= 1
            self.failed.append(result.id)
            raise StoreError("commit failed: database or disk is full")
        await super().settle(result, now)
