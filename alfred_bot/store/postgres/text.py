"""PostgreSQL `text` cannot hold the NUL character, which JSON (`\\u0000`) and SQLite can.

A message whose text, name or id carries one must still be accepted: refusing it would answer
503 to Meta for ever and hold back every other item of that webhook. Such values are stored with
U+FFFD in place of NUL (the columns are for display and lookups); the raw JSON, kept as `bytea`,
keeps the original, and that is what a pending message is decoded from. Every value a query
binds goes through `safe` the same way, so a lookup finds what an insert wrote.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

NUL, REPLACEMENT = "\x00", "\ufffd"


def safe(value: T) -> T:
    """`value` with NUL replaced if it is a string; anything else as it is."""
    if isinstance(value, str) and NUL in value:
        return value.replace(NUL, REPLACEMENT)  # type: ignore[return-value]
    return value


def safe_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(safe(value) for value in row)


S = TypeVar("S", bound=msgspec.Struct)


def safe_struct(record: S) -> S:
    """A record (`OutboxRow`, `Settlement`, `Completion`…) with every string field made `safe`,
    nested records and tuples of records included; the same object when nothing changes."""
    changes: dict[str, Any] = {}
    for field in record.__struct_fields__:
        value = getattr(record, field)
        if isinstance(value, msgspec.Struct):
            fixed: Any = safe_struct(value)
        elif isinstance(value, tuple) and value and isinstance(value[0], msgspec.Struct):
            fixed = tuple(safe_struct(item) for item in value)
        else:
            fixed = safe(value)
        if fixed is not value and fixed != value:
            changes[field] = fixed
    return msgspec.structs.replace(record, **changes) if changes else record
