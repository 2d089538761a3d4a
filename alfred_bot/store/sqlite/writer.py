"""One SQLite writer with group commit.

Why: with `synchronous=FULL` every commit is an fsync, and every hop into a database thread
costs tens of microseconds. So all writes go through one connection on one thread, and
whatever writes are waiting when the thread is free run together in ONE transaction (one
fsync, one hop). Each write runs inside its own SAVEPOINT: a write that fails is undone alone
and only its caller sees the error. If the transaction as a whole fails (disk full, I/O error)
nothing in the group is durable, so every caller in the group gets `StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from alfred_bot.store.base import StoreError

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], Any]

log = logging.getLogger("alfred.store")


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _apply_one(conn: sqlite3.Connection, op: WriteOp) -> Any:
    conn.execute("SAVEPOINT op")
    try:
        value = op(conn)
    except Exception as exc:
        if not conn.in_transaction:
            # SQLite rolled the whole transaction back (e.g. SQLITE_FULL): the group is lost.
            raise StoreError(f"transaction aborted: {exc}") from exc
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return _Failed(StoreError(f"write failed: {exc}") if isinstance(exc, sqlite3.Error) else exc)
    conn.execute("RELEASE op")
    return value


def apply_group(conn: sqlite3.Connection, ops: list[WriteOp]) -> list[Any]:
    """Run `ops` in one transaction; each result is a value or `_Failed`. Runs on the DB thread."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        results = [_apply_one(conn, op) for op in ops]
        conn.execute("COMMIT")
    except (sqlite3.Error, StoreError) as exc:
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        failure = _Failed(exc if isinstance(exc, StoreError) else StoreError(f"commit failed: {exc}"))
        return [failure] * len(ops)
    return results


class GroupWriter:
    """Serializes every write onto one thread and commits waiting writes together."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], *, max_group: int = 1000) -> None:
        self._connect = connect
        self._max_group = max_group
        self._queue: asyncio.Queue[tuple[WriteOp, asyncio.Future[Any]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alfred-sqlite-writer")
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.groups = 0
        self.writes = 0

    async def start(self) -> None:
        """Open the connection on the writer thread and start committing."""
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._executor, self._connect)
        self._task = asyncio.create_task(self._run(), name="alfred-sqlite-writer")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is not open")
        return self._conn

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    async def submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op(conn)` in the next group transaction; return its value once committed."""
        if not self.running:
            raise StoreError("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, future))
        result: T = await future
        return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            while len(group) < self._max_group and not self._queue.empty():
                group.append(self._queue.get_nowait())
            ops = [op for op, _ in group]
            try:
                results = await loop.run_in_executor(self._executor, apply_group, self._connection(), ops)
            except Exception as exc:  # noqa: BLE001 (never leave a caller waiting forever)
                results = [_Failed(StoreError(f"writer failed: {exc}"))] * len(group)
            self.groups += 1
            self.writes += len(group)
            for (_, future), result in zip(group, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, _Failed):
                    future.set_exception(result.exc)
                else:
                    future.set_result(result)
            for _ in group:
                self._queue.task_done()

    async def read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the writer's connection (for start-up checks, not hot paths)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, op, self._connection())

    async def close(self) -> None:
        """Refuse new writes, let queued ones commit, then close the connection."""
        self._closing = True
        if self._task is not None and not self._task.done():
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
