"""What a caller must prove (signature, tokens; constant-time) and what it may hold (body budget)."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping

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


def api_token_of(headers: Mapping[str, str]) -> str | None:
    """The API token a caller presents: `Authorization: Bearer <token>`, or else `X-API-Key: <token>`.

    Some orchestrator platforms can only send a fixed `X-API-Key` header; both carry the same
    `ALFRED_API_TOKEN` and are compared with `token_ok` (constant time) by the caller.
    """
    token = bearer(headers.get("Authorization"))
    if token:
        return token
    key = headers.get("X-API-Key")
    return key.strip() if key and key.strip() else None


#: Bodies declared at most this long count as "small" (Meta's webhooks are a few KB) and may use
#: the share of the budget that large bodies cannot take.
SMALL_BODY_BYTES = 64 * 1024
#: The share of `max_inflight_bytes` kept for small bodies.
RESERVED_SHARE = 8


class BodyBudget:
    """Bytes that unverified request bodies hold at once, charged as they arrive.

    The signature can only be checked once the whole body is in memory, so without a budget
    many slow 4 MiB bodies from anyone could exhaust a small VM. Charging by *declared* length
    let header-only connections (no byte sent) hold the whole budget; charging by bytes that
    arrived makes holding memory cost the attacker the same bandwidth. On top:

    - one peer (remote address) may hold at most `per_peer` bytes, so one host cannot take it all;
    - 1/8 of the budget (at most what exceeds one `largest` body) is kept for small bodies
      (declared <= 64 KiB), and a peer may use that share only while it holds little itself, so a
      genuine signed webhook still fits when large bodies from several hosts fill the rest.

    Over budget → 503 (Meta retries).
    """

    def __init__(self, limit: int, *, per_peer: int | None = None, largest: int = 0) -> None:
        self.limit = limit
        self.per_peer = limit if per_peer is None else per_peer
        # never so much that a body of the largest allowed size could no longer fit at all
        self.reserve = max(0, min(limit // RESERVED_SHARE, limit - largest))
        self.used = 0
        self.peers: dict[str, int] = {}

    def lease(self, peer: str, declared: int | None) -> BodyLease:
        """A lease for one body from `peer`; `declared` is its Content-Length (None when chunked)."""
        return BodyLease(self, peer, small=declared is not None and declared <= SMALL_BODY_BYTES)

    def _take(self, peer: str, size: int, small: bool) -> bool:
        held = self.peers.get(peer, 0)
        if held + size > self.per_peer:
            return False
        fits_bulk = self.used + size <= self.limit - self.reserve
        fits_reserve = small and self.used + size <= self.limit and held + size <= max(self.reserve // 4, 1)
        if not (fits_bulk or fits_reserve):
            return False
        self.used += size
        self.peers[peer] = held + size
        return True

    def _give_back(self, peer: str, size: int) -> None:
        self.used -= size
        left = self.peers.get(peer, 0) - size
        if left > 0:
            self.peers[peer] = left
        else:
            self.peers.pop(peer, None)


class BodyLease:
    """What one request body holds of the budget; `release()` gives it all back (idempotent)."""

    def __init__(self, budget: BodyBudget, peer: str, *, small: bool) -> None:
        self._budget, self._peer, self._small = budget, peer, small
        self.held = 0

    def charge(self, size: int) -> bool:
        """Account `size` more bytes that arrived; False (nothing charged) if over budget."""
        if not self._budget._take(self._peer, size, self._small):
            return False
        self.held += size
        return True

    def release(self) -> None:
        if self.held:
            self._budget._give_back(self._peer, self.held)
            self.held = 0


def identity_encoding(value: str | None) -> bool:
    """True when a `Content-Encoding` header means the body is sent as is.

    Meta sends no compressed webhooks, and a compressed body bypasses every byte cap (a few KB on
    the wire become megabytes), so anything else is refused with 415 before a byte is read.
    """
    return value is None or value.strip().lower() in ("", "identity")


def host_allowed(host: str | None, patterns: Iterable[str]) -> bool:
    """Whether `host` matches one of `patterns` (`example.com`, or `*.example.com` for any subdomain)."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    for given in patterns:
        pattern = given.lower().rstrip(".")
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
        if host == pattern:
            return True
    return False


# ------------------------------------------------------------------------------------ redaction

REDACTED = "[redacted]"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _fold(text: str) -> str:
    """Lower-case without changing the length (so positions in the folded text match the original)."""
    folded = text.lower()
    return folded if len(folded) == len(text) else text.translate(_ASCII_LOWER)


class Redactor:
    """Removes configured secrets from text: in any letter case, and any fragment of
    `WINDOW` (12) or more characters of one (a token cut short or embedded in other text).

    A Graph error may echo a malformed token back upper-cased, truncated or inside a URL; an
    exact-match replace misses all three. Built once from every secret; each text is scanned
    with one set lookup per position (a set of every 12-character window of every secret).
    Secrets shorter than the window are matched whole.
    """

    WINDOW = 12

    def __init__(self, secrets: Iterable[str]) -> None:
        windows: dict[int, set[str]] = {}
        for secret in secrets:
            folded = _fold(secret)
            if not folded.strip():
                continue
            width = min(self.WINDOW, len(folded))
            windows.setdefault(width, set()).update(folded[i : i + width] for i in range(len(folded) - width + 1))
        self._windows = {width: frozenset(found) for width, found in sorted(windows.items(), reverse=True)}
        self._shortest = min(self._windows, default=0)
        # Only runs of characters that occur in some secret can hold a fragment: in ordinary text
        # (spaces, punctuation) that skips nearly every position.
        alphabet = sorted({c for found in self._windows.values() for fragment in found for c in fragment})
        chars = "".join(re.escape(c) for c in alphabet)
        self._runs = re.compile(f"[{chars}]{{{self._shortest},}}") if alphabet else None

    def __bool__(self) -> bool:
        return bool(self._windows)

    def __call__(self, text: str) -> str:
        """`text` with every stretch that belongs to a secret replaced by `[redacted]`."""
        if self._runs is None or len(text) < self._shortest:
            return text
        folded = _fold(text)
        spans: list[tuple[int, int]] = []
        for run in self._runs.finditer(folded):
            start, end = run.span()
            for width, fragments in self._windows.items():
                spans += [(i, i + width) for i in range(start, end - width + 1) if folded[i : i + width] in fragments]
        return _cut(text, spans) if spans else text


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    """Replace the union of `spans` by one `[redacted]` per connected stretch."""
    out: list[str] = []
    pos = 0
    spans.sort()
    start, end = spans[0]
    for s, e in spans[1:]:
        if s <= end:
            end = max(end, e)
            continue
        out += [text[pos:start], REDACTED]
        pos, (start, end) = end, (s, e)
    out += [text[pos:start], REDACTED, text[end:]]
    return "".join(out)


def url_where(url: str) -> str:
    """host:port/path of a database or Redis URL, for logs and errors: no user, no password, no
    query (drivers also read `?password=` there)."""
    return url.split("://", 1)[-1].split("?", 1)[0].rsplit("@", 1)[-1]
