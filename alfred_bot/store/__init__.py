"""Durable storage behind small role interfaces (`Inbox`, `Outbox`, `Queries`, `Maintenance`;
`Store` is all four); SQLite is the embedded default, `make_store` picks the engine."""

from alfred_bot.store.base import (
    AuditEntry,
    Completion,
    Inbox,
    InboxState,
    Maintenance,
    Outbox,
    OutboxJob,
    OutboxRow,
    PendingMessage,
    Queries,
    Settlement,
    Store,
    StoreError,
)
from alfred_bot.store.factory import make_store
from alfred_bot.store.ids import new_outbox_id
from alfred_bot.store.sqlite.engine import SqliteStore

__all__ = [
    "AuditEntry",
    "Completion",
    "Inbox",
    "InboxState",
    "Maintenance",
    "Outbox",
    "OutboxJob",
    "OutboxRow",
    "PendingMessage",
    "Queries",
    "Settlement",
    "SqliteStore",
    "Store",
    "StoreError",
    "make_store",
    "new_outbox_id",
]
