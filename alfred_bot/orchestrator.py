"""The bridge to the agent platform: a text message out as an A2A-style envelope, its `response` back.

The call runs in a dispatch worker, never while Meta waits on the webhook. Each attempt is
bounded by `timeout_seconds`; timeouts, connection failures, 429 and 5xx are retried up to
`retries` times; a 4xx, a body that is not JSON, or one without a `response` text is not (it
would fail the same way again). Whatever fails, the caller gets `OrchestratorError` and sends
the configured fallback, so the user always hears back.

`orchestrator_fallback` makes the client a router's text fallback: the dispatcher mounts it on
every tenant's router (`Router.mount`), which sends it the texts no route claims.

The orchestrator is not trusted further than that: redirects are never followed (a 3xx is a
failure, so the user's text and number are never re-posted to a host we did not configure), the
answer is read up to `max_answer_bytes` (more is a failure: a cut JSON could not be read anyway,
and compressed answers are not unpacked), and `split_text` sends at most `max_parts` messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from alfred_bot import tracing
from alfred_bot.config import OrchestratorConfig
from alfred_bot.logs import new_trace_id
from alfred_bot.models import Message
from alfred_bot.telemetry import Telemetry

if TYPE_CHECKING:
    from alfred_bot.context import Context
    from alfred_bot.router import Handler

log = logging.getLogger("alfred.orchestrator")

RETRY_PAUSE = 0.25  # seconds before the first retry; doubles each time
READ_CHUNK = 16 * 1024
ELLIPSIS = "…"


class OrchestratorError(Exception):
    """The orchestrator gave no usable answer; the message says why (never the API key)."""


def envelope(
    *, trace_id: str, text: str, user: str, message_id: str, phone_number: str | None, tenant: str
) -> dict[str, Any]:
    """The request body the orchestrator expects."""
    return {
        "trace_id": trace_id,
        "sender_agent": "whatsapp_adapter",
        "receiver_agent": "orchestrator",
        "message_type": "orchestration_request",
        "payload": {
            "user_message": text,
            "user_id": user,
            "session_id": f"whatsapp_{user}",
            "metadata": {
                "source": "whatsapp",
                "message_id": message_id,
                "phone_number": phone_number,
                "tenant": tenant,
            },
        },
    }


def answer_text(body: bytes) -> str:
    """The `response` text of an answer (top level, or inside `payload`), else OrchestratorError."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise OrchestratorError("the answer is not JSON") from None
    if not isinstance(data, dict):
        raise OrchestratorError("the answer is not a JSON object")
    payload = data.get("payload")
    text = data.get("response")
    if text is None and isinstance(payload, dict):
        text = payload.get("response")
    if not isinstance(text, str) or not text.strip():
        raise OrchestratorError("the answer has no `response` text")
    return text


class _Retryable(Exception):
    pass


class Orchestrator:
    """One HTTP client to the orchestrator, shared by all dispatch workers."""

    def __init__(
        self,
        cfg: OrchestratorConfig,
        api_key: str | None,
        telemetry: Telemetry | None = None,
        *,
        connections: int = 100,
    ) -> None:
        self._connections = connections  # one per handler worker: none waits for a connection
        self._telemetry = telemetry or Telemetry()
        self._metrics = self._telemetry.metrics
        self._counts = self._telemetry.orchestrator
        self._cfg = cfg
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None

    @property
    def counts(self) -> Mapping[str, int]:
        """Requests, retries, failures… (read-only; the numbers live in the telemetry object)."""
        return MappingProxyType(self._counts)

    @property
    def enabled(self) -> bool:
        return bool(self._cfg.url)

    async def start(self) -> None:
        if self.enabled and self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=self._cfg.timeout_seconds),
                auto_decompress=False,  # a gzip bomb stays a few compressed bytes (and is not JSON)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ask(self, request: dict[str, Any]) -> str:
        """POST `request` (see `envelope`); the answer's text, or OrchestratorError after the retries."""
        if self._session is None:
            raise OrchestratorError("the orchestrator is not configured")
        self._counts["requests"] += 1
        body = msgspec.json.encode(request)
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "X-Trace-Id": str(request.get("trace_id", "")),
        }
        tracing.inject(headers)  # W3C `traceparent` of the `orchestrator` span, when tracing is on
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        problem = "no attempt made"
        for attempt in range(self._cfg.retries + 1):
            if attempt:
                self._counts["retries"] += 1
                self._metrics.orchestrator.labels("retry").inc()
                await asyncio.sleep(RETRY_PAUSE * 2 ** (attempt - 1))
            try:
                answer = await self._post(self._session, body, headers)
            except _Retryable as exc:
                problem = str(exc)
                log.warning("orchestrator attempt %d failed: %s", attempt + 1, problem)
            except OrchestratorError:
                self._failed()
                raise
            else:
                self._metrics.orchestrator.labels("ok").inc()
                return answer
        self._failed()
        raise OrchestratorError(f"{problem} (after {self._cfg.retries + 1} attempts)")

    def _failed(self) -> None:
        self._counts["failures"] += 1
        self._metrics.orchestrator.labels("failed").inc()

    async def _post(self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> str:
        try:
            async with session.post(self._cfg.url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                if 300 <= status < 400:
                    self._counts["redirects_refused"] += 1
                    raise OrchestratorError(f"HTTP {status}: redirects are not followed")
                raw = await self._read_capped(resp) if status < 400 else b""
        except TimeoutError:
            raise _Retryable(f"no answer within {self._cfg.timeout_seconds:g} s") from None
        except aiohttp.ClientError as exc:
            raise _Retryable(f"connection failed: {type(exc).__name__}") from None
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}")
        if status >= 400:
            raise OrchestratorError(f"HTTP {status}")
        return answer_text(raw)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, or OrchestratorError once it passes `max_answer_bytes` (never held whole)."""
        cap = self._cfg.max_answer_bytes
        if resp.content_length is not None and resp.content_length > cap:
            self._counts["answers_too_large"] += 1
            raise OrchestratorError(f"the answer is larger than orchestrator.max_answer_bytes ({cap} bytes)")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if size > cap:
                self._counts["answers_too_large"] += 1
                raise OrchestratorError(f"the answer is larger than orchestrator.max_answer_bytes ({cap} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)


def orchestrator_fallback(
    orchestrator: Orchestrator | None, cfg: OrchestratorConfig, counts: Counter[str]
) -> Handler | None:
    """The text fallback that forwards a text to the orchestrator (None when it is not configured).

    Its answer goes back to the user in at most `cfg.max_parts` messages; when it fails,
    `cfg.fallback_text` does (counted in `counts` as `orchestrator_failed`). A read receipt with
    "typing…" goes first, so the user sees the bot is working while the orchestrator thinks.
    """
    if orchestrator is None or not orchestrator.enabled:
        return None

    async def ask_orchestrator(message: Message, ctx: Context) -> None:
        ctx.mark_read(typing=True)
        try:
            with tracing.child("orchestrator", {"alfred.tenant": ctx.tenant}):
                answer = await orchestrator.ask(_request(message, ctx))
        except OrchestratorError as exc:
            log.error("orchestrator failed for %s (tenant %s): %s", message.id, ctx.tenant, exc)
            counts["orchestrator_failed"] += 1
            if cfg.fallback_text.strip():
                ctx.reply(cfg.fallback_text[:4096])
            return
        for part in split_text(answer, max_parts=cfg.max_parts):
            ctx.reply(part)

    return ask_orchestrator


def _request(message: Message, ctx: Context) -> dict[str, Any]:
    """The envelope for one message; the phone number is the contact's `wa_id` when Meta gave one."""
    return envelope(
        trace_id=ctx.trace_id or new_trace_id(),
        text=message.text or "",
        user=ctx.recipient,
        message_id=message.id,
        phone_number=ctx.contact.wa_id if ctx.contact and ctx.contact.wa_id else message.from_,
        tenant=ctx.tenant,
    )


def _cut(text: str, size: int) -> int:
    """Where to cut `text` to at most `size` characters: a line break or space in the second half."""
    cut = max(text.rfind("\n", 0, size), text.rfind(" ", 0, size))
    return cut if cut > size // 2 else size


def split_text(text: str, size: int = 4096, max_parts: int = 0) -> list[str]:
    """Cut a long answer into WhatsApp-sized messages, at a line break or space when possible.

    With `max_parts`, at most that many: the last one then ends with "…" where the text was cut,
    so one answer can never become hundreds of messages blocking the user's conversation.
    """
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > size:
        if max_parts and len(parts) == max_parts - 1:
            cut = _cut(rest, size - len(ELLIPSIS))
            parts.append(rest[:cut].rstrip() + ELLIPSIS)
            return parts
        cut = _cut(rest, size)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts
