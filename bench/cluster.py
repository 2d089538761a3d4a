"""SQLite vs PostgreSQL, one node vs two: what the shared database costs, in webhooks and in replies.

    python bench/cluster.py [--ingest 6000] [--seconds 20] [--msgs-per-second 100] [--concurrency 32]

Three scenarios, each on a fresh database, measured in the same run (the first is the baseline):

1. `sqlite-1`: `python main.py` on the embedded SQLite store, as today;
2. `pg-1`: one node on PostgreSQL (a throwaway server started here, fsync on);
3. `pg-2`: two nodes on the same PostgreSQL database, webhooks split between them.

Each scenario measures (a) ingest: `--ingest` signed webhooks as fast as `--concurrency`
connections allow (closed loop, spread over the nodes), webhooks/s and p50/p99 of the answer; then
(b) end to end: `--msgs-per-second` webhooks for `--seconds` at a fixed rate from 500 users,
each answered by the echo handler with a read receipt and a reply, the fake Graph API
(bench/fake_graph.py, 50 ms) timestamping arrivals: reply latency p50/p95/p99 from the intended
send time, replies missing a minute after the load, duplicate replies. `outbound.rate_per_second`
is 1000 so pacing does not bind: the numbers are the runtime's and the database's.

The machine has 2 cores: Alfred's nodes run on CPU 0, the load generator and the fake Graph API on
CPU 1, PostgreSQL wherever the kernel puts it (two nodes therefore share one core: this measures
the cost of coordination, not scaling). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common
from common import CLIENT_CPU, SECRET, SERVER_CPU, alfred_version, free_port, get_json, loadavg, machine, pin_self
from e2e import match, pcts, timed_bodies, wait_for_sends
from loadgen import Result, Signed, make_bodies, percentile, run_load

from tests.pgserver import PgServer

PRIVACY_KEY = secrets.token_hex(32)


def node_config(tmp: Path, name: str, port: int, graph_port: int, url: str | None) -> Path:
    folder = tmp / name
    folder.mkdir()
    storage = f'path = "{folder / "alfred.db"}"\n' + (f'url = "{url}"\n' if url else "")
    config = folder / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\n[storage]\n{storage}[logging]\nlevel = "WARNING"\n'
        f'[graph]\nbase_url = "http://127.0.0.1:{graph_port}"\n'
        f"[outbound]\nrate_per_second = 1000\n"
        f'[tenants.home]\nphone_number_id = "{common.PNID}"\n'
    )
    return config


def start_nodes(tmp: Path, count: int, graph_port: int, url: str | None) -> tuple[list[Any], list[int]]:
    procs, ports = [], []
    env = common.alfred_env() | {"ALFRED_PRIVACY_KEY": PRIVACY_KEY}
    for i in range(count):
        port = free_port()
        config = node_config(tmp, f"node{i}", port, graph_port, url)
        cmd = [common.ALFRED_PYTHON, "main.py", "--config", str(config)]
        proc = common.start(cmd, SERVER_CPU, env=env, log=tmp / f"node{i}.log", cwd=common.ALFRED_ROOT)
        common.wait_up(f"http://127.0.0.1:{port}/healthz", proc=proc)
        procs.append(proc)
        ports.append(port)
    time.sleep(3.0 if url else 0.0)  # sending nodes wait out the join grace before their first send
    return procs, ports


async def spread(ports: list[int], bodies: list[Signed], concurrency: int, rate: float | None) -> list[Result]:
    """Every node gets every n-th body (as a load balancer would), concurrently."""
    n = len(ports)
    runs = [
        run_load(
            f"http://127.0.0.1:{port}/webhook",
            bodies[i::n],
            max(1, concurrency // n),
            rate=None if rate is None else rate / n,
        )
        for i, port in enumerate(ports)
    ]
    return list(await asyncio.gather(*runs))


def merged(results: list[Result]) -> dict[str, float]:
    """One summary over the nodes' runs: answered per second of the longest run, latency percentiles."""
    lat = sorted(x for r in results for x, s in zip(r.latency, r.status, strict=True) if s)
    ok = sum(r.summary()["ok"] for r in results)
    elapsed = max(r.elapsed for r in results)
    return {"rps": ok / elapsed, "p50": percentile(lat, 50) * 1000, "p99": percentile(lat, 99) * 1000, "ok": ok}


def scenario(name: str, nodes: int, url: str | None, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake_port = free_port()
        fake = common.start_fake(fake_port, latency=0.05)
        procs, ports = start_nodes(tmp, nodes, fake_port, url)
        try:
            hooks = make_bodies(args.ingest, SECRET, tag="I")
            ingest = merged(asyncio.run(spread(ports, hooks, args.concurrency, None)))
            wait_for_sends(fake_port, 2 * int(ingest["ok"]), time.monotonic() + 120.0)
            n = int(args.msgs_per_second * args.seconds)
            bodies = timed_bodies(n, "E", args)
            loads = asyncio.run(spread(ports, bodies, 8, args.msgs_per_second))
            expected = 2 * int(ingest["ok"]) + 2 * sum(int(r.summary()["ok"]) for r in loads)
            wait_for_sends(fake_port, expected, time.monotonic() + 60.0)
            stats = get_json(f"http://127.0.0.1:{fake_port}/_stats", timeout=60)
        finally:
            for proc in procs:
                common.stop(proc)
            common.stop(fake)
    replies, latencies, dupes = e2e_latencies(stats["records"], bodies, loads, len(ports))
    return {"name": name, "ingest": ingest, "n": n, "replies": len(replies), "lat": latencies, "dupes": dupes}


def e2e_latencies(
    records: list[list[Any]], bodies: list[Signed], loads: list[Result], n: int
) -> tuple[dict[int, float], list[float], int]:
    """Reply arrival minus the intended send time of its webhook (each node's run holds every n-th)."""
    replies, _receipts, dupes, _bad = match(records, bodies)
    intended: dict[int, float] = {}
    for node, result in enumerate(loads):
        for j, due in enumerate(result.intended):
            intended[node + j * n] = due
    latencies = sorted((t - intended[i]) * 1000 for i, t in replies.items() if i in intended)
    return replies, latencies, dupes


def row(s: dict[str, Any]) -> str:
    ingest = s["ingest"]
    missing = s["n"] - s["replies"]
    return (
        f"| {s['name']} | {ingest['rps']:,.0f} | {ingest['p50']:.1f} / {ingest['p99']:.1f} | "
        f"{pcts(s['lat'])} | {missing} | {s['dupes']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingest", type=int, default=6000, help="webhooks for the ingest measurement")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--msgs-per-second", type=float, default=100.0)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    pin_self(CLIENT_CPU)
    server = PgServer(fsync=True)
    server.start()
    try:
        rows = [scenario("sqlite-1", 1, None, args)]
        for name, nodes in (("pg-1", 1), ("pg-2", 2)):
            rows.append(scenario(name, nodes, server.create_database(name.replace("-", "_")), args))
    finally:
        server.destroy()
    print(f"\n{machine()} · load {loadavg()} · {alfred_version()}")
    print(f"ingest: {args.ingest} webhooks, {args.concurrency} connections; end to end: "
          f"{args.msgs_per_second:g} msg/s × {args.seconds:g} s, Graph API 50 ms\n")
    print("| scenario | ingest webhooks/s | ingest p50 / p99 ms | reply p50 / p95 / p99 ms | missing | duplicates |")
    print("|---|---|---|---|---|---|")
    for s in rows:
        print(row(s))


if __name__ == "__main__":
    main()
