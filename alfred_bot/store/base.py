"""The storage interface the rest of Alfred uses, and the records that cross it.

Everything outside `alfred_bot.store` talks to a `Store`, never to SQLite: the embedded SQLite
store is the default, and a distributed engine can implement the same few methods later.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import msgspec

from alfred_bot.parse import InboundItem, ParsedBody

InboxState = Literal["pending", "handled", "failed", "unrouted"]


class StoreError(Exception):
    """A write could not be made durable (disk full, I/O error, database closed)."""


class OutboxRow(msgspec.Struct, frozen=True):
    """A message to send, as queued by a handler reply or the API.

    `idem_key` is unique: inserting the same key twice keeps the first row, which is what makes a
    re-run of a handler after a crash harmless.
    """

    id: str
    idem_key: str
    tenant: str
    recipient: str
    type: str
    payload: bytes
    source_event_id: str | None = None


class Completion(msgspec.Struct, frozen=True):
    """The outcome of handling one inbound message, written in one transaction with its replies."""

    event_id: str
    state: InboxState
    replies: tuple[OutboxRow, ...] = ()
    error: str | None = None


class PendingMessage(msgspec.Struct, frozen=True):
    """An accepted message not yet handled, with its position for resumable scans."""

    seq: int
    item: InboundItem


class Store(Protocol):
    """Durable inbox and outbox. Every write is committed before the call returns."""

    async def open(self) -> None:
        """Create or migrate the schema and start the writer."""

    async def close(self) -> None:
        """Finish queued writes, then release the database."""

    async def ingest(self, body: ParsedBody) -> list[InboundItem]:
        """Store everything in `body`; return the routed messages not seen before (to dispatch)."""

    async def complete(self, done: Completion) -> bool:
        """Mark a pending message handled/failed and queue its replies; False if it was not pending."""

    async def pending(self, after_seq: int, limit: int) -> list[PendingMessage]:
        """Accepted, unhandled messages after `after_seq`, oldest first."""

    async def recent_inbound(self, limit: int) -> list[dict[str, Any]]:
        """The newest received messages, newest first, as JSON-ready objects."""

    async def outbox_for(self, event_id: str) -> list[dict[str, Any]]:
        """The replies queued for one inbound message."""

    def stats(self) -> dict[str, int]:
        """Counters for /healthz (e.g. writes and the commits they shared)."""

    async def healthy(self) -> bool:
        """True while the database answers and the writer runs."""
