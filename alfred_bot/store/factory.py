"""Which engine a configured location means: the one place that names engine classes, so the
wiring and the operator's commands work on whatever engine the config selects."""

from __future__ import annotations

from pathlib import Path

from alfred_bot.store.base import Store
from alfred_bot.store.sqlite.engine import SqliteStore


def make_store(location: str | Path, *, read_only: bool = False) -> Store:
    """A store (not yet opened) for `location`, today a SQLite file path.

    `read_only`: for the operator's commands beside a running server: no lock, no writer, no
    migration; every write raises `StoreError`."""
    return SqliteStore(Path(location), read_only=read_only)
