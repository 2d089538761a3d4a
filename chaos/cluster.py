"""Cluster crash run: `kill -9` nodes of a 2-3 node Alfred sharing one PostgreSQL, restart the database too.

    python chaos/cluster.py --nodes 3 --seconds 90 --kills 9 --rate 200 --seed 5     # the full run, ~3 min
    python chaos/cluster.py --nodes 2 --seconds 20 --kills 3 --rate 100              # CI (tests/test_chaos_cluster.py)
    python chaos/cluster.py --split                                                   # one web node, the rest workers

Loopback only. Builds on chaos/crash.py (same driver, signatures, forgeries, fault-injecting fake
Graph API, checks and table) and adds what several machines behind a load balancer bring:

- a throwaway PostgreSQL 15 (`tests/pgserver.py`: initdb + pg_ctl in a temp dir, a free loopback
  port, `fsync=on`, as the `postgres` user when run as root);
- N `python main.py serve --port P --role all` processes (`--split`: one `--role web`, the others
  `--role worker`) with the same `ALFRED_DATABASE_URL` and `ALFRED_PRIVACY_KEY`;
- webhooks spread round-robin over the nodes that take them; one not answered 200 is redelivered
  to ANOTHER node, as Meta reaches another machine behind the balancer, and about 1 in 20
  accepted webhooks is delivered again on purpose to another node (dedupe across nodes);
- SIGKILL of random nodes at random moments (mid-send, mid-commit, random), each down for
  0.5-3 s while the others take over its leases after `storage.takeover_seconds` (`--takeover`,
  default 5 s here); never all nodes at once; one clean SIGTERM of a node under load (a rolling
  restart); and once `pg_ctl restart -m fast` of the database itself under load.

Then the Graph API is healed, the cluster drains, every node gets SIGTERM at once and must exit 0,
and the promises of chaos/crash.py are checked against the shared database: every accepted
message stored and answered, every accepted API send delivered, no forged webhook with an
effect, no 500, nothing dead-lettered, no secret in the nodes' logs, the server log or the data
directory, and the indexes and heaps pass `amcheck`. Besides: no message was handled twice (one
reply row per message, whichever nodes it reached).

Duplicate sends allowed: (kills + clean stops + database restarts x nodes) x 32 + ambiguous
faults. A send is sent twice only when it reached the Graph API and its settle did not commit:
a killed or stopped node can lose at most the sends it had in flight (16 workers x 2 numbers =
32); a database restart pauses every node's heartbeat and settles (settles are retried, but
should the pause outlast the takeover time the nodes take over each other's in-flight sends);
the ambiguous faults of the fake deliver and then lose the answer. Webhooks delivered twice add
nothing: the inbox dedupes them.

Prints a table, optionally writes `--json`, and exits 1 if any promise was broken. For a failed
run: a drain that times out lists what is left and which node (and which start of it) holds it;
`--slow-ms N` has the server log every statement slower than N ms and lists the costliest;
`--keep` keeps the nodes' folders and logs and the stopped database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest  # tests/pgserver.py fails with pytest's `Failed` when PostgreSQL is missing

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chaos.crash import (  # noqa: E402
    FACTS_SQL,
    GRACE,
    GRAPH_TIMEOUT,
    IN_FLIGHT,
    Alfred,
    Driver,
    Secrets,
    StoreFacts,
    add_common_options,
    at_times,
    before_mid_commit,
    before_mid_send,
    facts_from,
    free_port,
    judge,
    log,
    poll,
    promises,
    secrets_in,
    table,
    timed,
    together,
    work_directory,
    write_config,
)
from chaos.faultgraph import FaultGraph  # noqa: E402
from tests.pgserver import PgServer  # noqa: E402

REDELIVER_SHARE = 0.05  # accepted webhooks delivered again, on purpose, to another node
WEB_ROLES = ("all", "web")
SEND_ROLES = ("all", "worker")
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


# ---------------------------------------------------------------------------- the load balancer


class ClusterDriver(Driver):
    """crash.py's driver behind a load balancer: round-robin over the web nodes, a retry goes to
    another node than the one that failed, and a few accepted webhooks are delivered again."""

    def __init__(self, bases: list[str], real: Secrets, rng: random.Random, seed: int) -> None:
        super().__init__(0, real, rng, seed)
        self.bases = bases
        self._turn = itertools.count()
        self.moved = 0  # retries sent to another node than the one that failed
        self.redelivered = 0  # accepted webhooks delivered again on purpose
        self.redelivered_elsewhere = 0  # ... and accepted (200) by another node

    def target(self, previous: str | None) -> str:
        others = [b for b in self.bases if b != previous] or self.bases
        base = others[next(self._turn) % len(others)]
        self.moved += previous is not None and base != previous
        return base

    async def _until_ok(self, path: str, body: bytes, headers: dict[str, str], ok: int) -> bool:
        base = await self.deliver(path, body, headers, ok)
        if base is not None and path == "/webhook" and self.rng.random() < REDELIVER_SHARE:
            self.redelivered += 1
            await asyncio.sleep(self.rng.uniform(0.0, 2.0))  # now, or once the first node handled it
            again = await self.deliver(path, body, headers, ok, previous=base)
            self.redelivered_elsewhere += again is not None and again != base
        return base is not None


# ---------------------------------------------------------------------------- the database, from outside


class Database:
    """Reads of the shared database for the verdict (a fresh connection each: it may restart)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def rows(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.url, timeout=5)
        try:
            return list(await conn.fetch(sql, *args, timeout=60))
        finally:
            await conn.close()

    async def backlog(self) -> int | None:
        """Queued or leased sends plus unhandled messages; None while the database is unreachable."""
        sql = (
            "SELECT (SELECT COUNT(*) FROM outbox WHERE state IN ('queued', 'sending'))"
            " + (SELECT COUNT(*) FROM inbox WHERE state = 'pending')"
        )
        with contextlib.suppress(*DB_ERRORS):
            return int((await self.rows(sql))[0][0])
        return None

    async def stuck(self) -> list[dict[str, Any]]:
        """What is left when the drain times out, and who holds it (for the report of a failed run)."""
        inbox = await self.rows(
            "SELECT 'inbox' AS what, i.event_id AS id, i.owner,"
            " i.lease_until - extract(epoch FROM now())::float8 AS lease_s, n.pid,"
            " extract(epoch FROM now())::float8 - n.seen_at AS owner_silent_s, NULL::bigint AS attempts"
            " FROM inbox i LEFT JOIN nodes n ON n.id = i.owner WHERE i.state = 'pending' ORDER BY i.seq LIMIT 5"
        )
        outbox = await self.rows(
            "SELECT o.state AS what, o.id, o.owner, o.due_at - extract(epoch FROM now())::float8 AS lease_s, n.pid,"
            " extract(epoch FROM now())::float8 - n.seen_at AS owner_silent_s, o.attempts"
            " FROM outbox o LEFT JOIN nodes n ON n.id = o.owner WHERE o.state IN ('queued', 'sending')"
            " ORDER BY o.seq LIMIT 5"
        )
        return [dict(r) for r in [*inbox, *outbox]]

    async def integrity(self) -> str:
        """`amcheck` on every B-tree index (with every heap tuple indexed) and every table's heap."""
        await self.rows("CREATE EXTENSION IF NOT EXISTS amcheck")
        indexes = await self.rows(
            "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_am a ON a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE a.amname = 'btree' AND n.nspname = 'public'"
        )
        tables = await self.rows("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        problems = []
        for (index,) in indexes:
            try:
                await self.rows("SELECT bt_index_check($1::regclass, true)", index)
            except asyncpg.PostgresError as exc:
                problems.append(f"{index}: {exc}")
        for (name,) in tables:
            bad = await self.rows("SELECT blkno, msg FROM verify_heapam($1::regclass)", name)
            problems += [f"{name} block {r[0]}: {r[1]}" for r in bad[:3]]
        return "; ".join(problems[:5]) if problems else "ok"

    async def log_slow(self, ms: int) -> None:
        """Have the server log every statement slower than `ms` (kept across its restart)."""
        await self.rows(f"ALTER SYSTEM SET log_min_duration_statement = {int(ms)}")
        await self.rows("ALTER SYSTEM SET log_parameter_max_length = 80")
        await self.rows("SELECT pg_reload_conf()")

    async def facts(self) -> tuple[StoreFacts, int]:
        """crash.py's `StoreFacts`, and how many messages got more than one reply row; a database
        that cannot be read (no tables: the nodes never started) holds nothing, which the checks flag."""
        try:
            return await self._facts()
        except DB_ERRORS as exc:
            log(f"cannot read the database: {exc!r}")
            return StoreFacts({}, {}, set(), 0, {}, f"unreadable: {exc}"), 0

    async def _facts(self) -> tuple[StoreFacts, int]:
        results = {sql: [tuple(r) for r in await self.rows(sql)] for sql in FACTS_SQL.values()}
        facts = facts_from(lambda sql: results[sql], await self.integrity())
        twice = await self.rows(
            "SELECT COUNT(*) FROM (SELECT source_event_id FROM outbox WHERE type = 'text'"
            " AND source_event_id IS NOT NULL GROUP BY source_event_id HAVING COUNT(*) > 1) t"
        )
        return facts, int(twice[0][0])


# ---------------------------------------------------------------------------- the run


@dataclass
class ClusterRun:
    args: argparse.Namespace
    workdir: Path
    rng: random.Random
    real: Secrets
    graph: FaultGraph
    pg: PgServer
    db: Database
    nodes: list[Alfred]
    roles: list[str]
    driver: ClusterDriver
    kills: Counter[str] = field(default_factory=Counter)
    stops: int = 0
    pg_restarts: int = 0
    pg_restart_seconds: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    kill_log: list[dict[str, Any]] = field(default_factory=list)
    shutdown_seconds: list[float] = field(default_factory=list)
    final_exits: list[int | None] = field(default_factory=list)
    max_backlog: int = 0
    stuck: list[dict[str, Any]] = field(default_factory=list)  # what a timed-out drain left, and its holder
    pids: dict[int, str] = field(default_factory=dict)  # process id -> "node i, start n"
    pg_up: asyncio.Event = field(default_factory=asyncio.Event)
    down: set[int] = field(default_factory=set)  # nodes killed or stopped, not yet restarted
    starting: int = 0  # nodes between start and healthy (the database is not restarted meanwhile)
    _restarts: set[asyncio.Task[None]] = field(default_factory=set)

    def violate(self, what: str) -> None:
        log(f"VIOLATION: {what}")
        self.violations.append(what)

    def victims(self, roles: tuple[str, ...]) -> list[int]:
        """Nodes that may go down now: up, of one of `roles`, and never the last one up."""
        up = [i for i in range(len(self.nodes)) if i not in self.down]
        return [i for i in up if self.roles[i] in roles] if len(up) > 1 else []

    async def start(self, i: int) -> None:
        await self.pg_up.wait()  # the database restart is about running nodes, not about start-up
        self.starting += 1
        try:
            self.nodes[i].start()
            assert self.nodes[i].proc is not None
            self.pids[self.nodes[i].proc.pid] = f"node {i}, start {self.nodes[i].starts}"
            assert self.driver.session is not None
            await self.nodes[i].healthy(self.driver.session, within=60.0)
        finally:
            self.starting -= 1
        self.down.discard(i)

    def restart_later(self, i: int) -> None:
        """Bring node `i` back after 0.5-3 s (meanwhile the others take over its work)."""

        async def back() -> None:
            await asyncio.sleep(self.rng.uniform(0.5, 3.0))
            try:
                await self.start(i)
            except RuntimeError as exc:
                self.violate(f"node {i} did not come back: {exc}")

        task = asyncio.create_task(back())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def restarted(self) -> None:
        """Wait for every restart still pending."""
        while self._restarts:
            await asyncio.gather(*self._restarts, return_exceptions=True)

    async def kill(self, i: int, kind: str) -> None:
        in_sends, in_hooks = self.graph.in_progress, self.driver.outstanding
        if not self.nodes[i].kill():
            return
        self.down.add(i)
        self.kills[kind] += 1
        queued = await self.db.backlog() if self.pg_up.is_set() else None
        self.max_backlog = max(self.max_backlog, queued or 0)
        entry = {"kind": kind, "node": i, "sends_in_flight": in_sends, "webhooks_in_flight": in_hooks}
        self.kill_log.append(entry | {"backlog": queued})
        log(f"kill -9 #{sum(self.kills.values())} node {i} ({kind}): {in_sends} sends, {in_hooks} webhooks in flight")
        self.restart_later(i)


async def _kill_one(run: ClusterRun, n: int) -> None:
    """The n-th kill: mid-send, mid-commit or at a random moment, of a node that may go down."""
    kind = ("mid-send", "mid-commit", "random")[n % 3]
    roles = {"mid-send": SEND_ROLES, "mid-commit": WEB_ROLES}.get(kind, WEB_ROLES + SEND_ROLES)
    if not await poll(lambda: bool(run.victims(roles)), 30.0, 0.05):
        run.violate(f"no node could be killed ({kind}): too few up")
        return
    if kind == "mid-send":
        await before_mid_send(run.graph, run.rng)
    elif kind == "mid-commit":
        await before_mid_commit(run.driver, run.rng)
    victims = run.victims(roles)
    if victims:
        await run.kill(run.rng.choice(victims), kind)
    run.graph.latency = 0.0


async def _stop_one(run: ClusterRun) -> None:
    """A rolling restart: SIGTERM one node under load; it must exit 0; then start it again."""
    if not await poll(lambda: bool(run.victims(WEB_ROLES + SEND_ROLES)), 30.0, 0.05):
        run.violate("no node could be stopped: too few up")
        return
    i = run.rng.choice(run.victims(WEB_ROLES + SEND_ROLES))
    run.down.add(i)
    started = time.monotonic()
    run.nodes[i].term()
    rc = await run.nodes[i].wait_exit(GRACE * 2 + 15)
    if rc != 0:
        run.violate(f"node {i}: SIGTERM under load ended with {rc}")
    else:
        run.stops += 1
        run.shutdown_seconds.append(time.monotonic() - started)
        log(f"node {i}: clean SIGTERM shutdown in {time.monotonic() - started:.2f} s: exit 0")
    run.restart_later(i)


async def _restart_database(run: ClusterRun) -> None:
    """`pg_ctl restart -m fast` under load: connections cut, committed data must all be there."""
    await poll(lambda: run.starting == 0, 60.0)
    run.pg_up.clear()  # right after the poll (no await between): no node is starting now
    log("restarting PostgreSQL (pg_ctl restart -m fast) under load")
    phase, run.driver.phase = run.driver.phase, "pg-restart"
    started = time.monotonic()
    try:
        await asyncio.to_thread(run.pg.restart)
        run.pg_restarts += 1
    except RuntimeError as exc:
        run.violate(f"PostgreSQL did not restart: {exc}")
    run.pg_restart_seconds.append(time.monotonic() - started)
    log(f"PostgreSQL back after {time.monotonic() - started:.1f} s")
    await asyncio.sleep(2.0)  # the nodes reconnect; answers meanwhile still count as this phase
    run.driver.phase = phase
    run.pg_up.set()


def _events(run: ClusterRun, seconds: float, kills: int) -> list[tuple[float, str]]:
    """When what happens: kills at random moments, one rolling restart, one database restart."""
    events = [(run.rng.uniform(0.1, 0.85) * seconds, f"kill {n}") for n in range(kills)]
    if run.args.pg_restart:
        events.append((run.rng.uniform(0.4, 0.6) * seconds, "database"))
    if run.args.rolling and len(run.nodes) > 1:
        events.append((run.rng.uniform(0.2, 0.35) * seconds, "stop"))
    return sorted(events)


async def chaos(run: ClusterRun, seconds: float, kills: int) -> None:
    log(f"{len(run.nodes)} nodes ({', '.join(run.roles)}): {seconds:.0f} s, {kills} kills, faults on")
    run.driver.phase = "normal"
    run.graph.faulty = True
    events = _events(run, seconds, kills)

    async def act(i: int) -> None:
        what = events[i][1]
        if what == "database":
            await _restart_database(run)
        elif what == "stop":
            await _stop_one(run)
        else:
            await _kill_one(run, int(what.split()[1]))

    await together(run.driver.fire(seconds, run.args.rate), at_times([t for t, _ in events], act))
    await run.restarted()


async def drain(run: ClusterRun, within: float) -> None:
    """Heal the Graph API; wait until every request got its answer and nothing is left to do."""
    run.graph.faulty, run.graph.latency = False, 0.0
    deadline = time.monotonic() + within
    log(f"draining (a killed node's work passes to the others after {run.args.takeover:.0f} s)")
    run.driver.phase = "drain"
    await run.driver.idle(within)
    left: int | None = None
    while time.monotonic() < deadline:
        left = await run.db.backlog()
        if left == 0:
            return
        await asyncio.sleep(0.5)
    run.violate(f"not drained within {within:.0f} s: {left} rows left")
    with contextlib.suppress(*DB_ERRORS):
        run.stuck = await run.db.stuck()
    for row in run.stuck:
        row["node"] = run.pids.get(row["pid"])  # which of our nodes (and which start of it) holds it
        log(f"left: {row}")


async def stop_all(run: ClusterRun) -> None:
    """SIGTERM every node at once: each must exit 0."""
    for node in run.nodes:
        node.term()
    run.final_exits = list(await asyncio.gather(*(n.wait_exit(GRACE * 2 + 15) for n in run.nodes)))
    for i, rc in enumerate(run.final_exits):
        if rc != 0:
            run.violate(f"node {i}: final SIGTERM ended with {rc}")
    log(f"final SIGTERM: exit codes {run.final_exits}")


# ---------------------------------------------------------------------------- verdict


def _secrets_found(run: ClusterRun) -> list[str]:
    """In every node's log, the server's log and every file of the data directory (tables, WAL)."""
    files = [n.logfile for n in run.nodes] + sorted(run.pg.root.rglob("*"))
    return secrets_in(files, run.real)


async def verdict(run: ClusterRun) -> dict[str, Any]:
    facts, twice = await run.db.facts()
    result = promises(run.driver, run.graph, facts)
    kills, nodes = sum(run.kills.values()), len(run.nodes)
    events = kills + run.stops + run.pg_restarts * nodes
    result |= {
        "nodes": nodes,
        "roles": run.roles,
        "kills": kills,
        "kills_by_kind": dict(run.kills),
        "sigterm_stops": run.stops,
        "alfred_starts": sum(n.starts for n in run.nodes),
        "allowed_duplicates": events * IN_FLIGHT + result["ambiguous_faults"],
        "allowed_why": f"(kills + stops + database restarts x {nodes} nodes) x {IN_FLIGHT} + ambiguous"
        f" = {events} x {IN_FLIGHT} + {result['ambiguous_faults']}",
        "max_backlog": run.max_backlog,
        "secrets_found": _secrets_found(run),
        "kill_log": run.kill_log,
        "clean_shutdown_seconds": [round(x, 2) for x in run.shutdown_seconds],
        "pg_restarts": run.pg_restarts,
        "pg_restart_seconds": [round(x, 2) for x in run.pg_restart_seconds],
        "retries_to_another_node": run.driver.moved,
        "redelivered": run.driver.redelivered,
        "redelivered_elsewhere": run.driver.redelivered_elsewhere,
        "handled_twice": twice,
        "final_exits": run.final_exits,
        "stuck": run.stuck,
        "slow": slow_statements(run.pg.root / "server.log") if run.args.slow_ms else [],
    }
    judge(run, result)
    _judge_cluster(run, result)
    result["violations"] = run.violations
    return result


def _judge_cluster(run: ClusterRun, r: dict[str, Any]) -> None:
    wanted = 1 if run.args.pg_restart else 0
    stops = 1 if run.args.rolling else 0
    checks = [
        (r["handled_twice"] == 0, f"{r['handled_twice']} message(s) handled twice (more than one reply row)"),
        (r["pg_restarts"] >= wanted, "PostgreSQL was not restarted"),
        (r["sigterm_stops"] >= stops, "no node was stopped with SIGTERM under load"),
        (len(r["final_exits"]) == r["nodes"], "not every node got the final SIGTERM"),
    ]
    for ok, what in checks:
        if not ok:
            run.violate(what)


SLOW = re.compile(r"duration: ([0-9.]+) ms\s+(?:statement|execute [^:]*):\s*(.*)")


def slow_statements(server_log: Path, most: int = 5) -> list[dict[str, Any]]:
    """The statements that took longest in total (`--slow-ms`): where the database's time went."""
    total: Counter[str] = Counter()
    count: Counter[str] = Counter()
    worst: dict[str, float] = {}
    text = server_log.read_text(encoding="utf-8", errors="replace") if server_log.is_file() else ""
    for match in SLOW.finditer(text):
        ms, what = float(match.group(1)), " ".join(match.group(2).split())[:90]
        total[what] += ms
        count[what] += 1
        worst[what] = max(worst.get(what, 0.0), ms)
    return [
        {"statement": k, "n": count[k], "total_ms": round(v), "max_ms": round(worst[k])}
        for k, v in total.most_common(most)
    ]


def extra_rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    roles = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["roles"]).items()))
    restarts = ", ".join(f"{x} s" for x in r["pg_restart_seconds"]) or "-"
    redelivered = f"{r['redelivered']} ({r['redelivered_elsewhere']} accepted by another node)"
    return [
        ("nodes (roles) / starts", f"{r['nodes']} ({roles}) / {r['alfred_starts']}"),
        ("PostgreSQL restarts (took)", f"{r['pg_restarts']} ({restarts})"),
        ("retries sent to another node", r["retries_to_another_node"]),
        ("accepted webhooks redelivered", redelivered),
        ("messages handled twice", r["handled_twice"]),
        ("final SIGTERM exit codes", ", ".join(str(x) for x in r["final_exits"])),
        *((f"slow: {x['statement'][:50]}", f"{x['n']} x, {x['total_ms']} ms, max {x['max_ms']} ms") for x in r["slow"]),
    ]


# ---------------------------------------------------------------------------- main


def _nodes(
    args: argparse.Namespace, workdir: Path, graph_url: str, env: dict[str, str]
) -> tuple[list[Alfred], list[str]]:
    """One folder, config and log per node, as on separate machines; the database is shared."""
    roles = ["web"] + ["worker"] * (args.nodes - 1) if args.split else ["all"] * args.nodes
    nodes = []
    for i, role in enumerate(roles):
        folder = workdir / f"node{i}"
        folder.mkdir()
        port = free_port()
        config = write_config(folder, port, graph_url, storage=f"takeover_seconds = {args.takeover}\n")
        argv = ("serve", "--port", str(port), "--role", role)
        nodes.append(Alfred(config, env, folder / "alfred.log", port, args.repo.resolve(), argv=argv))
    return nodes, roles


async def _run(run: ClusterRun) -> None:
    run.pg_up.set()
    try:
        await asyncio.gather(*(run.start(i) for i in range(len(run.nodes))))
        await chaos(run, run.args.seconds, run.args.kills)
        await drain(run, run.args.drain_timeout)
        await stop_all(run)
    except RuntimeError as exc:  # a node could not start: judge what we have
        run.violate(f"run aborted: {exc}")


async def execute(args: argparse.Namespace, workdir: Path, pg: PgServer) -> dict[str, Any]:
    rng = random.Random(args.seed)  # noqa: S311 (reproducible chaos, not crypto)
    real = Secrets()
    db = Database(pg.create_database("alfred"))
    if args.slow_ms:
        await db.log_slow(args.slow_ms)
    env = real.env() | {"ALFRED_DATABASE_URL": db.url, "ALFRED_PRIVACY_KEY": secrets.token_hex(32)}
    graph = FaultGraph(rng, timeout=GRAPH_TIMEOUT)
    await graph.start()
    nodes, roles = _nodes(args, workdir, graph.url, env)
    bases = [f"http://127.0.0.1:{n.port}" for n, role in zip(nodes, roles, strict=True) if role in WEB_ROLES]
    started = time.monotonic()
    try:
        async with ClusterDriver(bases, real, rng, args.seed) as driver:
            run = ClusterRun(args, workdir, rng, real, graph, pg, db, nodes, roles, driver)
            driver.deadline = time.monotonic() + args.seconds + args.drain_timeout
            await _run(run)
            result = await verdict(run)
    finally:
        for node in nodes:
            node.kill()
        await graph.close()
    return timed(result, started, args.seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--nodes", type=int, default=3, choices=[2, 3, 4], help="Alfred processes (default 3)")
    p.add_argument("--split", action="store_true", help="one --role web node, the others --role worker")
    p.add_argument("--seconds", type=float, default=60.0, help="firing time (default 60)")
    p.add_argument("--kills", type=int, default=8, help="SIGKILLs of nodes, at least (default 8)")
    p.add_argument("--takeover", type=float, default=5.0, help="storage.takeover_seconds (default 5)")
    p.add_argument("--no-pg-restart", dest="pg_restart", action="store_false", help="do not restart PostgreSQL")
    p.add_argument("--no-rolling", dest="rolling", action="store_false", help="no clean SIGTERM of a node mid-run")
    p.add_argument("--slow-ms", type=int, default=0, help="list the statements slower than this many ms (0: off)")
    add_common_options(p, drain_timeout=180.0)  # a node's work waits for the takeover; 2 cores drain slowly
    return p.parse_args(argv)


@contextlib.contextmanager
def _server(keep: bool) -> Iterator[PgServer]:
    """PostgreSQL with fsync on (the durability promise is what this run checks)."""
    pg = PgServer(fsync=True)
    try:
        pg.start()
        yield pg
    finally:
        if keep:
            pg.stop()
            log(f"PostgreSQL data directory kept: {pg.data} (start: pg_ctl start -D …)")
        else:
            pg.destroy()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with work_directory(args.keep, "alfred-cluster-") as workdir, _server(args.keep) as pg:
            result = asyncio.run(execute(args, workdir, pg))
    except pytest.fail.Exception as exc:  # no PostgreSQL binaries: say so, never pass silently
        print(f"cluster: {exc}", file=sys.stderr)
        return 2
    print(table(result, extra_rows(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
