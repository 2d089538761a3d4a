"""Webhook load generator: pre-signed bodies, a cheap raw-HTTP engine, closed-loop and fixed-rate modes.

    python bench/loadgen.py --url http://127.0.0.1:8080/webhook --secret S --requests 20000 --concurrency 32
    python bench/loadgen.py --url ... --secret S --rate 2000 --seconds 10 [--engine aiohttp] [--user-id]

Every request body is a distinct text-message webhook (own wamid, own text, by default its own
sender), signed with HMAC-SHA256 beforehand, so the measured loop does no JSON and no hashing.

Engines:
- `raw` (default): asyncio protocols over keep-alive HTTP/1.1 connections; each request is one
  pre-serialized bytes object; of each response only the status line and Content-Length are
  read. Callback-driven (no task per request), so one core drives several times what an aiohttp
  client can.
- `aiohttp`: an aiohttp ClientSession, kept for comparison (tops out near 10k req/s on one core).

Modes:
- closed loop (`--requests N --concurrency C`): C connections, each sends its next request as soon
  as the previous answer arrived → req/s and latency percentiles.
- fixed rate (`--rate R --seconds T`): request i is due at start + i/R whatever happened before;
  latency is measured from that *intended* time, so a stalled server is charged for every request
  it delayed (no coordinated omission). C connections; a due request waits for a free one.

All times are `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process of the
machine), so other processes (the fake Graph API) can be compared with `sent_at`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

PNID = "123456789012345"


# ----------------------------------------------------------------------------- bodies


@dataclass(frozen=True, slots=True)
class Signed:
    """One pre-built webhook: raw body, its signature header, and what identifies it."""

    body: bytes
    signature: str
    wamid: str
    text: str
    sender: str


def webhook_body(
    i: int, *, tag: str = "B", pnid: str = PNID, user_id: bool = False, senders: int = 0, now: int | None = None
) -> tuple[bytes, str, str, str]:
    """A text-message webhook as Meta sends it (escaped-unicode JSON); returns (body, wamid, text, sender).

    `senders=0` gives every message its own sender (no per-user pacing binds); otherwise messages
    cycle over that many senders. `user_id=True` adds the 2026 business-scoped user id to the
    contact (pywa 4.5 requires `contacts[].user_id`).
    """
    sender = f"1555{(i if senders <= 0 else i % senders):07d}"
    wamid = f"wamid.{tag}{i:09d}"
    text = f"{tag} message {i}"
    contact: dict[str, object] = {"profile": {"name": f"User {i}"}, "wa_id": sender}
    if user_id:
        contact["user_id"] = f"US.{int(sender):020d}"
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": pnid, "phone_number_id": pnid},
        "contacts": [contact],
        "messages": [
            {
                "from": sender,
                "id": wamid,
                "timestamp": str(int(time.time()) if now is None else now),
                "type": "text",
                "text": {"body": text},
            }
        ],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "0", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(body, ensure_ascii=True).encode(), wamid, text, sender


def sign(body: bytes, secret: str) -> str:
    """The `X-Hub-Signature-256` header Meta would send."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def make_bodies(
    n: int, secret: str, *, tag: str = "B", pnid: str = PNID, user_id: bool = False, senders: int = 0
) -> list[Signed]:
    """N distinct, correctly signed webhooks."""
    now = int(time.time())
    out = []
    for i in range(n):
        body, wamid, text, sender = webhook_body(i, tag=tag, pnid=pnid, user_id=user_id, senders=senders, now=now)
        out.append(Signed(body, sign(body, secret), wamid, text, sender))
    return out


def serialize(host: str, port: int, path: str, signed: Signed) -> bytes:
    """One complete HTTP/1.1 keep-alive POST, ready to write."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"X-Hub-Signature-256: {signed.signature}\r\nContent-Length: {len(signed.body)}\r\n\r\n"
    )
    return head.encode() + signed.body


# ----------------------------------------------------------------------------- results


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence; nan when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Result:
    """What one run measured. Per-request arrays are indexed like the request list."""

    engine: str
    mode: str
    n: int
    concurrency: int
    elapsed: float = 0.0
    cpu: float = 0.0  # CPU seconds this process used while sending (generator headroom)
    status: list[int] = field(default_factory=list)  # 0 = not answered (connection lost, timeout)
    latency: list[float] = field(default_factory=list)  # seconds; from intended time in fixed-rate mode
    sent_at: list[float] = field(default_factory=list)  # monotonic time the request was written
    intended: list[float] = field(default_factory=list)  # monotonic due time (fixed rate) or sent_at

    def __post_init__(self) -> None:
        nan = float("nan")
        self.status = [0] * self.n
        self.latency = [nan] * self.n
        self.sent_at = [nan] * self.n
        self.intended = [nan] * self.n

    @property
    def answered(self) -> int:
        return sum(1 for s in self.status if s)

    def summary(self) -> dict[str, float]:
        lat = sorted(x for x, s in zip(self.latency, self.status, strict=True) if s)
        codes = Counter(self.status)
        return {
            "requests": self.n,
            "rps": self.answered / self.elapsed if self.elapsed else float("nan"),
            "p50": percentile(lat, 50) * 1000,
            "p95": percentile(lat, 95) * 1000,
            "p99": percentile(lat, 99) * 1000,
            "max": (lat[-1] if lat else float("nan")) * 1000,
            "ok": codes[200],
            "non200": self.n - codes[200],
            "unanswered": codes[0],
        }


# ----------------------------------------------------------------------------- raw engine


def parse_response(buf: bytearray) -> tuple[int, int] | None:
    """(status, bytes used) of the first complete response in `buf`, or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    status = int(head[9:12])
    pos = head.find(b"\r\ncontent-length:")
    length = 0
    if pos >= 0:
        stop = head.find(b"\r\n", pos + 2)
        length = int(head[pos + 17 : stop if stop >= 0 else len(head)])
    total = end + 4 + length
    return (status, total) if len(buf) >= total else None


class _Conn(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight."""

    def __init__(self, engine: RawEngine) -> None:
        self.engine = engine
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.index = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, index: int) -> None:
        self.index = index
        self.engine.result.sent_at[index] = time.monotonic()
        assert self.transport is not None
        self.transport.write(self.engine.payloads[index])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            parsed = parse_response(self.buf)
            if parsed is None:
                return
            status, used = parsed
            del self.buf[:used]
            index, self.index = self.index, -1
            if index >= 0:
                self.engine.finished(self, index, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.lost(self)


class RawEngine:
    """Pre-serialized requests over asyncio protocols; closed loop or fixed rate."""

    def __init__(
        self,
        host: str,
        port: int,
        payloads: Sequence[bytes],
        concurrency: int,
        *,
        rate: float | None = None,
        limit: float = 300.0,
    ) -> None:
        self.host, self.port = host, port
        self.payloads = payloads
        self.concurrency = concurrency
        self.rate = rate
        self.limit = limit
        mode = "closed loop" if rate is None else f"fixed {rate:g}/s"
        self.result = Result("raw", mode, len(payloads), concurrency)
        self._next = 0  # closed loop: next request index
        self._due: deque[int] = deque()  # fixed rate: due requests waiting for a connection
        self._idle: list[_Conn] = []
        self._done_count = 0
        self._done: asyncio.Future[None] | None = None
        self._closing = False
        self._conns: set[_Conn] = set()

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self._conns.add(conn)
        return conn

    def _dispatch(self, conn: _Conn) -> None:
        """Give an idle connection its next request, or park it."""
        if self.rate is None and self._next < len(self.payloads):
            self._next += 1
            conn.send(self._next - 1)
        elif self.rate is not None and self._due:
            conn.send(self._due.popleft())
        else:
            self._idle.append(conn)

    def finished(self, conn: _Conn, index: int, status: int) -> None:
        now = time.monotonic()
        r = self.result
        r.status[index] = status
        start = r.intended[index] if self.rate is not None else r.sent_at[index]
        r.latency[index] = now - start
        self._count_done()
        if not self._closing:
            self._dispatch(conn)

    def lost(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.index >= 0:  # in flight: counted as unanswered (status 0)
            self._count_done()
        if not self._closing:
            asyncio.get_running_loop().create_task(self._replace())

    async def _replace(self) -> None:
        with contextlib.suppress(OSError):
            self._dispatch(await self._connect())

    def _count_done(self) -> None:
        self._done_count += 1
        if self._done_count >= len(self.payloads) and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _ticker(self, start: float) -> None:
        assert self.rate is not None
        r, n, i = self.result, len(self.payloads), 0
        while i < n:
            now = time.monotonic()
            while i < n and start + i / self.rate <= now:
                r.intended[i] = start + i / self.rate
                if self._idle:
                    self._idle.pop().send(i)
                else:
                    self._due.append(i)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))

    async def run(self) -> Result:
        """Open the connections, send everything, wait for every answer (or `timeout`)."""
        self._done = asyncio.get_running_loop().create_future()
        conns = [await self._connect() for _ in range(self.concurrency)]
        if not self.payloads:
            self._done.set_result(None)
        start, cpu0 = time.monotonic(), _cpu()
        ticker = None
        if self.rate is None:
            for conn in conns:
                self._dispatch(conn)
        else:
            self._idle = list(conns)
            ticker = asyncio.create_task(self._ticker(start))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limit):
                await self._done
        self.result.elapsed = time.monotonic() - start
        self.result.cpu = _cpu() - cpu0
        self._closing = True
        if ticker is not None:
            ticker.cancel()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.close()
        if self.rate is None:  # closed loop: intended == sent
            self.result.intended = list(self.result.sent_at)
        return self.result


# ----------------------------------------------------------------------------- aiohttp engine


async def _aiohttp_one(
    session: aiohttp.ClientSession, url: str, signed: Signed, i: int, result: Result, *, closed: bool
) -> None:
    result.sent_at[i] = time.monotonic()
    if closed:
        result.intended[i] = result.sent_at[i]
    try:
        headers = {"X-Hub-Signature-256": signed.signature, "Content-Type": "application/json"}
        async with session.post(url, data=signed.body, headers=headers) as resp:
            await resp.read()
            result.status[i] = resp.status
    except aiohttp.ClientError:
        result.status[i] = 0
    result.latency[i] = time.monotonic() - result.intended[i]


async def run_aiohttp(
    url: str, bodies: Sequence[Signed], concurrency: int, *, rate: float | None = None, limit: float = 300.0
) -> Result:
    """The same modes with an aiohttp client (for comparison with the raw engine)."""
    mode = "closed loop" if rate is None else f"fixed {rate:g}/s"
    result = Result("aiohttp", mode, len(bodies), concurrency)
    todo: asyncio.Queue[int] = asyncio.Queue()

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            i = await todo.get()
            await _aiohttp_one(session, url, bodies[i], i, result, closed=rate is None)
            todo.task_done()

    async def feed(start: float) -> None:
        for i in range(len(bodies)):
            if rate is not None:
                due = start + i / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                result.intended[i] = due
            todo.put_nowait(i)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        start, cpu0 = time.monotonic(), _cpu()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await feed(start)
                await todo.join()
        result.elapsed = time.monotonic() - start
        result.cpu = _cpu() - cpu0
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return result


# ----------------------------------------------------------------------------- one entry point


async def run_load(
    url: str,
    bodies: Sequence[Signed],
    concurrency: int,
    *,
    engine: str = "raw",
    rate: float | None = None,
    limit: float = 300.0,
) -> Result:
    """Send `bodies` to `url` with the chosen engine and mode."""
    if engine == "aiohttp":
        return await run_aiohttp(url, bodies, concurrency, rate=rate, limit=limit)
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    payloads = [serialize(host, port, path, b) for b in bodies]
    return await RawEngine(host, port, payloads, concurrency, rate=rate, limit=limit).run()


def pin_self(cpu: int) -> bool:
    """Pin this process to one CPU (the server runs on another); False where unsupported."""
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})
        return True
    return False


def table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table of summaries keyed by a row name."""
    lines = [
        "| run | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | non-200 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s['requests']:.0f} | {s['rps']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | "
            f"{s['max']:.1f} | {s['non200']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080/webhook")
    parser.add_argument("--secret", required=True, help="the app secret the server verifies with")
    parser.add_argument("--requests", type=int, default=10000, help="closed loop: how many requests")
    parser.add_argument("--concurrency", type=int, default=32, help="connections")
    parser.add_argument("--rate", type=float, help="fixed-rate mode: requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="fixed-rate mode: duration")
    parser.add_argument("--engine", choices=["raw", "aiohttp"], default="raw")
    parser.add_argument("--user-id", action="store_true", help="add contacts[].user_id (pywa needs it)")
    parser.add_argument("--pnid", default=PNID, help="phone_number_id in the bodies")
    parser.add_argument("--tag", default=f"L{int(time.time())}", help="wamid/text prefix (keeps runs distinct)")
    parser.add_argument("--cpu", type=int, default=1, help="pin the generator to this CPU (-1: no pinning)")
    args = parser.parse_args()
    if args.cpu >= 0:
        pin_self(args.cpu)
    n = args.requests if args.rate is None else max(1, int(args.rate * args.seconds))
    bodies = make_bodies(n, args.secret, tag=args.tag, pnid=args.pnid, user_id=args.user_id)
    result = asyncio.run(run_load(args.url, bodies, args.concurrency, engine=args.engine, rate=args.rate))
    print(f"\n{result.engine} engine, {result.mode}, {args.concurrency} connections, generator on CPU {args.cpu}\n")
    print(table({f"{result.engine}, {result.mode}": result.summary()}))


if __name__ == "__main__":
    main()
