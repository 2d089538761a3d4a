"""Durable storage behind a small interface (`Store`); SQLite is the embedded default."""

from alfred_bot.store.base import Completion, InboxState, OutboxRow, PendingMessage, Store, StoreError
from alfred_bot.store.sqlite import SqliteStore

__all__ = ["Completion", "InboxState", "OutboxRow", "PendingMessage", "SqliteStore", "Store", "StoreError"]
