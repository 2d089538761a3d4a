"""atheris fuzz target: `alfred_bot.parse.parse_body` on arbitrary bytes (run it with fuzz/run.py).

The promise under test: any body either is refused as a whole (`EnvelopeError`, answered 400) or
decodes into items that are each a valid model; no other exception may escape, and every kept
message decodes again, unchanged (with the same parse error), from the raw bytes stored for it
and its contact's user id (what a restart reads back).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from alfred_bot.models import UnknownMessage
    from alfred_bot.parse import EnvelopeError, InboundItem, parse_body, read_message

TENANTS = {"123456789012345": "home", "987654321098765": "biz"}


#: The first byte picks the mode. Even: the rest is the whole body. Odd: the rest goes inside a
#: valid envelope (3: `messages`, 1: `statuses`, 5: `contacts` list of a change), so the fuzzer
#: spends its time on items rather than on broken envelopes.
WRAPS = (
    b'{"entry":[{"id":"W","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":'
    b'"123456789012345"},"contacts":[{"wa_id":"1"}],"messages":[%s]}}]}]}',
    b'{"entry":[{"changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"1"},"statuses":[%s]}}]}]}',
    b'{"entry":[{"changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"1"},"contacts":[%s],'
    b'"messages":[{"from":"1","id":"w","timestamp":"1","type":"text","text":{"body":"x"}}]}}]}]}',
)


def check(data: bytes) -> None:
    body = WRAPS[data[0] % 3] % data[1:] if data and data[0] % 2 else data[1:]
    try:
        parsed = parse_body(body, TENANTS)
    except EnvelopeError:
        return
    for item in parsed.messages:
        _check_message(item)
    for status in parsed.statuses:
        if status.key != f"{status.phone_number_id}:{status.status.id}:{status.status.status}":
            raise AssertionError(f"status key {status.key!r}")
    if any(not rejected.reason for rejected in parsed.rejected):
        raise AssertionError("a rejected item without a reason")


def _check_message(item: InboundItem) -> None:
    again, problem = read_message(item.raw, user_id=item.contact.user_id if item.contact else None)
    if again != item.message or problem != item.parse_error:
        raise AssertionError(f"stored raw decodes differently: {again!r} != {item.message!r}")
    if item.parse_error is not None and not isinstance(item.message, UnknownMessage):
        raise AssertionError(f"a message with a parse error kept as its type: {item.message!r}")
    if not item.message.id or (not item.message.sender and item.parse_error is None):
        raise AssertionError(f"a kept message violates the model: {item.message!r}")
    if not isinstance(item.message.timestamp, int) or item.key != f"{item.phone_number_id}:{item.message.id}":
        raise AssertionError(f"a kept message violates the model: {item.message!r}")
    if not -(2**63) <= item.message.timestamp < 2**63:
        raise AssertionError("a timestamp SQLite cannot hold was kept")


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
