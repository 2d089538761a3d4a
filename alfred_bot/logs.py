"""Structured logging: one JSON object per line (or plain text for a terminal).

Loggers are named `alfred.<part>`; extra fields passed with `extra={...}` become JSON keys.
`trace_id`, `tenant` and `message_id` come from context variables set where work starts (the
webhook, a dispatch worker, a send worker), so every line a message causes carries its trace id
without anyone passing it around. Messages never carry secrets or message texts.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import msgspec

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
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(data).decode()


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Send all `alfred.*` (and library) logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))  # ids: json only
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
