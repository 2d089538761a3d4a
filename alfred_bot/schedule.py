"""Scheduled sends: the promoter that turns due `scheduled` outbox rows into `queued` ones.

A scheduled send is an ordinary outbox row with a later `send_at`, stored `scheduled`: the
senders never claim it and it never holds back its user's other sends. Every sending node
(`all`, `worker`) runs a `Promoter`: about every `schedule.interval_seconds` (sooner when the next
send is due sooner) it reads the due rows, checks the 24-hour customer service window again for
free-form ones (the user may not have written since the send was scheduled), and in one
transaction makes the rest `queued` (due now, paced like any send) and fails the late ones with a
clear error. The changes are conditional on the row still being `scheduled`, so several nodes
promoting at once, or a cancel racing a promotion, never apply a change twice; the rows are
durable, so a crash or `kill -9` loses none and a restart sends each once.

Also the API's reading of `send_at` (`parse_send_at`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Protocol

import msgspec
from aiohttp import web

from alfred_bot import keys
from alfred_bot.cluster import SENDING_ROLES
from alfred_bot.dialog import send_time
from alfred_bot.store import StoreError
from alfred_bot.store.base import Dialogs, DueSend
from alfred_bot.validate import InvalidMessage

log = logging.getLogger("alfred.schedule")

WINDOW_SECONDS = 24 * 3600
BATCH = 500
#: Expired conversation states are deleted about this often (they already read as none).
PURGE_EVERY = 3600.0  # and those idle for `retention.hot_days` (personal data)
LATE = "outside the 24-hour customer service window when it came due: only a template can be sent"
#: Sends that need the user's 24-hour window: everything but templates and read receipts.
_WINDOW_FREE = frozenset({"template", "read"})


class ScheduleStore(Protocol):
    """What the promoter needs: the scheduled rows, and the user's last message (the window)."""

    @property
    def dialogs(self) -> Dialogs: ...

    async def last_inbound(self, tenant: str, user: str) -> int | None: ...


def needs_window(send: DueSend) -> bool:
    """A free-form message to one user (not a template, a receipt, or a group message: Meta
    opens a group's window when any member writes, which Alfred does not track)."""
    if send.type in _WINDOW_FREE:
        return False
    try:
        payload = msgspec.json.decode(send.payload)
    except msgspec.DecodeError:
        return True
    return not (isinstance(payload, dict) and payload.get("recipient_type") == "group")


class Promoter:
    """Makes due scheduled sends `queued` (see the module docstring); `wake` wakes the senders."""

    def __init__(
        self,
        store: ScheduleStore,
        wake: Callable[[], None],
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        *,
        idle_days: float = 30.0,
    ) -> None:
        self._store = store
        self._wake = wake
        self._interval = interval
        self._clock = clock
        self._idle = idle_days * 86400  # a state untouched this long is personal data past retention
        self.counts = {"promoted": 0, "late": 0}
        self._purged_at = 0.0

    async def run_once(self) -> int:
        """One pass: promote what is due now; how many became queued."""
        now = self._clock()
        due = await self._store.dialogs.due(now, BATCH)
        last: dict[tuple[str, str], int | None] = {}  # one window read per user per pass, not per send
        late = [send.id for send in due if needs_window(send) and not await self._in_window(send, now, last)]
        gone = frozenset(late)
        ready = [send.id for send in due if send.id not in gone]
        queued = await self._store.dialogs.promote(ready, late, LATE, now)
        if late:
            log.warning("%d scheduled send(s) failed: %s", len(late), LATE)
        self.counts["promoted"] += queued
        self.counts["late"] += len(late)
        if queued:
            self._wake()
        if now - self._purged_at >= PURGE_EVERY:
            self._purged_at = now
            await self._store.dialogs.purge(now, now - self._idle)
        return queued

    async def _in_window(self, send: DueSend, now: float, known: dict[tuple[str, str], int | None]) -> bool:
        user = (send.tenant, send.recipient)
        if user not in known:
            known[user] = await self._store.last_inbound(*user)
        last = known[user]
        return last is not None and now - last <= WINDOW_SECONDS

    async def _pause(self) -> float:
        """Until the next scheduled send is due, at most `interval`."""
        nxt = await self._store.dialogs.next_at()
        if nxt is None:
            return self._interval
        return min(self._interval, max(0.0, nxt - self._clock()))

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
                pause = await self._pause()
            except StoreError as exc:  # the database is away: try again, never give up
                log.error("scheduled sends: pass failed, next try in %.0f s: %s", self._interval, exc)
                pause = self._interval
            await asyncio.sleep(max(pause, 0.01))


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The promoter, on sending roles only (a `web` node only stores scheduled sends)."""
    if app[keys.ROLE] not in SENDING_ROLES:
        yield
        return
    cfg = app[keys.CONFIG]
    wake = app[keys.SENDER].wake
    promoter = Promoter(app[keys.STORE], wake, cfg.schedule.interval_seconds, idle_days=cfg.retention.hot_days)
    task = asyncio.create_task(promoter.run(), name="alfred-schedule")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def parse_send_at(value: Any, now: float | None = None) -> float | None:
    """`send_at` of an API send: Unix seconds (a number) or an ISO 8601 time with an offset
    (`2026-12-01T09:00:00+01:00`, `…Z`). None: send now (also for a time in the past).
    Raises `InvalidMessage("send_at", …)` for anything else or more than a year ahead."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidMessage(
                "send_at", "must be Unix seconds or an ISO 8601 time with an offset, e.g. 2026-12-01T09:00:00+01:00"
            ) from None
        return send_time(moment, now)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage("send_at", "must be Unix seconds or an ISO 8601 time with an offset")
    return send_time(value, now)
