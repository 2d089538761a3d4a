"""A stand-alone fake Graph API for benchmarks: answers every send after `--latency` seconds.

    python bench/fake_graph.py PORT [--latency 0.1] [--status 200]

It records every POST to /{version}/{phone_number_id}/messages: arrival and answer times
(`time.monotonic()`, CLOCK_MONOTONIC: pacing is judged where Meta would judge it, and the
load generator's send times are on the same clock), the message type, what identifies it (the
text body of a text message, the `message_id` of a read receipt) and the status answered.

Control and read-out (loopback only):
- `POST /_mode` with JSON `{"status": 503, "latency": 0.1}`: answer every send with that status
  (a Graph error body for non-2xx: "down") and/or after that latency, from now on.
- `GET /_count`: `{"total", "ok", "distinct_ok", "last_ok", "by_status", "inflight_max"}` (cheap,
  for polling; `distinct_ok` counts distinct (type, key) pairs answered 2xx, `last_ok` is the
  arrival time of the latest of them).
- `GET /_stats`: `{"arrivals": [t, …], "records": [[t_in, t_out, type, key, status], …]}`.

With `--agent-latency S` it also plays the agent platform (`[orchestrator] url = …/agent`): a
POST answers `{"response": "You said: <user_message>"}` after S seconds, as the echo handler
would have, so replies match the same way; `/_count` then also reports `agent_inflight_max`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

from aiohttp import web

DOWN_BODY = json.dumps(
    {"error": {"message": "Service temporarily unavailable", "type": "OAuthException", "code": 2, "fbtrace_id": "B"}}
)


def _identify(body: bytes) -> tuple[str, str]:
    """(type, key) of a send body: text → its text, read receipt → the message id it marks read."""
    try:
        data = json.loads(body)
    except ValueError:
        return "invalid", ""
    if data.get("status") == "read":
        return "read", str(data.get("message_id", ""))
    kind = str(data.get("type", "?"))
    if kind == "text":
        return kind, str(data.get("text", {}).get("body", ""))
    return kind, str(data.get("to", ""))


class FakeGraph:
    """The state of one fake Graph API: its mode and what it received."""

    def __init__(self, latency: float, status: int) -> None:
        self.latency = latency
        self.status = status
        self.arrivals: list[float] = []
        self.records: list[tuple[float, float, str, str, int]] = []
        self.ok = 0
        self.ok_keys: set[tuple[str, str]] = set()  # distinct (type, key) answered 2xx
        self.last_ok = 0.0
        self.by_status: dict[int, int] = {}
        self.inflight = 0
        self.inflight_max = 0
        self.ids = itertools.count(1)
        self.agent_latency = 0.0
        self.agent_inflight = 0
        self.agent_inflight_max = 0

    async def messages(self, request: web.Request) -> web.Response:
        t_in = time.monotonic()
        self.arrivals.append(t_in)
        self.inflight += 1
        self.inflight_max = max(self.inflight_max, self.inflight)
        try:
            body = await request.read()
            kind, key = _identify(body)
            status = self.status
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.inflight -= 1
        self.records.append((t_in, time.monotonic(), kind, key, status))
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status >= 300:
            return web.Response(status=status, text=DOWN_BODY, content_type="application/json")
        self.ok += 1
        self.ok_keys.add((kind, key))
        self.last_ok = t_in
        if kind == "read":
            return web.json_response({"success": True})
        answer = {"messaging_product": "whatsapp", "messages": [{"id": f"wamid.B{next(self.ids)}"}]}
        return web.json_response(answer)

    async def agent(self, request: web.Request) -> web.Response:
        """The orchestrator: thinks for `agent_latency` s, then echoes the user's text."""
        data = await request.json()
        self.agent_inflight += 1
        self.agent_inflight_max = max(self.agent_inflight_max, self.agent_inflight)
        try:
            await asyncio.sleep(self.agent_latency)
        finally:
            self.agent_inflight -= 1
        return web.json_response({"response": "You said: " + str(data["payload"]["user_message"])})

    async def mode(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.status = int(data.get("status", self.status))
        self.latency = float(data.get("latency", self.latency))
        return web.json_response({"status": self.status, "latency": self.latency})

    async def count(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "total": len(self.records),
                "ok": self.ok,
                "distinct_ok": len(self.ok_keys),
                "last_ok": self.last_ok,
                "by_status": self.by_status,
                "inflight_max": self.inflight_max,
                "agent_inflight_max": self.agent_inflight_max,
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"arrivals": self.arrivals, "records": self.records})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=200, help="status of every answer (503: Graph API down)")
    parser.add_argument("--agent-latency", type=float, default=0.0, help="the fake orchestrator's thinking time, s")
    args = parser.parse_args()
    fake = FakeGraph(args.latency, args.status)
    fake.agent_latency = args.agent_latency
    app = web.Application()
    app.router.add_post("/{version}/{pnid}/messages", fake.messages)
    app.router.add_post("/agent", fake.agent)
    app.router.add_post("/_mode", fake.mode)
    app.router.add_get("/_count", fake.count)
    app.router.add_get("/_stats", fake.stats)
    app.router.add_get("/healthz", fake.health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
