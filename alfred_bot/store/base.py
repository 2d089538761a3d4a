"""The storage interfaces the rest of Alfred uses, and the records that cross them.

Everything outside `alfred_bot.store` talks to a role (`Inbox`, `Outbox`, `Queries`,
`Maintenance`), never to SQLite: each caller asks for the narrowest role it uses, so a new engine
sees at a glance what each part of Alfred relies on. `Store` is all four, for the wiring and for
engines. The embedded SQLite store is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import msgspec

from alfred_bot.parse import InboundItem, ParsedBody, StatusItem

InboxState = Literal["pending", "handled", "failed", "unrouted", "limited"]


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
    priority: int = 0  # 0: conversation (replies, receipts); 1: business-initiated (API)
    trace_id: str | None = None
    origin_at: float | None = None  # when the cause arrived (webhook or API call): end-to-end latency


class OutboxJob(msgspec.Struct, frozen=True):
    """A claimed outbox row: leased to this process until it is settled or the lease runs out."""

    id: str
    tenant: str
    recipient: str
    type: str
    payload: bytes
    attempts: int
    created_at: float
    trace_id: str | None = None
    origin_at: float | None = None
    #: Set on a read receipt the claim did not lease but dropped (`superseded`, `stale`): a notice to count.
    dropped: str | None = None


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One Graph API call, for the audit trail (the recipient is stored masked)."""

    tenant: str
    type: str
    recipient: str
    http_status: int | None
    error_code: int | None
    fbtrace_id: str | None
    latency_ms: float
    outcome: str


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """How one claimed send ended: sent, back to queued (retry/deferred) or failed.

    `refund` gives back the attempt the claim counted, for sends that were deferred without
    reaching Meta (a paused tenant, a recipient still in its pair-limit backoff).
    """

    id: str
    state: Literal["sent", "queued", "failed", "dropped"]  # dropped: a best-effort read receipt given up
    attempts: int  # the claim's attempt count: a settle for an older claim of the row is ignored
    due_at: float | None = None
    wamid: str | None = None
    refund: bool = False
    error_code: int | None = None
    error_message: str | None = None
    error_details: str | None = None
    error_fbtrace_id: str | None = None
    error_http_status: int | None = None
    needs_template: bool = False
    audit: AuditEntry | None = None  # the Graph call this settles, written in the same transaction


class Completion(msgspec.Struct, frozen=True):
    """The outcome of handling one inbound message, written in one transaction with its replies.

    `consent` records the user's wish in the same transaction: "out" after an opt-out word,
    "in" for a message the user writes or taps (which lifts an earlier opt-out; see
    `consent.ends_opt_out`), None for anything else (a reaction, a system notice, …).

    The row is identified by `phone_number_id` and `event_id` (the wamid): a wamid is unique per
    business number only. Without `phone_number_id` only a wamid no other number used matches.
    """

    event_id: str
    state: InboxState
    replies: tuple[OutboxRow, ...] = ()
    error: str | None = None
    tenant: str | None = None
    user: str | None = None
    consent: Literal["in", "out"] | None = None
    phone_number_id: str | None = None


class PendingMessage(msgspec.Struct, frozen=True):
    """An accepted message not yet handled, with its position for resumable scans."""

    seq: int
    item: InboundItem


class Inbox(Protocol):
    """What the webhook and the dispatcher need: accept messages, hand out pending ones, finish them."""

    async def ingest(self, body: ParsedBody) -> list[InboundItem | StatusItem]:
        """Store everything in `body`; return the routed messages and statuses not seen before.

        Dedupe: a message per (phone number id, wamid), a status per key, an event per key, a
        rejected item per key. A status moves its tenant's outbox row forward, never back."""

    async def pending(self, after_seq: int, limit: int) -> list[PendingMessage]:
        """Accepted, unhandled messages after `after_seq`, oldest first."""

    async def complete(self, done: Completion) -> bool:
        """Mark a pending message handled/failed, queue its replies and record consent in ONE
        transaction; False (and nothing written) if it was not pending."""


class Outbox(Protocol):
    """What the senders and the API need to queue, lease and settle sends."""

    async def enqueue(self, rows: list[OutboxRow]) -> list[str]:
        """Queue sends; a row whose idem_key the tenant used already yields the existing id (no second send)."""

    async def claim(
        self,
        now: float,
        quotas: dict[str, int],
        lease: float,
        held: frozenset[str],
        *,
        receipts: Mapping[str, int] | None = None,
        receipt_max_age: float | None = None,
    ) -> list[OutboxJob]:
        """Lease up to `quotas[tenant]` due sends per tenant, each the oldest pending one of its user
        (read receipts aside), conversation rows (priority 0) before campaign rows. A lease runs out
        at `now + lease`. Rows in `held` (already in this process's hands) are never claimed again.

        Read receipts are best-effort: a receipt never holds back its user's later rows; only the
        newest of a user's receipts is sent, the older ones are dropped (`superseded`), as are those
        older than `receipt_max_age` s (`stale`); both come back as jobs with `dropped` set. With
        `receipts`, up to `receipts[tenant]` receipts are leased besides `quotas` (newest first).
        """

    async def settle(self, result: Settlement, now: float) -> None:
        """Record how a claimed send ended; ignored unless the row is still leased by that claim."""

    async def next_due(self, tenants: frozenset[str]) -> float | None:
        """When the next send of these tenants becomes due (None: nothing waits)."""

    async def retry_dead(self, ids: list[str] | None, now: float) -> int:
        """Queue failed sends again (all of them when `ids` is None); return how many."""

    async def message(self, outbox_id: str) -> dict[str, Any] | None:
        """One outbox row as the API shows it, or None."""

    async def message_by_key(self, idem_key: str) -> dict[str, Any] | None:
        """The outbox row queued with this idempotency key, or None."""


class Queries(Protocol):
    """Read models for the API, the status page, the handlers' history and the CLI (no writes)."""

    async def recent_inbound(self, limit: int) -> list[dict[str, Any]]:
        """The newest received messages, newest first, as JSON-ready objects."""

    async def last_inbound(self, tenant: str, user: str) -> int | None:
        """Unix time of the user's last message to this tenant (for the 24-hour window); system
        messages do not count; `user` may be the phone number or the user id of the same person."""

    async def opted_out(self, tenant: str, user: str) -> bool:
        """True while the user (by either of their ids) has opted out of business-initiated messages."""

    async def marketing_stopped(self, tenant: str, user: str) -> bool:
        """True while the user's latest `user_preferences` update (by Meta's timestamp) for this
        tenant says they stopped marketing messages (for campaigns)."""

    async def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by state."""

    async def outbox_by_tenant(self) -> dict[str, dict[str, int]]:
        """Outbox rows by tenant, then by state."""

    async def delivery(self, since: float) -> dict[str, dict[str, int]]:
        """Per tenant, messages sent since `since` and how many of them were delivered and read."""

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        """Inbound messages whose handler failed, newest first."""

    async def events(self, limit: int, field: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        """Other webhook fields (templates, account, preferences, unknown ones…), newest first: `field`,
        `tenant`, `phone_number_id`, `waba_id`, `time` (entry time), `received_at`, `value` (decoded JSON)."""

    async def rejected(self, limit: int) -> list[dict[str, Any]]:
        """Parts of webhooks that could not be read, newest first: `what`, `reason`, `received_at`."""

    async def conversation(self, tenant: str, user: str, limit: int) -> list[dict[str, Any]]:
        """The user's last `limit` messages with this tenant, both directions, oldest first."""

    async def replies_to(self, tenant: str, event_id: str) -> list[dict[str, Any]]:
        """The sends queued in answer to one inbound message (receipt and replies), in the order the
        handler queued them: `id`, `to`, `type`, `state`, `payload` (decoded JSON, None once scrubbed)."""

    async def dead_letters(self, limit: int, tenant: str | None = None) -> list[dict[str, Any]]:
        """Sends that failed for good, newest first."""

    async def audit(self, limit: int, tenant: str | None = None, outbox_id: str | None = None) -> list[dict[str, Any]]:
        """Graph API calls, newest first."""


#: The tables whose rows `scrub` changes, in the order the archive writes them.
ARCHIVE_TABLES = ("inbox", "outbox", "statuses", "events", "rejected")


class ArchiveBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The rows the next scrub would change, read before it changes them, so they can be copied
    to cold storage first (`alfred_bot.archive`): per table, every column as stored (`bytes` for
    raw bodies and payloads) and, in the same order, each row's key for `scrub(only=...)`."""

    rows: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, list[str | int]] = {}

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.keys.values())


class Maintenance(Protocol):
    """Lifecycle, health and retention: what wiring, /healthz and the retention job need."""

    async def open(self) -> None:
        """Create or migrate the schema and start the writer (read-only: only connect)."""

    async def close(self) -> None:
        """Finish queued writes, then release the database."""

    def stats(self) -> dict[str, int]:
        """Counters for /healthz (e.g. writes and the commits they shared)."""

    async def healthy(self) -> bool:
        """True while the database answers and the writer runs."""

    async def scrub(self, key: bytes, cutoff: float, only: Mapping[str, Sequence[str | int]] | None = None) -> int:
        """Remove texts and raw bodies and pseudonymise numbers in one batch of finished rows older
        than `cutoff` (never a pending message or a queued send; opt-outs stay); rows changed.

        With `only` (table -> keys, from `archive_batch`), only those rows, if they still qualify:
        what was archived is what gets scrubbed, and nothing that was not archived."""

    async def archive_batch(self, cutoff: float, limit: int) -> ArchiveBatch:
        """Read, change nothing: up to `limit` rows of each `ARCHIVE_TABLES` table that `scrub(key,
        cutoff)` would change now, each with every column named as in the SQLite schema (engine-only
        columns may be left out); `keys` holds their keys (inbox `seq`, outbox `id`, else `key`)."""

    async def purge(self, cutoff: float) -> int:
        """Delete one batch of finished rows older than `cutoff`; 0 when nothing is left."""


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Who this process is, for the heartbeat row other nodes and the status page read."""

    id: str
    host: str
    role: str  # all | web | worker
    version: str
    started_at: float
    pid: int


class Cluster(Protocol):
    """What several processes sharing one database need (PostgreSQL); the embedded engine has one
    process, so there `take` is its own scan, `nodes` lists only itself and `watch` never fires."""

    @property
    def shared(self) -> bool:
        """True when other processes may use the same database at the same time."""

    async def take(self, limit: int) -> list[PendingMessage]:
        """Lease up to `limit` pending messages to this node, oldest first, each the oldest pending
        message of its user (tenant, sender) that no live node holds: per-user order across nodes.

        A lease lasts `takeover_seconds` and the node's heartbeat renews it; a node that stops
        heartbeating loses it to the others. `complete` ends it."""

    async def release(self, event_id: str, phone_number_id: str) -> None:
        """Give back a taken message this node could not finish (its dispatch failed): it stays
        pending, and any node, this one included, may take it again."""

    async def nodes(self) -> list[dict[str, Any]]:
        """Nodes seen in the last day, newest first: `id`, `host`, `role`, `version`, `pid`,
        `started_at`, `seen_at`, `alive` (heartbeat within `takeover_seconds`)."""

    def watch(self, on_inbox: Callable[[], None], on_outbox: Callable[[], None]) -> None:
        """Call `on_inbox` when any node accepted new messages, `on_outbox` when any node queued
        sends (LISTEN/NOTIFY), so workers wake without polling. Callbacks run on the event loop."""


class Store(Inbox, Outbox, Queries, Maintenance, Cluster, Protocol):
    """Every role at once: what the wiring holds and what an engine implements.

    Every write is committed before the call returns. An engine proves itself by passing the
    contract suite in `tests/contract/` (add it to the `ENGINES` there)."""
