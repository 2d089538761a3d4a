"""Ingest benchmark: signed webhooks/s into a bare aiohttp ceiling, Alfred's durable path and pywa, in one run.

    python bench/ingest.py [--requests 20000] [--concurrency 32] [--rounds 2] [--engine raw|aiohttp]
                           [--no-pywa] [--profile DIR]

Servers (each a real process on 127.0.0.1, pinned to CPU 0 with taskset; this generator pins
itself to CPU 1):
- bare aiohttp: reads the body, answers 200 (the ceiling);
- Alfred: `python main.py` in production mode (signature, msgspec parsing, group commit with
  synchronous=FULL, dedupe, dispatch to the echo handler, read receipt + reply sent by the
  senders to bench/fake_graph.py on CPU 1 at the configured rate, default 80/s);
- pywa 4.5 (`pywa[fastapi]`, FastAPI under uvicorn, `app_secret` set so signatures are checked,
  an async no-op `on_message` handler), installed by this script into bench/.venv-pywa on first
  use. If that fails the script says so and reports the other two.

Every server gets the same load: the same pre-signed bodies (with `contacts[].user_id`, which
pywa 4.5 requires), a warm-up, then the measured closed loop, `--rounds` times in turn. After
each Alfred round the inbox is checked: every request answered 200 must be a stored row.
`--profile DIR` records Alfred with py-spy during its measured load (see bench/profile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    CLIENT_CPU,
    PNID,
    SECRET,
    SERVER_CPU,
    alfred_version,
    cpu_seconds,
    free_port,
    get_json,
    machine,
    pin_self,
    query,
    start,
    start_alfred,
    start_fake,
    start_profiler,
    stop,
    stop_profiler,
    wait_up,
    write_config,
)
from loadgen import Result, make_bodies, run_load

PYWA_VERSION = "4.5.0"
PYWA_VENV = BENCH / ".venv-pywa"

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

PYWA = """
import sys
import uvicorn
from fastapi import FastAPI
from pywa_async import WhatsApp

app = FastAPI()
handled = 0

@app.get("/healthz")
async def healthz() -> dict:
    return {"handled": handled}

wa = WhatsApp(phone_id=sys.argv[2], token="bench-token", server=app, verify_token="bench",
              app_secret=sys.argv[3], webhook_endpoint="/webhook")

@wa.on_message
async def noop(client, msg) -> None:
    global handled
    handled += 1

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def pywa_python(venv: Path) -> tuple[Path | None, str]:
    """The interpreter of a venv holding pywa 4.5 + FastAPI + uvicorn, installing it if needed."""
    python = venv / "bin" / "python"
    probe = "import pywa, fastapi, uvicorn; print(pywa.__version__, fastapi.__version__, uvicorn.__version__)"
    if python.exists():
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.startswith(PYWA_VERSION):
            return python, done.stdout.strip()
    print(f"installing pywa {PYWA_VERSION} into {venv} (first run only) …", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        pkgs = [f"pywa[fastapi]=={PYWA_VERSION}", "uvicorn"]
        subprocess.run([python, "-m", "pip", "install", "-q", *pkgs], check=True, capture_output=True, timeout=900)
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        tail = (err.decode() if isinstance(err, bytes) else str(err)).strip().splitlines()[-1:] or [str(exc)]
        return None, f"pywa install failed: {tail[0]}"
    return python, done.stdout.strip()


def store_stats(port: int) -> dict[str, int]:
    """Alfred's group-commit counters from /healthz: {"writes", "commits"}."""
    return get_json(f"http://127.0.0.1:{port}/healthz")["store"]


@dataclass
class Server:
    """How to start one server under test, and what to check after a round."""

    name: str
    start: Callable[[], tuple[subprocess.Popen[bytes], int]]
    check: Callable[[Result, list[str]], str] | None = None


def measure(server: Server, warm: list, bodies: list, args: argparse.Namespace) -> dict[str, float | str]:
    """Start the server, warm it up, run the measured load, stop it; summary + CPU use."""
    proc, port = server.start()
    url = f"http://127.0.0.1:{port}/webhook"
    profiler = None
    try:
        asyncio.run(run_load(url, warm, args.concurrency, engine=args.engine))
        if args.profile and server.name.startswith("alfred"):
            profiler = start_profiler(proc.pid, Path(args.profile) / "alfred-ingest.txt")
        alfred = server.name.startswith("alfred")
        store0 = store_stats(port) if alfred else {}
        cpu0 = cpu_seconds(proc.pid)
        result = asyncio.run(run_load(url, bodies, args.concurrency, engine=args.engine))
        cpu1 = cpu_seconds(proc.pid)
        store1 = store_stats(port) if alfred else {}
        if profiler is not None:
            stop_profiler(profiler)
        note = server.check(result, [b.wamid for b in bodies]) if server.check else ""
        if store1:
            writes, commits = store1["writes"] - store0["writes"], store1["commits"] - store0["commits"]
            note += (
                f"; store: {writes} writes in {commits} commits ({writes / max(commits, 1):.1f} per commit, "
                f"{commits / result.elapsed:.0f} commits/s)"
            )
    finally:
        stop(proc)
    summary: dict[str, float | str] = dict(result.summary())
    summary["server_cpu"] = (cpu1 - cpu0) / result.elapsed
    summary["gen_cpu"] = result.cpu / result.elapsed
    summary["note"] = note
    return summary


def alfred_server(tmp: Path, args: argparse.Namespace) -> tuple[Server, list[subprocess.Popen[bytes]]]:
    """Alfred in production mode against a fake Graph API (kept for the whole run)."""
    graph_port = free_port()
    fake = start_fake(graph_port)
    counter = [0]
    dbs: list[Path] = []

    def launch() -> tuple[subprocess.Popen[bytes], int]:
        counter[0] += 1
        run_dir = tmp / f"alfred{counter[0]}"
        run_dir.mkdir()
        port = free_port()
        config, db = write_config(run_dir, port, graph_port=graph_port, rate=args.rate)
        dbs.append(db)
        return start_alfred(config, port, log=run_dir / "alfred.log"), port

    def check(result: Result, wamids: list[str]) -> str:
        ok = {w for w, s in zip(wamids, result.status, strict=True) if s == 200}
        stored = {r[0] for r in query(dbs[-1], "SELECT event_id FROM inbox")}
        pending = query(dbs[-1], "SELECT COUNT(*) FROM inbox WHERE state = 'pending'")[0][0]
        lost = len(ok - stored)
        return f"200s stored {len(ok & stored)}/{len(ok)}, lost {lost}, not yet handled at the end {pending}"

    return Server("alfred (python main.py)", launch, check), [fake]


def simple_server(name: str, cmd: Callable[[int], list[str]], env: dict[str, str] | None = None) -> Server:
    def launch() -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        proc = start(cmd(port), SERVER_CPU, env=env)
        wait_up(f"http://127.0.0.1:{port}/healthz", proc=proc)
        return proc, port

    return Server(name, launch)


def servers(tmp: Path, args: argparse.Namespace) -> tuple[list[Server], list[subprocess.Popen[bytes]], str]:
    bare = tmp / "bare.py"
    bare.write_text(BARE)
    out = [simple_server("bare aiohttp (ceiling)", lambda port: [sys.executable, str(bare), str(port)])]
    alfred, helpers = alfred_server(tmp, args)
    out.append(alfred)
    pywa_note = "skipped (--no-pywa)"
    if not args.no_pywa:
        python, pywa_note = pywa_python(Path(args.pywa_venv))
        if python is not None:
            script = tmp / "pywa_server.py"
            script.write_text(PYWA)
            env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
            cmd = [str(python), str(script)]
            out.append(simple_server("pywa 4.5 (FastAPI + uvicorn)", lambda p: [*cmd, str(p), PNID, SECRET], env))
            pywa_note = f"pywa, fastapi, uvicorn versions: {pywa_note}"
        else:
            print(f"\n!! {pywa_note}: reporting bare aiohttp and Alfred only\n", file=sys.stderr)
    return out, helpers, pywa_note


def report(
    rows: dict[str, list[dict[str, float | str]]], args: argparse.Namespace, pywa_note: str, load: tuple[str, str]
) -> None:
    med = {name: statistics.median(float(r["rps"]) for r in runs) for name, runs in rows.items()}
    ceiling = med.get("bare aiohttp (ceiling)", float("nan"))
    pywa = next((v for k, v in med.items() if k.startswith("pywa")), None)
    print(
        f"\ningest: {args.requests} signed text webhooks per round ({args.warmup} warm-up), {args.rounds} round(s), "
        f"{args.engine} engine, {args.concurrency} connections; servers on CPU {SERVER_CPU} (taskset), "
        f"generator on CPU {CLIENT_CPU}; Alfred rate_per_second={args.rate:g}\n"
    )
    print(f"machine: {machine()} (before the run: {load[0]}, after: {load[1]})")
    print(f"{alfred_version()}\n{pywa_note}\n")
    print("| server | round | req/s | p50 ms | p95 ms | p99 ms | non-200 | server CPU | generator CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        for i, r in enumerate(runs, 1):
            print(
                f"| {name} | {i} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
                f"{r['non200']:.0f} | {r['server_cpu']:.0%} | {r['gen_cpu']:.0%} |"
            )
    print("\n| server | median req/s | vs bare aiohttp | vs pywa |")
    print("|---|---:|---:|---:|")
    for name, rps in med.items():
        vs_pywa = f"{rps / pywa:.2f}×" if pywa else "–"
        print(f"| {name} | {rps:.0f} | {rps / ceiling:.0%} | {vs_pywa} |")
    for name, runs in rows.items():
        for i, r in enumerate(runs, 1):
            if r["note"]:
                print(f"{name} round {i}: {r['note']}")
    print(json.dumps({k: [{m: v for m, v in r.items()} for r in runs] for k, runs in rows.items()}, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="each server measured this many times, in turn")
    parser.add_argument("--engine", choices=["raw", "aiohttp"], default="raw")
    parser.add_argument("--rate", type=float, default=80, help="Alfred's outbound.rate_per_second")
    parser.add_argument("--no-pywa", action="store_true")
    parser.add_argument("--pywa-venv", default=str(PYWA_VENV))
    parser.add_argument("--profile", help="directory for a py-spy profile of Alfred's measured load")
    args = parser.parse_args()
    load_before = machine().rsplit("load average ", 1)[1]
    pin_self(CLIENT_CPU)
    rows: dict[str, list[dict[str, float | str]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        todo, helpers, pywa_note = servers(tmp, args)
        try:
            for rnd in range(args.rounds):
                warm = make_bodies(args.warmup, SECRET, tag=f"W{rnd}x", user_id=True)
                bodies = make_bodies(args.requests, SECRET, tag=f"R{rnd}x", user_id=True)
                for server in todo:
                    rows.setdefault(server.name, []).append(measure(server, warm, bodies, args))
        finally:
            for proc in helpers:
                stop(proc)
    report(rows, args, pywa_note, (load_before, machine().rsplit("load average ", 1)[1]))


if __name__ == "__main__":
    main()
