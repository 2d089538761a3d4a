"""The PII archive: before rows are scrubbed they are copied, gzip JSON lines, to S3-compatible storage.

Against a real S3 server on loopback: moto's, in server mode, with request authentication ON, so
every request our signer makes is checked by an independent SigV4 implementation (moto verifies
with botocore's) and by an IAM policy (the uploader may only `PutObject`, as
`deploy/archive-iam-policy.json` says). Never a real cloud. Without moto these tests skip locally
and fail under CI (`requirements-dev.txt` installs it).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from alfred_bot.archive import (
    ArchiveError,
    Credentials,
    S3Archive,
    authorization,
    encode_rows,
    object_name,
    signed_headers,
)
from alfred_bot.config import ConfigError, RetentionConfig
from alfred_bot.privacy import install_key, pseudonym
from alfred_bot.retention import Retention
from alfred_bot.store import Completion, SqliteStore
from alfred_bot.store.base import ArchiveBatch
from tests.conftest import make_config
from tests.contract.conftest import START, FakeClock
from tests.contract.helpers import PNID, USER, body, claim_all, event, row, send, statuses, text

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "deploy" / "archive-iam-policy.json"
DAY = 86400.0
BUCKET = "alfred-archive"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


# ------------------------------------------------------------------------------ the signer, on paper


# AWS: "Signature Calculations for the Authorization Header: Transferring Payload in a Single Chunk",
# section "Examples: Signature Calculations" (docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html):
# bucket examplebucket, access key AKIAIOSFODNN7EXAMPLE, 20130524T000000Z, us-east-1.
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
PUT_BODY_SHA = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"  # "Welcome to Amazon S3."
AWS_EXAMPLES = [
    (
        "GET",
        "/test.txt",
        {},
        {"Range": "bytes=0-9"},
        EMPTY,
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    ),
    (
        "PUT",
        "/test$file.text",
        {},
        {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        PUT_BODY_SHA,
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    ("GET", "/", {"lifecycle": ""}, {}, EMPTY, "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    (
        "GET",
        "/",
        {"max-keys": "2", "prefix": "J"},
        {},
        EMPTY,
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    ),
]


@pytest.mark.parametrize(("method", "path", "query", "extra", "payload", "signature"), AWS_EXAMPLES)
def test_the_signer_reproduces_aws_documented_signatures(
    method: str, path: str, query: dict[str, str], extra: dict[str, str], payload: str, signature: str
) -> None:
    creds = Credentials("AKIAIOSFODNN7EXAMPLE", SECRET)
    headers = {"Host": "examplebucket.s3.amazonaws.com", "x-amz-date": "20130524T000000Z"}
    headers |= {"x-amz-content-sha256": payload, **extra}
    auth = authorization(
        creds, (method, path, query), headers=headers, payload_sha256=payload, scope=("us-east-1", "s3"),
        amz_date="20130524T000000Z",
    )  # fmt: skip
    assert auth.endswith(f"Signature={signature}")
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, ")


def test_signed_headers_sign_what_is_sent_and_carry_a_session_token() -> None:
    creds = Credentials("AKIDTEMP", SECRET, "token-123")
    url = URL("http://127.0.0.1:9000/bucket/a%20b/c.jsonl.gz", encoded=True)
    headers = signed_headers(creds, "PUT", url, b"x", "auto", extra={"Content-MD5": "abc"}, now=0)
    assert headers["Host"] == "127.0.0.1:9000" and headers["x-amz-date"] == "19700101T000000Z"
    assert headers["x-amz-security-token"] == "token-123"
    signed = re.search(r"SignedHeaders=([^,]+)", headers["Authorization"])
    assert signed and signed.group(1) == "content-md5;host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
    assert "/19700101/auto/s3/aws4_request" in headers["Authorization"]
    aws = URL("https://b.s3.eu-west-1.amazonaws.com/k", encoded=True)
    assert signed_headers(creds, "PUT", aws, b"", "eu-west-1", now=0)["Host"] == "b.s3.eu-west-1.amazonaws.com"


def test_credentials_come_from_the_environment_and_are_never_shown() -> None:
    creds = Credentials.from_env({"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert (creds.access_key, creds.session_token) == ("AKID", None)
    assert SECRET not in repr(creds) and SECRET not in str(creds)
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY") as err:
        Credentials.from_env({"AWS_ACCESS_KEY_ID": "AKID-VISIBLE"})
    assert "AKID-VISIBLE" not in str(err.value)
    cfg = RetentionConfig(archive_url=f"s3://{BUCKET}/x")
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        S3Archive.from_config(cfg, {})
    assert S3Archive.from_config(RetentionConfig(), {}) is None


def test_rows_become_deterministic_gzip_json_lines() -> None:
    rows = [{"seq": 1, "raw": b'{"text":"h\xc3\xa9"}', "at": 1.5}, {"seq": 2, "raw": b"\xff\x00", "text": None}]
    data = encode_rows(rows)
    assert data == encode_rows(rows)  # same rows, same bytes: a retried upload rewrites the same object
    decoded = [json.loads(line) for line in gzip.decompress(data).decode().splitlines()]
    assert decoded == [
        {"seq": 1, "raw": '{"text":"hé"}', "at": 1.5},
        {"seq": 2, "raw": {"base64": "/wA="}, "text": None},
    ]


def test_object_names_say_when_and_what() -> None:
    now = START + 40 * DAY  # 2026-02-10
    rows = [{"received_at": START + 3600}, {"received_at": START}]
    name = object_name("alfred/prod", "inbox", rows, [7, 3], now)
    assert re.fullmatch(r"alfred/prod/2026/02/10/inbox-20260101T000000Z-20260101T010000Z-[0-9a-f]{12}\.jsonl\.gz", name)
    assert object_name("alfred/prod", "inbox", rows, [3, 7], now) == name  # the rows decide, not their order
    assert object_name("alfred/prod", "inbox", rows, [3, 8], now) != name
    sends = object_name("", "outbox", [{"created_at": START}], ["o-1"], now)
    assert sends.startswith("2026/02/10/outbox-20260101T000000Z-20260101T000000Z-")


@pytest.mark.parametrize(
    ("retention", "message"),
    [
        ({"archive_url": "https://bucket/x"}, "retention.archive_url"),
        ({"archive_url": "s3://Bad_Bucket/x"}, "retention.archive_url"),
        ({"archive_url": "s3://bucket/with space"}, "retention.archive_url"),
        ({"archive_url": "s3://bucket", "archive_endpoint": "minio:9000"}, "retention.archive_endpoint"),
        ({"archive_url": "s3://bucket", "archive_region": "US East"}, "retention.archive_region"),
    ],
)
def test_the_config_check_names_a_bad_archive_key(tmp_path: Path, retention: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(tmp_path, retention=retention)


def test_the_config_accepts_archive_settings(tmp_path: Path) -> None:
    retention = {"archive_url": "s3://my.bucket-1/alfred/prod", "archive_endpoint": "https://x.r2.dev"}
    cfg = make_config(tmp_path, retention={**retention, "archive_region": "auto"}).retention
    assert (cfg.archive_url, cfg.archive_endpoint, cfg.archive_region) == (*retention.values(), "auto")
    assert make_config(tmp_path).retention.archive_url == ""  # off by default: scrub as before


# ------------------------------------------------------------------------------ a real S3 server


@dataclass
class S3:
    endpoint: str
    writer: Credentials  # the uploader: deploy/archive-iam-policy.json, PutObject under the prefix only
    reader: Credentials  # the test's eyes: list and get

    def env(self, creds: Credentials | None = None) -> dict[str, str]:
        creds = creds or self.writer
        return {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}

    def call(self, method: str, path: str, creds: Credentials, **kw: Any) -> tuple[int, bytes]:
        return _call(self.endpoint, method, path, creds, **kw)

    def keys(self, prefix: str) -> list[str]:
        """Listed whole and filtered here: moto checks a signature against the query it decoded, so a
        `prefix=` with a '/' (which SigV4 signs as %2F, as S3 itself expects) would not verify there."""
        status, data = self.call("GET", f"/{BUCKET}", self.reader, query={"list-type": "2"})
        assert status == 200, data
        return [k for k in re.findall(r"<Key>([^<]+)</Key>", data.decode()) if k.startswith(prefix)]

    def rows(self, key: str) -> list[dict[str, Any]]:
        status, data = self.call("GET", f"/{BUCKET}/{key}", self.reader)
        assert status == 200, data
        return [json.loads(line) for line in gzip.decompress(data).decode().splitlines()]


def _call(
    endpoint: str,
    method: str,
    path: str,
    creds: Credentials,
    *,
    query: dict[str, str] | None = None,
    data: bytes = b"",
    service: str = "s3",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One SigV4-signed request (our signer) with urllib: the server checks the signature."""
    # the query goes out encoded exactly as SigV4 canonicalizes it ('/' as %2F): what is signed is what is sent
    encoded = "&".join(
        f"{urllib.parse.quote(k, safe='~')}={urllib.parse.quote(v, safe='~')}" for k, v in (query or {}).items()
    )
    url = URL(endpoint + urllib.parse.quote(path) + (f"?{encoded}" if encoded else ""), encoded=True)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    sha = hashlib.sha256(data).hexdigest()
    all_headers = {"Host": f"{url.host}:{url.port}", "x-amz-date": amz_date, "x-amz-content-sha256": sha}
    all_headers |= headers or {}
    all_headers["Authorization"] = authorization(
        creds, (method, url.path, dict(url.query)), headers=all_headers, payload_sha256=sha,
        scope=("us-east-1", service), amz_date=amz_date,
    )  # fmt: skip
    request = urllib.request.Request(str(url), data=data or None, headers=all_headers, method=method)
    try:
        with _opener.open(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _iam(endpoint: str, admin: Credentials, **params: str) -> str:
    form = urllib.parse.urlencode({**params, "Version": "2010-05-08"}).encode()
    status, data = _call(
        endpoint, "POST", "/", admin, data=form, service="iam",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )  # fmt: skip
    assert status == 200, data
    return data.decode()


def _user(endpoint: str, admin: Credentials, name: str, policy: dict[str, Any]) -> Credentials:
    _iam(endpoint, admin, Action="CreateUser", UserName=name)
    _iam(endpoint, admin, Action="PutUserPolicy", UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
    answer = _iam(endpoint, admin, Action="CreateAccessKey", UserName=name)
    key = re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", answer)
    secret = re.search(r"<SecretAccessKey>([^<]+)</SecretAccessKey>", answer)
    assert key and secret
    return Credentials(key.group(1), secret.group(1))


def _moto_server() -> Any:
    try:
        from moto.server import ThreadedMotoServer  # noqa: PLC0415 (a test tool: only where it is installed)
    except ImportError:
        reason = "moto is not installed: `pip install -r requirements-dev.txt` provides it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto on a free loopback port: a bucket, two users, then authentication switched on."""
    server = _moto_server()
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        admin = Credentials("AKIAADMIN0000000000", "not-checked-yet")  # authentication is still off
        assert _call(endpoint, "PUT", f"/{BUCKET}", admin)[0] == 200
        policy = json.loads(POLICY.read_text(encoding="utf-8").replace("YOUR-BUCKET", BUCKET))
        writer = _user(endpoint, admin, "alfred", policy)
        reader_policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
        }
        reader = _user(endpoint, admin, "auditor", reader_policy)
        status, _ = _opener_post(f"{endpoint}/moto-api/reset-auth", b"0")  # from now on, every request is checked
        assert status == 200
        yield S3(endpoint, writer, reader)
    finally:
        server.stop()


def _opener_post(url: str, data: bytes) -> tuple[int, bytes]:
    with _opener.open(
        urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "text/plain"}), timeout=10
    ) as response:
        return int(response.status), response.read()


def _url(prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}"


def _prefix() -> str:
    return f"alfred/{uuid.uuid4().hex[:8]}"


def test_the_server_really_checks_signatures_and_the_policy(s3: S3) -> None:
    """Without this, the tests below could pass with a broken signer."""
    bad = Credentials(s3.writer.access_key, s3.writer.secret_key + "x")
    status, answer = s3.call("PUT", f"/{BUCKET}/alfred/probe", bad, data=b"x")
    assert status == 403 and b"SignatureDoesNotMatch" in answer
    assert s3.call("PUT", f"/{BUCKET}/alfred/probe", s3.writer, data=b"x")[0] == 200
    assert s3.call("PUT", f"/{BUCKET}/elsewhere/probe", s3.writer, data=b"x")[0] == 403  # only under the prefix
    assert s3.call("GET", f"/{BUCKET}/alfred/probe", s3.writer)[0] == 403  # the uploader cannot read back
    assert s3.call("GET", f"/{BUCKET}/alfred/probe", s3.reader)[0] == 200


# ------------------------------------------------------------------------------ the retention job


async def _aged_store(tmp_path: Path) -> tuple[SqliteStore, FakeClock]:
    """At START: a handled message (+ its delivered reply, a status, an event) and a pending one;
    at START + 40 days: a fresh handled message. The store's clock is left at START + 40 days."""
    clock = FakeClock()
    store = SqliteStore(tmp_path / "alfred.db", clock=clock)
    await store.open()
    await store.ingest(body(text("wamid.OLD", "secret plans"), text("wamid.PENDING", "still waiting")))
    reply = row("o-old", key="reply:wamid.OLD:000", source="wamid.OLD", words="You said: secret plans")
    await store.complete(Completion("wamid.OLD", "handled", (reply,), phone_number_id=PNID))
    [job] = await claim_all(store, clock.now)
    await send(store, job, clock.now, "wamid.S")
    await store.ingest(statuses({"id": "wamid.S", "status": "delivered", "timestamp": "1", "recipient_id": USER}))
    prefs = {"metadata": {"phone_number_id": PNID}, "user_preferences": [{"wa_id": USER, "value": "stop"}]}
    await store.ingest(event("user_preferences", prefs, time=1))
    clock.advance(40 * DAY)
    await store.ingest(body(text("wamid.NEW", "fresh")))
    await store.complete(Completion("wamid.NEW", "handled", phone_number_id=PNID))
    return store, clock


def _job(store: SqliteStore, tmp_path: Path, now: float, env: dict[str, str], **retention: str) -> Retention:
    cfg = make_config(tmp_path, retention=retention).retention
    return Retention(store, cfg, install_key(tmp_path), tmp_path / "media", clock=lambda: now, environ=env)


async def test_a_pass_archives_exactly_the_rows_it_scrubs_then_nothing_more(s3: S3, tmp_path: Path) -> None:
    store, clock = await _aged_store(tmp_path)
    prefix = _prefix()
    job = _job(store, tmp_path, clock.now, s3.env(), archive_url=_url(prefix), archive_endpoint=s3.endpoint)
    try:
        done = await job.run_once()
        again = await job.run_once()
        inbox = {i["id"]: i for i in await store.recent_inbound(10)}
        reply = await store.message("o-old") or {}
    finally:
        await store.close()
    assert (done["archived"], done["objects"], done["scrubbed"]) == (4, 4, 4)
    assert (again["archived"], again["objects"], again["scrubbed"]) == (0, 0, 0)
    keys = s3.keys(prefix + "/")
    assert len(keys) == 4  # inbox, outbox, statuses, events: one object each, and no more the second time
    assert all(k.startswith(f"{prefix}/2026/02/10/") and k.endswith(".jsonl.gz") for k in keys)
    archived = {k.rsplit("/", 1)[1].split("-")[0]: s3.rows(k) for k in keys}
    [inbound], [sent] = archived["inbox"], archived["outbox"]
    assert (inbound["event_id"], inbound["text"], inbound["sender"]) == ("wamid.OLD", "secret plans", USER)
    assert json.loads(inbound["raw"])["text"]["body"] == "secret plans"  # Meta's JSON, as text
    assert sent["id"] == "o-old" and "You said: secret plans" in sent["payload"] and sent["recipient"] == USER
    assert [s["wamid"] for s in archived["statuses"]] == ["wamid.S"]
    assert [e["field"] for e in archived["events"]] == ["user_preferences"]
    # what was archived is what was scrubbed; what stayed hot or pending was neither
    assert {i for i, r in inbox.items() if r["text"] is None} == {"wamid.OLD"}
    assert inbox["wamid.OLD"]["from"] == pseudonym(install_key(tmp_path), USER)
    assert reply["to"] == pseudonym(install_key(tmp_path), USER)
    everything = b"".join(json.dumps(r).encode() for rows in archived.values() for r in rows)
    assert s3.writer.secret_key.encode() not in everything and s3.writer.access_key.encode() not in everything


async def test_a_failed_upload_scrubs_and_deletes_nothing_and_the_next_pass_does(
    s3: S3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, clock = await _aged_store(tmp_path)
    now, prefix = clock.now + 60 * DAY, _prefix()  # everything is past the hot period, the old rows past delete_days
    wrong = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
    where = {"archive_url": _url(prefix), "archive_endpoint": s3.endpoint}
    try:
        with caplog.at_level(logging.ERROR, logger="alfred.retention"):
            failed = await _job(store, tmp_path, now, wrong, **where).run_once()
        whole = {i["id"]: i["text"] for i in await store.recent_inbound(10)}
        ok = _job(store, tmp_path, now, s3.env(), **where)
        done = await ok.run_once()
        left = {i["id"]: i["text"] for i in await store.recent_inbound(10)}
    finally:
        await store.close()
    assert failed == {"scrubbed": 0, "deleted": 0, "archived": 0, "objects": 0, "media_files": 0}
    assert whole == {"wamid.OLD": "secret plans", "wamid.PENDING": "still waiting", "wamid.NEW": "fresh"}
    assert "SignatureDoesNotMatch" in caplog.text and "wrong-secret-value" not in caplog.text
    assert (done["archived"], done["scrubbed"]) == (5, 5) and done["deleted"] >= 4  # then the old rows went
    assert left == {"wamid.PENDING": "still waiting", "wamid.NEW": None}
    assert len(s3.keys(prefix + "/")) == 4
    assert ok.totals["archive_failures"] == 0


async def test_an_unreachable_archive_scrubs_nothing(tmp_path: Path) -> None:
    store, clock = await _aged_store(tmp_path)
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": SECRET}
    job = _job(store, tmp_path, clock.now, env, archive_url=_url("alfred"), archive_endpoint=closed)
    try:
        done = await job.run_once()
        texts = {i["id"]: i["text"] for i in await store.recent_inbound(10)}
    finally:
        await store.close()
    assert done["scrubbed"] == 0 and job.totals["archive_failures"] == 1
    assert texts["wamid.OLD"] == "secret plans"


async def test_without_an_archive_url_the_job_scrubs_as_before(s3: S3, tmp_path: Path) -> None:
    store, clock = await _aged_store(tmp_path)
    before = s3.keys("alfred/")
    job = _job(store, tmp_path, clock.now, s3.env())
    try:
        done = await job.run_once()
        texts = {i["id"]: i["text"] for i in await store.recent_inbound(10)}
    finally:
        await store.close()
    assert job.archive is None
    assert done == {"scrubbed": 4, "deleted": 0, "media_files": 0}
    assert texts == {"wamid.OLD": None, "wamid.PENDING": "still waiting", "wamid.NEW": "fresh"}
    assert s3.keys("alfred/") == before


async def test_a_job_with_an_archive_but_no_credentials_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        _job(SqliteStore(tmp_path / "a.db"), tmp_path, START, {}, archive_url=_url("alfred"))


class _Moving(SqliteStore):
    """Every batch's rows change before they can be scrubbed (a dead letter queued again meanwhile)."""

    async def archive_batch(self, cutoff: float, limit: int) -> ArchiveBatch:
        return ArchiveBatch(rows={"rejected": [{"key": "k", "received_at": START}]}, keys={"rejected": ["k"]})

    async def scrub(self, key: bytes, cutoff: float, only: Any = None) -> int:
        return 0 if only is not None else await super().scrub(key, cutoff)


async def test_a_batch_whose_rows_changed_meanwhile_ends_the_pass_instead_of_spinning(s3: S3, tmp_path: Path) -> None:
    store = _Moving(tmp_path / "alfred.db")
    await store.open()
    where = {"archive_url": _url(_prefix()), "archive_endpoint": s3.endpoint}
    try:
        done = await asyncio.wait_for(_job(store, tmp_path, START, s3.env(), **where).archive_once(), 20)
    finally:
        await store.close()
    assert done == {"archived": 1, "objects": 1, "scrubbed": 0}


async def test_archiving_without_an_archive_url_is_an_error_not_a_silent_scrub(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "alfred.db")
    job = _job(store, tmp_path, START, {})
    with pytest.raises(ArchiveError, match="archive_url is not set"):
        await job.archive_once()


# ------------------------------------------------------------------------------ the command


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
        encoding="utf-8", timeout=60, check=False,
    )  # fmt: skip


def _config(tmp_path: Path, retention: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[storage]\npath = "{(tmp_path / "alfred.db").as_posix()}"\n\n[retention]\n{retention}\n\n'
        f'[tenants.home]\nphone_number_id = "{PNID}"\n',
        encoding="utf-8",
    )
    return path


async def _aged_database(tmp_path: Path) -> None:
    """The same rows: at START (2026-01-01) and 40 days later, both past the command's real
    cutoff (now - 30 days) on any date from 2026-03-13 on."""
    assert time.time() > START + 71 * DAY
    store, _ = await _aged_store(tmp_path)
    await store.close()


async def test_python_main_archive_end_to_end(s3: S3, tmp_path: Path) -> None:
    await _aged_database(tmp_path)
    prefix = _prefix()
    config = _config(tmp_path, f'archive_url = "{_url(prefix)}"\narchive_endpoint = "{s3.endpoint}"')
    first = _run("archive", "--config", str(config), env=s3.env())
    assert first.returncode == 0, first.stderr
    assert f"archived 5 row(s) in 4 object(s) to s3://{BUCKET}/{prefix} at {s3.endpoint}; scrubbed 5" in first.stdout
    second = _run("archive", "--config", str(config), env=s3.env())
    assert second.returncode == 0 and "archived 0 row(s) in 0 object(s)" in second.stdout
    keys = s3.keys(prefix + "/")
    assert len(keys) == 4
    inbound = next(s3.rows(k) for k in keys if "/inbox-" in k)
    assert {r["event_id"] for r in inbound} == {"wamid.OLD", "wamid.NEW"}  # NEW is 40 days old by now too
    assert s3.writer.secret_key not in first.stdout + first.stderr + second.stdout + second.stderr
    check = _run("check-config", "--config", str(config), env=s3.env())
    assert check.returncode == 0 and f"archive: s3://{BUCKET}/{prefix} at {s3.endpoint}" in check.stdout


def test_python_main_archive_explains_what_is_missing(tmp_path: Path) -> None:
    off = _run("archive", "--config", str(_config(tmp_path, "")), env={})
    assert off.returncode == 2 and "retention.archive_url is not set" in off.stderr
    config = _config(tmp_path, f'archive_url = "{_url("alfred")}"')
    for command in ("archive", "check-config"):
        missing = _run(command, "--config", str(config), env={"AWS_ACCESS_KEY_ID": "AKID-SHOWN-NOWHERE"})
        assert missing.returncode == 2 and "AWS_SECRET_ACCESS_KEY" in missing.stderr, missing.stderr
        assert "Traceback" not in missing.stderr and "AKID-SHOWN-NOWHERE" not in missing.stderr


async def test_python_main_archive_beside_a_running_sqlite_server_says_so(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "alfred.db")
    await store.open()  # holds the database lock, as a running server does
    try:
        config = _config(tmp_path, f'archive_url = "{_url("alfred")}"')
        busy = _run("archive", "--config", str(config), env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    finally:
        await store.close()
    assert busy.returncode == 1 and "in use by another Alfred process" in busy.stderr
    assert "archives by itself" in busy.stderr
