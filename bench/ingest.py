"""Ingest benchmark: signed webhooks/s into Alfred's durable path vs a bare aiohttp ceiling.

    python bench/ingest.py [--requests 5000] [--concurrency 32]

Both servers run as real processes on 127.0.0.1, pinned to CPU 0 (taskset); this load generator
pins itself to CPU 1. The baseline is a bare aiohttp app that reads the body and answers 200,
measured in the same run. Alfred runs as `python main.py` (signature, parsing, group commit with
synchronous=FULL, dedupe, dispatch and the echo handler writing replies). Afterwards the inbox is
counted: every 200 must be a stored message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import free_port, pinned  # noqa: E402

from alfred_bot.cli import text_webhook  # noqa: E402
from alfred_bot.security import sign  # noqa: E402

SECRET = "bench-secret"
PNID = "123456789012345"

BARE = """
import sys
from aiohttp import web
async def hook(request):
    await request.read()
    return web.Response(text="OK")
async def health(request):
    return web.Response(text="ok")
app = web.Application(client_max_size=4 * 1024 * 1024)
app.router.add_post("/webhook", hook)
app.router.add_get("/healthz", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def wait_healthy(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not become healthy")


async def load(port: int, bodies: list[tuple[bytes, str]], concurrency: int) -> tuple[float, list[float], int]:
    url = f"http://127.0.0.1:{port}/webhook"
    latencies: list[float] = []
    errors = 0
    it = iter(bodies)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for body, sig in it:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"X-Hub-Signature-256": sig}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies, errors


def run_server(cmd: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(pinned(cmd, 0), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(port)
    return proc


def measure(name: str, cmd: list[str], port: int, env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    bodies = []
    for i in range(args.requests):
        body = text_webhook(PNID, "15551234567", "Bench", f"message {i}", f"wamid.BENCH{name}{i:08d}")
        bodies.append((body, sign(body, SECRET)))
    proc = run_server(cmd, port, env)
    try:
        asyncio.run(load(port, bodies[:200], args.concurrency))  # warm-up
        elapsed, lat, errors = asyncio.run(load(port, bodies[200:], args.concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat.sort()
    n = len(lat)
    return {
        "rps": n / elapsed,
        "p50": statistics.median(lat) * 1000,
        "p99": lat[int(n * 0.99) - 1] * 1000,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_"))}
    env["WHATSAPP_APP_SECRET"] = SECRET
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare.py"
        bare.write_text(BARE)
        config = Path(tmp) / "config.toml"
        db = Path(tmp) / "alfred.db"
        port_a, port_b = free_port(), free_port()
        config.write_text(
            f'[server]\nport = {port_b}\n[storage]\npath = "{db}"\n[logging]\nlevel = "WARNING"\n'
            f'[tenants.home]\nphone_number_id = "{PNID}"\n'
        )
        results = {
            "bare aiohttp (ceiling)": measure("bare", [sys.executable, str(bare), str(port_a)], port_a, env, args),
            "alfred (python main.py)": measure(
                "alfred", [sys.executable, "main.py", "--config", str(config)], port_b, env, args
            ),
        }
        conn = sqlite3.connect(db)
        stored = conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        conn.close()
    ceiling = results["bare aiohttp (ceiling)"]["rps"]
    print(
        f"\ningest: {args.requests} signed text webhooks (200 warm-up), concurrency {args.concurrency}, "
        f"server on CPU 0, client on CPU 1\n"
    )
    print("| server | req/s | p50 ms | p99 ms | non-200 | vs ceiling |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        cells = [
            f"{r['rps']:.0f}",
            f"{r['p50']:.2f}",
            f"{r['p99']:.2f}",
            f"{r['errors']:.0f}",
            f"{r['rps'] / ceiling:.0%}",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nalfred inbox rows after the run: {stored} (expected {args.requests})")
    print(json.dumps({k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
