"""What to do with a Graph API answer: the ONE place that maps responses to decisions.

Meta says to classify by `error.code` (and details), never by HTTP status: code 190 arrives with
400 or 401, 130429 with 400 or 429. Only when the body carries no code (HTML from a proxy, an
empty body, a timeout) does the HTTP status decide. Nothing here raises on any input.
"""

from __future__ import annotations

import email.utils
import enum
import random
import time
from collections.abc import Callable, Mapping
from typing import Literal

import msgspec
from msgspec.structs import replace


class Outcome(enum.StrEnum):
    SENT = "sent"  # accepted by Meta (not yet delivered)
    RETRY = "retry"  # transient: back off and try again
    FAILED = "failed"  # permanent: exactly one attempt, keep the error
    PAUSE_TENANT = "pause_tenant"  # token/permission: stop all sends of the tenant, keep the queue
    PAUSE_NUMBER = "pause_number"  # account blocked/restricted: stop this number, a human must act
    PAIR_LIMIT = "pair_limit"  # 131056: delay only this recipient


#: Transient codes: temporary downtime, throughput, maintenance.
TRANSIENT = frozenset({2, 4, 80007, 130429, 131016, 131057, 133004})
#: Transient codes that also mean "send slower for a while".
SLOW_DOWN = frozenset({4, 80007, 130429})
#: "Unknown error — try again": only a few retries, then dead-letter.
UNKNOWN = frozenset({1, 131000})
#: Credentials or permissions: every send of the tenant would fail the same way.
TENANT_PAUSE = frozenset({0, 3, 10, 190}) | frozenset(range(200, 300))
#: The token itself is bad: every tenant sending with it is affected.
TOKEN_CODES = frozenset({0, 190})
#: The number or account is blocked, locked or unpaid.
NUMBER_PAUSE = frozenset({368, 131031, 131042, 131048})
PAIR = 131056
NEEDS_TEMPLATE = frozenset({131047, 470})

#: What a pause holds: every tenant sending with the token, this tenant, or this number.
Scope = Literal["token", "tenant", "number"]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The decision plus everything worth keeping about the answer."""

    outcome: Outcome
    http_status: int | None = None
    wamid: str | None = None
    code: int | None = None
    message: str | None = None
    details: str | None = None
    fbtrace_id: str | None = None
    retry_after: float | None = None
    slow_down: bool = False
    limited: bool = False  # an unknown error: retry only a few times
    needs_template: bool = False
    scope: Scope | None = None  # for a pause: what it holds (classified here, nowhere else)
    raw: str | None = None  # the start of a body we could not understand

    def redacted(self, redact: Callable[[str], str]) -> Decision:
        """This decision with every text Meta (or a proxy) wrote passed through `redact`.

        These texts are stored (outbox, dead letters, pause reasons) and shown, and a Graph error
        may echo a malformed token back: see `security.Redactor`.
        """
        fields = {"message": self.message, "details": self.details, "raw": self.raw, "fbtrace_id": self.fbtrace_id}
        changed = {k: redact(v) for k, v in fields.items() if v is not None}
        return replace(self, **changed)


class _ErrorData(msgspec.Struct):
    details: str | None = None


class _Error(msgspec.Struct):
    code: int | None = None
    message: str | None = None
    fbtrace_id: str | None = None
    error_data: _ErrorData | None = None


class _SentMessage(msgspec.Struct):
    id: str


class _Answer(msgspec.Struct):
    error: _Error | None = None
    messages: list[_SentMessage] | None = None
    success: bool | None = None


_answer = msgspec.json.Decoder(_Answer, strict=False)
RAW_KEEP = 500


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def decide(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Decision:
    """Map one HTTP answer of the Graph API to a decision."""
    after = retry_after(headers or {})
    try:
        answer = _answer.decode(body) if body.strip() else None
    except (msgspec.DecodeError, UnicodeDecodeError):
        answer = None
    if answer is not None and answer.error is not None and answer.error.code is not None:
        return _by_code(status, answer.error, after)
    if 200 <= status < 300:
        # Accepted. Without a readable id we cannot track delivery, but sending again would
        # probably duplicate the message: keep the raw answer instead.
        wamid = answer.messages[0].id if answer is not None and answer.messages else None
        plain = answer is not None and (wamid is not None or answer.success)
        raw = None if plain else (body[:RAW_KEEP].decode("utf-8", "replace") or "(empty body)")
        return Decision(outcome=Outcome.SENT, http_status=status, wamid=wamid, raw=raw)
    return _by_status(status, body, after)


def _by_code(status: int, error: _Error, after: float | None) -> Decision:
    code = error.code if error.code is not None else -1
    kept = Decision(
        outcome=Outcome.FAILED,
        http_status=status,
        code=code,
        message=error.message,
        details=error.error_data.details if error.error_data else None,
        fbtrace_id=error.fbtrace_id,
        retry_after=after,
    )
    if code in TRANSIENT:
        return replace(kept, outcome=Outcome.RETRY, slow_down=code in SLOW_DOWN)
    if code in UNKNOWN:
        return replace(kept, outcome=Outcome.RETRY, limited=True)
    if code == PAIR:
        return replace(kept, outcome=Outcome.PAIR_LIMIT)
    if code in TENANT_PAUSE:
        scope: Scope = "token" if code in TOKEN_CODES else "tenant"
        return replace(kept, outcome=Outcome.PAUSE_TENANT, scope=scope)
    if code in NUMBER_PAUSE:
        return replace(kept, outcome=Outcome.PAUSE_NUMBER, scope="number")
    return replace(kept, outcome=Outcome.FAILED, needs_template=code in NEEDS_TEMPLATE)


def _by_status(status: int, body: bytes, after: float | None) -> Decision:
    """No error code to go by (HTML, empty, or a success without an id): use the HTTP status."""
    raw = body[:RAW_KEEP].decode("utf-8", "replace") or f"(empty body, HTTP {status})"
    kept = Decision(outcome=Outcome.RETRY, http_status=status, retry_after=after, raw=raw)
    if status == 429:
        return replace(kept, outcome=Outcome.RETRY, slow_down=True)
    if status >= 500 or status in (408, 425):
        return replace(kept, outcome=Outcome.RETRY)
    if status == 401:
        # No code to tell a bad token from a missing permission: the token is the likely cause.
        return replace(kept, outcome=Outcome.PAUSE_TENANT, scope="token", message="HTTP 401 without an error code")
    return replace(kept, outcome=Outcome.RETRY, limited=True)


def transport_failure(reason: str) -> Decision:
    """A timeout, reset or refused connection: transient (the send may or may not have landed)."""
    return Decision(outcome=Outcome.RETRY, message=reason)


def backoff(attempt: int, *, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2^attempt))."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    return (rng or random).uniform(0.0, ceiling)
