"""Personal data in views and at rest: masked phone numbers for people, keyed hashes for old rows.

Masking is for display (status page, audit trail, CLI): enough to recognise a number, not enough
to harvest it. Pseudonyms replace numbers in rows past the hot retention period: the same number
always gives the same pseudonym (so counts per user still work), and without this install's key
nobody can test a guessed number against it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from alfred_bot.config import ConfigError

KEY_FILE = "retention-key"
PSEUDONYM_PREFIX = "h:"


def mask(user: str) -> str:
    """`15551230123` → `+15•••••0123`; user ids and short values keep only their first characters."""
    digits = user.lstrip("+")
    if not digits.isdigit() or len(digits) < 7:
        return user[:3] + "•••" if len(user) > 3 else "•••"
    return f"+{digits[:2]}{'•' * (len(digits) - 6)}{digits[-4:]}"


def pseudonym(key: bytes, user: str) -> str:
    """A stable keyed hash of a phone number or user id (idempotent on a pseudonym)."""
    if user.startswith(PSEUDONYM_PREFIX):
        return user
    return PSEUDONYM_PREFIX + hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:24]


#: The key from the environment (64 hex digits), for nodes sharing one database: every node must
#: pseudonymise a number the same way, so they cannot each create their own file.
KEY_ENV = "ALFRED_PRIVACY_KEY"


def install_key(folder: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """This install's pseudonym key: `ALFRED_PRIVACY_KEY` if set, else a file created (mode 0600)
    beside the database on first use."""
    given = (os.environ if environ is None else environ).get(KEY_ENV, "").strip()
    if given:
        try:
            key = bytes.fromhex(given)
        except ValueError:
            key = b""
        if len(key) < 16:
            raise ConfigError(f"{KEY_ENV}: must be at least 32 hex digits (e.g. from `openssl rand -hex 32`)")
        return key
    path = folder / KEY_FILE
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text(encoding="ascii").strip())
