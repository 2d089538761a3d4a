"""Inbound dispatch: a bounded queue feeds handler workers; the store is the real buffer.

Fresh messages are offered to the in-memory queue straight after their commit. When the queue
is full they are NOT dropped: they are already pending in the store, and a catch-up task scans
the store for pending messages once the queue has room (it also runs at start-up, which is how
messages accepted before a crash get handled). A message is never in the queue twice: the
`_inflight` set guards the queue, and the completion's `state = 'pending'` check guards the store.

The queue has one lane per tenant (`lanes.FairQueue`): a tenant holds at most its share of the
workers, so one tenant's slow handlers or hanging orchestrator never delay another tenant's messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from alfred_bot.abuse import InboundLimiter, ends_opt_out, is_opt_out
from alfred_bot.config import Config
from alfred_bot.context import Context, Services, StatusContext
from alfred_bot.lanes import FairQueue
from alfred_bot.logs import bound, new_trace_id, redact
from alfred_bot.metrics import Metrics
from alfred_bot.models import Message, TextMessage
from alfred_bot.orchestrator import Orchestrator, OrchestratorError, envelope, split_text
from alfred_bot.parse import InboundItem, StatusItem
from alfred_bot.router import CONTINUE, Router
from alfred_bot.store import Completion, InboxState, OutboxRow, Store, StoreError
from alfred_bot.tasks import stop_workers

log = logging.getLogger("alfred.dispatch")

SCAN_BATCH = 200
RETRY_DELAY = 1.0
#: A handler still running after this long gets its read receipt (and "typing…") sent at once.
EARLY_RECEIPT_AFTER = 0.2
COMMIT_RETRY_CAP = 30.0


class Dispatcher:
    """Runs each accepted message through its tenant's router exactly once."""

    def __init__(
        self,
        store: Store,
        routers: Mapping[str, Router],
        cfg: Config,
        *,
        on_replies: Callable[[], None] | None = None,
        orchestrator: Orchestrator | None = None,
        services: Services | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._on_replies = on_replies
        self._routers = routers
        self._cfg = cfg.dispatch
        self._limits = cfg.limits
        self._orchestrator = orchestrator if orchestrator is not None and orchestrator.enabled else None
        self._orchestrator_fallback = cfg.orchestrator.fallback_text
        self._orchestrator_parts = cfg.orchestrator.max_parts
        self._services = services
        self._limiter = InboundLimiter(cfg.limits.inbound_per_user, cfg.limits.inbound_window_seconds)
        self.queue: FairQueue[InboundItem | StatusItem] = FairQueue(
            cfg.dispatch.queue_size, cfg.dispatch.tenant_cap(len(cfg.tenants))
        )
        self._inflight: set[str] = set()
        self._done_during_scan: set[str] | None = None  # only while a scan batch is in progress
        self._backlog = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._early_tasks: set[asyncio.Task[None]] = set()
        self._early_timers: dict[str, asyncio.TimerHandle] = {}
        self._stopping = False
        self.counts: Counter[str] = Counter(handled=0, failed=0, overflow=0, recovered=0)

    async def start(self) -> None:
        """Start workers and the catch-up scan (which also picks up what a crash left pending)."""
        self._backlog.set()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"alfred-handler-{i}") for i in range(self._cfg.workers)
        ]
        self._tasks.append(asyncio.create_task(self._catch_up(), name="alfred-catch-up"))

    @property
    def running(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks) and not self._stopping

    @property
    def backlog(self) -> bool:
        return self._backlog.is_set()

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
            if item.key in self._inflight:
                continue
            try:
                self.queue.put_nowait(item.tenant or "", item)
            except asyncio.QueueFull:
                self.counts["overflow"] += 1
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
            self.counts["status_dropped"] += 1

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
            self.counts["recovered"] += 1
            await self.queue.put(pending.item.tenant or "", pending.item)
        return batch[-1].seq

    def _retry_later(self) -> None:
        asyncio.get_running_loop().call_later(RETRY_DELAY, self._backlog.set)

    async def _worker(self) -> None:
        current = asyncio.current_task()
        assert current is not None
        while not self._stopping:
            lane, item = await self.queue.get()
            self._busy.add(current)
            try:
                if isinstance(item, StatusItem):
                    await self._handle_status(item)
                else:
                    await self._guarded(item)
            finally:
                self._busy.discard(current)
                self.queue.done(lane)

    async def _guarded(self, item: InboundItem) -> None:
        trace_id = item.trace_id or new_trace_id()
        try:
            with bound(trace_id=trace_id, tenant=item.tenant, message_id=item.message.id):
                await self._handle(item)
        except Exception:  # a bug here must not kill the worker; the message stays pending
            log.exception("dispatch of %s failed; it stays pending", item.message.id)
            self._retry_later()
        finally:
            self._inflight.discard(item.key)
            if self._done_during_scan is not None:
                self._done_during_scan.add(item.key)

    async def _handle(self, item: InboundItem) -> None:
        try:
            done = await self._run_handler(item)
        finally:
            self._cancel_early(f"{item.tenant}:{item.message.id}")  # the completion carries the receipt
        attempt = 0
        while True:
            try:
                await self._store.complete(done)
                break
            except StoreError as exc:
                # Keep the outcome and retry only the commit: re-running the handler would
                # repeat its side effects. If we are stopping, the message stays pending.
                delay = min(COMMIT_RETRY_CAP, RETRY_DELAY * 2**attempt)
                log.error("could not record the outcome of %s, retrying in %.0f s: %s", done.event_id, delay, exc)
                if self._stopping:
                    return
                await asyncio.sleep(delay)
                attempt += 1
        self.counts[done.state] += 1
        if done.replies and self._on_replies is not None:
            self._on_replies()

    async def _run_handler(self, item: InboundItem) -> Completion:
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
            early=self._send_early,
            trace_id=item.trace_id,
            received_at=item.received_at,
        )
        gate = self._gate(ctx)
        if gate is not None:
            return gate
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._cfg.handler_timeout_seconds):
                await self._route(router, ctx)
        except Exception as exc:  # noqa: BLE001 (a handler bug must not stop the bot)
            return self._failed(ctx, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being stopped: the message stays pending
            return self._failed(ctx, exc)
        elapsed = time.perf_counter() - started
        self._metrics.handler_latency.labels(tenant).observe(elapsed)
        log.debug("handled %s in %.1f ms", message.id, elapsed * 1000)
        return self._completion(ctx, "handled")

    def _send_early(self, row: OutboxRow) -> None:
        """Queue a read receipt before the completion if the handler is slow, so "typing…" shows.

        Only after `EARLY_RECEIPT_AFTER`: a fast handler's receipt simply goes with its replies
        (one write instead of two). The completion inserts the row anyway; its idempotency key
        makes a second insert a no-op, and if the early write fails the completion still queues it.
        """
        event_id = f"{row.tenant}:{row.source_event_id or row.id}"  # wamids are unique per number only
        loop = asyncio.get_running_loop()
        self._early_timers[event_id] = loop.call_later(EARLY_RECEIPT_AFTER, self._spawn_early, event_id, row)

    def _spawn_early(self, event_id: str, row: OutboxRow) -> None:
        self._early_timers.pop(event_id, None)
        task = asyncio.create_task(self._enqueue_early(row))
        self._early_tasks.add(task)
        task.add_done_callback(self._early_tasks.discard)

    def _cancel_early(self, event_id: str) -> None:
        timer = self._early_timers.pop(event_id, None)
        if timer is not None:
            timer.cancel()

    async def _enqueue_early(self, row: OutboxRow) -> None:
        try:
            await self._store.enqueue([row])
        except StoreError as exc:
            log.warning("early read receipt not queued (the completion will queue it): %s", exc)
            return
        if self._on_replies is not None:
            self._on_replies()

    def _completion(self, ctx: Context, state: InboxState, error: str | None = None) -> Completion:
        """A message the user writes or taps (other than an opt-out) means they want to hear from us;
        a reaction, an edit, a system notice … changes nothing (`abuse.ends_opt_out`)."""
        return Completion(
            ctx.message.id,
            state,
            tuple(ctx.replies),
            error,
            tenant=ctx.tenant,
            user=ctx.recipient,
            consent="in" if ends_opt_out(ctx.message) else None,
            phone_number_id=ctx.phone_number_id,
        )

    def _gate(self, ctx: Context) -> Completion | None:
        """Opt-out words end here; over the per-user limit the message is kept but not handled."""
        message = ctx.message
        if is_opt_out(message, self._limits):
            self.counts["opted_out"] += 1
            if self._limits.opt_out_reply.strip():
                ctx.reply(self._limits.opt_out_reply[:4096])
            return Completion(
                message.id,
                "handled",
                tuple(ctx.replies),
                tenant=ctx.tenant,
                user=ctx.recipient,
                consent="out",
                phone_number_id=ctx.phone_number_id,
            )
        verdict = self._limiter.check(ctx.tenant, ctx.recipient, float(message.timestamp))
        if verdict.allowed:
            return None
        if verdict.notify and self._limits.limit_notice.strip():
            ctx.reply(self._limits.limit_notice[:4096])
        log.warning("message %s: user over the inbound limit (tenant %s), kept but not handled", message.id, ctx.tenant)
        return Completion(
            message.id,
            "limited",
            tuple(ctx.replies),
            tenant=ctx.tenant,
            user=ctx.recipient,
            phone_number_id=ctx.phone_number_id,
        )

    async def _route(self, router: Router, ctx: Context) -> None:
        """The router's middleware, once, around: matching routes in order until one does not
        return CONTINUE; then the orchestrator (texts, when configured) or the default."""

        async def handle(message: Message, ctx: Context) -> None:
            for handler in router.handlers_for(message):
                if await handler(message, ctx) is not CONTINUE:
                    return
            if self._orchestrator is not None and isinstance(message, TextMessage):
                await self._ask_orchestrator(message, ctx)
            elif router.fallback is not None:
                await router.fallback(message, ctx)

        await router.wrap(handle)(ctx.message, ctx)

    async def _ask_orchestrator(self, message: Message, ctx: Context) -> None:
        """Forward a text to the orchestrator; its answer, or the fallback, goes back to the user."""
        assert self._orchestrator is not None
        ctx.mark_read(typing=True)
        request = envelope(
            trace_id=ctx.trace_id or new_trace_id(),
            text=message.text or "",
            user=ctx.recipient,
            message_id=message.id,
            phone_number=ctx.contact.wa_id if ctx.contact and ctx.contact.wa_id else message.from_,
            tenant=ctx.tenant,
        )
        try:
            answer = await self._orchestrator.ask(request)
        except OrchestratorError as exc:
            log.error("orchestrator failed for %s (tenant %s): %s", message.id, ctx.tenant, exc)
            self.counts["orchestrator_failed"] += 1
            if self._orchestrator_fallback.strip():
                ctx.reply(self._orchestrator_fallback[:4096])
            return
        for part in split_text(answer, max_parts=self._orchestrator_parts):
            ctx.reply(part)

    async def _handle_status(self, item: StatusItem) -> None:
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
                await self._store.enqueue(ctx.replies)
                if self._on_replies is not None:
                    self._on_replies()
        except Exception:  # a status handler bug must not stop the bot
            status = item.status
            log.exception("status handler failed for %s %s (tenant %s)", status.id, status.status, item.tenant)
            self.counts["status_failed"] += 1
            return
        self.counts["status_handled"] += 1

    def _failed(self, ctx: Context, exc: BaseException) -> Completion:
        """Drop whatever the handler queued; queue the configured fallback instead."""
        reason = "handler timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        reason = redact(reason.encode("utf-8", "backslashreplace").decode("utf-8"))  # storable, secret-free
        log.error("handler failed for %s (tenant %s): %s", ctx.message.id, ctx.tenant, reason)
        ctx.replies[:] = [r for r in ctx.replies if r.type == "read"]  # the receipt stays, replies go
        if self._cfg.fallback_text.strip():
            ctx.reply(self._cfg.fallback_text[:4096])
        return self._completion(ctx, "failed", reason[:1000])

    async def stop(self, grace: float = 5.0) -> None:
        """Let busy workers finish their message (up to `grace` s); the rest stays pending."""
        self._stopping = True
        await stop_workers(self._tasks, self._busy, grace)
        self._tasks = []
        for event_id in list(self._early_timers):
            self._cancel_early(event_id)
        if self._early_tasks:  # early receipts: the completion (or the next run) queues them anyway
            await asyncio.wait(self._early_tasks, timeout=1.0)
