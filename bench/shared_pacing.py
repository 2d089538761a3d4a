"""Shared pacing benchmark: two "nodes" sharing one number through a real redis-server.

    python bench/shared_pacing.py [--seconds 10] [--rates 80,1000] [--latency 0.1]

For each rate, two nodes (each its own Redis client, node id and `SharedPacer`, in one process)
run as many senders as Alfred gives a node (rate x 0.25 s, at least 4): book a slot, sleep for
it, "send" (record the start, report the lag, hold the sender `--latency` seconds as a Graph
API call would). Printed: the worst sliding second (the promise: never above the rate), the
sustained rate over the run (the promise: ≥ 95 %), and the client CPU per send; then the same
for one node with the in-process limiter alone, the baseline, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alfred_bot.outbound.ratelimit import SlidingWindowLimiter  # noqa: E402
from alfred_bot.outbound.redis import AsyncPacer, LocalPacer, SharedPacing, connect  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import worst_window  # noqa: E402


def worst_second(starts: list[float]) -> int:
    """Most starts in any sliding second (e2e.py's measure, on unsorted starts)."""
    return worst_window(sorted(starts))


async def node(pacer: AsyncPacer, workers: int, until: float, latency: float, starts: list[float]) -> None:
    async def sender() -> None:
        while time.monotonic() < until:
            wait = await pacer.acquire()
            due = time.monotonic() + wait
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            starts.append(now)
            pacer.observe_lag(now - due)
            await asyncio.sleep(latency)  # the Graph API call

    await asyncio.gather(*(sender() for _ in range(workers)))


def report(name: str, rate: int, seconds: float, starts: list[float], begin: float, cpu: float) -> None:
    sent = [t for t in starts if t < begin + seconds]
    sustained = len(sent) / seconds
    worst = worst_second(starts)
    verdict = "ok" if worst <= rate and sustained >= 0.95 * rate else "MISSED"
    print(
        f"| {name} | {rate} | {worst} | {sustained:.1f} | {100 * sustained / rate:.1f} % "
        f"| {1e6 * cpu / max(1, len(starts)):.0f} | {verdict} |"
    )


async def scenario(url: str, rate: int, seconds: float, latency: float) -> None:
    workers = max(4, math.ceil(rate * 0.25))
    # Baseline: one node, the in-process limiter.
    starts: list[float] = []
    cpu, begin = time.process_time(), time.monotonic()
    await node(LocalPacer(SlidingWindowLimiter(rate)), workers, begin + seconds, latency, starts)
    report("in-process, 1 node", rate, seconds, starts, begin, time.process_time() - cpu)
    # Two nodes sharing the number through Redis.
    nodes = [SharedPacing(connect(url), share=lambda: 2, prefix=f"bench{rate}") for _ in range(2)]
    for n in nodes:
        await n.start()
    await asyncio.sleep(2 * nodes[0].beat)  # each node has heard the other
    pacers = [n.pacer("bench", "123456789012345", rate) for n in nodes]
    runs: list[list[float]] = [[], []]
    cpu, begin = time.process_time(), time.monotonic()
    await asyncio.gather(*(node(p, workers, begin + seconds, latency, s) for p, s in zip(pacers, runs, strict=True)))
    report("Redis, 2 nodes", rate, seconds, runs[0] + runs[1], begin, time.process_time() - cpu)
    print(f"|  (per node) | | {worst_second(runs[0])} / {worst_second(runs[1])} | | | | |")
    for n in nodes:
        await n.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rates", default="80,1000")
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            print(f"{args.seconds:g} s per run, Graph API latency {1000 * args.latency:g} ms, redis-server on loopback")
            print("| pacing | rate/s | worst sliding second | sustained/s | of rate | client CPU µs/send | |")
            print("|---|---|---|---|---|---|---|")
            for rate in (int(r) for r in args.rates.split(",")):
                await scenario(server.url, rate, args.seconds, args.latency)
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
