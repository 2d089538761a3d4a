"""Durable storage behind a small interface (`Store`); SQLite is the embedded default."""

from alfred_bot.store.base import (
    AuditEntry,
    Completion,
    InboxState,
    OutboxJob,
    OutboxRow,
    PendingMessage,
    Settlement,
    Store,
    StoreError,
)
from alfred_bot.store.sqlite import SqliteStore

__all__ = [
    "AuditEntry",
    "Completion",
    "InboxState",
    "OutboxJob",
    "OutboxRow",
    "PendingMessage",
    "Settlement",
    "SqliteStore",
    "Store",
    "StoreError",
]
