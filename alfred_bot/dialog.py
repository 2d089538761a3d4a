"""Conversation state (`ctx.state`) and the times of scheduled sends, for handlers and the API.

A handler reads the user's state as it was when its message came in and changes a copy; the
change is written by the message's completion, in the transaction that queues the replies, so a
crash leaves both or neither (`Completion.dialog`). Messages of one user are handled one at a time
(`UserLocks` here; across nodes, `take` leases only a user's oldest message), so no two handlers
read the same state and overwrite each other's change.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from types import EllipsisType
from typing import Any

import msgspec

from alfred_bot.store.base import MAX_DIALOG_BYTES, Dialog
from alfred_bot.validate import InvalidMessage

#: The furthest ahead a send may be scheduled (a year, and a day for leap years and time zones).
MAX_AHEAD_SECONDS = 366 * 86400
MAX_STEP = 100

#: What a scheduled send's time may be given as: Unix seconds, an aware datetime, or a delay.
When = float | int | datetime | timedelta


class StateError(ValueError):
    """A state a handler may not keep: not a JSON object, or larger than `MAX_DIALOG_BYTES`."""


def send_time(at: When, now: float | None = None, *, field: str = "send_at") -> float | None:
    """Unix time to send at: None for "now" (a time in the past is now). Raises `InvalidMessage`
    naming `field` for a naive datetime, a non-finite number or a time over a year ahead."""
    now = time.time() if now is None else now
    if isinstance(at, bool) or not isinstance(at, int | float | datetime | timedelta):
        raise InvalidMessage(field, "must be Unix seconds, an aware datetime or a timedelta")
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidMessage(field, "needs a time zone (an aware datetime, or an ISO 8601 time with an offset)")
        value = at.timestamp()
    elif isinstance(at, timedelta):
        value = now + at.total_seconds()
    else:
        value = float(at)
    if not math.isfinite(value):
        raise InvalidMessage(field, "must be a finite time")
    if value > now + MAX_AHEAD_SECONDS:
        raise InvalidMessage(field, f"must be at most {MAX_AHEAD_SECONDS // 86400} days ahead")
    return value if value > now else None


def _encode(data: Mapping[str, Any]) -> bytes:
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise StateError("state data must be a mapping with string keys")
    try:
        raw = msgspec.json.encode(dict(data))
    except (TypeError, ValueError, OverflowError) as exc:
        raise StateError(f"state data must be JSON (str, int, float, bool, None, lists, dicts): {exc}") from None
    if len(raw) > MAX_DIALOG_BYTES:
        raise StateError(f"state data is {len(raw)} bytes as JSON; the limit is {MAX_DIALOG_BYTES}")
    return raw


def _step(step: str | None) -> str | None:
    if step is not None and (not isinstance(step, str) or not 1 <= len(step) <= MAX_STEP):
        raise StateError(f"a state step is a string of 1-{MAX_STEP} characters, or None")
    return step


class DialogState:
    """The user's conversation state with this tenant: a `step` (what `@router.state` matches)
    and a JSON object of data. Changes are buffered and written with the handler's replies.

    `set` replaces everything, `update` merges data (and may move the step), `clear` ends the
    dialog. `ttl` (seconds): the state reads as none once that long has passed."""

    def __init__(self, loaded: Dialog | None = None) -> None:
        self._reset(loaded)

    def _reset(self, loaded: Dialog | None) -> None:
        self._step = loaded.step if loaded else None
        self._data: dict[str, Any] = msgspec.json.decode(loaded.data) if loaded else {}
        self._expires = loaded.expires_at if loaded else None
        self._changed = False

    def load(self, loaded: Dialog | None) -> None:
        """What the store holds (the dispatcher's read before routing)."""
        self._reset(loaded)

    @property
    def step(self) -> str | None:
        """The dialog step, None outside any dialog."""
        return self._step

    @property
    def data(self) -> dict[str, Any]:
        """A copy of the state's data (change it with `update` or `set`)."""
        return msgspec.json.decode(msgspec.json.encode(self._data))  # type: ignore[no-any-return]

    @property
    def expires_at(self) -> float | None:
        return self._expires

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def set(self, step: str | None, data: Mapping[str, Any] | None = None, *, ttl: float | None = None) -> None:
        """Go to `step` with exactly `data` (none: empty); `ttl` seconds, or no expiry."""
        raw, step, expires = _encode(data or {}), _step(step), _expiry(ttl)  # all checked before any change
        self._step, self._data, self._expires = step, msgspec.json.decode(raw), expires
        self._changed = True

    def update(
        self,
        values: Mapping[str, Any] | None = None,
        /,
        *,
        step: str | EllipsisType | None = ...,
        ttl: float | EllipsisType | None = ...,
        **more: Any,
    ) -> None:
        """Merge `values` and keyword values into the data; `step` and `ttl` change only if given."""
        raw = _encode({**self._data, **(values or {}), **more})
        new_step = self._step if isinstance(step, EllipsisType) else _step(step)
        expires = self._expires if isinstance(ttl, EllipsisType) else _expiry(ttl)
        self._step, self._data, self._expires = new_step, msgspec.json.decode(raw), expires
        self._changed = True

    def clear(self) -> None:
        """End the dialog: no step, no data."""
        self._step, self._data, self._expires, self._changed = None, {}, None, True

    def written(self) -> Dialog | None:
        """The change to commit with the replies (None: unchanged)."""
        if not self._changed:
            return None
        return Dialog(self._step, msgspec.json.encode(self._data), self._expires)


def _expiry(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_AHEAD_SECONDS:
        raise StateError(f"ttl must be seconds between 0 and {MAX_AHEAD_SECONDS}, or None")
    return time.time() + ttl


class UserLocks:
    """One message per user at a time in this process (its state is read, then written)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
