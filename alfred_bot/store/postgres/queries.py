"""The `Queries` role of `PostgresStore`, handed to `PostgresReads` once the pool exists.

Kept apart from the engine class so each class stays one concern: the engine owns the pool, the
heartbeat and the listener; this only forwards reads (which work in read-only mode too), with
string arguments made `safe` as the writes stored them (no NUL in PostgreSQL text).
"""

from __future__ import annotations

from typing import Any

from alfred_bot.store.base import StoreError
from alfred_bot.store.postgres.reads import PostgresReads
from alfred_bot.store.postgres.text import safe


class ForwardedQueries:
    """Every read, forwarded to `_reads` (set by `open`, cleared by `close`)."""

    _reads: PostgresReads | None = None

    @property
    def reads(self) -> PostgresReads:
        if self._reads is None:
            raise StoreError("the store is not open")
        return self._reads

    async def message(self, outbox_id: str) -> dict[str, Any] | None:
        return await self.reads.message(safe(outbox_id))

    async def message_by_key(self, idem_key: str) -> dict[str, Any] | None:
        return await self.reads.message_by_key(safe(idem_key))

    async def recent_inbound(self, limit: int) -> list[dict[str, Any]]:
        return await self.reads.recent_inbound(limit)

    async def last_inbound(self, tenant: str, user: str) -> int | None:
        return await self.reads.last_inbound(safe(tenant), safe(user))

    async def opted_out(self, tenant: str, user: str) -> bool:
        return await self.reads.opted_out(safe(tenant), safe(user))

    async def marketing_stopped(self, tenant: str, user: str) -> bool:
        return await self.reads.marketing_stopped(safe(tenant), safe(user))

    async def outbox_counts(self) -> dict[str, int]:
        return await self.reads.outbox_counts()

    async def outbox_by_tenant(self) -> dict[str, dict[str, int]]:
        return await self.reads.outbox_by_tenant()

    async def delivery(self, since: float) -> dict[str, dict[str, int]]:
        return await self.reads.delivery(since)

    async def activity(self, since: float, minutes: int) -> dict[str, list[dict[str, Any]]]:
        return await self.reads.activity(since, minutes)

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        return await self.reads.recent_failures(limit)

    async def events(self, limit: int, field: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        return await self.reads.events(limit, safe(field), safe(tenant))

    async def rejected(self, limit: int) -> list[dict[str, Any]]:
        return await self.reads.rejected(limit)

    async def conversation(self, tenant: str, user: str, limit: int) -> list[dict[str, Any]]:
        return await self.reads.conversation(safe(tenant), safe(user), limit)

    async def replies_to(self, tenant: str, event_id: str) -> list[dict[str, Any]]:
        return await self.reads.replies_to(safe(tenant), safe(event_id))

    async def dead_letters(self, limit: int, tenant: str | None = None) -> list[dict[str, Any]]:
        return await self.reads.dead_letters(limit, safe(tenant))

    async def audit(self, limit: int, tenant: str | None = None, outbox_id: str | None = None) -> list[dict[str, Any]]:
        return await self.reads.audit(limit, safe(tenant), safe(outbox_id))
