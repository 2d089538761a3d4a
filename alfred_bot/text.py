"""Reading the words of a message: pure functions shared by routing and the handler's context.

They live apart from `router.py` and `context.py` so that neither has to import the other.
"""

from __future__ import annotations


def command_of(text: str | None) -> tuple[str, str] | None:
    """`"/Help me"` → `("help", "me")`: the first word (ended by any whitespace), lower-cased,
    without a leading '/' or trailing '!', '.', '?'."""
    parts = (text or "").split(maxsplit=1)
    if not parts:
        return None
    word = parts[0].removeprefix("/").rstrip("!.?").lower()
    return word, parts[1].strip() if len(parts) > 1 else ""
