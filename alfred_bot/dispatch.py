"""Inbound dispatch: a bounded queue feeds handler workers; the store is the real buffer.

Fresh messages are offered to the in-memory queue straight after their commit. When the queue
is full they are NOT dropped: they are already pending in the store, and a catch-up task scans
the store for pending messages once the queue has room (it also runs at start-up, which is how
messages accepted before a crash get handled). A message is never in the queue twice: the
`_inflight` set guards the queue, and the completion's `state = 'pending'` check guards the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from alfred_bot.config import DispatchConfig
from alfred_bot.context import Context
from alfred_bot.parse import InboundItem
from alfred_bot.router import Router
from alfred_bot.store import Completion, Store, StoreError
from alfred_bot.tasks import stop_workers

log = logging.getLogger("alfred.dispatch")

SCAN_BATCH = 200
RETRY_DELAY = 1.0
COMMIT_RETRY_CAP = 30.0


class Dispatcher:
    """Runs each accepted message through its tenant's router exactly once."""

    def __init__(
        self,
        store: Store,
        routers: Mapping[str, Router],
        cfg: DispatchConfig,
        *,
        on_replies: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._on_replies = on_replies
        self._routers = routers
        self._cfg = cfg
        self.queue: asyncio.Queue[InboundItem] = asyncio.Queue(maxsize=cfg.queue_size)
        self._inflight: set[str] = set()
        self._done_during_scan: set[str] | None = None  # only while a scan batch is in progress
        self._backlog = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.counts: dict[str, int] = {"handled": 0, "failed": 0, "overflow": 0, "recovered": 0}

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

    def offer(self, items: Iterable[InboundItem]) -> None:
        """Queue freshly committed messages; on a full queue leave them to the catch-up scan."""
        for item in items:
            if item.message.id in self._inflight:
                continue
            try:
                self.queue.put_nowait(item)
            except asyncio.QueueFull:
                self.counts["overflow"] += 1
                self._backlog.set()
            else:
                self._inflight.add(item.message.id)

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
            event_id = pending.item.message.id
            if event_id in self._inflight or event_id in done:
                continue
            self._inflight.add(event_id)
            self.counts["recovered"] += 1
            await self.queue.put(pending.item)
        return batch[-1].seq

    def _retry_later(self) -> None:
        asyncio.get_running_loop().call_later(RETRY_DELAY, self._backlog.set)

    async def _worker(self) -> None:
        current = asyncio.current_task()
        assert current is not None
        while not self._stopping:
            item = await self.queue.get()
            self._busy.add(current)
            try:
                await self._handle(item)
            except Exception:  # a bug here must not kill the worker; the message stays pending
                log.exception("dispatch of %s failed; it stays pending", item.message.id)
                self._retry_later()
            finally:
                self._busy.discard(current)
                self._inflight.discard(item.message.id)
                if self._done_during_scan is not None:
                    self._done_during_scan.add(item.message.id)
                self.queue.task_done()

    async def _handle(self, item: InboundItem) -> None:
        done = await self._run_handler(item)
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
        self.counts["handled" if done.state == "handled" else "failed"] += 1
        if done.replies and self._on_replies is not None:
            self._on_replies()

    async def _run_handler(self, item: InboundItem) -> Completion:
        message, tenant = item.message, item.tenant
        router = self._routers.get(tenant) if tenant else None
        if router is None or tenant is None:
            log.warning("message %s: tenant %r is not configured any more", message.id, tenant)
            return Completion(message.id, "unrouted")
        ctx = Context(tenant=tenant, phone_number_id=item.phone_number_id, message=message, contact=item.contact)
        handler = router.resolve(message)
        started = time.perf_counter()
        try:
            if handler is not None:
                async with asyncio.timeout(self._cfg.handler_timeout_seconds):
                    await handler(message, ctx)
        except Exception as exc:  # noqa: BLE001 (a handler bug must not stop the bot)
            return self._failed(ctx, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being stopped: the message stays pending
            return self._failed(ctx, exc)
        log.debug("handled %s in %.1f ms", message.id, (time.perf_counter() - started) * 1000)
        return Completion(message.id, "handled", tuple(ctx.replies))

    def _failed(self, ctx: Context, exc: BaseException) -> Completion:
        """Drop whatever the handler queued; queue the configured fallback instead."""
        reason = "handler timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")  # storable whatever it holds
        log.error("handler failed for %s (tenant %s): %s", ctx.message.id, ctx.tenant, reason)
        ctx.replies.clear()
        if self._cfg.fallback_text.strip():
            ctx.reply(self._cfg.fallback_text[:4096])
        return Completion(ctx.message.id, "failed", tuple(ctx.replies), reason[:1000])

    async def stop(self, grace: float = 5.0) -> None:
        """Let busy workers finish their message (up to `grace` s); the rest stays pending."""
        self._stopping = True
        await stop_workers(self._tasks, self._busy, grace)
        self._tasks = []
