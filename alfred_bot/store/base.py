"""The storage interfaces the rest of Alfred uses, and the records that cross them.

Everything outside `alfred_bot.store` talks to a role (`Inbox`, `Outbox`, `Queries`,
`Maintenance`), never to SQLite: each caller asks for the narrowest role it uses, so a new engine
sees at a glance what each part of Alfred relies on. `Store` is all four, for the wiring and for
engines. The embedded SQLite store is the default.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from alfred_bot.parse import InboundItem, ParsedBody, StatusItem

T = TypeVar("T")

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
    #: Unix time to send at: a later time stores the row as `scheduled` (not claimed, and not
    #: holding back the user's other sends) until it comes due; None or past: queued at once.
    send_at: float | None = None
    campaign_id: str | None = None  # the campaign this send belongs to (counts, pause, cancel)


#: Seconds between sweeps of superseded and stale read receipts by claims that take none.
RECEIPT_SWEEP = 0.25


class ReceiptSweeps:
    """Whether a claim should drop superseded and stale read receipts even though it takes none.

    Why: under a backlog with no spare budget the pump claims many times a second and none of those
    claims takes a receipt; dropping at each of them was a third of SQLite's writer thread (and two
    round trips per claim on PostgreSQL). A claim that takes receipts always drops first; the others
    sweep once every `RECEIPT_SWEEP` seconds, so the drops are counted a little later, never missed.
    """

    def __init__(self) -> None:
        self._last = float("-inf")

    def due(self, now: float) -> bool:
        if now - RECEIPT_SWEEP < self._last <= now:  # (a clock set back sweeps too)
            return False
        self._last = now
        return True


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
    #: The user's new conversation state (`ctx.state`), written in the same transaction; None: unchanged.
    dialog: Dialog | None = None
    #: Scheduled or queued sends of this user (`tenant`, `user`) the handler cancelled (`ctx.cancel`).
    cancels: tuple[str, ...] = ()


class Dialog(msgspec.Struct, frozen=True):
    """One user's conversation state with one tenant: the dialog `step` (what `@router.state`
    matches) and a JSON object of `data`. No step and empty data is no dialog: writing it deletes
    the row. `expires_at` (Unix time): from then on it reads as no dialog."""

    step: str | None = None
    data: bytes = b"{}"
    expires_at: float | None = None

    @property
    def empty(self) -> bool:
        return self.step is None and self.data == b"{}"


#: The largest `Dialog.data` an engine stores (bytes of JSON); `ctx.state` refuses more first.
MAX_DIALOG_BYTES = 16 * 1024


class DueSend(msgspec.Struct, frozen=True):
    """A scheduled send whose time has come, as the promoter sees it (to re-check the window)."""

    id: str
    tenant: str
    recipient: str
    type: str
    payload: bytes
    send_at: float


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

    @property
    def shared(self) -> bool:
        """As `Cluster.shared`. For the sender: on a shared database a claim submitted after a write
        may run beside it and miss it; on SQLite's one writer it always runs after it."""

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


async def claim_after(store: Outbox, write: Awaitable[T], wake: Callable[[], None] | None) -> T:
    """Await `write` (rows the sender should claim: replies, a settle freeing the user's next row)
    and wake the sender (`wake`, if any) so that its next claim sees it.

    On one writer (SQLite, first in first out) the wake comes first: the claim it causes is queued
    behind the write, joins its group and shares its fsync (a claim queued before the write does
    not spend the wake: the pump claims again after it). `write` must reach the writer without
    an await of its own first (`SqliteStore._write`). On a shared database (PostgreSQL) claims run
    beside the write, so the wake comes after it has committed."""
    if wake is not None and not store.shared:
        wake()
    result = await write
    if wake is not None and store.shared:
        wake()
    return result


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

    async def activity(self, since: float, minutes: int) -> dict[str, list[dict[str, Any]]]:
        """The status page's charts: per tenant with any traffic, `minutes` one-minute points from
        `since`, oldest first, each `{at, inbound, sent, failed, p95_ms}` (`at`: the minute's start;
        `failed`: Graph calls Meta refused plus failed delivery statuses; `p95_ms`: nearest-rank p95
        of `sent_at - origin_at` over immediate replies, None without any). Receipts are not sends."""

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


class CampaignSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A campaign as created: `template` is `{"name", "language", "category"}` (category may be None)."""

    id: str
    tenant: str
    name: str
    template: dict[str, Any]
    send_at: float | None = None


class Campaigns(Protocol):
    """Campaigns (`store.campaigns`): a template sent to many recipients, as outbox rows of
    priority 1 with `campaign_id`, one per (campaign, recipient) (idem key `campaign:<id>:<to>`).

    A campaign is `loading` while its recipients go in (its rows wait, `paused`, so a crash
    mid-upload sends nothing until the upload is finished again), then `running`; `paused` rows
    are not claimed; `cancel` turns waiting rows `cancelled`. Counts are read from the rows."""

    async def create(self, spec: CampaignSpec) -> bool:
        """Record a new campaign as `loading`; False (nothing changed) if the id exists."""

    async def add(self, campaign_id: str, rows: Sequence[OutboxRow], *, marketing: bool) -> dict[str, int]:
        """Queue one batch of the campaign's sends (one transaction). Recipients who opted out, or
        (`marketing`) whose latest preference stopped marketing messages, are recorded as skipped
        instead. Returns `{"queued", "skipped", "duplicates"}` for this batch: a recipient the
        campaign already has (queued or skipped) is a duplicate and changes nothing."""

    async def finish(self, campaign_id: str) -> str | None:
        """End loading: `loading` becomes `running` and its rows become due (or `scheduled`); any
        other state is kept. The state after, or None for an unknown campaign."""

    async def control(self, campaign_id: str, action: str) -> str | None:
        """`pause` | `resume` | `cancel`; the stored state after (unchanged if the action does not
        apply: a cancelled campaign stays cancelled), or None for an unknown campaign."""

    async def summary(self, campaign_id: str) -> dict[str, Any] | None:
        """One campaign as `summaries` shows it, or None."""

    async def summaries(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Campaigns, newest first: `id`, `tenant`, `name`, `state` (`loading`, `scheduled`,
        `running`, `paused`, `cancelled`, `done`), `template`, `created_at`, `send_at`, `counts`
        (exclusive, by each send's current state: `queued` waiting in any form, `sent`, `delivered`,
        `read`, `failed`, `skipped`, `cancelled`), `total` and `failures_by_code` (`{"131049": 2}`)."""


class TemplateInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One message template of a WhatsApp Business Account, as Graph lists it."""

    name: str
    language: str
    status: str
    category: str | None = None
    id: str | None = None
    parameter_format: str | None = None
    components: list[dict[str, Any]] = []


class Templates(Protocol):
    """The synced message templates of each tenant (`store.templates`)."""

    async def replace(self, tenant: str, templates: Sequence[TemplateInfo]) -> None:
        """The tenant's whole set, as just listed by Graph (one transaction), and when."""

    async def upsert(self, tenant: str, template: TemplateInfo) -> None:
        """Add or update one template (one just created)."""

    async def remove(self, tenant: str, name: str, template_id: str | None = None) -> int:
        """Forget a deleted template (every language, or the one with `template_id`); how many."""

    async def templates(self, tenant: str, name: str | None = None) -> list[TemplateInfo]:
        """The tenant's templates (all, or those named `name`), by name then language."""

    async def synced_at(self, tenant: str) -> float | None:
        """When the tenant's set was last replaced (None: never synced: no check applies)."""


class FeedEntry(msgspec.Struct, frozen=True):
    """One row of the event bus feed: `stream` is `ingest` or `events`, `body` the entry's JSON."""

    seq: int
    stream: str
    body: bytes


class Feed(Protocol):
    """The event bus feed (issue 16): a transactional outbox towards Redis Streams.

    While `on`, every accepted inbound message, status and event, and every send outcome
    (queued, sent, failed, delivered, read) adds a feed row IN THE SAME TRANSACTION as the write
    itself, so what is committed is published, later if need be, never lost. `on` is False unless
    a Redis URL is configured: then no feed row is ever written."""

    on: bool

    async def relay(self, publish: Callable[[list[FeedEntry]], Awaitable[None]], limit: int) -> int:
        """Give the oldest rows (up to `limit`, in commit order as far as the engine knows it) to
        `publish`; once it returns, delete them. If it raises, nothing is deleted (the rows come
        again: a consumer may see an entry twice). How many were published; 0 when there were none
        or another node is relaying right now (one relays at a time)."""

    async def backlog(self) -> tuple[int, float | None]:
        """Rows not yet published, and the creation time of the oldest (None when empty)."""


class Dialogs(Protocol):
    """Conversation state and scheduled sends (`store.dialogs`).

    A handler's state is written by `Inbox.complete` (`Completion.dialog`), in the transaction
    that queues its replies; this reads it. Scheduled sends are outbox rows in state `scheduled`
    (`OutboxRow.send_at`): never claimed, never holding back their user's other sends, until the
    promoter makes them `queued` here. Every change is conditional on the row's current state,
    so nodes promoting or cancelling at once never apply a change twice."""

    async def get(self, tenant: str, user: str) -> Dialog | None:
        """The user's state with the tenant; None when there is none or it expired (store clock)."""

    async def due(self, now: float, limit: int) -> list[DueSend]:
        """Scheduled sends whose time is `now` or earlier, oldest first (reads only)."""

    async def promote(self, ready: Sequence[str], late: Sequence[str], error: str, now: float) -> int:
        """Of the sends still `scheduled`: `ready` become `queued` (due now, paced like any send),
        `late` become `failed` with `error` and `needs_template` (outside the 24-hour window when
        they came due). One transaction; how many became queued."""

    async def cancel(self, outbox_id: str) -> str | None:
        """Cancel a `scheduled` or `queued` send; the row's state after (`cancelled`, or the state
        that kept it: `sending`, `sent`, …), None for an unknown id."""

    async def scheduled(self, tenant: str, user: str, *, prefix: str = "", limit: int = 100) -> list[dict[str, Any]]:
        """The user's scheduled sends (idempotency key starting with `prefix`), soonest first:
        `id`, `send_at`, `type`, `payload` (decoded JSON)."""

    async def next_at(self) -> float | None:
        """When the soonest scheduled send comes due (None: nothing is scheduled)."""

    async def purge(self, now: float, idle_before: float | None = None) -> int:
        """Delete states that expired before `now`, and (personal data: retention) those not
        changed since `idle_before`; how many."""


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

    Features beyond these roles are sub-objects (`store.<feature>`), each its own module per
    engine, so that no engine class grows past a screenful.

    Every write is committed before the call returns. An engine proves itself by passing the
    contract suite in `tests/contract/` (add it to the `ENGINES` there)."""

    # store features: conversation state and scheduled sends
    @property
    def dialogs(self) -> Dialogs:  # read-only: an engine's own class (SqliteDialogs) satisfies it
        """Conversation state and scheduled sends."""
    # store features: campaigns and templates
    @property
    def campaigns(self) -> Campaigns: ...  # read-only to the roles: each engine sets its own class

    @property
    def templates(self) -> Templates: ...
    # store features: event bus feed
    @property
    def feed(self) -> Feed:
        """The event bus feed (read-only here, so an engine's own `Feed` class satisfies it)."""
