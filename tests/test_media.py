"""Media: downloads into the media folder (two hops, bearer token, size and sha256 checks),
uploads checked before any HTTP call, and the retention sweep; against the fake Graph API."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.context import Context
from alfred_bot.graph import GraphTransport
from alfred_bot.media import LIMITS, MB, MediaError, MediaFile, check_upload, prune, target_path
from alfred_bot.models import Message
from alfred_bot.outbound.decide import Outcome
from alfred_bot.router import Router
from tests import payloads
from tests.conftest import ACCESS_TOKEN, API_TOKEN, ENV, PROD_ENV, make_config, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
BEARER = f"Bearer {ACCESS_TOKEN}"
DAY = 86400.0


class Recorder:
    """A router whose media handler downloads (or uploads) and keeps what happened."""

    def __init__(self) -> None:
        self.results: dict[str, MediaFile | str | Exception] = {}
        self.router = Router("media")
        self.upload: tuple[str, bytes, str, str] | None = None
        self.router.message("image", "video", "audio", "document", "sticker", "text")(self.handle)

    async def handle(self, message: Message, ctx: Context) -> None:
        try:
            if self.upload is not None:
                media_id = await ctx.upload_media(*self.upload)
                ctx.reply_media(self.upload[0], media_id=media_id)
                self.results[message.id] = media_id
            else:
                self.results[message.id] = await ctx.download_media()
        except MediaError as exc:
            self.results[message.id] = exc

    async def wait(self, message_id: str) -> Any:
        await wait_for(lambda: message_id in self.results)
        return self.results[message_id]


def _image(media_id: str, message_id: str, mime: str = "image/jpeg") -> dict[str, Any]:
    return payloads.message("image", {"mime_type": mime, "sha256": "x", "id": media_id}, id=message_id)


async def _prod(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, rec: Recorder, env: dict[str, str] | None = None, **s: Any
) -> Any:
    cfg = prod_config(tmp_path, graph, **s)
    secrets = load_secrets(PROD_ENV if env is None else env, cfg=cfg)
    return await aiohttp_client(create_app(cfg, secrets, routers={"home": rec.router, "biz": rec.router}))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------- downloads


async def test_download_writes_the_file_under_the_media_dir(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    data = os.urandom(3000)
    graph.add_media("1234567890", data, "image/jpeg")
    rec = Recorder()
    client = await _prod(aiohttp_client, tmp_path, graph, rec)
    assert await post_webhook(client, payloads.body_of(_image("1234567890", "wamid.IMG1"))) == 200
    result = await rec.wait("wamid.IMG1")
    assert isinstance(result, MediaFile), result
    expected = tmp_path / "media" / "home" / "1234567890.jpg"
    assert Path(result.path) == expected
    assert expected.read_bytes() == data
    assert result.size == len(data) == expected.stat().st_size
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.mime_type == "image/jpeg"
    assert result.id == "1234567890"
    assert _files(tmp_path / "media") == ["home/1234567890.jpg"]  # no .part left behind
    info, download = graph.media_requests
    assert (info.kind, info.authorization, info.query.get("phone_number_id")) == ("info", BEARER, payloads.PNID)
    assert (download.kind, download.authorization) == ("download", BEARER)


async def test_downloads_have_their_own_pool_and_never_hold_up_a_send(tmp_path: Path, graph: FakeGraph) -> None:
    """Up to `dispatch.workers` handlers may download at once; with one shared pool a slow media
    host took the connections the paced sends need (here the send pool holds just one)."""
    hold = asyncio.Event()
    graph.add_media("777", b"\xff\xd8 slow", "image/jpeg", hold=hold)
    transport = GraphTransport(prod_config(tmp_path, graph).graph, {payloads.PNID: ACCESS_TOKEN}, connections=1)
    await transport.start()
    try:
        download = asyncio.create_task(transport.download(payloads.PNID, "777", tmp_path / "media", 1 << 20))
        await wait_for(lambda: [r.kind for r in graph.media_requests] == ["info", "download"])
        text = {"messaging_product": "whatsapp", "to": "15550001111", "type": "text", "text": {"body": "hi"}}
        decision = await asyncio.wait_for(transport.send(payloads.PNID, json.dumps(text).encode()), 2)
        assert decision.outcome == Outcome.SENT and not download.done()
        hold.set()
        assert Path((await download).path).read_bytes() == b"\xff\xd8 slow"
    finally:
        hold.set()
        await transport.close()


async def test_download_for_a_tenant_with_its_own_token(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    graph.add_media("555", b"%PDF-1.4 tiny", "application/pdf")
    rec = Recorder()
    tenants = {
        "home": {"phone_number_id": payloads.PNID},
        "biz": {"phone_number_id": payloads.BIZ_PNID, "access_token_env": "BIZ_TOKEN", "app_secret_env": "BIZ_SECRET"},
    }
    env = {**PROD_ENV, "BIZ_TOKEN": "biz-token-xyz", "BIZ_SECRET": "biz-secret-xyz"}
    client = await _prod(aiohttp_client, tmp_path, graph, rec, env=env, tenants=tenants)
    doc = payloads.message(
        "document", {"mime_type": "application/pdf", "sha256": "x", "id": "555", "filename": "a.pdf"}, id="wamid.D1"
    )
    assert await post_webhook(client, payloads.body_of(doc, pnid=payloads.BIZ_PNID), "biz-secret-xyz") == 200
    result = await rec.wait("wamid.D1")
    assert isinstance(result, MediaFile), result
    assert Path(result.path) == tmp_path / "media" / "biz" / "555.pdf"
    assert {r.authorization for r in graph.media_requests} == {"Bearer biz-token-xyz"}
    assert graph.media_requests[0].query["phone_number_id"] == payloads.BIZ_PNID


async def test_download_to_a_configured_media_path(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    graph.add_media("77", b"\x89PNG....", "image/png")
    rec = Recorder()
    elsewhere = tmp_path / "elsewhere"
    client = await _prod(aiohttp_client, tmp_path, graph, rec, media={"path": str(elsewhere)})
    assert await post_webhook(client, payloads.body_of(_image("77", "wamid.P1", "image/png"))) == 200
    result = await rec.wait("wamid.P1")
    assert isinstance(result, MediaFile), result
    assert Path(result.path) == elsewhere / "home" / "77.png"
    assert not (tmp_path / "media").exists()


async def test_download_above_the_declared_size_limit_is_refused_before_fetching(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    graph.add_media("big1", b"x" * 4096, "image/jpeg")
    rec = Recorder()
    client = await _prod(aiohttp_client, tmp_path, graph, rec, media={"max_download_bytes": 2048})
    assert await post_webhook(client, payloads.body_of(_image("big1", "wamid.BIG1"))) == 200
    result = await rec.wait("wamid.BIG1")
    assert isinstance(result, MediaError)
    assert "4096" in str(result) and "2048" in str(result)
    assert [r.kind for r in graph.media_requests] == ["info"]
    assert _files(tmp_path / "media") == []


@pytest.mark.parametrize("declared", [None, 100], ids=["size-not-declared", "size-understated"])
async def test_download_cut_at_the_limit_leaves_no_file(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, declared: int | None
) -> None:
    graph.add_media("big2", os.urandom(300 * 1024), "image/jpeg", report_size=declared is not None, file_size=declared)
    rec = Recorder()
    client = await _prod(aiohttp_client, tmp_path, graph, rec, media={"max_download_bytes": 64 * 1024})
    assert await post_webhook(client, payloads.body_of(_image("big2", "wamid.BIG2"))) == 200
    result = await rec.wait("wamid.BIG2")
    assert isinstance(result, MediaError)
    assert "limit" in str(result)
    assert [r.kind for r in graph.media_requests] == ["info", "download"]
    assert _files(tmp_path / "media") == []  # neither the file nor a .part


async def test_a_sha256_mismatch_leaves_no_file(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    graph.add_media("bad1", b"tampered bytes", "image/jpeg", sha256="0" * 64)
    rec = Recorder()
    client = await _prod(aiohttp_client, tmp_path, graph, rec)
    assert await post_webhook(client, payloads.body_of(_image("bad1", "wamid.SHA1"))) == 200
    result = await rec.wait("wamid.SHA1")
    assert isinstance(result, MediaError)
    assert "sha256" in str(result)
    assert _files(tmp_path / "media") == []


async def test_an_expired_url_is_a_media_error(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    graph.add_media("old1", b"bytes", "image/jpeg", download_status=404)
    graph.add_media("gone1", b"bytes", "image/jpeg", info_status=404)
    rec = Recorder()
    client = await _prod(aiohttp_client, tmp_path, graph, rec)
    body = payloads.body_of(_image("old1", "wamid.EXP1"), _image("gone1", "wamid.EXP2"))
    assert await post_webhook(client, body) == 200
    expired, gone = await rec.wait("wamid.EXP1"), await rec.wait("wamid.EXP2")
    assert isinstance(expired, MediaError) and "404" in str(expired) and "expired" in str(expired)
    assert isinstance(gone, MediaError) and "HTTP 404" in str(gone) and "gone1" in str(gone)
    assert _files(tmp_path / "media") == []
    for error in (expired, gone):
        assert ACCESS_TOKEN not in str(error)


async def test_download_in_sandbox_mode_is_a_clear_error(aiohttp_client: Any, tmp_path: Path) -> None:
    rec = Recorder()
    cfg = make_config(tmp_path)
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": rec.router}))
    assert await post_webhook(client, payloads.body_of(_image("1", "wamid.SB1"))) == 200
    result = await rec.wait("wamid.SB1")
    assert isinstance(result, MediaError)
    assert "sandbox mode" in str(result) and "WHATSAPP_ACCESS_TOKEN" in str(result)


async def test_a_text_has_no_media_to_download(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    rec = Recorder()
    client = await _prod(aiohttp_client, tmp_path, graph, rec)
    assert await post_webhook(client, payloads.body_of(payloads.text("hi", id="wamid.TX1"))) == 200
    result = await rec.wait("wamid.TX1")
    assert isinstance(result, MediaError) and "text message has no media" in str(result)
    assert graph.media_requests == []


def test_target_path_never_leaves_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "media" / "home"
    for media_id in ("../../etc/passwd", "..", "/abs/path", "a/../../b", ".hidden", ""):
        path = target_path(folder, media_id, "image/jpeg")
        assert path.parent == folder, media_id
        assert path.suffix == ".jpg"
        assert not path.name.startswith(".")
    assert target_path(folder, "9", "audio/ogg; codecs=opus").name == "9.ogg"
    assert target_path(folder, "9", "application/x-unknown").name == "9.bin"


# ---------------------------------------------------------------------------- uploads


async def test_upload_from_a_handler_returns_the_media_id(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    rec = Recorder()
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(500)
    rec.upload = ("image", png, "image/png", "chart.png")
    client = await _prod(aiohttp_client, tmp_path, graph, rec)
    assert await post_webhook(client, payloads.body_of(payloads.text("chart please", id="wamid.UP1"))) == 200
    assert await rec.wait("wamid.UP1") == "upload-0001"
    [upload] = graph.uploads
    assert upload.phone_number_id == payloads.PNID
    assert upload.authorization == BEARER
    assert upload.fields == {"messaging_product": "whatsapp", "type": "image/png"}
    assert (upload.data, upload.filename, upload.content_type) == (png, "chart.png", "image/png")
    await wait_for(lambda: any(r.body.get("type") == "image" for r in graph.sends))
    [sent] = [r.body for r in graph.sends if r.body.get("type") == "image"]
    assert sent["image"] == {"id": "upload-0001"}


@pytest.mark.parametrize(
    ("upload", "needle"),
    [
        (("image", b"GIF89a....", "image/gif", "a.gif"), "MIME type 'image/gif' is not accepted"),
        (("image", b"x" * (5 * MB + 1), "image/jpeg", "a.jpg"), "above Meta's limit"),
        (("sticker", b"x" * (500 * 1024 + 1), "image/webp", "s.webp"), "above Meta's limit"),
        (("gif", b"x", "image/gif", "a.gif"), "media kind must be one of"),
        (("document", b"", "application/pdf", "a.pdf"), "empty"),
    ],
    ids=["wrong-mime", "image-too-large", "sticker-too-large", "unknown-kind", "empty"],
)
async def test_a_bad_upload_from_a_handler_is_refused_before_any_http_call(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, upload: tuple[str, bytes, str, str], needle: str
) -> None:
    rec = Recorder()
    rec.upload = upload
    client = await _prod(aiohttp_client, tmp_path, graph, rec)
    assert await post_webhook(client, payloads.body_of(payloads.text("send it", id="wamid.UPX"))) == 200
    result = await rec.wait("wamid.UPX")
    assert isinstance(result, MediaError)
    assert needle in str(result)
    assert graph.uploads == []


def _form(data: bytes, content_type: str, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    payload: Any = io.BytesIO(data) if len(data) > 1_000_000 else data  # aiohttp warns on large raw bytes
    form.add_field("file", payload, filename="upload.bin", content_type=content_type)
    return form


async def test_api_media_upload_returns_the_id(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await _prod(aiohttp_client, tmp_path, graph, Recorder())
    pdf = b"%PDF-1.4\n" + os.urandom(2000)
    form = _form(pdf, "application/pdf", tenant="biz", kind="document")
    resp = await client.post("/api/media", data=form, headers=AUTH)
    assert resp.status == 201, await resp.text()
    assert await resp.json() == {"id": "upload-0001", "tenant": "biz", "kind": "document"}
    [upload] = graph.uploads
    assert upload.phone_number_id == payloads.BIZ_PNID
    assert upload.data == pdf
    assert upload.authorization == BEARER
    assert upload.fields == {"messaging_product": "whatsapp", "type": "application/pdf"}
    # The kind defaults from the MIME type; the tenant defaults to the first.
    resp = await client.post("/api/media", data=_form(b"\xff\xd8\xff" + b"j" * 100, "image/jpeg"), headers=AUTH)
    assert resp.status == 201
    assert (await resp.json())["kind"] == "image"
    assert graph.uploads[-1].phone_number_id == payloads.PNID


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [("application/pdf", "document"), ("text/plain", "document"), ("video/mp4", "video"), ("audio/mpeg", "audio")],
)
async def test_api_media_upload_infers_the_kind_from_the_mime_type(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, content_type: str, kind: str
) -> None:
    """`kind` is optional: a PDF is obviously a document (not a kind named "application")."""
    client = await _prod(aiohttp_client, tmp_path, graph, Recorder())
    resp = await client.post("/api/media", data=_form(b"some bytes", content_type), headers=AUTH)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["kind"] == kind
    assert len(graph.uploads) == 1


@pytest.mark.parametrize(
    ("data", "content_type", "fields", "needle"),
    [
        (b"GIF89a", "image/gif", {}, "image/gif"),
        (b"x" * (500 * 1024 + 1), "image/webp", {"kind": "sticker"}, "above Meta's limit"),
        (b"x" * 10, "application/zip", {"kind": "document"}, "not accepted"),
    ],
    ids=["wrong-mime", "sticker-too-large", "zip-document"],
)
async def test_api_media_upload_refuses_before_any_http_call(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, data: bytes, content_type: str, fields: Any, needle: str
) -> None:
    client = await _prod(aiohttp_client, tmp_path, graph, Recorder())
    resp = await client.post("/api/media", data=_form(data, content_type, **fields), headers=AUTH)
    assert resp.status == 422
    body = await resp.json()
    assert body["field"] == "file"
    assert needle in body["error"]
    assert graph.uploads == []


async def test_api_media_upload_accepts_a_video_within_metas_limit(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """Meta takes videos up to 16 MB and documents up to 100 MB: the API must not stop at 4 MiB."""
    client = await _prod(aiohttp_client, tmp_path, graph, Recorder())
    video = b"\x00\x00\x00\x18ftypmp42" + b"v" * (6 * MB)
    assert len(video) < LIMITS["video"][1]
    resp = await client.post("/api/media", data=_form(video, "video/mp4"), headers=AUTH)
    assert resp.status == 201, f"HTTP {resp.status}: {(await resp.text())[:200]}"
    assert len(graph.uploads[0].data) == len(video)


async def test_api_media_upload_needs_the_token_and_multipart(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _prod(aiohttp_client, tmp_path, graph, Recorder())
    assert (await client.post("/api/media", data=_form(b"x", "image/png"))).status == 401
    resp = await client.post("/api/media", json={"file": "x"}, headers=AUTH)
    assert resp.status == 400
    resp = await client.post("/api/media", data=_form(b"x", "image/png", tenant="nobody"), headers=AUTH)
    assert resp.status == 422 and (await resp.json())["field"] == "tenant"
    assert graph.uploads == []


async def test_api_media_upload_in_sandbox_mode_says_why(aiohttp_client: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": Router(), "biz": Router()}))
    resp = await client.post("/api/media", data=_form(b"\x89PNG", "image/png"), headers=AUTH)
    assert resp.status >= 400
    assert "sandbox" in (await resp.json())["error"]


def test_check_upload_limits() -> None:
    check_upload("image", "image/jpeg", 5 * MB)
    check_upload("audio", "audio/ogg; codecs=opus", 1)
    check_upload("document", "application/pdf", 100 * MB)
    with pytest.raises(MediaError, match="above"):
        check_upload("document", "application/pdf", 100 * MB + 1)
    with pytest.raises(MediaError, match="not accepted"):
        check_upload("video", "video/quicktime", 10)


# ---------------------------------------------------------------------------- retention


def _make(path: Path, age_days: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"data")
    stamp = now - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


def test_prune_removes_files_older_than_the_retention(tmp_path: Path) -> None:
    folder, now = tmp_path / "media", time.time()
    old_home = _make(folder / "home" / "1.jpg", 31, now)
    old_biz = _make(folder / "biz" / "2.pdf", 45, now)
    fresh = _make(folder / "home" / "3.jpg", 29, now)
    just_new = _make(folder / "biz" / "4.ogg", 0, now)
    assert prune(folder, 30 * DAY, now=now) == 2
    assert not old_home.exists() and not old_biz.exists()
    assert fresh.exists() and just_new.exists()
    assert (folder / "home").is_dir()  # folders stay
    assert prune(folder, 30 * DAY, now=now) == 0
    assert prune(tmp_path / "absent", 30 * DAY) == 0


async def test_the_app_sweeps_old_media_at_start_up(aiohttp_client: Any, tmp_path: Path) -> None:
    now = time.time()
    old = _make(tmp_path / "media" / "home" / "old.jpg", 8, now)
    fresh = _make(tmp_path / "media" / "home" / "fresh.jpg", 1, now)
    cfg = make_config(tmp_path, media={"retention_days": 7})
    client = await aiohttp_client(create_app(cfg, load_secrets(ENV), routers={"home": Router()}))
    await wait_for(lambda: not old.exists())
    assert fresh.exists()
    assert client.app[keys.CONFIG].media.retention_days == 7
