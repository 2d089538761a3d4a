"""Two nodes sharing one number through Redis, and the bus round trip: XADD to the Graph API.

    python bench/bus.py [--seconds 4] [--bus-rate 50] [--bus-requests 200]

Each scenario: a fresh PostgreSQL database (a throwaway server, fsync on), a flushed
`redis-server` (AOF on), two `python main.py` nodes on CPU 0 with `ALFRED_DATABASE_URL` and
`ALFRED_REDIS_URL`, and the fake Graph API (bench/fake_graph.py, 100 ms, CPU 1) timestamping
arrivals on CLOCK_MONOTONIC, where Meta would judge the rate.

1. pacing at 80 and 1,000 msg/s: a backlog of `rate x --seconds` template sends, drained by both
   nodes through ONE shared limiter: the worst sliding second at the Graph API (must not exceed
   the rate) and the sustained rate, (sends - 1) / span, also over the middle 80 % of the sends
   (the issue asks >= 95 % of the rate). The baseline: 1,000 msg/s on the same two nodes without
   Redis (each on half the rate), which shows what the nodes and the database can do here.
2. `bus round trip`: `--bus-requests` requests XADDed to `alfred-outbox` at `--bus-rate` per
   second (each a template to its own number); latency from the XADD to the request's arrival at
   the Graph API, p50 / p99 (consumer group read, API checks, commit, XACK, pump, limiter, send).

Short by default: the machine is shared. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common
from common import SERVER_CPU, alfred_version, free_port, get_json, loadavg, machine
from e2e import worst_window
from redis import Redis

from alfred_bot.store import OutboxRow, new_outbox_id
from alfred_bot.store.postgres.engine import PostgresStore
from tests.pgserver import PgServer
from tests.redisserver import RedisServer

PRIVACY_KEY = secrets.token_hex(32)
LATENCY = 0.1
TEMPLATE = {"type": "template", "template": {"name": "hello_world", "language": {"code": "en_US"}}}


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


async def _backlog(url: str, n: int) -> None:
    store = PostgresStore(url)
    await store.open()
    try:
        payload = json.dumps({"messaging_product": "whatsapp", "to": "+15550000000", **TEMPLATE}).encode()
        rows = [OutboxRow(new_outbox_id(), f"bench:{i}", "home", f"1555{i:07d}", "template", payload) for i in range(n)]
        for i in range(0, n, 1000):
            await store.enqueue(rows[i : i + 1000])
    finally:
        await store.close()


def _nodes(tmp: Path, db: str, redis: str | None, graph_port: int, rate: float) -> list[Any]:
    env = common.alfred_env() | {"ALFRED_PRIVACY_KEY": PRIVACY_KEY, "ALFRED_DATABASE_URL": db}
    if redis is not None:
        env["ALFRED_REDIS_URL"] = redis
    procs = []
    for i in range(2):
        folder = tmp / f"node{i}"
        folder.mkdir()
        port = free_port()
        config = folder / "config.toml"
        config.write_text(
            f'[server]\nport = {port}\n[storage]\npath = "{folder / "alfred.db"}"\n[logging]\nlevel = "WARNING"\n'
            f'[graph]\nbase_url = "http://127.0.0.1:{graph_port}"\n[outbound]\nrate_per_second = {rate}\n'
            f'[tenants.home]\nphone_number_id = "{common.PNID}"\n'
        )
        cmd = [common.ALFRED_PYTHON, "main.py", "--config", str(config)]
        proc = common.start(cmd, SERVER_CPU, env=env, log=tmp / f"node{i}.log", cwd=common.ALFRED_ROOT)
        common.wait_up(f"http://127.0.0.1:{port}/healthz", proc=proc)
        procs.append(proc)
    return procs


def _arrivals(graph_port: int, n: int, within: float) -> list[list[Any]]:
    deadline = time.monotonic() + within
    while True:
        records: list[list[Any]] = get_json(f"http://127.0.0.1:{graph_port}/_stats", timeout=60)["records"]
        if len(records) >= n or time.monotonic() > deadline:
            return records
        time.sleep(0.25)


def pacing(pg: PgServer, redis: RedisServer, rate: float, seconds: float, *, shared: bool = True) -> dict[str, Any]:
    """`shared=False`: the same two nodes without Redis (each its equal share): the baseline."""
    n = int(rate * seconds)
    db = pg.create_database(f"pacing_{int(rate)}_{int(shared)}")
    asyncio.run(_backlog(db, n))
    Redis.from_url(redis.url).flushall()
    with tempfile.TemporaryDirectory() as tmp:
        graph_port = free_port()
        fake = common.start_fake(graph_port, latency=LATENCY)
        procs = _nodes(Path(tmp), db, redis.url if shared else None, graph_port, rate)
        try:
            records = _arrivals(graph_port, n, n / rate * 3 + 30)
        finally:
            for proc in procs:
                common.stop(proc)
            common.stop(fake)
    times = sorted(r[0] for r in records)
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    sustained = (len(times) - 1) / span
    # steady state: the middle 80 % of the sends (the nodes start one after the other, each after
    # its join grace, and the last sends trickle): what the shared limiter sustains under load
    middle = times[len(times) // 10 : len(times) - len(times) // 10]
    steady = (len(middle) - 1) / (middle[-1] - middle[0]) if len(middle) > 1 else float("nan")
    name = f"{rate:g} msg/s, " + ("one limiter in Redis" if shared else "no Redis: equal shares")
    return {"scenario": name, "rate": rate, "sends": len(times), "expected": n,
            "worst_window": worst_window(times), "sustained": sustained, "steady": steady,
            "share": steady / rate}  # fmt: skip


def round_trip(pg: PgServer, redis: RedisServer, count: int, per_second: float) -> dict[str, Any]:
    db = pg.create_database("round_trip")
    client = Redis.from_url(redis.url)
    client.flushall()
    sent: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        graph_port = free_port()
        fake = common.start_fake(graph_port, latency=LATENCY)
        procs = _nodes(Path(tmp), db, redis.url, graph_port, 80)
        time.sleep(3.0)  # both nodes past their join grace
        try:
            start = time.monotonic()
            for i in range(count):
                time.sleep(max(0.0, start + i / per_second - time.monotonic()))
                to = f"1999{i:07d}"
                sent[to] = time.monotonic()
                client.xadd("alfred-outbox", {"message": json.dumps({"to": to, **TEMPLATE})})
            records = _arrivals(graph_port, count, 60)
        finally:
            for proc in procs:
                common.stop(proc)
            common.stop(fake)
    arrived = {str(r[3]).lstrip("+"): r[0] for r in records if r[2] == "template"}
    latencies = [(arrived[to] - t) * 1000 for to, t in sent.items() if to in arrived]
    return {"scenario": "bus round trip", "requests": count, "arrived": len(latencies),
            "p50": _pct(latencies, 50), "p99": _pct(latencies, 99)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="backlog length of each pacing scenario")
    parser.add_argument("--bus-requests", type=int, default=200)
    parser.add_argument("--bus-rate", type=float, default=50.0, help="bus requests per second")
    args = parser.parse_args()
    common.pin_self(common.CLIENT_CPU)
    pg = PgServer(fsync=True)
    redis_dir = Path(tempfile.mkdtemp(prefix="alfred-bench-redis-"))
    redis = RedisServer(redis_dir)
    pg.start()
    redis.start()
    try:
        results = [pacing(pg, redis, 80, args.seconds), pacing(pg, redis, 1000, args.seconds)]
        results.append(pacing(pg, redis, 1000, args.seconds, shared=False))
        trip = round_trip(pg, redis, args.bus_requests, args.bus_rate)
    finally:
        redis.stop()
        pg.destroy()
    print(f"\n{machine()} · load {loadavg()} · {alfred_version()}")
    print(f"2 nodes on PostgreSQL + Redis, one number, Graph API {LATENCY * 1000:.0f} ms\n")
    print("| scenario | sends | worst sliding second | overall msg/s | steady msg/s (middle 80 %) | of the rate |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['scenario']} | {r['sends']}/{r['expected']} | {r['worst_window']} | "
              f"{r['sustained']:.1f} | {r['steady']:.1f} | {r['share']:.1%} |")  # fmt: skip
    print(f"\nbus round trip (XADD alfred-outbox → Graph API), {trip['arrived']}/{trip['requests']} requests at "
          f"{args.bus_rate:g}/s: p50 {trip['p50']:.1f} ms, p99 {trip['p99']:.1f} ms")  # fmt: skip
    print(json.dumps({"pacing": results, "round_trip": trip}))


if __name__ == "__main__":
    main()
