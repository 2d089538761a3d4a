"""What a caller must prove (signature, tokens; constant-time) and what it may hold (body budget)."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def sign(body: bytes, secret: str) -> str:
    """The `X-Hub-Signature-256` value Meta would send for `body` (used by `simulate` and tests)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _given_digest(header: str | None) -> bytes | None:
    if not header:
        return None
    prefix, _, hexdigest = header.partition("=")
    if prefix != "sha256" or not _HEX64.fullmatch(hexdigest):
        return None
    return bytes.fromhex(hexdigest)


def signature_scopes(body: bytes, header: str | None, keyring: Mapping[str | None, tuple[str, ...]]) -> set[str | None]:
    """Which owners' secrets produced `header` (`sha256=<hex>` of HMAC-SHA256 over the raw body):
    tenant names, or None for the global app secret.

    The raw bytes are hashed exactly as received: Meta signs its escaped-unicode serialisation,
    so re-encoding parsed JSON would not match. Hex case is ignored (the digest is the same).
    An owner may hold two secrets, so an app secret can be rotated without refusing webhooks.

    Every secret is compared (constant time) even after a match, so timing does not tell which
    owner a guess hit. An empty set means the signature is invalid for everyone.
    """
    given = _given_digest(header)
    if given is None:
        return set()
    digests: dict[str, bytes] = {}
    owners: set[str | None] = set()
    for owner, secrets in keyring.items():
        for secret in secrets:
            digest = digests.setdefault(secret, hmac.new(secret.encode(), body, hashlib.sha256).digest())
            if hmac.compare_digest(digest, given):
                owners.add(owner)
    return owners


def token_ok(given: str | None, expected: str | None) -> bool:
    """Constant-time token comparison; an unset expected token accepts nothing."""
    if not given or not expected:
        return False
    # surrogateescape: a header with non-UTF-8 bytes is simply a wrong token, not a crash
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class BodyBudget:
    """Bytes that unverified request bodies may hold at once.

    The signature can only be checked once the whole body is in memory, so without a budget
    many slow 4 MiB bodies from anyone could exhaust a small VM. Over budget → 503 (Meta retries).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size
