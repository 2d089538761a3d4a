"""Meta in a box: a fake Graph API that calls back with signed status webhooks, plus steady inbound traffic.

    python bench/meta_sim.py [--conversations 500] [--users 5000] [--rate 1000] [--seconds 20] [--warmup 5]

One simulator process (pinned to CPU 1) plays Meta for `python main.py` (production mode, pinned
to CPU 0, `outbound.rate_per_second = --rate`, echo handler):

- inbound: `--conversations` signed text-message webhooks per second from `--users` senders, each
  due at a fixed time (request i at start + i/R) and its latency taken from that due time, so a
  stalled server is charged for every webhook it delayed (no coordinated omission);
- Graph API: accepts every send (after `--graph-latency`), timestamps its arrival, and for every
  accepted message (not for read receipts, as Meta) posts three status webhooks, each on its own
  and signed with the app secret: `sent` +20 ms, `delivered` +100 ms, `read` +500 ms;
- every second it reads the outbox backlog (queued + sending) from the open `/healthz`.

All webhooks go over `--connections` keep-alive connections (pre-serialised inbound bodies, raw
HTTP, only the status line read back). What is reported covers the `--seconds` after `--warmup`:
sends/s accepted, webhooks/s posted, webhook latency p50/p99 by kind, the worst sliding second of
send arrivals at the receiver (Meta's view of the pacing), backlog over time and the server's CPU
(% of one core, /proc/<pid>/stat). Loopback only; it stops by itself (inbound ends after warm-up +
measured seconds, then at most `--drain` s for the last answers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLIENT_CPU,
    PNID,
    SECRET,
    SERVER_CPU,
    alfred_version,
    cpu_seconds,
    free_port,
    loadavg,
    machine,
    pin_self,
    start_alfred,
    stop,
    write_config,
)
from e2e import worst_window
from loadgen import Signed, parse_response, percentile, serialize, sign, webhook_body

#: Meta's status webhooks after each accepted send: (status, seconds after the send was accepted).
STATUSES = (("sent", 0.020), ("delivered", 0.100), ("read", 0.500))


@dataclass(slots=True)
class Post:
    """One webhook to post: its kind (`message` / `status`), the ready request and when it is due."""

    kind: str
    request: bytes
    due: float


class _Conn(asyncio.Protocol):
    """One keep-alive connection to Alfred: at most one webhook in flight."""

    def __init__(self, poster: Poster) -> None:
        self.poster = poster
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.post: Post | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, post: Post) -> None:
        self.post = post
        assert self.transport is not None
        self.transport.write(post.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (parsed := parse_response(self.buf)) is not None:
            status, used = parsed
            del self.buf[:used]
            post, self.post = self.post, None
            if post is not None:
                self.poster.finished(self, post, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.poster.lost(self)


class Poster:
    """Posts webhooks to Alfred over a pool of keep-alive connections, in due order, recording each outcome."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port, self.connections = host, port, connections
        self.pending: deque[Post] = deque()
        self.idle: list[_Conn] = []
        self.open: set[_Conn] = set()
        self.closing = False
        #: (kind, due, answered at, HTTP status; 0 = connection lost)
        self.done: list[tuple[str, float, float, int]] = []

    def request(self, kind: str, body: bytes, due: float) -> Post:
        """A ready-to-write signed POST /webhook."""
        signed = Signed(body, sign(body, SECRET), "", "", "")
        return Post(kind, serialize(self.host, self.port, "/webhook", signed), due)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.connections):
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
            self.open.add(conn)
            self.idle.append(conn)

    def submit(self, post: Post) -> None:
        if self.idle:
            self.idle.pop().send(post)
        else:
            self.pending.append(post)

    def _next(self, conn: _Conn) -> None:
        if self.closing:
            return
        if self.pending:
            conn.send(self.pending.popleft())
        else:
            self.idle.append(conn)

    def finished(self, conn: _Conn, post: Post, status: int) -> None:
        self.done.append((post.kind, post.due, time.monotonic(), status))
        self._next(conn)

    def lost(self, conn: _Conn) -> None:
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.post is not None:
            self.done.append((conn.post.kind, conn.post.due, time.monotonic(), 0))
        if not self.closing:
            asyncio.get_running_loop().create_task(self._replace())

    async def _replace(self) -> None:
        with contextlib.suppress(OSError):
            _, conn = await asyncio.get_running_loop().create_connection(lambda: _Conn(self), self.host, self.port)
            self.open.add(conn)
            self._next(conn)

    def busy(self) -> bool:
        return bool(self.pending) or len(self.idle) < len(self.open)

    def close(self) -> None:
        self.closing = True
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()


def status_body(wamid: str, state: str, recipient: str) -> bytes:
    """A status webhook as Meta sends it: one status per webhook."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": PNID, "phone_number_id": PNID},
        "statuses": [{"id": wamid, "status": state, "timestamp": str(int(time.time())), "recipient_id": recipient}],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "0", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(body).encode()


class Graph:
    """The fake Graph API: accepts every send, records its arrival, schedules its status webhooks."""

    def __init__(self, poster: Poster, latency: float) -> None:
        self.poster = poster
        self.latency = latency
        self.arrivals: list[float] = []
        self.receipts = 0
        self.messages = 0
        self.ids = itertools.count(1)
        self.calling_back = True

    async def send(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        data = json.loads(await request.read())
        if self.latency:
            await asyncio.sleep(self.latency)
        if data.get("status") == "read":  # read receipt (+ typing indicator): no statuses for it
            self.receipts += 1
            return web.json_response({"success": True})
        self.messages += 1
        wamid = f"wamid.SIM{next(self.ids):09d}"
        loop, now = asyncio.get_running_loop(), time.monotonic()
        for state, delay in STATUSES:
            loop.call_at(now + delay, self.call_back, wamid, state, str(data.get("to", "")), now + delay)
        return web.json_response({"messaging_product": "whatsapp", "messages": [{"id": wamid}]})

    def last_arrival(self) -> float:
        return self.arrivals[-1] if self.arrivals else 0.0

    def call_back(self, wamid: str, state: str, recipient: str, due: float) -> None:
        if self.calling_back:
            self.poster.submit(self.poster.request("status", status_body(wamid, state, recipient), due))


async def start_graph(graph: Graph, port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/{version}/{pnid}/messages", graph.send)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def inbound(args: argparse.Namespace, poster: Poster) -> list[Post]:
    """The inbound webhooks, signed beforehand, due from 0.2 s after they are built (their `due` is then
    shifted onto the monotonic clock); Meta's timestamp of each is its due time, to the second."""
    n = max(1, int(args.conversations * (args.warmup + args.seconds)))
    wall = time.time() + 0.2
    tag = f"M{int(time.time()) % 100000}"
    posts = []
    for i in range(n):
        offset = i / args.conversations
        body = webhook_body(i, tag=tag, senders=args.users, now=int(wall + offset))[0]
        posts.append(poster.request("message", body, offset))
    start = time.monotonic() + 0.2
    for post in posts:
        post.due += start
    return posts


async def feed(poster: Poster, posts: list[Post]) -> None:
    """Submit each inbound webhook at its due time."""
    i = 0
    while i < len(posts):
        now = time.monotonic()
        while i < len(posts) and posts[i].due <= now:
            poster.submit(posts[i])
            i += 1
        if i < len(posts):
            await asyncio.sleep(max(0.0, posts[i].due - time.monotonic()))


async def sample_backlog(url: str, start: float, out: list[tuple[float, int, int, int, int, int, int]]) -> None:
    """Every second: (t, outbox queued, outbox sending, sender queue, dispatcher queue, store commits,
    store writes) from /healthz."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, start + tick - time.monotonic()))
            try:
                async with session.get(url) as resp:
                    data = await resp.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            outbox = data.get("outbox", {})
            queues = data.get("sender", {}).get("queue", 0), data.get("dispatcher", {}).get("queue", 0)
            store = data.get("store", {})
            counts = store.get("commits", 0), store.get("writes", 0)
            out.append((time.monotonic() - start, outbox.get("queued", 0), outbox.get("sending", 0), *queues, *counts))


async def cpu_at(pid: int, when: float) -> tuple[float, float]:
    """CPU seconds used so far by Alfred and by this simulator (its headroom), at `when`."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    own = os.times()
    return cpu_seconds(pid), own.user + own.system


async def simulate(args: argparse.Namespace, port: int, graph_port: int, pid: int) -> dict[str, Any]:
    poster = Poster("127.0.0.1", port, args.connections)
    graph = Graph(poster, args.graph_latency)
    runner = await start_graph(graph, graph_port)
    await poster.connect()
    posts = inbound(args, poster)
    start = posts[0].due
    t0, t1 = start + args.warmup, start + args.warmup + args.seconds
    backlog: list[tuple[float, int, int, int, int, int, int]] = []
    sampler = asyncio.create_task(sample_backlog(f"http://127.0.0.1:{port}/healthz", start, backlog))
    cpu = asyncio.gather(cpu_at(pid, t0), cpu_at(pid, t1))
    await feed(poster, posts)
    cpu0, cpu1 = await cpu
    for _ in range(int(args.drain * 10)):  # Alfred's backlog, the last answers and status webhooks, bounded
        if not poster.busy() and time.monotonic() > graph.last_arrival() + 0.6:
            break
        await asyncio.sleep(0.1)
    graph.calling_back = False
    sampler.cancel()
    poster.close()
    await runner.cleanup()
    return {
        "t0": t0,
        "t1": t1,
        "start": start,
        "done": poster.done,
        "arrivals": graph.arrivals,
        "messages": graph.messages,
        "receipts": graph.receipts,
        "cpu": (cpu1[0] - cpu0[0]) / args.seconds,
        "sim_cpu": (cpu1[1] - cpu0[1]) / args.seconds,
        "backlog": backlog,
        "pending": len(poster.pending),
    }


def webhook_rows(r: dict[str, Any], seconds: float) -> list[str]:
    rows = ["| webhooks | due in window | posted/s | 200 | non-200 or lost | p50 ms | p99 ms | max ms |"]
    rows.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("message", "status", "all"):
        done = [d for d in r["done"] if r["t0"] <= d[1] < r["t1"] and kind in (d[0], "all")]
        lat = sorted((d[2] - d[1]) * 1000 for d in done if d[3] == 200)
        ok = sum(1 for d in done if d[3] == 200)
        rows.append(
            f"| {kind} | {len(done)} | {len(done) / seconds:.0f} | {ok} | {len(done) - ok} | "
            f"{percentile(lat, 50):.1f} | {percentile(lat, 99):.1f} | {(lat[-1] if lat else float('nan')):.1f} |"
        )
    return rows


def summary_rows(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    window = sorted(t for t in r["arrivals"] if r["t0"] <= t < r["t1"])
    whole = sorted(r["arrivals"])
    return [
        "| conversations/s offered | rate_per_second | sends/s accepted | of 2 × conversations | "
        "worst 1 s (window / whole run) | server CPU, % of one core | simulator CPU | "
        "receipts / messages sent (whole run) | commits / writes per conversation |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.conversations:g} | {args.rate:g} | {len(window) / args.seconds:.0f} | "
        f"{len(window) / args.seconds / (2 * args.conversations):.1%} | "
        f"{worst_window(window)} / {worst_window(whole)} | "
        f"{r['cpu']:.0%} | {r['sim_cpu']:.0%} | {r['receipts']} / {r['messages']} | {per_conversation(r, args)} |",
    ]


def per_conversation(r: dict[str, Any], args: argparse.Namespace) -> str:
    """SQLite group commits and writes per conversation over the measured seconds (/healthz samples)."""
    inside = [s for s in r["backlog"] if args.warmup <= s[0] <= args.warmup + args.seconds]
    if len(inside) < 2:
        return "–"
    (t0, *_, c0, w0), (t1, *_, c1, w1) = inside[0], inside[-1]
    conversations = (t1 - t0) * args.conversations
    return f"{(c1 - c0) / conversations:.1f} / {(w1 - w0) / conversations:.1f}"


def backlog_rows(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    rows = ["| t s | phase | outbox queued | outbox sending | sender queue | dispatcher queue |"]
    rows.append("|---:|---|---:|---:|---:|---:|")
    for t, queued, sending, sender, dispatcher, _, _ in r["backlog"]:
        phase = "warm-up" if t < args.warmup else ("measured" if t < args.warmup + args.seconds else "drain")
        rows.append(f"| {t:.0f} | {phase} | {queued} | {sending} | {sender} | {dispatcher} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=float, default=500.0, help="inbound messages per second")
    parser.add_argument("--users", type=int, default=5000, help="distinct senders")
    parser.add_argument("--rate", type=float, default=1000.0, help="Alfred's outbound.rate_per_second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds (after the warm-up)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--drain", type=float, default=5.0, help="at most this long for answers after the load")
    parser.add_argument("--graph-latency", type=float, default=0.05, help="fake Graph API answer delay, s")
    parser.add_argument("--connections", type=int, default=32, help="webhook connections to Alfred")
    args = parser.parse_args()
    if args.conversations <= 0 or args.seconds <= 0 or args.users <= 0 or args.warmup < 0:
        parser.error("--conversations, --seconds and --users must be positive, --warmup not negative")
    load_before = loadavg()
    pin_self(CLIENT_CPU)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port, graph_port = free_port(), free_port()
        config, _db = write_config(tmp, port, graph_port=graph_port, rate=args.rate)
        alfred = start_alfred(config, port, log=tmp / "alfred.log")
        try:
            result = asyncio.run(simulate(args, port, graph_port, alfred.pid))
        finally:
            stop(alfred)
    print(
        f"\nmeta_sim: {args.conversations:g} conversations/s from {args.users} users, {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s measured; Alfred (rate_per_second {args.rate:g}) on CPU {SERVER_CPU}, simulator "
        f"(Graph answers in {args.graph_latency * 1000:g} ms, statuses +20/+100/+500 ms) on CPU {CLIENT_CPU}"
    )
    print(f"machine: {machine()} (load before: {load_before}, after: {loadavg()}); {alfred_version()}\n")
    print("\n".join(summary_rows(result, args)))
    print()
    print("\n".join(webhook_rows(result, args.seconds)))
    print(f"\nBacklog each second (/healthz; webhooks left unsent in the simulator: {result['pending']}):\n")
    print("\n".join(backlog_rows(result, args)))


if __name__ == "__main__":
    main()
