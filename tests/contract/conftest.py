"""`engine_store`: a fresh, opened store of each engine in `ENGINES`, with an injected clock.

To add an engine: write a factory `(directory, clock, read_only) -> Store` that gives a fresh,
empty store (a new file, or a new database on a test server) and add it to `ENGINES`. Every
test in this package then runs against it; the engine is done when they all pass. The tests use
only the store's public interface: no SQL, no driver, no private attribute.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from alfred_bot.store import SqliteStore, Store
from alfred_bot.store.postgres.engine import PostgresStore
from tests import pgserver

#: A fixed start (2026-01-01 UTC) far from 0, so "older than a cutoff" arithmetic is realistic.
START = 1_767_225_600.0


class FakeClock:
    """The store's clock (received_at, created_at, due_at of new rows); tests move it by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


Factory = Callable[[Path, FakeClock, bool], Store]


def _sqlite(directory: Path, clock: FakeClock, read_only: bool) -> Store:
    return SqliteStore(directory / "alfred.db", clock=clock, read_only=read_only)


#: Test directory -> its database on the shared test server (the read-only handle opens the same one).
_DATABASES: dict[Path, str] = {}


def _postgres(directory: Path, clock: FakeClock, read_only: bool) -> Store:
    """An empty database per test on the session's PostgreSQL server (tests/pgserver.py)."""
    if directory not in _DATABASES:
        _DATABASES[directory] = pgserver.shared_server().clean_database()
    return PostgresStore(_DATABASES[directory], clock=clock, read_only=read_only)


def _forget(directory: Path) -> None:
    """Give the test's database back, emptied, for the next test (if it had one)."""
    url = _DATABASES.pop(directory, None)
    if url is not None:
        pgserver.shared_server().recycle(url)


@pytest.fixture(scope="session", autouse=True)
def _stop_postgres() -> Iterator[None]:
    """Stop the test server at the end of the session, if a test started it."""
    yield
    pgserver.stop_shared()


#: Engine name -> factory. A new engine adds one entry.
ENGINES: dict[str, Factory] = {"sqlite": _sqlite, "postgres": _postgres}

Reopen = Callable[[], Awaitable[Store]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=list(ENGINES))
async def engine_store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    store = ENGINES[request.param](tmp_path, clock, False)
    try:
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    finally:
        _forget(tmp_path)


@pytest.fixture
async def read_only_store(
    request: pytest.FixtureRequest, engine_store: Store, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Store]:
    """A second, read-only handle on `engine_store`'s database (what the operator's commands use)."""
    store = ENGINES[request.node.callspec.params["engine_store"]](tmp_path, clock, True)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
