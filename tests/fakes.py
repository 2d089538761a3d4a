"""A fake Graph API: a real aiohttp server on 127.0.0.1 that records sends and plays scripted answers."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


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
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{version}/{pnid}/messages", self._messages)
        app.router.add_get("/{version}/{pnid}", self._probe)
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
        self.probes += 1
        return web.Response(status=self.probe_status, text=json.dumps({"id": request.match_info["pnid"]}))
