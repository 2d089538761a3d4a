"""Structured logging: one JSON object per line (or plain text for a terminal).

Loggers are named `alfred.<part>`; extra fields passed with `extra={...}` become JSON keys.
`trace_id`, `tenant` and `message_id` come from context variables set where work starts (the
webhook, a dispatch worker, a send worker), so every line a message causes carries its trace id
without anyone passing it around. Messages never carry secrets or message texts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import msgspec
from aiohttp.http_exceptions import HttpProcessingError

TRACE_ID: ContextVar[str | None] = ContextVar("trace_id", default=None)
TENANT: ContextVar[str | None] = ContextVar("tenant", default=None)
MESSAGE_ID: ContextVar[str | None] = ContextVar("message_id", default=None)
_CONTEXT = (("trace_id", TRACE_ID), ("tenant", TENANT), ("message_id", MESSAGE_ID))
_TRACE_SHAPE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_trace_id(given: str | None = None) -> str:
    """The caller's `X-Trace-Id` when it is a sane token, else a fresh one (never log raw headers)."""
    if given and _TRACE_SHAPE.fullmatch(given):
        return given
    return f"{random.getrandbits(128):032x}"  # unique enough for tracing; uuid4 costs a syscall per webhook


@contextlib.contextmanager
def bound(trace_id: str | None = None, tenant: str | None = None, message_id: str | None = None) -> Iterator[None]:
    """Tag every log line inside the block (in this task) with these ids."""
    pairs = ((TRACE_ID, trace_id), (TENANT, tenant), (MESSAGE_ID, message_id))
    tokens = [(var, var.set(value)) for var, value in pairs]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copy the context ids onto each record (unless the call passed its own in `extra`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render a record as a single JSON line with time, level, logger, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                # extras are set after the record factory ran (see `install_redactor`): redact here
                data[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info or record.exc_text:
            # exc_text first: set (redacted) when the record was made, see `install_redactor`
            data["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return msgspec.json.encode(data).decode()


#: Loggers of our own code; every other logger belongs to a library.
OWN_LOGGERS = ("alfred", "handlers")


def setup_logging(level: str = "INFO", fmt: str = "json", library_level: str = "INFO") -> None:
    """Send all `alfred.*` (and library) logs to stderr in the chosen format.

    Libraries log at `library_level` at most verbose (never more verbose than `level`): at DEBUG
    aiosqlite logs every query with its parameters (raw phone numbers), aiohttp and asyncio
    their internals; `logging.level = "DEBUG"` is meant for our own loggers.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))  # ids: json only
    root = logging.getLogger()
    root.handlers[:] = [handler]
    own = logging.getLevelName(level)
    root.setLevel(max(own, logging.getLevelName(library_level)))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------ redaction

Redact = Callable[[str], str]
_REDACTORS: list[Redact] = []
_BASE_FACTORY: list[Callable[..., logging.LogRecord]] = []  # the factory ours wraps, once installed
_EXC_FORMATTER = logging.Formatter()


def redact(text: str) -> str:
    """`text` through every installed redactor (see `install_redactor`)."""
    for redactor in _REDACTORS:
        text = redactor(text)
    return text


def install_redactor(redactor: Redact) -> Callable[[], None]:
    """Redact every log record from now on, whichever logger made it and whichever handler
    writes it: message (with its arguments), exception and stack text (string extras, which
    logging adds after the factory, are redacted by `JsonFormatter`). Returns the function that
    uninstalls it.

    Done in the log record factory, so no handler (ours, a test's, a library's) sees a record
    before it is clean; the exception text is formatted here once, redacted, and kept in
    `exc_text`, which every standard formatter prints instead of formatting it again.
    """
    if not _BASE_FACTORY:
        _BASE_FACTORY.append(logging.getLogRecordFactory())
        logging.setLogRecordFactory(_redacting_factory)
    _REDACTORS.append(redactor)

    def uninstall() -> None:
        if redactor in _REDACTORS:
            _REDACTORS.remove(redactor)

    return uninstall


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _BASE_FACTORY[0](*args, **kwargs)
    if _REDACTORS:
        scrub(record)
    return record


def scrub(record: logging.LogRecord) -> None:
    """Redact one record in place (message, exception and stack text)."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError, KeyError):  # bad arguments: keep only the template
        message, record.args = str(record.msg), None
    clean = redact(message)
    if clean != message or record.args is None:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(_EXC_FORMATTER.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


# ------------------------------------------------------------------------------------ rate limits


class RateLimit:
    """At most `per_minute` lines of one kind per minute; the first line after a quiet spell says
    how many were left out. Unauthenticated callers decide how often these lines happen, so
    without a cap they could fill the disk (log amplification)."""

    def __init__(self, per_minute: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._start = -math.inf
        self._count = 0
        self.suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """(log this one?, how many were left out before it, to report once)."""
        now = self._clock()
        if now - self._start >= 60:
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self.per_minute:
            self.suppressed += 1
            return False, 0
        missed, self.suppressed = self.suppressed, 0
        return True, missed


class BadRequestFilter(logging.Filter):
    """aiohttp's "Error handling request" for a malformed request (bad HTTP, broken chunked
    encoding, invalid headers) → one WARNING line without a traceback, rate-limited.

    Anyone can send those, and each cost a 30-line ERROR traceback. Errors raised by our own
    handlers (a real bug) keep their ERROR and traceback.
    """

    def __init__(self, limit: RateLimit | None = None) -> None:
        super().__init__()
        self.limit = limit or RateLimit()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        allowed, missed = self.limit.allow()
        if not allowed:
            return False
        lines = str(exc.message or "").strip().splitlines()
        peer = record.getMessage().rpartition(" from ")[2] or "?"
        record.msg = "malformed request from %s refused (%s: %r)" + (
            f"; {missed} more not logged in the last minute" if missed else ""
        )
        record.args = (peer[:64], type(exc).__name__, redact(lines[0][:160] if lines else ""))
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


def quiet_bad_requests() -> None:
    """Install `BadRequestFilter` on aiohttp's server logger (once)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server.filters):
        server.addFilter(BadRequestFilter())
