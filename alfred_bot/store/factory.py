"""Which engine a configured location means: the one place that names engine classes, so the
wiring and the operator's commands work on whatever engine the config selects."""

from __future__ import annotations

from pathlib import Path

from alfred_bot.config import Config, database_url
from alfred_bot.security import url_where
from alfred_bot.store.base import NodeInfo, Store
from alfred_bot.store.sqlite.cluster import this_node
from alfred_bot.store.sqlite.engine import SqliteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def make_store(
    location: str | Path,
    *,
    read_only: bool = False,
    node: NodeInfo | None = None,
    pool_size: int = 10,
    takeover_seconds: float = 15.0,
) -> Store:
    """A store (not yet opened) for `location`: a PostgreSQL URL, else a SQLite file path.

    `read_only`: for the operator's commands beside a running server: no lock, no writer, no
    migration; every write raises `StoreError`."""
    if isinstance(location, str) and location.startswith(POSTGRES_SCHEMES):
        from alfred_bot.store.postgres.engine import PostgresStore  # noqa: PLC0415 (the driver loads only when used)

        return PostgresStore(
            location, read_only=read_only, node=node, pool_size=pool_size, takeover_seconds=takeover_seconds
        )
    return SqliteStore(Path(location), read_only=read_only, node=node)


def configured_store(cfg: Config, *, read_only: bool = False, role: str = "all") -> Store:
    """The store the configuration (and `ALFRED_DATABASE_URL`) selects, for this process as `role`."""
    storage = cfg.storage
    return make_store(
        database_url(cfg) or storage.path,
        read_only=read_only,
        node=this_node(role),
        pool_size=storage.pool_size,
        takeover_seconds=storage.takeover_seconds,
    )


def describe(cfg: Config) -> str:
    """Where the data lives, for logs and `config check`, without the URL's password."""
    url = database_url(cfg)
    if url is None:
        return f"SQLite {cfg.storage.path}"
    return f"PostgreSQL {url_where(url)}"  # host:port/db only: user and password stay out
