"""Cold storage: rows about to be scrubbed, copied first to S3-compatible storage as gzip-compressed
JSON lines (the guide's tiers: 30 days hot in the database, then cold in the archive, then gone).

One object per table per batch, named `PREFIX/YYYY/MM/DD/TABLE-FIRST-LAST-DIGEST.jsonl.gz` (the day
the batch was archived; FIRST and LAST are the oldest and newest row's time, DIGEST names the exact
rows): the same batch always gives the same name and the same bytes, so a retry after a failed pass
overwrites instead of duplicating (unless the retry falls on another day: readers dedupe by key).
Each line is one row, every column as stored; bodies (`raw`, `payload`) are text when they are
UTF-8 (Meta's JSON always is), else `{"base64": ...}`.

Uploads are S3 `PutObject` calls signed with AWS Signature Version 4, by the small signer below
(hashlib and hmac: no SDK to install for one request type). It follows AWS's documentation:
- "Create a signed AWS API request", docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html
- "Signature Calculations for the Authorization Header: Transferring Payload in a Single Chunk",
  docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html (S3's rules: each path
  segment URI-encoded once, `x-amz-content-sha256` signed; its worked examples are our test vectors)
- "PutObject", docs.aws.amazon.com/AmazonS3/latest/API/API_PutObject.html (`Content-MD5`: the
  server checks the bytes it got against it and refuses a corrupted upload).

Credentials come from the environment only (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, and
`AWS_SESSION_TOKEN` for temporary ones): never from the config file, never logged, never in an error.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from alfred_bot.config import ConfigError, RetentionConfig
from alfred_bot.store.base import ARCHIVE_TABLES, ArchiveBatch

log = logging.getLogger("alfred.archive")

ALGORITHM = "AWS4-HMAC-SHA256"
KEY_ENV, SECRET_ENV, TOKEN_ENV = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"
#: The column that dates a row of each table (names as in the SQLite schema).
TIME_COLUMN = {"outbox": "created_at"}
UPLOAD_TIMEOUT_SECONDS = 60.0


class ArchiveError(Exception):
    """An upload failed: nothing of the batch is scrubbed, the next pass tries again."""


@dataclass(frozen=True)
class Credentials:
    """An access key pair; `repr` never shows the secret (a traceback or a debug log may print it)."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Credentials:
        """The pair from the environment, or a `ConfigError` naming what is missing (never a value)."""
        key, secret = environ.get(KEY_ENV, "").strip(), environ.get(SECRET_ENV, "").strip()
        missing = [name for name, value in ((KEY_ENV, key), (SECRET_ENV, secret)) if not value]
        if missing:
            raise ConfigError(f"retention.archive_url is set but {' and '.join(missing)} not: the archive needs them")
        return cls(key, secret, environ.get(TOKEN_ENV, "").strip() or None)


# ---------------------------------------------------------------------------- Signature Version 4


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def canonical_request(
    method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], payload_sha256: str
) -> tuple[str, str]:
    """(canonical request, signed header names) as AWS defines them: the path URI-encoded once per
    segment (S3 does not double-encode), query pairs encoded and sorted, header names lower-cased and
    sorted with trimmed values whose inner runs of spaces become one."""
    canonical_path = quote(path, safe="/~")
    canonical_query = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(query.items()))
    lowered = sorted((name.lower(), " ".join(value.split())) for name, value in headers.items())
    signed = ";".join(name for name, _ in lowered)
    canonical_headers = "".join(f"{name}:{value}\n" for name, value in lowered)
    parts = (method.upper(), canonical_path, canonical_query, canonical_headers, signed, payload_sha256)
    return "\n".join(parts), signed


def signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    """HMAC chain `AWS4`+secret → date → region → service → `aws4_request`."""
    key = _hmac(f"AWS4{secret}".encode(), day)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def authorization(
    creds: Credentials,
    request: tuple[str, str, Mapping[str, str]],
    *,
    headers: Mapping[str, str],
    payload_sha256: str,
    scope: tuple[str, str],
    amz_date: str,
) -> str:
    """The `Authorization` header of `request` (method, path, query) carrying exactly `headers`,
    which must include `host` and `x-amz-date`; `scope` is (region, service)."""
    method, path, query = request
    region, service = scope
    canonical, signed = canonical_request(method, path, query, headers, payload_sha256)
    credential_scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join((ALGORITHM, amz_date, credential_scope, _sha256(canonical.encode())))
    signature = hmac.new(
        signing_key(creds.secret_key, amz_date[:8], region, service), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    return (
        f"{ALGORITHM} Credential={creds.access_key}/{credential_scope}, SignedHeaders={signed}, Signature={signature}"
    )


def signed_headers(
    creds: Credentials,
    method: str,
    url: URL,
    payload: bytes,
    region: str,
    *,
    extra: Mapping[str, str] | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """Every header a signed S3 request to `url` sends (Host included: what is signed is what goes out)."""
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    payload_sha256 = _sha256(payload)
    headers = {
        "Host": host_header(url),
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_sha256,
        **(extra or {}),
    }
    if creds.session_token:
        headers["x-amz-security-token"] = creds.session_token
    query = {k: v for k, v in url.query.items()}
    auth = authorization(
        creds,
        (method, url.path, query),
        headers=headers,
        payload_sha256=payload_sha256,
        scope=(region, "s3"),
        amz_date=amz_date,
    )
    return {**headers, "Authorization": auth}


def host_header(url: URL) -> str:
    host = url.raw_host or ""
    host = f"[{host}]" if ":" in host else host
    return host if url.explicit_port is None or url.is_default_port() else f"{host}:{url.explicit_port}"


# ---------------------------------------------------------------------------- objects


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode("ascii")}
    return value


def encode_rows(rows: list[dict[str, Any]]) -> bytes:
    """Gzip-compressed JSON lines, byte for byte the same for the same rows (no timestamp in the header)."""
    lines = (json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False, sort_keys=True) for row in rows)
    return gzip.compress("".join(f"{line}\n" for line in lines).encode(), mtime=0)


def _stamp(at: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))


def object_name(prefix: str, table: str, rows: list[dict[str, Any]], keys: list[str | int], now: float) -> str:
    """`PREFIX/YYYY/MM/DD/TABLE-FIRST-LAST-DIGEST.jsonl.gz` (see the module's docstring)."""
    column = TIME_COLUMN.get(table, "received_at")
    times = [float(row[column]) for row in rows if isinstance(row.get(column), int | float)] or [now]
    digest = _sha256("\n".join(sorted(map(str, keys))).encode())[:12]
    name = f"{time.strftime('%Y/%m/%d', time.gmtime(now))}/{table}-{_stamp(min(times))}-{_stamp(max(times))}-{digest}"
    return f"{prefix}/{name}.jsonl.gz" if prefix else f"{name}.jsonl.gz"


_S3_URL = re.compile(r"s3://(?P<bucket>[^/]+)/?(?P<prefix>.*)")


class S3Archive:
    """Writes batches to one bucket and prefix: path-style on a given endpoint (MinIO, R2, moto…),
    virtual-hosted on AWS itself (`https://BUCKET.s3.REGION.amazonaws.com`)."""

    def __init__(self, url: str, *, endpoint: str, region: str, credentials: Credentials) -> None:
        match = _S3_URL.fullmatch(url)
        if match is None:
            raise ConfigError(f"retention.archive_url: must look like s3://bucket/prefix, got {url!r}")
        self.bucket, self.prefix = match["bucket"], match["prefix"].strip("/")
        self.region = region
        self._endpoint = endpoint.rstrip("/")
        self._creds = credentials

    @classmethod
    def from_config(cls, cfg: RetentionConfig, environ: Mapping[str, str]) -> S3Archive | None:
        """The archive `[retention]` asks for, or None when `archive_url` is empty (scrub only)."""
        if not cfg.archive_url:
            return None
        creds = Credentials.from_env(environ)
        return cls(cfg.archive_url, endpoint=cfg.archive_endpoint, region=cfg.archive_region, credentials=creds)

    @property
    def location(self) -> str:
        """Where objects go, for logs and the command's output (no credential is part of it)."""
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self._endpoint}" if self._endpoint else where

    def url(self, key: str) -> URL:
        path = quote(f"/{key}", safe="/~")
        if self._endpoint:
            return URL(f"{self._endpoint}/{quote(self.bucket, safe='')}{path}", encoded=True)
        return URL(f"https://{self.bucket}.s3.{self.region}.amazonaws.com{path}", encoded=True)

    async def store(self, batch: ArchiveBatch, now: float) -> list[str]:
        """Upload each table of `batch` as one object; the keys written. Raises `ArchiveError` on
        the first failure (objects already written stay: the retry rewrites them identically)."""
        written: list[str] = []
        timeout = aiohttp.ClientTimeout(total=UPLOAD_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            for table in ARCHIVE_TABLES:
                rows, keys = batch.rows.get(table, []), batch.keys.get(table, [])
                if rows:
                    key = object_name(self.prefix, table, rows, keys, now)
                    await self._put(session, key, encode_rows(rows))
                    written.append(key)
        return written

    async def _put(self, session: aiohttp.ClientSession, key: str, body: bytes) -> None:
        url = self.url(key)
        extra = {
            "Content-Type": "application/gzip",
            "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode("ascii"),  # noqa: S324 (S3's integrity check)
        }
        headers = signed_headers(self._creds, "PUT", url, body, self.region, extra=extra)
        try:
            async with session.put(url, data=body, headers=headers) as resp:
                if resp.status // 100 != 2:
                    raise ArchiveError(
                        f"PUT s3://{self.bucket}/{key}: HTTP {resp.status} {_s3_code(await resp.read())}"
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ArchiveError(f"PUT s3://{self.bucket}/{key}: {type(exc).__name__}: {exc}") from exc
        log.debug("archived %d bytes to s3://%s/%s", len(body), self.bucket, key)


def _s3_code(body: bytes) -> str:
    """S3's error code (`AccessDenied`, `NoSuchBucket`, `SignatureDoesNotMatch`…) from its XML answer;
    the rest of the body is not repeated (it can echo the string we signed)."""
    match = re.search(rb"<Code>([A-Za-z0-9.]{1,64})</Code>", body[:4096])
    return match.group(1).decode() if match else "(no S3 error code)"
