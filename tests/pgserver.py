"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temp data dir, a free loopback port.

`PgServer` runs `initdb` and `pg_ctl` (as the `postgres` user via `runuser` when the tests run as
root: PostgreSQL refuses to run as root). The shared server (`shared_server()`, fixture
`pg_server`) trades durability for speed (`fsync=off`: a crash of the test machine loses a test
database, nothing else); `PgServer(fsync=True)` is for the tests that kill and restart the server
and must see the real promise. `fresh_database()` gives each test its own empty database.

Missing binaries FAIL the fixture, never skip it: CI installs `postgresql` (see `.ci/run`), and a
test of the PostgreSQL store that silently does not run proves nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_counter = itertools.count(1)


def _bin_dir() -> Path:
    """The newest installed server's binaries (15 on Debian bookworm)."""
    found = sorted(glob.glob(f"{_BIN_GLOB}/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        pytest.fail(f"PostgreSQL binaries not found ({_BIN_GLOB}/initdb): apt-get install postgresql")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL cluster in a temp dir; `start`/`stop`/`restart` for the outage tests."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bin = _bin_dir()
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="alfred-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", *f"-D {self.data} -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync".split())
        self.running = False
        self._recycled: list[str] = []  # emptied databases for `clean_database`

    def _run(self, tool: str, *args: str) -> str:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=self.root, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def _options(self) -> str:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "300",
            "fsync": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "synchronous_commit": "on",
        }
        return " ".join(f"-c {key}={value}" for key, value in settings.items())

    def _ctl_args(self) -> list[str]:
        return [*f"-w -t 60 -D {self.data} -l {self.root / 'server.log'}".split(), "-o", self._options()]

    def start(self) -> None:
        try:
            self._run("pg_ctl", "start", *self._ctl_args())
        except RuntimeError as exc:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{exc}\n{tail}") from None
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "stop", *f"-w -t 60 -m {mode} -D {self.data}".split())
            self.running = False

    def restart(self) -> None:
        """What the chaos run does under load: `pg_ctl restart -m fast`."""
        self._run("pg_ctl", "restart", "-m", "fast", *self._ctl_args())
        self.running = True

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with `psql` (setup and teardown only: tests use the store's interface)."""
        done = subprocess.run(self._psql(statement, database), capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def _psql(self, statement: str, database: str = "postgres") -> list[str]:
        connect = f"-X -q -At -h 127.0.0.1 -p {self.port} -U postgres -d {database}".split()
        return [str(self.bin / "psql"), *connect, "-c", statement]  # any OS user may connect (trust)

    def create_database(self, name: str) -> str:
        """A new empty database (from `template0`: nothing left over from another test); its URL."""
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY file_copy')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def fresh_database(self) -> str:
        """A new, empty database with a unique name (no schema yet); its URL."""
        return self.create_database(f"t{os.getpid()}_{next(_counter)}")

    def clean_database(self) -> str:
        """An empty database for a test that does not care how the schema got there: one a previous
        test gave back (`recycle`: tables emptied, identities restarted), else a fresh one.
        CREATE DATABASE checkpoints (a fifth of a second, more under load); emptying ten tables does not."""
        return self.url(self._recycled.pop()) if self._recycled else self.fresh_database()

    def recycle(self, url: str) -> None:
        """Empty a test's database for `clean_database` (its connections must be closed); dropped
        instead if that fails."""
        name = url.rsplit("/", 1)[1]
        try:
            self.sql(_EMPTY_ALL, name)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.drop_database(name)
            return
        self._recycled.append(name)


#: Every table but the schema version emptied, every identity restarted: a store sees no row.
#: DELETE, not TRUNCATE: on a test's few rows it is much faster (no new files per table).
_EMPTY_ALL = """
SET lock_timeout = '5s';
DO $$ DECLARE t record; BEGIN
  FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_version' LOOP
    EXECUTE format('DELETE FROM %I', t.tablename);
  END LOOP;
  FOR t IN SELECT sequencename FROM pg_sequences WHERE schemaname = 'public' LOOP
    EXECUTE format('ALTER SEQUENCE %I RESTART', t.sequencename);
  END LOOP;
END $$
"""


_shared: PgServer | None = None


def shared_server() -> PgServer:
    """The session's fast server, started on first use and stopped when the session ends."""
    global _shared  # noqa: PLW0603 - one server per test session, started lazily by whoever needs it
    if _shared is None:
        server = PgServer()
        atexit.register(server.destroy)  # also when the session fixture never ran (a factory used it)
        server.start()
        _shared = server
    return _shared


def stop_shared() -> None:
    """Stop and remove the shared server, if it was started (a later `shared_server()` starts anew)."""
    global _shared  # noqa: PLW0603
    if _shared is not None:
        _shared.destroy()
        _shared = None


def fresh_database() -> str:
    """A new empty database on the shared server: its URL."""
    return shared_server().fresh_database()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = shared_server()
    yield server
    stop_shared()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database for one test, dropped after it."""
    url = pg_server.fresh_database()
    yield url
    pg_server.drop_database(url.rsplit("/", 1)[1])
