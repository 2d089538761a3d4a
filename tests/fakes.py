"""A fake Graph API: a real aiohttp server on 127.0.0.1 that records sends and plays scripted answers."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web


@dataclass(frozen=True)
class Answer:
    """One scripted answer: status and body, optionally late, or a connection reset."""

    status: int = 200
    body: bytes | dict[str, Any] | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    reset: bool = False


def graph_error(code: int, status: int = 400, message: str = "error", details: str = "details") -> Answer:
    """An answer in Meta's error shape."""
    body = {
        "error": {
            "message": f"(#{code}) {message}",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": details},
            "fbtrace_id": f"trace-{code}",
        }
    }
    return Answer(status=status, body=body)


@dataclass
class Recorded:
    at: float
    phone_number_id: str
    authorization: str
    body: dict[str, Any]


@dataclass
class StoredMedia:
    """Inbound media the fake serves: `GET /{version}/{id}` describes it, its URL serves the bytes.

    `sha256` / `file_size` override what the description claims (None: the true values);
    `report_size=False` leaves `file_size` out; `info_status` / `download_status` script
    failures (a 404 download is an expired URL).
    """

    id: str
    data: bytes
    mime_type: str
    sha256: str | None = None
    file_size: int | None = None
    report_size: bool = True
    info_status: int = 200
    download_status: int = 200
    hold: asyncio.Event | None = None  # the bytes are served once it is set


@dataclass
class MediaRequest:
    kind: str  # "info" or "download"
    media_id: str
    authorization: str
    query: dict[str, str]


@dataclass
class Upload:
    phone_number_id: str
    authorization: str
    fields: dict[str, str]
    data: bytes
    filename: str | None
    content_type: str | None
    media_id: str


class FakeGraph:
    """Scripts are consumed in order: per recipient first, then global; default is success."""

    def __init__(self) -> None:
        self.sends: list[Recorded] = []
        self.script: deque[Answer] = deque()
        self.by_recipient: dict[str, deque[Answer]] = {}
        self.probe_status = 200
        self.probes = 0
        self.latency = 0.0
        self._ids = itertools.count(1)
        self.media: dict[str, StoredMedia] = {}
        self.media_requests: list[MediaRequest] = []
        self.uploads: list[Upload] = []
        self._upload_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""
        # message templates per WhatsApp Business Account id (see "message templates" below)
        self.templates: dict[str, list[dict[str, Any]]] = {}
        self.template_page_size = 2
        self.template_requests: list[TemplateRequest] = []
        self.template_script: deque[Answer] = deque()
        self._template_ids = itertools.count(9000)

    async def start(self) -> str:
        app = web.Application(client_max_size=128 * 1024 * 1024)  # uploads up to Meta's limits
        app.router.add_post("/{version}/{pnid}/messages", self._messages)
        app.router.add_get("/{version}/{pnid}", self._probe)
        app.router.add_get("/media-bytes/{media_id}/download", self._download)
        app.router.add_post("/{version}/{pnid}/media", self._upload)
        app.router.add_get("/{version}/{waba}/message_templates", self._list_templates)
        app.router.add_post("/{version}/{waba}/message_templates", self._create_template)
        app.router.add_delete("/{version}/{waba}/message_templates", self._delete_template)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def script_for(self, recipient: str, *answers: Answer) -> None:
        self.by_recipient.setdefault(recipient, deque()).extend(answers)

    def texts(self) -> list[str]:
        return [r.body["text"]["body"] for r in self.sends if r.body.get("type") == "text"]

    def _next(self, body: dict[str, Any]) -> Answer:
        queue = self.by_recipient.get(str(body.get("to", "")))
        if queue:
            return queue.popleft()
        if self.script:
            return self.script.popleft()
        if body.get("status") == "read":
            return Answer(body={"success": True})
        wamid = f"wamid.FAKE{next(self._ids):06d}"
        return Answer(body={"messaging_product": "whatsapp", "contacts": [], "messages": [{"id": wamid}]})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.sends.append(
            Recorded(time.monotonic(), request.match_info["pnid"], request.headers.get("Authorization", ""), body)
        )
        answer = self._next(body)
        if answer.delay or self.latency:
            await asyncio.sleep(answer.delay or self.latency)
        if answer.reset:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        raw = answer.body if isinstance(answer.body, bytes | None) else json.dumps(answer.body).encode()
        return web.Response(status=answer.status, body=raw or b"", headers=answer.headers)

    async def _probe(self, request: web.Request) -> web.Response:
        media = self.media.get(request.match_info["pnid"])
        if media is not None:  # GET /{version}/{media_id}: the media description, not a probe
            return self._media_info(request, media)
        self.probes += 1
        return web.Response(status=self.probe_status, text=json.dumps({"id": request.match_info["pnid"]}))

    # ------------------------------------------------------------------ media

    def add_media(self, media_id: str, data: bytes, mime_type: str = "image/jpeg", **kw: Any) -> StoredMedia:
        """Register inbound media the fake serves (see `StoredMedia`)."""
        stored = StoredMedia(media_id, data, mime_type, **kw)
        self.media[media_id] = stored
        return stored

    def _media_info(self, request: web.Request, media: StoredMedia) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.media_requests.append(MediaRequest("info", media.id, auth, dict(request.query)))
        if media.info_status != 200:
            error = {"error": {"message": "(#100) Unsupported get request", "type": "OAuthException", "code": 100}}
            return web.json_response(error, status=media.info_status)
        body: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "url": f"{self.url}/media-bytes/{media.id}/download",
            "mime_type": media.mime_type,
            "sha256": media.sha256 if media.sha256 is not None else hashlib.sha256(media.data).hexdigest(),
            "id": media.id,
        }
        if media.report_size:
            body["file_size"] = media.file_size if media.file_size is not None else len(media.data)
        return web.json_response(body)

    async def _download(self, request: web.Request) -> web.Response:
        """The bytes behind a media URL; like Meta's, it needs the bearer token."""
        media_id = request.match_info["media_id"]
        auth = request.headers.get("Authorization", "")
        self.media_requests.append(MediaRequest("download", media_id, auth, dict(request.query)))
        if not auth.startswith("Bearer ") or not auth.removeprefix("Bearer ").strip():
            return web.Response(status=401, text="missing bearer token")
        media = self.media.get(media_id)
        if media is None:
            return web.Response(status=404, text="no such media")
        if media.download_status != 200:
            return web.Response(status=media.download_status, text="url expired")
        if media.hold is not None:
            await media.hold.wait()
        return web.Response(body=media.data, content_type=media.mime_type.split(";")[0])

    async def _upload(self, request: web.Request) -> web.Response:
        """POST /{version}/{pnid}/media (multipart): record the upload, answer its new id."""
        fields: dict[str, str] = {}
        data, filename, content_type = b"", None, None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            if part.name == "file":
                data = bytes(await part.read(decode=False))
                filename, content_type = part.filename, part.headers.get("Content-Type")
            elif part.name is not None:
                fields[part.name] = await part.text()
        media_id = f"upload-{next(self._upload_ids):04d}"
        auth = request.headers.get("Authorization", "")
        pnid = request.match_info["pnid"]
        self.uploads.append(Upload(pnid, auth, fields, data, filename, content_type, media_id))
        return web.json_response({"id": media_id})

    # ------------------------------------------------------------------ message templates

    def add_template(self, waba: str, name: str, language: str = "en_US", **fields: Any) -> dict[str, Any]:
        """A template the account holds, in the shape `GET /{waba_id}/message_templates` lists it
        (Meta: templates/overview; defaults: an APPROVED UTILITY template with a one-variable body)."""
        template = {
            "name": name,
            "language": language,
            "status": "APPROVED",
            "category": "UTILITY",
            "parameter_format": "POSITIONAL",
            "id": str(next(self._template_ids)),
            "components": [{"type": "BODY", "text": "Hello {{1}}"}],
            **fields,
        }
        self.templates.setdefault(waba, []).append(template)
        return template

    def _record_template(self, request: web.Request, body: Any = None) -> TemplateRequest:
        auth = request.headers.get("Authorization", "")
        seen = TemplateRequest(request.method, request.match_info["waba"], dict(request.query), auth, body)
        self.template_requests.append(seen)
        return seen

    def _scripted(self) -> web.Response | None:
        if not self.template_script:
            return None
        answer = self.template_script.popleft()
        raw = answer.body if isinstance(answer.body, bytes | None) else json.dumps(answer.body).encode()
        return web.Response(status=answer.status, body=raw or b"", content_type="application/json")

    async def _list_templates(self, request: web.Request) -> web.Response:
        """Cursor paging like Graph's: `paging.cursors.after`, and `paging.next` while more remain."""
        seen = self._record_template(request)
        scripted = self._scripted()
        if scripted is not None:
            return scripted
        every = self.templates.get(seen.waba, [])
        start = int(seen.query.get("after", "0"))
        end = start + self.template_page_size
        paging: dict[str, Any] = {"cursors": {"before": str(start), "after": str(end)}}
        if end < len(every):
            paging["next"] = f"{self.url}{request.path}?limit={self.template_page_size}&after={end}"
        return web.json_response({"data": every[start:end], "paging": paging})

    async def _create_template(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        seen = self._record_template(request, body)
        scripted = self._scripted()
        if scripted is not None:
            return scripted
        made = self.add_template(
            seen.waba,
            body["name"],
            body["language"],
            status="PENDING",
            **{k: v for k, v in body.items() if k in ("category", "components", "parameter_format")},
        )
        return web.json_response({"id": made["id"], "status": "PENDING", "category": made["category"]})

    async def _delete_template(self, request: web.Request) -> web.Response:
        """By name (every language), or by name and `hsm_id` (that one): templates/template-management."""
        seen = self._record_template(request)
        scripted = self._scripted()
        if scripted is not None:
            return scripted
        every = self.templates.get(seen.waba, [])
        name, hsm_id = seen.query.get("name"), seen.query.get("hsm_id")
        keep = [t for t in every if t["name"] != name or (hsm_id is not None and t["id"] != hsm_id)]
        if len(keep) == len(every):
            error = {
                "message": "Invalid parameter",
                "type": "OAuthException",
                "code": 100,
                "error_subcode": 2593002,
                "error_user_msg": f"The message template {name} wasn't found for this account.",
            }
            return web.json_response({"error": error}, status=400)
        self.templates[seen.waba] = keep
        return web.json_response({"success": True})


@dataclass
class TemplateRequest:
    method: str
    waba: str
    query: dict[str, str]
    authorization: str
    body: Any


# ---------------------------------------------------------------------------- the agent platform


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict[str, Any] | None = None
    delay: float = 0.0
    hold: asyncio.Event | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # send the body in chunks, with no Content-Length


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeOrchestrator:
    """A real aiohttp server on 127.0.0.1: records requests, plays scripted replies in order."""

    requests: list[Seen] = field(default_factory=list)
    script: deque[Reply] = field(default_factory=deque)
    default: Reply = field(default_factory=lambda: Reply(body={"response": "default answer"}))
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/orchestrate", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1/orchestrate"

    async def close(self) -> None:
        for reply in self.script:
            if reply.hold is not None:
                reply.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.path, dict(request.headers), json.loads(await request.read())))
        reply = self.script.popleft() if self.script else self.default
        if reply.hold is not None:
            await reply.hold.wait()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        raw = reply.body if isinstance(reply.body, bytes | None) else json.dumps(reply.body).encode()
        if not reply.chunked:
            return web.Response(
                status=reply.status, body=raw or b"", content_type="application/json", headers=reply.headers
            )
        resp = web.StreamResponse(status=reply.status, headers={"Content-Type": "application/json", **reply.headers})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(raw or b""), 65536):
            await resp.write((raw or b"")[start : start + 65536])
        await resp.write_eof()
        return resp
