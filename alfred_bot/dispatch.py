"""Inbound dispatch: a bounded queue feeds handler workers; the store is the real buffer.

Fresh messages are offered to the in-memory queue straight after their commit. When the queue
is full they are NOT dropped: they are already pending in the store, and a catch-up task scans
the store for pending messages once the queue has room (it also runs at start-up, which is how
messages accepted before a crash get handled). A message is never in the queue twice: the
`_inflight` set guards the queue, and the completion's `state = 'pending'` check guards the store.

The queue has one lane per tenant (`fairqueue.FairQueue`): a tenant holds at most its share of the
workers, so one tenant's slow handlers or hanging orchestrator never delay another tenant's messages.

What happens to one message is the router's business (`Router.handle`): the dispatcher mounts each
tenant's router with the built-in middleware — consent, then the inbound limit, then the handler
timing — outside the bot's own, and the orchestrator as the fallback for texts. `Runner` runs it
under the handler timeout and commits the outcome.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from alfred_bot import tracing
from alfred_bot.admission import FLOOR, Admission
from alfred_bot.config import Config, DispatchConfig
from alfred_bot.consent import consent_middleware
from alfred_bot.context import Context, Services, StatusContext
from alfred_bot.dialog import UserLocks
from alfred_bot.fairqueue import FairQueue
from alfred_bot.limits import InboundLimiter, limit_middleware
from alfred_bot.logs import bound, new_trace_id, redact
from alfred_bot.models import Message
from alfred_bot.orchestrator import Orchestrator, orchestrator_fallback
from alfred_bot.parse import InboundItem, StatusItem
from alfred_bot.prometheus import Metrics
from alfred_bot.router import Middleware, Next, Router
from alfred_bot.store import Cluster, Completion, Inbox, InboxState, Outbox, OutboxRow, StoreError, claim_after
from alfred_bot.tasks import stop_workers
from alfred_bot.telemetry import Telemetry

log = logging.getLogger("alfred.dispatch")

SCAN_BATCH = 200
RETRY_DELAY = 1.0
#: On a shared database: how often to look for messages a dead node left (NOTIFY covers the rest).
TAKE_POLL = 1.0
#: A handler still running after this long gets its read receipt (and "typing…") sent at once.
EARLY_RECEIPT_AFTER = 0.2
COMMIT_RETRY_CAP = 30.0


class DispatchStore(Inbox, Outbox, Cluster, Protocol):
    """What dispatch needs of the store: pending messages and their completions, the outbox
    (replies of status routes, early read receipts) and, on a shared database, `take`."""


class Dispatcher:
    """Runs each accepted message through its tenant's router exactly once."""

    def __init__(
        self,
        store: DispatchStore,
        routers: Mapping[str, Router],
        cfg: Config,
        *,
        on_replies: Callable[[], None] | None = None,
        orchestrator: Orchestrator | None = None,
        services: Services | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._telemetry = telemetry or Telemetry(cfg.tenants)
        counts = self._telemetry.dispatch
        self._store = store
        self._cfg = cfg.dispatch
        self._routers = mount_routers(routers, cfg, counts, orchestrator, self._telemetry.metrics)
        self._runner = Runner(store, self._routers, cfg.dispatch, counts, services=services, on_replies=on_replies)
        tenants = len(cfg.tenants)
        self.queue: FairQueue[InboundItem | StatusItem] = FairQueue(
            cfg.dispatch.queue_size, cfg.dispatch.tenant_cap(tenants)
        )
        self.admission = Admission(  # never below one worker per tenant: the fair queue's caps need it
            cfg.dispatch.workers,
            floor=max(FLOOR, tenants),
            on_change=lambda limit: self.queue.set_cap(cfg.dispatch.tenant_cap(tenants, limit)),
        )
        self._inflight: set[str] = set()
        self._done_during_scan: set[str] | None = None  # only while a scan batch is in progress
        self._backlog = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._stopping = False
        #: Several nodes share the database: messages are leased with `take` (per-user order
        #: across nodes), never offered straight from the webhook.
        self._shared = store.shared

    async def start(self) -> None:
        """Start workers and the catch-up scan (which also picks up what a crash left pending)."""
        self._backlog.set()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"alfred-handler-{i}") for i in range(self._cfg.workers)
        ]
        self._tasks.append(asyncio.create_task(self._catch_up(), name="alfred-catch-up"))
        self._tasks.append(asyncio.create_task(self.admission.watch(), name="alfred-handler-admission"))
        if self._shared:
            self._store.watch(self._backlog.set, lambda: None)
            self._tasks.append(asyncio.create_task(_every(TAKE_POLL, self._backlog.set), name="alfred-take-poll"))

    @property
    def running(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks) and not self._stopping

    @property
    def counts(self) -> Mapping[str, int]:
        """Messages handled, failed, recovered… (read-only; the numbers live in the telemetry object)."""
        return MappingProxyType(self._telemetry.dispatch)

    @property
    def backlog(self) -> bool:
        return self._backlog.is_set()

    @property
    def scanning(self) -> bool:
        """A catch-up batch is being queued (it remembers completions meanwhile, released after)."""
        return self._done_during_scan is not None

    def offer(self, items: Iterable[InboundItem | StatusItem]) -> None:
        """Queue freshly committed updates; on a full queue leave messages to the catch-up scan.

        Status events are only queued when the tenant's router has status routes; they are
        notifications (the outbox row already holds the new state), so a full queue drops them
        with a count rather than blocking the webhook.
        """
        for item in items:
            if isinstance(item, StatusItem):
                self._offer_status(item)
                continue
            if self._shared:  # leased by whichever node takes it first, in its user's order
                self._backlog.set()
                continue
            if item.key in self._inflight:
                continue
            try:
                self.queue.put_nowait(item.tenant or "", item)
            except asyncio.QueueFull:
                self._telemetry.dispatch["overflow"] += 1
                self._backlog.set()
            else:
                self._inflight.add(item.key)

    def _offer_status(self, item: StatusItem) -> None:
        router = self._routers.get(item.tenant or "")
        if router is None or not router.status_handlers(item.status):
            return
        try:
            self.queue.put_nowait(item.tenant or "", item)
        except asyncio.QueueFull:
            self._telemetry.dispatch["status_dropped"] += 1

    async def _catch_up(self) -> None:
        while True:
            await self._backlog.wait()
            self._backlog.clear()
            try:
                await self._scan()
            except Exception:  # the scan must outlive any read error, or pending rows wait forever
                log.exception("catch-up scan failed, retrying in %.0f s", RETRY_DELAY)
                self._retry_later()

    async def _scan(self) -> None:
        if self._shared:
            await self._take()
            return
        cursor: int | None = 0
        try:
            while cursor is not None:
                cursor = await self._scan_batch(cursor)
        finally:
            self._done_during_scan = None

    async def _scan_batch(self, cursor: int) -> int | None:
        """Queue one batch of pending rows after `cursor`; return the next cursor, None at the end.

        Completions are remembered from just before the read until the batch is queued: a row
        read as pending but completed meanwhile must not be queued again.
        """
        done: set[str] = set()
        self._done_during_scan = done
        batch = await self._store.pending(cursor, SCAN_BATCH)
        if not batch:
            return None
        for pending in batch:
            event_id = pending.item.key  # a wamid is unique per business number only
            if event_id in self._inflight or event_id in done:
                continue
            self._inflight.add(event_id)
            self._telemetry.dispatch["recovered"] += 1
            await self.queue.put(pending.item.tenant or "", pending.item)
        return batch[-1].seq

    async def _take(self) -> None:
        """Lease as many pending messages as the queue has room for (shared database)."""
        while (room := self.queue.maxsize - self.queue.qsize()) > 0 and not self._stopping:
            batch = await self._store.take(min(room, SCAN_BATCH))
            for pending in batch:
                if pending.item.key not in self._inflight:
                    self._inflight.add(pending.item.key)
                    await self.queue.put(pending.item.tenant or "", pending.item)  # statuses may have come first
            if len(batch) < min(room, SCAN_BATCH):
                return

    def _retry_later(self) -> None:
        asyncio.get_running_loop().call_later(RETRY_DELAY, self._backlog.set)

    async def _worker(self) -> None:
        current = asyncio.current_task()
        assert current is not None
        while not self._stopping:
            async with self.admission:  # fewer run at once while the process is busy (admission.py)
                lane, item = await self.queue.get()
                self._busy.add(current)
                try:
                    if isinstance(item, StatusItem):
                        await self._runner.status(item)
                    else:
                        await self._guarded(item)
                finally:
                    self._busy.discard(current)
                    self.queue.done(lane)

    async def _guarded(self, item: InboundItem) -> None:
        trace_id = item.trace_id or new_trace_id()
        try:
            with bound(trace_id=trace_id, tenant=item.tenant, message_id=item.message.id), tracing.follow(
                "handler", trace_id, {"alfred.tenant": item.tenant or "", "alfred.message_type": item.message.type}
            ):
                await self._runner.message(item)
        except Exception:  # a bug here must not kill the worker; the message stays pending
            log.exception("dispatch of %s failed; it stays pending", item.message.id)
            if self._shared:
                await _give_back(self._store, item)
            self._retry_later()
        finally:
            self._inflight.discard(item.key)
            if self._done_during_scan is not None:
                self._done_during_scan.add(item.key)
            if self._shared:  # the user's next message may be taken now
                self._backlog.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Let busy workers finish their message (up to `grace` s); the rest stays pending."""
        self._stopping = self._runner.stopping = True
        await stop_workers(self._tasks, self._busy, grace)
        self._tasks = []
        await self._runner.close()


async def _every(seconds: float, callback: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(seconds)
        callback()


async def _give_back(store: DispatchStore, item: InboundItem) -> None:
    """Shared database: release the lease, or this node would hold the user until it stops."""
    try:
        await store.release(item.message.id, item.phone_number_id)
    except StoreError as exc:  # the heartbeat keeps the lease; a restart or takeover frees it
        log.error("cannot give %s back: %s", item.message.id, exc)


def mount_routers(
    routers: Mapping[str, Router],
    cfg: Config,
    counts: Counter[str],
    orchestrator: Orchestrator | None,
    metrics: Metrics,
) -> dict[str, Router]:
    """Each tenant's router as dispatch runs it: the built-in middleware outside the bot's own (one
    inbound limiter for all tenants, keyed by tenant and user) and the orchestrator for texts."""
    limiter = InboundLimiter(cfg.limits.inbound_per_user, cfg.limits.inbound_window_seconds)
    builtins = (
        consent_middleware(cfg.limits, counts),
        limit_middleware(limiter, cfg.limits),
        latency_middleware(metrics),
    )
    fallback = orchestrator_fallback(orchestrator, cfg.orchestrator, counts)
    return {name: router.mount(outer=builtins, text_fallback=fallback) for name, router in routers.items()}


def latency_middleware(metrics: Metrics) -> Middleware:
    """The innermost built-in: the bot's handling time per tenant (`alfred_handler_latency_seconds`).

    Inside consent and the limit, so an opt-out word or a limited message, which the bot never
    sees, is not timed; a handler that fails is not timed either (it is counted as failed).
    """

    async def timed(message: Message, ctx: Context, call_next: Next) -> Any:
        started = time.perf_counter()
        result = await call_next()
        elapsed = time.perf_counter() - started
        metrics.handler_latency.labels(ctx.tenant).observe(elapsed)
        log.debug("handled %s in %.1f ms", message.id, elapsed * 1000)
        return result

    return timed


class Runner:
    """Runs one queued item through its tenant's (mounted) router and records the outcome once."""

    def __init__(
        self,
        store: DispatchStore,
        routers: Mapping[str, Router],
        cfg: DispatchConfig,
        counts: Counter[str],
        *,
        services: Services | None,
        on_replies: Callable[[], None] | None,
    ) -> None:
        self._store = store
        self._routers = routers
        self._cfg = cfg
        self._counts = counts
        self._services = services
        self._on_replies = on_replies
        self._early = EarlyReceipts(store, on_replies)
        self._users = UserLocks()
        #: Set when shutdown starts: a completion that cannot be committed then stays pending.
        self.stopping = False

    async def message(self, item: InboundItem) -> None:
        """Handle a message and commit its completion (replies, state, consent) in one write; one
        message of a user at a time, as its dialog state is read before and written after."""
        async with self._users.hold(f"{item.tenant}:{item.message.sender}"):
            await self._message(item)

    async def _message(self, item: InboundItem) -> None:
        try:
            done = await self._run(item)
        finally:
            self._early.cancel(f"{item.tenant}:{item.message.id}")  # the completion carries the receipt
        tracing.note({"alfred.outcome": done.state, "alfred.replies": len(done.replies)})
        if not await self._commit(done):
            return
        self._counts[done.state] += 1

    async def _commit(self, done: Completion) -> bool:
        """Keep the outcome and retry only the commit: re-running the handler would repeat its side
        effects. False if we are stopping (the message stays pending)."""
        attempt = 0
        while True:
            try:  # with replies, the sender's claim leases them
                await claim_after(self._store, self._store.complete(done), self._on_replies if done.replies else None)
                return True
            except StoreError as exc:
                delay = min(COMMIT_RETRY_CAP, RETRY_DELAY * 2**attempt)
                log.error("could not record the outcome of %s, retrying in %.0f s: %s", done.event_id, delay, exc)
                if self.stopping:
                    return False
                await asyncio.sleep(delay)
                attempt += 1

    async def _run(self, item: InboundItem) -> Completion:
        message, tenant = item.message, item.tenant
        router = self._routers.get(tenant) if tenant else None
        if router is None or tenant is None:
            log.warning("message %s: tenant %r is not configured any more", message.id, tenant)
            return Completion(message.id, "unrouted", phone_number_id=item.phone_number_id)
        ctx = Context(
            tenant=tenant,
            phone_number_id=item.phone_number_id,
            message=message,
            contact=item.contact,
            services=self._services,
            early=self._early.schedule,
            trace_id=item.trace_id,
            received_at=item.received_at,
        )
        await ctx.load_state()  # outside the handler's try: a read error leaves the message pending
        try:
            async with asyncio.timeout(self._cfg.handler_timeout_seconds):
                await router.handle(message, ctx)
                await self._check_templates(ctx)
        except StoreError:  # the database failed, not the handler: pending, tried again (no apology)
            raise
        except Exception as exc:  # noqa: BLE001 (a handler bug must not stop the bot)
            return self._failed(ctx, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being stopped: the message stays pending
            return self._failed(ctx, exc)
        return self._completion(ctx, "limited" if ctx.limited else "handled")

    async def _check_templates(self, ctx: Context) -> None:
        """Template replies meet the synced templates, as API sends do (`InvalidMessage`: the
        handler failed, its fallback goes instead)."""
        check = self._services.check_template if self._services is not None else None
        if check is None or ctx.tenant is None:
            return
        for reply in ctx.replies:
            if reply.type == "template":
                await check(ctx.tenant, json.loads(reply.payload))

    @staticmethod
    def _completion(ctx: Context, state: InboxState, error: str | None = None) -> Completion:
        """The outcome with the consent verdict of the built-in middleware (`consent.py`)."""
        return Completion(
            ctx.message.id,
            state,
            tuple(ctx.replies),
            error,
            tenant=ctx.tenant,
            user=ctx.recipient,
            consent=ctx.consent,
            phone_number_id=ctx.phone_number_id,
            # a failed handler's state change and cancels go with its replies (see `_failed`)
            dialog=ctx.state.written() if state != "failed" else None,
            cancels=tuple(ctx.cancels) if state != "failed" else (),
        )

    def _failed(self, ctx: Context, exc: BaseException) -> Completion:
        """Drop whatever the handler queued; queue the configured fallback instead."""
        reason = "handler timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        reason = redact(reason.encode("utf-8", "backslashreplace").decode("utf-8"))  # storable, secret-free
        log.error("handler failed for %s (tenant %s): %s", ctx.message.id, ctx.tenant, reason)
        ctx.replies[:] = [r for r in ctx.replies if r.type == "read"]  # the receipt stays, replies go
        if self._cfg.fallback_text.strip():
            ctx.reply(self._cfg.fallback_text[:4096])
        return self._completion(ctx, "failed", reason[:1000])

    async def status(self, item: StatusItem) -> None:
        """Run the status routes of the tenant; what they send is queued straight away."""
        router = self._routers.get(item.tenant or "")
        if router is None or item.tenant is None:
            return
        ctx = StatusContext(tenant=item.tenant, phone_number_id=item.phone_number_id, status=item.status)
        try:
            async with asyncio.timeout(self._cfg.handler_timeout_seconds):
                for handler in router.status_handlers(item.status):
                    await handler(item.status, ctx)
            if ctx.replies:
                await claim_after(self._store, self._store.enqueue(ctx.replies), self._on_replies)
        except Exception:  # a status handler bug must not stop the bot
            status = item.status
            log.exception("status handler failed for %s %s (tenant %s)", status.id, status.status, item.tenant)
            self._counts["status_failed"] += 1
            return
        self._counts["status_handled"] += 1

    async def close(self) -> None:
        await self._early.close()


class EarlyReceipts:
    """Read receipts queued before the completion when the handler is slow, so "typing…" shows.

    Only after `EARLY_RECEIPT_AFTER`: a fast handler's receipt simply goes with its replies
    (one write instead of two). The completion inserts the row anyway; its idempotency key
    makes a second insert a no-op, and if the early write fails the completion still queues it.
    """

    def __init__(self, store: Outbox, on_replies: Callable[[], None] | None) -> None:
        self._store = store
        self._on_replies = on_replies
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def schedule(self, row: OutboxRow) -> None:
        """`Context.mark_read` calls this with the receipt row."""
        event_id = f"{row.tenant}:{row.source_event_id or row.id}"  # wamids are unique per number only
        loop = asyncio.get_running_loop()
        self._timers[event_id] = loop.call_later(EARLY_RECEIPT_AFTER, self._spawn, event_id, row)

    def cancel(self, event_id: str) -> None:
        timer = self._timers.pop(event_id, None)
        if timer is not None:
            timer.cancel()

    def _spawn(self, event_id: str, row: OutboxRow) -> None:
        self._timers.pop(event_id, None)
        task = asyncio.create_task(self._enqueue(row))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enqueue(self, row: OutboxRow) -> None:
        try:
            await claim_after(self._store, self._store.enqueue([row]), self._on_replies)
        except StoreError as exc:
            log.warning("early read receipt not queued (the completion will queue it): %s", exc)

    async def close(self) -> None:
        """Cancel pending timers; give started writes a second (the completion, or the next run,
        queues the receipts anyway)."""
        for event_id in list(self._timers):
            self.cancel(event_id)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
