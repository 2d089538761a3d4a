"""Bus chaos run: 2 Alfred nodes + PostgreSQL + Redis; Redis SIGKILLed and restarted under load, a node killed.

    python chaos/bus.py --seconds 20 --rate 30 --seed 1       # CI (tests/test_chaos_bus.py), about a minute
    python chaos/bus.py --seconds 60 --rate 80 --seed 7       # a longer run

Loopback only. Real processes: a throwaway PostgreSQL (`tests/pgserver.py`, fsync on), a real
`redis-server` (`tests/redisserver.py`: AOF on, SIGKILL and restart on the same port and files),
two `python main.py serve --role all` nodes with the same `ALFRED_DATABASE_URL` and
`ALFRED_REDIS_URL`, and the fake Graph API (`tests/fakes.py`) in this process.

Load, for `--seconds`: signed webhooks (a user's text each) spread over the nodes, one not
answered 200 retried on the other node (as Meta does); and agent requests on `alfred-outbox`
(a template to a distinct number each, with an idempotency key, XADD retried until Redis takes
it, as an agent would). Chaos: at 30 % of the run Redis is SIGKILLed for 2 s, at 60 % node 1 is
SIGKILLed for 2 s (its leased sends go to node 0 after `storage.takeover_seconds`).

Then the run drains and checks: every accepted message was published on `alfred-ingest` (by its
wamid; a duplicate entry is allowed, consumers dedupe), every request Redis took was sent, each
at most once beyond what a killed node had in flight (`allowed_duplicates`: at-least-once sends),
`XPENDING alfred-outbox alfred` is empty, the feed table is empty, and both nodes exit 0 on SIGTERM.
Prints the result as JSON (`--json` also writes it) and exits 1 if a promise was broken, 2 if a
server binary is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest  # the test servers fail with pytest's `Failed` when a binary is missing
from redis.asyncio import Redis
from redis.exceptions import RedisError

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chaos.crash import PNIDS, Alfred, Secrets, envelope, free_port, log, sign, work_directory, write_config  # noqa: E402
from tests.fakes import FakeGraph  # noqa: E402
from tests.pgserver import PgServer  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402

WORKERS = 16  # chaos/crash.py's send workers per number: what a killed node may have in flight
TAKEOVER = 3.0
TEMPLATE = {"type": "template", "template": {"name": "order_ready", "language": {"code": "en"}}}


class BusRun:
    """The processes, the load's bookkeeping and the verdict."""

    def __init__(self, args: argparse.Namespace, workdir: Path, pg: PgServer, redis: RedisServer) -> None:
        self.args, self.workdir, self.pg, self.redis = args, workdir, pg, redis
        self.real = Secrets()
        self.graph = FakeGraph()
        self.nodes: list[Alfred] = []
        self.accepted: set[str] = set()  # wamids a node answered 200
        self.requested: set[str] = set()  # `to` of every request Redis took
        self.webhook_answers: Counter[str] = Counter()
        self.xadd_retries = 0
        self.kills = {"redis": 0, "node": 0}
        self.violations: list[str] = []
        self.db_url = ""

    async def start(self, session: aiohttp.ClientSession) -> None:
        await self.graph.start()
        self.db_url = self.pg.create_database("alfred")
        env = self.real.env() | {
            "ALFRED_DATABASE_URL": self.db_url,
            "ALFRED_REDIS_URL": self.redis.url,
            "ALFRED_PRIVACY_KEY": secrets.token_hex(32),
        }
        for i in range(2):
            folder = self.workdir / f"node{i}"
            folder.mkdir()
            port = free_port()
            config = write_config(folder, port, self.graph.url, storage=f"takeover_seconds = {TAKEOVER}\n")
            argv = ("serve", "--port", str(port), "--role", "all")
            self.nodes.append(Alfred(config, env, folder / "alfred.log", port, REPO, argv=argv))
        for node in self.nodes:
            node.start()
        await asyncio.gather(*(node.healthy(session, within=60) for node in self.nodes))

    # ------------------------------------------------------------------ load

    async def webhook(self, session: aiohttp.ClientSession, n: int) -> None:
        wamid = f"wamid.BUS{n:06d}"
        msg = {"from": f"1555{n % 50:07d}", "id": wamid, "timestamp": str(int(time.time())), "type": "text"}
        body = envelope(PNIDS[0], [{**msg, "text": {"body": f"m{n}"}}])
        headers = {"X-Hub-Signature-256": sign(body, self.real.app), "Content-Type": "application/json"}
        for attempt in itertools.count():
            node = self.nodes[(n + attempt) % len(self.nodes)]
            try:
                async with session.post(f"http://127.0.0.1:{node.port}/webhook", data=body, headers=headers) as r:
                    self.webhook_answers[str(r.status)] += 1
                    if r.status == 200:
                        self.accepted.add(wamid)
                        return
            except (aiohttp.ClientError, TimeoutError):
                self.webhook_answers["refused"] += 1
            await asyncio.sleep(0.1)

    async def request(self, client: Redis, n: int) -> None:
        to = f"1999{n:07d}"
        message = json.dumps({"tenant": "t0", "to": to, **TEMPLATE, "idempotency_key": f"req-{n}"})
        while True:
            try:
                await client.xadd("alfred-outbox", {"message": message})
                self.requested.add(to)
                return
            except (RedisError, OSError):
                self.xadd_retries += 1
                await asyncio.sleep(0.1)

    async def fire(self, session: aiohttp.ClientSession, client: Redis) -> None:
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / self.args.rate
        start = time.monotonic()
        for n in itertools.count():
            if time.monotonic() - start >= self.args.seconds:
                break
            work = self.webhook(session, n) if n % 2 == 0 else self.request(client, n)
            task = asyncio.create_task(work)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, start + (n + 1) * interval - time.monotonic()))
        await asyncio.gather(*tasks)

    # ------------------------------------------------------------------ chaos

    async def chaos(self, session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(self.args.seconds * 0.3)
        log("SIGKILL redis-server")
        self.redis.kill()
        self.kills["redis"] += 1
        await asyncio.sleep(2.0)
        self.redis.start()
        log("redis-server restarted (same port, same AOF)")
        await asyncio.sleep(self.args.seconds * 0.3 - 2.0)
        log("SIGKILL node 1")
        self.nodes[1].kill()
        self.kills["node"] += 1
        await asyncio.sleep(2.0)
        self.nodes[1].start()
        await self.nodes[1].healthy(session, within=60)
        log("node 1 restarted")

    # ------------------------------------------------------------------ drain and verdict

    async def facts(self, client: Redis) -> dict[str, Any]:
        ingest = [json.loads(f[b"event"]) for _, f in await client.xrange("alfred-ingest")]
        published = Counter(e["id"] for e in ingest if e["kind"] == "message")
        sent = Counter(r.body.get("to", "").lstrip("+") for r in self.graph.sends if r.body.get("type") == "template")
        conn = await asyncpg.connect(self.db_url)
        try:
            feed = int(await conn.fetchval("SELECT COUNT(*) FROM feed"))
        finally:
            await conn.close()
        pending = (await client.xpending("alfred-outbox", "alfred"))["pending"]
        return {
            "unpublished": sorted(self.accepted - set(published)),
            "ingest_duplicates": sum(c - 1 for c in published.values()),
            "unsent": sorted(self.requested - set(sent)),
            "duplicates": sum(c - 1 for to, c in sent.items() if to in self.requested),
            "pending": pending,
            "feed_left": feed,
            "dead": await client.xlen("alfred-outbox-dead"),
        }

    async def drain(self, client: Redis) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.drain_timeout
        while True:
            with contextlib.suppress(RedisError, OSError, asyncpg.PostgresError):
                facts = await self.facts(client)
                done = not facts["unpublished"] and not facts["unsent"] and not facts["pending"]
                if (done and not facts["feed_left"]) or time.monotonic() > deadline:
                    return facts
            await asyncio.sleep(0.5)

    async def stop(self) -> list[int | None]:
        for node in self.nodes:
            node.term()
        return [await node.wait_exit(30) for node in self.nodes]

    def judge(self, r: dict[str, Any]) -> None:
        checks = [
            (not r["unpublished"], f"{len(r['unpublished'])} accepted message(s) never published on alfred-ingest"),
            (not r["unsent"], f"{len(r['unsent'])} bus request(s) never sent"),
            (r["duplicates"] <= r["allowed_duplicates"], f"{r['duplicates']} duplicate send(s) of bus requests"),
            (r["pending"] == 0, f"{r['pending']} alfred-outbox entries left pending"),
            (r["feed_left"] == 0, f"{r['feed_left']} feed row(s) never relayed"),
            (r["dead"] == 0, f"{r['dead']} valid request(s) dead-lettered"),
            (r["final_exits"] == [0, 0], f"nodes exited with {r['final_exits']}"),
            (r["accepted"] > 0 and r["requests"] > 0, "no load was accepted"),
        ]
        self.violations += [why for ok, why in checks if not ok]


async def execute(args: argparse.Namespace, workdir: Path, pg: PgServer, redis: RedisServer) -> dict[str, Any]:
    run = BusRun(args, workdir, pg, redis)
    client = Redis.from_url(redis.url, socket_timeout=2, socket_connect_timeout=1)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await run.start(session)
            await asyncio.gather(run.fire(session, client), run.chaos(session))
            log(f"load done: {len(run.accepted)} webhooks accepted, {len(run.requested)} bus requests; draining")
            facts = await run.drain(client)
        exits = await run.stop()
    finally:
        for node in run.nodes:
            node.kill()
        await run.graph.close()
        await client.aclose()
    result = {
        **facts,
        "unpublished": facts["unpublished"][:20],
        "unsent": facts["unsent"][:20],
        "accepted": len(run.accepted),
        "requests": len(run.requested),
        "xadd_retries": run.xadd_retries,
        "webhook_answers": dict(run.webhook_answers),
        "kills": run.kills,
        "allowed_duplicates": run.kills["node"] * WORKERS * len(PNIDS),
        "final_exits": exits,
        "seconds": round(time.monotonic() - started, 1),
    }
    run.judge(result)
    result["violations"] = run.violations
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=20.0, help="firing time (default 20, at least 8)")
    p.add_argument("--rate", type=float, default=30.0, help="webhooks + bus requests per second (default 30)")
    p.add_argument("--seed", type=int, default=1, help="accepted for symmetry with the other runs (the run is timed)")
    p.add_argument("--drain-timeout", type=float, default=90.0, help="seconds to drain (default 90)")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (node logs)")
    args = p.parse_args(argv)
    args.seconds = max(8.0, args.seconds)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pg: PgServer | None = None
    redis: RedisServer | None = None
    try:
        with work_directory(args.keep, "alfred-bus-") as workdir:
            pg = PgServer(fsync=True)
            pg.start()
            (workdir / "redis").mkdir()
            redis = RedisServer(workdir / "redis")
            redis.start()
            result = asyncio.run(execute(args, workdir, pg, redis))
            redis.stop()
    except pytest.fail.Exception as exc:  # a server binary is missing: say so, never pass silently
        print(f"bus: {exc}", file=sys.stderr)
        return 2
    finally:
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.destroy()
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
