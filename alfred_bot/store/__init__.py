"""Durable storage behind small role interfaces (`Inbox`, `Outbox`, `Queries`, `Maintenance`;
`Cluster` for several nodes; `Store` is all five); SQLite is the embedded default, `make_store` picks the engine."""

from alfred_bot.store.base import (
    ARCHIVE_TABLES,
    ArchiveBatch,
    AuditEntry,
    Cluster,
    Completion,
    Inbox,
    InboxState,
    Maintenance,
    NodeInfo,
    Outbox,
    OutboxJob,
    OutboxRow,
    PendingMessage,
    Queries,
    Settlement,
    Store,
    StoreError,
    claim_after,
)
from alfred_bot.store.factory import configured_store, describe, make_store
from alfred_bot.store.ids import new_outbox_id
from alfred_bot.store.sqlite.engine import SqliteStore

__all__ = [
    "ARCHIVE_TABLES",
    "ArchiveBatch",
    "AuditEntry",
    "Cluster",
    "Completion",
    "Inbox",
    "InboxState",
    "Maintenance",
    "NodeInfo",
    "Outbox",
    "OutboxJob",
    "OutboxRow",
    "PendingMessage",
    "Queries",
    "Settlement",
    "SqliteStore",
    "Store",
    "StoreError",
    "claim_after",
    "configured_store",
    "describe",
    "make_store",
    "new_outbox_id",
]
