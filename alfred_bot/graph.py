"""Transports that deliver one send: the Graph API over one shared session, or a sandbox sink.

A transport turns every outcome, including timeouts and resets, into a `Decision` (see
`decide.py`); it never raises for a failed send and never puts the token in an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from alfred_bot import logs, tracing
from alfred_bot.config import GraphConfig
from alfred_bot.media import DEFAULT_DOWNLOAD_HOSTS, MediaError, MediaFile, MediaInfo, limit_for, target_path
from alfred_bot.outbound.decide import Decision, Outcome, decide, transport_failure
from alfred_bot.security import Redactor, host_allowed

log = logging.getLogger("alfred.graph")


OnWire = Callable[[], None]


async def _headers_sent(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    """Tell the sender when a request really left (for pacing as the receiver sees it)."""
    on_wire = (ctx.trace_request_ctx or {}).get("on_wire")
    if on_wire is not None:
        on_wire()


class Transport(Protocol):
    """Where sends go."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, phone_number_id: str, payload: bytes, on_wire: OnWire | None = None) -> Decision:
        """Deliver one Cloud API message body; call `on_wire()` when its bytes are on the wire."""

    async def probe(self, phone_number_id: str) -> bool:
        """True when the credentials work again (used to lift a token pause)."""

    async def download(self, phone_number_id: str, media_id: str, folder: Path, max_bytes: int) -> MediaFile:
        """Fetch inbound media `media_id` into `folder` (a file named after the id and its type)."""

    async def upload(self, phone_number_id: str, data: bytes, mime_type: str, filename: str) -> str:
        """Upload media for sending; return its media id (valid 30 days)."""

    async def manage(
        self, method: str, phone_number_id: str, path: str, *, params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> GraphAnswer:
        """A Business Management API call (`{waba_id}/message_templates`…) with the token of the
        tenant that owns `phone_number_id`: Meta's status and JSON answer, redacted. Raises
        `GraphUnavailable` when there is no answer (timeout, connection, sandbox)."""


class GraphAnswer(msgspec.Struct, frozen=True):
    """A management call's answer: Meta's HTTP status and its JSON body (secrets redacted)."""

    status: int
    body: Any


class GraphUnavailable(Exception):
    """A management call got no answer (timeout, connection refused, sandbox mode)."""


def _started(session: aiohttp.ClientSession | None) -> aiohttp.ClientSession:
    if session is None:
        raise RuntimeError("GraphTransport used before start()")
    return session


class GraphTransport:
    """POST {base_url}/{api_version}/{phone_number_id}/messages with that number's bearer token.

    `tokens` maps each phone number id to its access token: a tenant's token is only ever sent
    for its own number.
    """

    def __init__(
        self,
        cfg: GraphConfig,
        tokens: Mapping[str, str],
        *,
        connections: int,
        download_connections: int = 100,
        redactor: Redactor | None = None,
        download_hosts: Sequence[str] = DEFAULT_DOWNLOAD_HOSTS,
    ) -> None:
        self._base = f"{cfg.base_url.rstrip('/')}/{cfg.api_version}"
        self._timeout = cfg.timeout_seconds
        self._tokens = dict(tokens)
        self._connections = connections
        self._download_connections = download_connections
        self._session: aiohttp.ClientSession | None = None
        # Handlers' media downloads get a pool of their own (one connection per handler worker):
        # up to `dispatch.workers` of them at once must not make a paced send wait for a connection.
        self._media_session: aiohttp.ClientSession | None = None
        # every configured secret, not only the tokens: any of them could come back in an error
        self._redact = redactor if redactor is not None else Redactor(self._tokens.values())
        # the bearer token goes to Meta's media hosts and the Graph API itself, nowhere else
        self._download_hosts = tuple(download_hosts)
        self._base_origin = URL(cfg.base_url).origin()

    def _auth(self, phone_number_id: str) -> dict[str, str]:
        token = self._tokens.get(phone_number_id)
        if token is None:
            raise RuntimeError(f"no access token for phone number id {phone_number_id}")
        return {"Authorization": f"Bearer {token}"}

    def _decide(self, status: int, body: bytes, headers: Mapping[str, str]) -> Decision:
        """`decide()` with every text of the answer redacted: Meta's error text can echo a
        malformed token back (upper-cased, truncated, inside a URL), and these texts are stored."""
        return decide(status, body, headers).redacted(self._redact)

    def _graph_error(self, status: int, body: bytes) -> str:
        """`HTTP 404, code 100: Unsupported get request` from a Graph error body (or just the status)."""
        d = self._decide(status, body, {})
        parts = [f"HTTP {status}"]
        if d.code is not None:
            parts.append(f"code {d.code}")
        if d.message:
            parts.append(d.message[:200])
        return ", ".join(parts)

    async def start(self) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_headers_sent)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit=self._connections),
            trace_configs=[trace],
        )
        self._media_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit=self._download_connections),
        )

    async def close(self) -> None:
        for session in (self._session, self._media_session):
            if session is not None:
                await session.close()
        self._session = self._media_session = None

    def _client(self) -> aiohttp.ClientSession:
        return _started(self._session)

    def _media(self) -> aiohttp.ClientSession:
        return _started(self._media_session)

    async def send(self, phone_number_id: str, payload: bytes, on_wire: OnWire | None = None) -> Decision:
        """`_post_message`, inside a `send` span when tracing is on (under the `webhook` span of
        the trace id the lane worker bound; attributes from the bound ids, never the recipient)."""
        if not tracing.on():
            return await self._post_message(phone_number_id, payload, on_wire)
        trace_id = logs.TRACE_ID.get()
        attrs = send_attributes(payload)
        with tracing.follow("send", trace_id, attrs) if trace_id else tracing.child("send", attrs) as span:
            decision = await self._post_message(phone_number_id, payload, on_wire)
            tracing.annotate(
                span,
                {
                    "http.response.status_code": decision.http_status,
                    "alfred.error_code": decision.code,
                    "alfred.outcome": str(decision.outcome),
                },
            )
        return decision

    async def _post_message(self, phone_number_id: str, payload: bytes, on_wire: OnWire | None) -> Decision:
        url = f"{self._base}/{phone_number_id}/messages"
        try:
            async with self._client().post(
                url,
                data=payload,
                headers={**self._auth(phone_number_id), "Content-Type": "application/json"},
                trace_request_ctx={"on_wire": on_wire},
            ) as resp:
                body = await resp.read()
                return self._decide(resp.status, body, resp.headers)
        except TimeoutError:
            return transport_failure(f"no answer within {self._timeout:g} s")
        except aiohttp.ClientError as exc:
            return transport_failure(f"connection failed: {type(exc).__name__}")

    async def probe(self, phone_number_id: str) -> bool:
        try:
            async with self._client().get(
                f"{self._base}/{phone_number_id}", params={"fields": "id"}, headers=self._auth(phone_number_id)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def download(self, phone_number_id: str, media_id: str, folder: Path, max_bytes: int) -> MediaFile:
        try:
            info = await self._media_info(phone_number_id, media_id)
            limit = limit_for(info.mime_type, max_bytes)
            if info.file_size is not None and info.file_size > limit:
                raise MediaError(f"media {media_id} is {info.file_size} bytes, above the limit of {limit}")
            dest = target_path(folder, media_id, info.mime_type)
            size = await self._fetch_to(phone_number_id, info, dest, limit)
        except TimeoutError:
            raise MediaError(f"media {media_id}: no answer within {self._timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise MediaError(f"media {media_id}: connection failed: {type(exc).__name__}") from None
        return MediaFile(id=media_id, path=str(dest), mime_type=info.mime_type, size=size, sha256=info.sha256)

    async def _media_info(self, phone_number_id: str, media_id: str) -> MediaInfo:
        url = f"{self._base}/{quote(media_id, safe='')}"
        params = {"phone_number_id": phone_number_id}
        async with self._media().get(url, params=params, headers=self._auth(phone_number_id)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise MediaError(f"media {media_id}: {self._graph_error(resp.status, body)}")
        try:
            return msgspec.json.decode(body, type=MediaInfo)
        except msgspec.DecodeError:
            raise MediaError(f"media {media_id}: Graph answered without a usable url") from None

    async def _fetch_to(self, phone_number_id: str, info: MediaInfo, dest: Path, limit: int) -> int:
        """Stream the bytes to a temporary file, cut at `limit`, check sha256, then rename."""
        url = media_url(info.url, self._base_origin, self._download_hosts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_suffix(dest.suffix + ".part")
        digest, size = hashlib.sha256(), 0
        try:
            async with self._media().get(url, headers=self._auth(phone_number_id)) as resp:
                if resp.status != 200:
                    raise MediaError(f"media download answered HTTP {resp.status} (the url may have expired)")
                with partial.open("wb") as out:
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        size += len(chunk)
                        if size > limit:
                            raise MediaError(f"media is larger than the limit of {limit} bytes")
                        digest.update(chunk)
                        out.write(chunk)
            if info.sha256 and digest.hexdigest() != info.sha256.lower():
                raise MediaError("media checksum does not match Graph's sha256")
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)
        return size

    async def upload(self, phone_number_id: str, data: bytes, mime_type: str, filename: str) -> str:
        form = aiohttp.FormData()
        form.add_field("messaging_product", "whatsapp")
        form.add_field("type", mime_type)
        form.add_field("file", io.BytesIO(data), filename=filename, content_type=mime_type)
        url = f"{self._base}/{phone_number_id}/media"
        try:
            async with self._media().post(url, data=form, headers=self._auth(phone_number_id)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise MediaError(f"upload refused: {self._graph_error(resp.status, body)}")
        except TimeoutError:
            raise MediaError(f"upload: no answer within {self._timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise MediaError(f"upload: connection failed: {type(exc).__name__}") from None
        media_id = _json_field(body, "id")
        if not media_id:
            raise MediaError("upload: Graph answered without a media id")
        return media_id

    async def manage(
        self, method: str, phone_number_id: str, path: str, *, params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> GraphAnswer:
        # callers build `path` from validated ids only (digits, fixed words)
        request = _Management(method, f"{self._base}/{path}", params, body, self._auth(phone_number_id))
        return await request.run(self._client(), self._timeout, self._redact)


def media_url(raw: str, base_origin: URL, download_hosts: Sequence[str]) -> URL:
    """The media URL Graph gave, if the bearer token may go there: the Graph API's own origin
    (`base_origin`: scheme, host and port of `graph.base_url`, e.g. a local fake), or https on a
    host of `download_hosts` (`media.download_hosts`, Meta's CDN).

    A URL elsewhere (a compromised or spoofed answer, a proxy in between) is refused, never
    fetched: the token would be handed to whoever runs that host.
    """
    url = URL(raw)
    if url.is_absolute() and url.scheme in ("http", "https") and url.origin() == base_origin:
        return url
    if url.scheme != "https" or not url.is_absolute():
        raise MediaError("media url must be https (the bearer token is never sent in clear to another host)")
    if not host_allowed(url.host, download_hosts):
        raise MediaError(
            f"media url host {str(url.host)[:100]!r} is not one of Meta's media hosts (media.download_hosts): "
            "not fetched, the access token is only sent to Meta"
        )
    return url


class _Shape(msgspec.Struct):
    """The one field of a Cloud API message body a span may name: its type (a receipt has none)."""

    type: str | None = None
    status: str | None = None


def send_attributes(payload: bytes) -> dict[str, str]:
    """Tenant, outbox id (both bound by the lane worker) and message type of one send."""
    try:
        shape = msgspec.json.decode(payload, type=_Shape)
        kind = shape.type or shape.status or "?"
    except msgspec.DecodeError:
        kind = "?"
    tenant, outbox_id = logs.TENANT.get() or "", logs.MESSAGE_ID.get() or ""
    return {"alfred.tenant": tenant, "alfred.outbox_id": outbox_id, "alfred.type": kind}


def _json_field(body: bytes, key: str) -> str | None:
    try:
        value = msgspec.json.decode(body).get(key)
    except (msgspec.DecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None




class _Management(NamedTuple):
    """One Business Management API call (see `Transport.manage`)."""

    method: str
    url: str
    params: Mapping[str, str] | None
    body: Any
    auth: dict[str, str]

    async def run(self, session: aiohttp.ClientSession, limit: float, redact: Callable[[str], str]) -> GraphAnswer:
        data = None if self.body is None else msgspec.json.encode(self.body)
        headers = {**self.auth, **({"Content-Type": "application/json"} if data else {})}
        try:
            async with session.request(self.method, self.url, params=self.params, data=data, headers=headers) as resp:
                raw = await resp.read()
        except TimeoutError:
            raise GraphUnavailable(f"no answer within {limit:g} s") from None
        except aiohttp.ClientError as exc:
            raise GraphUnavailable(f"connection failed: {type(exc).__name__}") from None
        try:
            decoded = msgspec.json.decode(redact(raw.decode("utf-8", "replace")))
        except msgspec.DecodeError:
            decoded = {"error": {"message": f"Graph answered HTTP {resp.status} without JSON"}}
        return GraphAnswer(resp.status, decoded)


class SandboxTransport:
    """No access token: nothing goes to Meta; each send is 'accepted' with a sandbox wamid."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, phone_number_id: str, payload: bytes, on_wire: OnWire | None = None) -> Decision:
        await asyncio.sleep(0)
        if on_wire is not None:
            on_wire()
        return Decision(outcome=Outcome.SENT, http_status=200, wamid=f"wamid.SANDBOX{uuid.uuid4().hex}")

    async def probe(self, phone_number_id: str) -> bool:
        return True

    async def download(self, phone_number_id: str, media_id: str, folder: Path, max_bytes: int) -> MediaFile:
        raise MediaError("media cannot be downloaded in sandbox mode (set WHATSAPP_ACCESS_TOKEN)")

    async def upload(self, phone_number_id: str, data: bytes, mime_type: str, filename: str) -> str:
        raise MediaError("media cannot be uploaded in sandbox mode (set WHATSAPP_ACCESS_TOKEN)")

    async def manage(
        self, method: str, phone_number_id: str, path: str, *, params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> GraphAnswer:
        raise GraphUnavailable("the Graph API is not called in sandbox mode (set WHATSAPP_ACCESS_TOKEN)")
