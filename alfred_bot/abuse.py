"""Abuse and consent: the per-user inbound limit, the opt-out words, and what ends an opt-out.

The limit counts messages by Meta's own `timestamp`, not by when we handle them: a backlog
replayed after a restart or an outage is judged by when the user really wrote, so a burst of
old messages is not punished twice and a real flood is caught however slowly we drain it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from alfred_bot.config import LimitsConfig
from alfred_bot.models import (
    AudioMessage,
    ButtonMessage,
    ContactsMessage,
    DocumentMessage,
    ImageMessage,
    InteractiveMessage,
    LocationMessage,
    Message,
    OrderMessage,
    StickerMessage,
    TextMessage,
    VideoMessage,
)

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


def is_opt_out(message: Message, limits: LimitsConfig) -> bool:
    """A STOP-like text (whole message, any case) or a template button with an opt-out payload."""
    if isinstance(message, ButtonMessage):
        return message.button.payload is not None and message.button.payload in limits.opt_out_payloads
    if message.type != "text" or message.text is None:
        return False
    word = message.text.strip().rstrip(".!").strip().casefold()
    return any(word == k.strip().casefold() for k in limits.opt_out_keywords)


#: Messages the user writes or sends on purpose. Deliberately absent: reactions, revokes and
#: edits (they change an earlier message, they do not write to us again), system notices (a
#: number change), `unsupported` / `unknown` and any type we cannot read (we cannot tell what the
#: user did), `request_welcome` (opening the chat is not a request for messages).
_WRITTEN = (
    TextMessage,
    ImageMessage,
    AudioMessage,
    VideoMessage,
    DocumentMessage,
    StickerMessage,
    LocationMessage,
    ContactsMessage,
    ButtonMessage,
    OrderMessage,
)
#: Taps on our interactive messages: reply buttons, list rows, a completed flow. Not a
#: `call_permission_reply`: accepting calls says nothing about wanting messages again.
_TAPPED = frozenset({"button_reply", "list_reply", "nfm_reply"})


def ends_opt_out(message: Message) -> bool:
    """True when this message means the user wants to hear from us again (lifts an opt-out).

    Judged by the decoded class, never by the `type` string: a message kept with a parse error
    is an `UnknownMessage` whatever type it claims, and never ends an opt-out.
    """
    if isinstance(message, InteractiveMessage):
        return message.interactive.type in _TAPPED
    return isinstance(message, _WRITTEN)
