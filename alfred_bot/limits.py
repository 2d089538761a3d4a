"""The per-user inbound limit: `InboundLimiter` (pure, clock-injected) and its built-in middleware.

The limit counts messages by Meta's own `timestamp`, not by when we handle them: a backlog
replayed after a restart or an outage is judged by when the user really wrote, so a burst of
old messages is not punished twice and a real flood is caught however slowly we drain it.

The middleware runs right after consent (an opt-out word is never counted) and before the bot's
own middleware and routes; a message over the limit is kept (inbox state `limited`), not handled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from alfred_bot.config import LimitsConfig
from alfred_bot.models import Message

if TYPE_CHECKING:
    from alfred_bot.context import Context
    from alfred_bot.router import Middleware, Next

log = logging.getLogger("alfred.limits")

PRUNE_EVERY = 300.0
PRUNE_SIZE = 50_000  # also prune when this many users are tracked


class Verdict:
    """What to do with one message: dispatch it, and whether to send the limit notice."""

    __slots__ = ("allowed", "notify")

    def __init__(self, allowed: bool, notify: bool) -> None:
        self.allowed = allowed
        self.notify = notify


class InboundLimiter:
    """At most `per_user` messages per user in any `window` seconds; one notice per window.

    A sliding log of send times per user, kept in a plain list (a deque costs ~600 bytes even
    for one entry: a burst from 100,000 different users would hold ~60 MB instead of ~20 MB).
    """

    def __init__(self, per_user: int, window: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_user = per_user
        self._window = window
        self._clock = clock
        self._seen: dict[tuple[str, str], list[float]] = {}
        self._noticed: dict[tuple[str, str], float] = {}
        self._pruned = clock()
        self._prune_at = PRUNE_SIZE

    def check(self, tenant: str, user: str, at: float) -> Verdict:
        """Count a message the user sent at `at` (unix seconds) and judge it."""
        if self._per_user <= 0:
            return Verdict(allowed=True, notify=False)
        self._maybe_prune(at)
        key = (tenant, user)
        times = [t for t in self._seen.get(key, ()) if t > at - self._window]
        times.append(at)
        self._seen[key] = times[-(self._per_user + 1) :]  # more than the limit never changes a verdict
        if len(times) <= self._per_user:
            return Verdict(allowed=True, notify=False)
        last = self._noticed.get(key)
        notify = last is None or at - last >= self._window
        if notify:
            self._noticed[key] = at
        return Verdict(allowed=False, notify=notify)

    def _maybe_prune(self, at: float) -> None:
        """Forget users quiet for a whole window, so memory follows the active users only."""
        now = self._clock()
        if now - self._pruned < PRUNE_EVERY and len(self._seen) < self._prune_at:
            return
        self._pruned = now
        self._seen = {k: t for k, t in self._seen.items() if t and t[-1] > at - self._window}
        self._noticed = {k: t for k, t in self._noticed.items() if at - t < self._window}
        self._prune_at = max(PRUNE_SIZE, 2 * len(self._seen))  # amortised: never a scan per message

    @property
    def tracked(self) -> int:
        return len(self._seen)


def limit_middleware(limiter: InboundLimiter, limits: LimitsConfig) -> Middleware:
    """The built-in limit step: over the limit, the message is kept but not handled (`ctx.limited`),
    with `limits.limit_notice` at most once per window; it then says nothing about consent either
    (a message we did not act on does not lift an opt-out)."""

    async def limit(message: Message, ctx: Context, call_next: Next) -> Any:
        verdict = limiter.check(ctx.tenant, ctx.recipient, float(message.timestamp))
        if verdict.allowed:
            return await call_next()
        ctx.limited = True
        ctx.consent = None
        if verdict.notify and limits.limit_notice.strip():
            ctx.reply(limits.limit_notice[:4096])
        log.warning("message %s: user over the inbound limit (tenant %s), kept but not handled", message.id, ctx.tenant)
        return None

    return limit
