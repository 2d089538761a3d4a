"""A fault-injecting fake Graph API on 127.0.0.1 that counts what Meta would have delivered.

Every POST /{version}/{pnid}/messages is keyed by what it carries (a text body, or
`read:<wamid>` for a read receipt). A request counts as *delivered* when Meta would have acted on
it: a success, but also the ambiguous faults where the request landed and only the answer was
lost (a reset after processing, an answer slower than Alfred's timeout). Those two are the only
faults that may cause a duplicate besides a crash, so they are counted apart (`ambiguous`).

No key gets more than `max_faults_per_key` faults, so retry limits (e.g. 3 attempts for unknown
errors) can never turn injected faults into a dead letter: every accepted message must arrive.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import Counter
from typing import Any

from aiohttp import web

#: kind -> relative weight. Every kind is one row of the fault matrix.
FAULTS: dict[str, float] = {
    "http_500_html": 3.0,  # 5xx with an HTML body (a proxy): transient
    "empty_503": 2.0,  # 5xx with an empty body: transient
    "throttle_130429": 1.5,  # 429 + Retry-After: back off and slow down
    "code_131000": 1.0,  # "something went wrong" (echoes the token: must be redacted)
    "pair_131056": 0.5,  # pair rate: only that recipient waits
    "token_190": 0.2,  # token expired: every tenant pauses until a probe succeeds
    "reset_before": 1.5,  # connection reset before Meta saw the request
    "hang": 0.5,  # no answer at all until Alfred's timeout; nothing delivered
    "reset_after": 0.7,  # AMBIGUOUS: delivered, then the connection reset
    "timeout_after": 0.7,  # AMBIGUOUS: delivered, the answer arrives after Alfred's timeout
    "ok_non_json": 0.5,  # 200 with a body that is not JSON: sent, without a wamid
}
AMBIGUOUS = frozenset({"reset_after", "timeout_after"})


def key_of(body: dict[str, Any]) -> str:
    """What a send carries: the text of a reply, or the message a receipt marks read."""
    if body.get("status") == "read":
        return f"read:{body.get('message_id')}"
    if body.get("type") == "text":
        return str(body.get("text", {}).get("body"))
    if body.get("type") == "template":
        return f"template:{body.get('template', {}).get('name')}"
    return json.dumps(body, sort_keys=True)


def _error(code: int, message: str) -> bytes:
    return json.dumps(
        {"error": {"message": f"(#{code}) {message}", "type": "OAuthException", "code": code, "fbtrace_id": "chaos"}}
    ).encode()


class FaultGraph:
    """The fake. `fault_rate` is the share of requests that get a fault while `faulty` is set."""

    def __init__(self, rng: random.Random, *, timeout: float, fault_rate: float = 0.12) -> None:
        self.rng = rng
        self.timeout = timeout
        self.fault_rate = fault_rate
        self.faulty = False
        self.latency = 0.0  # added to every answer (after delivery)
        self.max_faults_per_key = 2
        self.delivered: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.faults_per_key: Counter[str] = Counter()
        self.requests = 0
        self.probes = 0
        self.in_progress = 0
        self.down_periods = 0
        self.is_down = False
        self.refused_while_down = 0  # requests on kept-alive connections, reset while down
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        if self._runner is None:
            app = web.Application(client_max_size=8 * 1024 * 1024)
            app.router.add_post("/{version}/{pnid}/messages", self._messages)
            app.router.add_get("/{version}/{pnid}", self._probe)
            self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def down(self) -> None:
        """Graph API unreachable: new connections are refused, kept-alive ones are reset."""
        self.is_down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
            self.down_periods += 1

    async def up(self) -> None:
        self.is_down = False
        if self._site is None:
            await self.start(self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _pick(self, key: str) -> str | None:
        if not self.faulty or self.faults_per_key[key] >= self.max_faults_per_key:
            return None
        if self.rng.random() >= self.fault_rate:
            return None
        kinds, weights = zip(*FAULTS.items(), strict=True)
        kind = self.rng.choices(kinds, weights)[0]
        self.faults[kind] += 1
        self.faults_per_key[key] += 1
        return kind

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if self.is_down:
            self.refused_while_down += 1
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        self.requests += 1
        self.in_progress += 1
        try:
            body = json.loads(await request.read())
            key = key_of(body)
            fault = self._pick(key)
            if fault is None:
                return await self._success(key, body)
            return await self._fault(request, fault, key)
        finally:
            self.in_progress -= 1

    async def _success(self, key: str, body: dict[str, Any]) -> web.Response:
        self.delivered[key] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        if body.get("status") == "read":
            return web.json_response({"success": True})
        wamid = f"wamid.CHAOS{next(self._ids):08d}"
        return web.json_response({"messaging_product": "whatsapp", "contacts": [], "messages": [{"id": wamid}]})

    async def _fault(self, request: web.Request, fault: str, key: str) -> web.StreamResponse:
        if fault in ("reset_before", "reset_after"):
            if fault == "reset_after":
                self.delivered[key] += 1
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if fault in ("hang", "timeout_after"):
            if fault == "timeout_after":
                self.delivered[key] += 1
            await asyncio.sleep(self.timeout + 0.5)
            return web.json_response({"messages": [{"id": "wamid.LATE"}]})
        if fault == "ok_non_json":
            self.delivered[key] += 1
            return web.Response(status=200, text="<html>accepted</html>", content_type="text/html")
        return self._error_answer(request, fault)

    def _error_answer(self, request: web.Request, fault: str) -> web.Response:
        if fault == "http_500_html":
            return web.Response(status=500, text="<html><body>Internal Server Error</body></html>")
        if fault == "empty_503":
            return web.Response(status=503)
        if fault == "throttle_130429":
            return web.Response(status=429, body=_error(130429, "Rate limit hit"), headers={"Retry-After": "1"})
        if fault == "pair_131056":
            return web.Response(status=400, body=_error(131056, "Pair rate limit hit"))
        if fault == "token_190":
            return web.Response(status=401, body=_error(190, "Error validating access token"))
        # Meta sometimes echoes the credentials it was given: Alfred must never keep or log them.
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.Response(status=500, body=_error(131000, f"Something went wrong with token {token}"))

    async def _probe(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.json_response({"id": request.match_info["pnid"]})
