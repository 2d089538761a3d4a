"""Transports that deliver one send: the Graph API over one shared session, or a sandbox sink.

A transport turns every outcome, including timeouts and resets, into a `Decision` (see
`decide.py`); it never raises for a failed send and never puts the token in an error.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Protocol

import aiohttp

from alfred_bot.config import GraphConfig
from alfred_bot.decide import Decision, Outcome, decide, transport_failure

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


class GraphTransport:
    """POST {base_url}/{api_version}/{phone_number_id}/messages with the bearer token."""

    def __init__(self, cfg: GraphConfig, token: str, *, connections: int) -> None:
        self._base = f"{cfg.base_url.rstrip('/')}/{cfg.api_version}"
        self._timeout = cfg.timeout_seconds
        self._token = token
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_headers_sent)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit=self._connections),
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
            trace_configs=[trace],
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("GraphTransport used before start()")
        return self._session

    async def send(self, phone_number_id: str, payload: bytes, on_wire: OnWire | None = None) -> Decision:
        url = f"{self._base}/{phone_number_id}/messages"
        try:
            async with self._client().post(url, data=payload, trace_request_ctx={"on_wire": on_wire}) as resp:
                body = await resp.read()
                # Meta's error text can echo a malformed token back: never keep it.
                return decide(resp.status, body.replace(self._token.encode(), b"[redacted]"), resp.headers)
        except TimeoutError:
            return transport_failure(f"no answer within {self._timeout:g} s")
        except aiohttp.ClientError as exc:
            return transport_failure(f"connection failed: {type(exc).__name__}")

    async def probe(self, phone_number_id: str) -> bool:
        try:
            async with self._client().get(f"{self._base}/{phone_number_id}", params={"fields": "id"}) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False


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
