"""Crash suite: `kill -9` a real Alfred under load and faults, then prove nothing accepted was lost.

    python chaos/crash.py --seconds 160 --kills 16 --rate 200 --batch 1 --seed 11   # the full run, ~4 min
    python chaos/crash.py --seconds 8 --kills 5                                      # CI (tests/test_crash.py)

Loopback only. The script starts a fault-injecting fake Graph API (chaos/faultgraph.py) and
`python main.py` in production mode against it, fires signed webhooks at `--rate` per second
(about 1 in 20 forged in one of seven ways, 1 in 50 an API send with an idempotency key, 1 in 10
signed with the previous app secret, as while rotating), and kills Alfred with SIGKILL
at chosen moments, restarting it each time. Like Meta, the driver counts a webhook as accepted only
on HTTP 200 and retries anything else. Scenarios (`all` runs them one after the other, on one
database, in this order, splitting `--seconds` 2:1:1 and `--kills` between them):

- normal: faults injected; kills at random moments, mid-commit (a burst of webhooks in flight)
  and mid-send (the fake holds delivered sends open).
- shutdown: SIGTERM, then SIGKILL while the graceful shutdown is still running (tried again,
  sooner, if the shutdown finished first); then one clean stop under load, which must exit 0.
- backpressure: the Graph API is down (refused / reset) while thousands of messages queue up
  (`--batch` messages per webhook); kills land on the backlog.

Then the Graph API is healed, Alfred drains (rows a killed process had leased are due again as
soon as the next process opens the database), is stopped with SIGTERM, and the promises are checked:

- every accepted message is stored and was answered (its reply reached the fake; its read receipt
  reached it too or, receipts being best-effort, was dropped as superseded, stale or failed);
  every accepted API send was delivered;
- `PRAGMA integrity_check` is ok (and `quick_check` after every kill);
- no forged webhook got a 200, was stored or answered;
- duplicate sends <= (kills + clean stops under load) x in-flight sends (send workers: 16 per
  number, 2 numbers) + ambiguous faults (delivered, answer lost);
- no webhook or API answer was a 500; nothing was dead-lettered (faults per send are capped);
- no secret in Alfred's logs or database; the final SIGTERM exits 0.

`--repo` runs another checkout's `main.py` (e.g. a `git archive` snapshot) with this script.

Prints a table, optionally writes `--json`, and exits 1 if any promise was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chaos.faultgraph import AMBIGUOUS, FaultGraph  # noqa: E402

PNIDS = ("123456789012345", "987654321098765")
WORKERS = 16  # send workers per number (lane): the most sends one process has in flight per lane
IN_FLIGHT = WORKERS * len(PNIDS)
GRAPH_TIMEOUT = 1.0
GRACE = 1.0


async def poll(condition: Callable[[], bool], within: float, step: float = 0.05) -> bool:
    """Wait until `condition()` holds (True) or `within` seconds pass (False)."""
    deadline = time.monotonic() + within
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------- secrets and config


@dataclass(frozen=True)
class Secrets:
    app: str = field(default_factory=lambda: "app-" + secrets.token_hex(16))
    previous: str = field(default_factory=lambda: "prev-" + secrets.token_hex(16))
    access: str = field(default_factory=lambda: "EAAG" + secrets.token_hex(20))
    verify: str = field(default_factory=lambda: "verify-" + secrets.token_hex(12))
    api: str = field(default_factory=lambda: "api-" + secrets.token_hex(16))

    def env(self) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WHATSAPP_", "ALFRED_")) and k.lower() not in {"http_proxy", "https_proxy"}
        }
        return {
            **base,
            "WHATSAPP_APP_SECRET": self.app,
            "WHATSAPP_APP_SECRET_PREVIOUS": self.previous,
            "WHATSAPP_ACCESS_TOKEN": self.access,
            "WHATSAPP_VERIFY_TOKEN": self.verify,
            "ALFRED_API_TOKEN": self.api,
        }

    def all(self) -> tuple[str, ...]:
        return (self.app, self.previous, self.access, self.verify, self.api)


def write_config(directory: Path, port: int, graph_url: str, storage: str = "") -> Path:
    """`storage`: more lines for the `[storage]` section (the cluster run's takeover time)."""
    tenants = "".join(f'[tenants.t{i}]\nphone_number_id = "{p}"\n' for i, p in enumerate(PNIDS))
    path = directory / "config.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\npath = "{(directory / "alfred.db").as_posix()}"\n{storage}'
        f'[graph]\nbase_url = "{graph_url}"\ntimeout_seconds = {GRAPH_TIMEOUT}\n'
        f"[outbound]\nrate_per_second = 1000\nworkers = {WORKERS}\nbackoff_base_seconds = 0.05\n"
        "backoff_cap_seconds = 2.0\nprobe_interval_seconds = 0.5\n"
        f"[dispatch]\nqueue_size = 100\nshutdown_grace_seconds = {GRACE}\n"
        '[logging]\nlevel = "INFO"\nformat = "json"\n' + tenants,
        encoding="utf-8",
    )
    return path


# ---------------------------------------------------------------------------- the Alfred process


class Alfred:
    """`python main.py [argv…] --config …` as a real process; its stderr goes to one log file."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str],
        logfile: Path,
        port: int,
        repo: Path = REPO,
        *,
        argv: tuple[str, ...] = (),
    ) -> None:
        self.config, self.env, self.logfile, self.port, self.repo = config, env, logfile, port, repo
        self.argv = argv  # e.g. ("serve", "--port", "8081", "--role", "web") for a node of the cluster run
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and script)
                [sys.executable, "main.py", *self.argv, "--config", str(self.config)],
                cwd=self.repo,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self.starts += 1

    async def healthy(self, session: aiohttp.ClientSession, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"Alfred exited at start-up (rc {self.proc and self.proc.returncode})")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError("Alfred did not become healthy in time")

    def kill(self) -> bool:
        """SIGKILL; True if it was alive."""
        if not self.alive or self.proc is None:
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return True

    def term(self) -> None:
        if self.alive and self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait_exit(self, within: float) -> int | None:
        await poll(lambda: not self.alive, within, 0.02)
        return None if self.alive or self.proc is None else self.proc.returncode


# ---------------------------------------------------------------------------- webhooks, like Meta


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def envelope(pnid: str, messages: list[dict[str, Any]]) -> bytes:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": pnid},
        "contacts": [{"profile": {"name": "Chaos"}, "wa_id": messages[0]["from"]}],
        "messages": messages,
    }
    change = {"field": "messages", "value": value}
    body = {"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [change]}]}
    return json.dumps(body, ensure_ascii=True).encode()


def _forge(body: bytes, real: Secrets, rng: random.Random) -> dict[str, str]:
    """The headers of one forged request: every way a signature can be wrong."""
    kind = rng.choice(["missing", "wrong_secret", "sha1", "truncated", "uppercase_prefix", "tampered", "empty"])
    good = sign(body, real.app)
    value = {
        "missing": None,
        "empty": "",
        "wrong_secret": sign(body, "not-" + real.app),
        "sha1": "sha1=" + hmac.new(real.app.encode(), body, hashlib.sha1).hexdigest(),
        "truncated": good[:-2],
        "uppercase_prefix": "SHA256=" + good.removeprefix("sha256="),
        "tampered": sign(body.replace(b"FORGED", b"GENUIN"), real.app),  # signed, then changed
    }[kind]
    headers = {"Content-Type": "application/json"}
    if value is not None:
        headers["X-Hub-Signature-256"] = value
    return headers


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=dict)  # phase -> seconds of each 200
    accepted: dict[str, str] = field(default_factory=dict)  # wamid -> expected reply text
    api_accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> template name
    forged: Counter[str] = field(default_factory=Counter)  # status -> count
    forged_ok: int = 0
    never_accepted: int = 0


class Driver:
    """Fires webhooks (and a few API sends) and retries each until it gets its 2xx."""

    def __init__(self, port: int, real: Secrets, rng: random.Random, seed: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.real, self.rng, self.seed = real, rng, seed
        self.tally = Tally()
        self.outstanding = 0
        self.started = 0
        self.phase = "start"
        self.deadline = float("inf")
        self._seq = itertools.count(1)
        self._users = [f"1555{rng.randrange(10**7):07d}" for _ in range(20000)]
        self._tasks: set[asyncio.Task[None]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.limit = asyncio.Semaphore(400)

    async def __aenter__(self) -> Driver:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=20), connector=aiohttp.TCPConnector(limit=200)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    def spawn(self, make: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            async with self.limit:
                await make()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def fire(self, seconds: float, rate: float, batch: int = 1) -> int:
        """Start `rate` requests per second for `seconds`; return how many were started."""
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        while loop.time() < start + seconds:
            roll = self.rng.random()
            if roll < 0.05:
                self.spawn(self.forged)
            elif roll < 0.07:
                self.spawn(self.api_send)
            else:
                self.spawn(lambda: self.genuine(batch))
            n += 1
            self.started += 1
            await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
        return n

    def burst(self, count: int) -> None:
        for _ in range(count):
            self.spawn(lambda: self.genuine(1))

    async def idle(self, within: float) -> bool:
        return await poll(lambda: not self._tasks, within, 0.1)

    def _message(self, tag: str = "m") -> tuple[str, str, dict[str, Any]]:
        n = next(self._seq)
        wamid = f"wamid.CHAOS{self.seed}.{tag}{n:07d}"
        text = f"{tag}{n} {self.rng.getrandbits(40):010x}"
        msg = {
            "from": self.rng.choice(self._users),
            "id": wamid,
            "timestamp": str(int(time.time())),
            "type": "text",
            "text": {"body": text},
        }
        return wamid, text, msg

    async def genuine(self, batch: int) -> None:
        made = [self._message() for _ in range(batch)]
        body = envelope(self.rng.choice(PNIDS), [m for _, _, m in made])
        secret = self.real.previous if self.rng.random() < 0.1 else self.real.app  # rotation: both work
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, secret)}
        if await self._until_ok("/webhook", body, headers, 200):
            for wamid, text, _ in made:
                self.tally.accepted[wamid] = f"You said: {text}"

    async def api_send(self) -> None:
        n = next(self._seq)
        name = f"chaos_{self.seed}_{n}"
        body = json.dumps(
            {
                "to": self.rng.choice(self._users),
                "type": "template",
                "template": {"name": name, "language": {"code": "en_US"}},
                "tenant": self.rng.choice(["t0", "t1"]),
                "idempotency_key": f"key-{name}",
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.real.api}"}
        if await self._until_ok("/api/messages", body, headers, 202):
            self.tally.api_accepted[f"key-{name}"] = name

    async def forged(self) -> None:
        _, _, msg = self._message("FORGED")
        msg["text"]["body"] = "FORGED " + msg["text"]["body"]
        body = envelope(self.rng.choice(PNIDS), [msg])
        headers = _forge(body, self.real, self.rng)
        base: str | None = None
        for _ in range(40):  # until the server answers at all (it may be down)
            base = self.target(base)
            status = await self._post("/webhook", body, headers, base)
            if status != "conn":
                self.tally.forged[status] += 1
                self.tally.forged_ok += status == "200"
                return
            await asyncio.sleep(0.25)

    def target(self, previous: str | None) -> str:
        """The server for the next attempt; `previous` answered the last one badly or not at all.
        One server here; chaos/cluster.py spreads requests over its nodes, like a load balancer."""
        return self.base

    async def _post(self, path: str, body: bytes, headers: dict[str, str], base: str | None = None) -> str:
        assert self.session is not None
        self.outstanding += 1
        started = time.monotonic()
        try:
            async with self.session.post((base or self.base) + path, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 200:
                    self.tally.latency.setdefault(self.phase, []).append(time.monotonic() - started)
                return str(resp.status)
        except (aiohttp.ClientError, TimeoutError):
            return "conn"
        finally:
            self.outstanding -= 1

    async def _until_ok(self, path: str, body: bytes, headers: dict[str, str], ok: int) -> bool:
        return await self.deliver(path, body, headers, ok) is not None

    async def deliver(
        self, path: str, body: bytes, headers: dict[str, str], ok: int, previous: str | None = None
    ) -> str | None:
        """Retry like Meta: anything but `ok` (or no answer) is tried again, with a pause.
        Returns the server that answered `ok` (None: never, before the deadline)."""
        base = previous
        while time.monotonic() < self.deadline:
            base = self.target(base)
            status = await self._post(path, body, headers, base)
            self.tally.statuses[f"{self.phase} {path} {status}"] += 1
            if status == str(ok):
                return base
            await asyncio.sleep(self.rng.uniform(0.1, 0.6))
        self.tally.never_accepted += 1
        return None


# ---------------------------------------------------------------------------- the database, read-only


def db_query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def backlog(path: Path) -> int:
    rows = db_query(path, "SELECT COUNT(*) FROM outbox WHERE state IN ('queued', 'sending')")
    pending = db_query(path, "SELECT COUNT(*) FROM inbox WHERE state = 'pending'")
    return int(rows[0][0]) + int(pending[0][0])


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    rng: random.Random
    real: Secrets
    graph: FaultGraph
    alfred: Alfred
    driver: Driver
    kills: Counter[str] = field(default_factory=Counter)
    stops: int = 0
    violations: list[str] = field(default_factory=list)
    kill_log: list[dict[str, Any]] = field(default_factory=list)
    shutdown_seconds: list[float] = field(default_factory=list)
    max_backlog: int = 0

    @property
    def db(self) -> Path:
        return self.workdir / "alfred.db"

    def violate(self, what: str) -> None:
        log(f"VIOLATION: {what}")
        self.violations.append(what)

    async def kill(self, kind: str) -> None:
        in_sends, in_hooks = self.graph.in_progress, self.driver.outstanding
        if not self.alfred.kill():
            return
        self.kills[kind] += 1
        queued = backlog(self.db)
        self.max_backlog = max(self.max_backlog, queued)
        check = db_query(self.db, "PRAGMA quick_check")[0][0]
        if check != "ok":
            self.violate(f"quick_check after a kill: {check}")
        entry = {"kind": kind, "sends_in_flight": in_sends, "webhooks_in_flight": in_hooks, "backlog": queued}
        self.kill_log.append(entry)
        log(
            f"kill -9 #{sum(self.kills.values())} ({kind}): {in_sends} sends, {in_hooks} webhooks in flight, "
            f"backlog {queued}"
        )

    async def restart(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.05, 0.4))
        self.alfred.start()
        assert self.driver.session is not None
        try:
            await self.alfred.healthy(self.driver.session)
        except RuntimeError as exc:
            self.violate(str(exc))
            raise

    async def kill_at_random(self) -> None:
        await self.kill("random")

    async def kill_mid_commit(self) -> None:
        await before_mid_commit(self.driver, self.rng)
        await self.kill("mid-commit")

    async def kill_mid_send(self) -> None:
        await before_mid_send(self.graph, self.rng)
        await self.kill("mid-send")
        self.graph.latency = 0.0


async def before_mid_commit(driver: Driver, rng: random.Random) -> None:
    """A burst of webhooks, so that a kill right after lands while many are between body and commit."""
    driver.burst(40)
    await poll(lambda: driver.outstanding >= 10, 1.0, 0.0005)
    await asyncio.sleep(rng.uniform(0, 0.003))


async def before_mid_send(graph: FaultGraph, rng: random.Random) -> None:
    """Hold delivered sends open at the fake, so that a kill right after lands before Alfred sees
    their answers (the caller sets `graph.latency` back to 0 after the kill)."""
    graph.latency = 0.6
    await poll(lambda: graph.in_progress >= 1, 3.0, 0.002)
    await asyncio.sleep(rng.uniform(0, 0.2))


async def together(*coros: Awaitable[Any]) -> None:
    """Run side by side; if one fails, the others are cancelled (no firing into a dead run)."""
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)  # type: ignore[arg-type]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None


async def at_times(times: list[float], action: Callable[[int], Awaitable[None]]) -> None:
    start = time.monotonic()
    for i, t in enumerate(times):
        await asyncio.sleep(max(0.0, start + t - time.monotonic()))
        await action(i)


async def normal(run: Run, seconds: float, kills: int) -> None:
    log(f"scenario normal: {seconds:.0f} s, {kills} kills, faults on")
    run.driver.phase = "normal"
    run.graph.faulty = True
    kinds = [run.kill_mid_send, run.kill_mid_commit, run.kill_at_random]
    times = sorted(run.rng.uniform(0.1, 0.85) * seconds for _ in range(kills))

    async def act(i: int) -> None:
        await kinds[i % len(kinds)]()
        await run.restart()

    await together(run.driver.fire(seconds, run.args.rate), at_times(times, act))


async def backpressure(run: Run, seconds: float, kills: int) -> None:
    log(f"scenario backpressure: {seconds:.0f} s, {kills} kills, Graph API down")
    run.driver.phase = "backpressure"
    run.graph.faulty = False
    await run.graph.down()
    times = sorted(run.rng.uniform(0.5, 0.95) * seconds for _ in range(kills))

    async def act(i: int) -> None:
        await run.kill("backpressure")
        await run.restart()

    await together(run.driver.fire(seconds, run.args.rate, batch=run.args.batch), at_times(times, act))
    run.max_backlog = max(run.max_backlog, backlog(run.db))
    log(f"backlog before the Graph API comes back: {backlog(run.db)} rows")
    await run.graph.up()


async def _stop(run: Run, kill_after: float | None, *, final: bool = False) -> bool:
    """SIGTERM; with `kill_after`, SIGKILL that long into the shutdown if it is still running.

    Returns True when the SIGKILL landed mid-shutdown. A clean stop under traffic may cancel
    sends still running after the grace period (their rows stay leased and are sent again), so
    it counts towards the allowed duplicates.
    """
    started = time.monotonic()
    run.alfred.term()
    if kill_after is not None:
        await asyncio.sleep(kill_after)
        if run.alfred.alive:
            await run.kill("mid-shutdown")
            return True
    rc = await run.alfred.wait_exit(GRACE * 2 + 15)
    if rc != 0:
        run.violate(f"SIGTERM shutdown ended with {rc}")
    else:
        if not final:
            run.stops += 1
            run.shutdown_seconds.append(time.monotonic() - started)
        log(f"clean SIGTERM shutdown in {time.monotonic() - started:.2f} s: exit 0")
    return False


async def shutdown(run: Run, seconds: float, kills: int) -> None:
    log(f"scenario shutdown: {seconds:.0f} s, {kills} kills during shutdown")
    run.driver.phase = "shutdown"
    run.graph.faulty, run.graph.latency = True, 0.1
    times = [(i + 0.5) * seconds / (kills + 1) for i in range(kills + 1)]

    async def act(i: int) -> None:
        if i == kills:  # the last one: a clean stop under load, which must exit 0
            await _stop(run, None)
            await run.restart()
            return
        delay = run.rng.uniform(0.02, 0.5)
        for _ in range(6):  # if the shutdown finished first, start again and kill sooner
            killed = await _stop(run, delay)
            await run.restart()
            if killed:
                return
            delay /= 3

    await together(run.driver.fire(seconds, run.args.rate), at_times(times, act))
    run.graph.latency = 0.0


# ---------------------------------------------------------------------------- verdict


def _duplicates(graph: FaultGraph) -> Counter[str]:
    dup: Counter[str] = Counter()
    for key, count in graph.delivered.items():
        kind = "receipt" if key.startswith("read:") else "template" if key.startswith("template:") else "text"
        dup[kind] += max(0, count - 1)
    return dup


def secrets_in(files: Iterable[Path], real: Secrets) -> list[str]:
    """Which secrets appear, byte for byte, in any of `files` (logs, database files)."""
    names = ("app secret", "previous app secret", "access token", "verify token", "api token")
    pairs = list(zip(names, real.all(), strict=True))
    found: set[str] = set()
    for path in files:  # one at a time: a PostgreSQL data directory holds hundreds of megabytes
        if path.is_file() and not path.name.endswith(".lock"):
            blob = path.read_bytes()
            found |= {name for name, value in pairs if value.encode() in blob}
    return [name for name, _ in pairs if name in found]


def _secrets_found(run: Run) -> list[str]:
    return secrets_in([run.alfred.logfile, *run.workdir.glob("alfred.db*")], run.real)


@dataclass
class StoreFacts:
    """What the verdict reads from the database after the run, whichever engine holds it."""

    inbox: dict[str, str]  # event_id -> state
    replies: dict[str, str]  # source_event_id -> state of its text reply
    dropped_receipts: set[str]  # source_event_id of read receipts dropped (superseded, stale, failed)
    forged_stored: int
    outbox_states: dict[str, int]
    integrity: str


#: The reads behind `StoreFacts`: plain SQL that SQLite and PostgreSQL both run as written.
FACTS_SQL = {
    "inbox": "SELECT event_id, state FROM inbox",
    "replies": "SELECT source_event_id, state FROM outbox WHERE type = 'text' AND source_event_id IS NOT NULL",
    "dropped": "SELECT source_event_id FROM outbox WHERE type = 'read' AND state = 'dropped'",
    "forged": "SELECT COUNT(*) FROM inbox WHERE event_id || text LIKE '%FORGED%'",
    "states": "SELECT state, COUNT(*) FROM outbox GROUP BY state",
}


def facts_from(query: Callable[[str], list[tuple[Any, ...]]], integrity: str) -> StoreFacts:
    return StoreFacts(
        inbox={str(r[0]): str(r[1]) for r in query(FACTS_SQL["inbox"])},
        replies={str(r[0]): str(r[1]) for r in query(FACTS_SQL["replies"])},
        dropped_receipts={str(r[0]) for r in query(FACTS_SQL["dropped"])},
        forged_stored=int(query(FACTS_SQL["forged"])[0][0]),
        outbox_states={str(r[0]): int(r[1]) for r in query(FACTS_SQL["states"])},
        integrity=integrity,
    )


def _why_unanswered(facts: StoreFacts, wamids: list[str]) -> Counter[str]:
    """For each accepted message without an answer at the fake: where did it stop?"""
    why: Counter[str] = Counter()
    for wamid in wamids:
        inbox, reply = facts.inbox.get(wamid), facts.replies.get(wamid)
        if inbox is None:
            why["not stored"] += 1
        elif inbox == "pending":
            why["not handled yet"] += 1
        else:
            why[f"reply {reply}" if reply else f"{inbox}, no reply row"] += 1
    return why


def _pick(ordered: list[float], q: float) -> float:
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def _percentiles(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for phase, values in samples.items():
        ordered = sorted(values)
        out[phase] = {"n": len(ordered), "p50_ms": _pick(ordered, 0.5), "p99_ms": _pick(ordered, 0.99)}
        out[phase]["max_ms"] = _pick(ordered, 1.0)
    return out


def promises(driver: Driver, graph: FaultGraph, facts: StoreFacts) -> dict[str, Any]:
    """What the driver saw accepted, against what the fake received and the database holds."""
    tally = driver.tally
    answered = [w for w, text in tally.accepted.items() if graph.delivered[text] > 0]
    receipts = [w for w in tally.accepted if graph.delivered[f"read:{w}"] > 0]
    # receipts are best-effort: one superseded by a newer one, gone stale or failed is dropped (counted)
    dropped = facts.dropped_receipts
    receipts_missing = [w for w in tally.accepted if graph.delivered[f"read:{w}"] == 0 and w not in dropped]
    unanswered = sorted(set(tally.accepted) - set(answered))
    why = _why_unanswered(facts, unanswered)
    queued = why["reply queued"] + why["reply sending"] + why["not handled yet"]
    not_stored = sorted(set(tally.accepted) - set(facts.inbox))  # answered or not, a 200 must mean stored
    api_lost = [k for k, name in tally.api_accepted.items() if graph.delivered[f"template:{name}"] == 0]
    dup = _duplicates(graph)
    return {
        "webhook_answers": dict(tally.statuses),
        "requests_started": driver.started,
        "http_500": sum(v for k, v in tally.statuses.items() if k.endswith(" 500")),
        "accepted": len(tally.accepted),
        "answered": len(answered),
        "receipts_sent": len(receipts),
        "receipts_dropped": len(dropped & set(tally.accepted)),
        "receipts_missing": len(receipts_missing),
        "lost": len(unanswered) - queued,
        "not_stored": len(not_stored),
        "still_queued": queued,
        "unanswered_why": dict(why),
        "webhook_latency": _percentiles(tally.latency),
        "api_accepted": len(tally.api_accepted),
        "api_lost": len(api_lost),
        "never_accepted": tally.never_accepted,
        "duplicates": sum(dup.values()),
        "duplicates_by_kind": dict(dup),
        "ambiguous_faults": sum(graph.faults[k] for k in AMBIGUOUS),
        "faults": dict(graph.faults),
        "graph_requests": graph.requests,
        "reset_while_down": graph.refused_while_down,
        "outbox_states": facts.outbox_states,
        "forged_sent": sum(tally.forged.values()),
        "forged_answers": dict(tally.forged),
        "forged_effects": tally.forged_ok + facts.forged_stored + sum(1 for k in graph.delivered if "FORGED" in k),
        "integrity": facts.integrity,
        "examples_unanswered": (unanswered + not_stored)[:5],
    }


def verdict(run: Run) -> dict[str, Any]:
    facts = facts_from(lambda sql: db_query(run.db, sql), db_query(run.db, "PRAGMA integrity_check")[0][0])
    result = promises(run.driver, run.graph, facts)
    kills = sum(run.kills.values())
    result |= {
        "kills": kills,
        "kills_by_kind": dict(run.kills),
        "sigterm_stops": run.stops,
        "alfred_starts": run.alfred.starts,
        "allowed_duplicates": (kills + run.stops) * IN_FLIGHT + result["ambiguous_faults"],
        "max_backlog": run.max_backlog,
        "secrets_found": _secrets_found(run),
        "kill_log": run.kill_log,
        "clean_shutdown_seconds": [round(x, 2) for x in run.shutdown_seconds],
    }
    judge(run, result)
    result["violations"] = run.violations
    return result


class Judged(Protocol):
    """What `judge` needs of a run (this one's `Run`, the cluster run's `ClusterRun`)."""

    args: argparse.Namespace

    def violate(self, what: str) -> None: ...


def judge(run: Judged, r: dict[str, Any]) -> None:
    checks = [
        (r["not_stored"] == 0, f"{r['not_stored']} message(s) answered 200 but not in the inbox"),
        (r["lost"] == 0, f"{r['lost']} accepted message(s) lost: {r['unanswered_why']}"),
        (r["still_queued"] == 0, f"{r['still_queued']} accepted message(s) still unanswered when the drain ended"),
        (r["receipts_missing"] == 0, f"{r['receipts_missing']} read receipt(s) neither sent nor dropped"),
        (r["api_lost"] == 0, f"{r['api_lost']} accepted API send(s) never delivered"),
        (r["forged_effects"] == 0, f"forged webhooks had {r['forged_effects']} effect(s)"),
        (r["duplicates"] <= r["allowed_duplicates"], f"{r['duplicates']} duplicates > {r['allowed_duplicates']}"),
        (r["integrity"] == "ok", f"integrity_check: {r['integrity']}"),
        (not r["secrets_found"], f"secrets found in logs or database: {r['secrets_found']}"),
        (r["kills"] >= run.args.kills, f"only {r['kills']} kills (wanted {run.args.kills})"),
        (r["accepted"] > 0, "nothing was accepted"),
        (r["http_500"] == 0, f"{r['http_500']} answers were 500"),
        (r["outbox_states"].get("failed", 0) == 0, f"{r['outbox_states'].get('failed')} sends dead-lettered"),
    ]
    for ok, what in checks:
        if not ok:
            run.violate(what)


def table(r: dict[str, Any], extra: Iterable[tuple[str, Any]] = ()) -> str:
    """The result as a Markdown table; `extra` rows (the cluster run's) go before the wall time."""
    faults = ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items())) or "none"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kills_by_kind"].items()))
    rows = [
        ("kills (kill -9)", f"{r['kills']} ({kinds})"),
        ("clean SIGTERM stops under load", _stops(r)),
        ("requests started (webhooks + API)", f"{r['requests_started']} ({r['achieved_rate']:.0f}/s)"),
        ("requests by phase and answer", _answers(r["webhook_answers"])),
        ("messages accepted (200)", r["accepted"]),
        ("answered / receipts sent / dropped", f"{r['answered']} / {r['receipts_sent']} / {r['receipts_dropped']}"),
        ("lost / still queued at the end", f"{r['lost']} / {r['still_queued']}"),
        ("API sends accepted / lost", f"{r['api_accepted']} / {r['api_lost']}"),
        ("duplicates (text, receipt, template)", _dups(r)),
        ("allowed duplicates", f"{r['allowed_duplicates']} = {r.get('allowed_why') or _allowed(r)}"),
        ("faults injected", f"{sum(r['faults'].values())}: {faults}"),
        ("Graph API down: requests reset", r["reset_while_down"]),
        ("largest backlog (rows)", r["max_backlog"]),
        ("webhook latency p50/p99/max ms", _latency(r["webhook_latency"])),
        ("forged sent / effects", f"{r['forged_sent']} / {r['forged_effects']} ({r['forged_answers']})"),
        ("integrity_check", r["integrity"]),
        ("secrets in logs/db", ", ".join(r["secrets_found"]) or "none"),
        *extra,
        ("wall time", f"{r.get('seconds', 0):.0f} s"),
        ("verdict", "PASS" if not r["violations"] else "FAIL: " + "; ".join(r["violations"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)


def _allowed(r: dict[str, Any]) -> str:
    return f"(kills + stops) x {IN_FLIGHT} + {r['ambiguous_faults']}"


def _stops(r: dict[str, Any]) -> str:
    took = ", ".join(f"{x} s" for x in r["clean_shutdown_seconds"])
    return f"{r['sigterm_stops']} (exit 0 after {took})" if took else str(r["sigterm_stops"])


def _latency(by_phase: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} {v['p50_ms']}/{v['p99_ms']}/{v['max_ms']}" for k, v in by_phase.items())


def _answers(statuses: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))


def _dups(r: dict[str, Any]) -> str:
    by = r["duplicates_by_kind"]
    return f"{r['duplicates']} ({by.get('text', 0)}, {by.get('receipt', 0)}, {by.get('template', 0)})"


# ---------------------------------------------------------------------------- main


def plan(args: argparse.Namespace) -> list[tuple[Callable[[Run, float, int], Awaitable[None]], float, int]]:
    if args.scenario != "all":
        fn = {"normal": normal, "backpressure": backpressure, "shutdown": shutdown}[args.scenario]
        return [(fn, args.seconds, args.kills)]
    quarter = max(1, args.kills // 4)
    return [  # the backlog of the Graph API outage last, so the final drain is what works it off
        (normal, args.seconds / 2, max(1, args.kills - 2 * quarter)),
        (shutdown, args.seconds / 4, quarter),
        (backpressure, args.seconds / 4, quarter),
    ]


async def drain(run: Run, within: float) -> None:
    """Heal the Graph API and wait until every request got its answer and the outbox is empty."""
    run.graph.faulty, run.graph.latency = False, 0.0
    await run.graph.up()
    deadline = time.monotonic() + within
    log("draining (rows of killed processes are due again as soon as the next one opens the database)")
    run.driver.phase = "drain"
    await run.driver.idle(within)
    if not await poll(lambda: backlog(run.db) == 0, max(0.0, deadline - time.monotonic()), 0.5):
        run.violate(f"not drained within {within:.0f} s: {backlog(run.db)} rows left")


async def execute(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)  # noqa: S311 (reproducible chaos, not crypto)
    real = Secrets()
    graph = FaultGraph(rng, timeout=GRAPH_TIMEOUT)
    await graph.start()
    port = free_port()
    config = write_config(workdir, port, graph.url)
    alfred = Alfred(config, real.env(), workdir / "alfred.log", port, args.repo.resolve())
    started = time.monotonic()
    try:
        async with Driver(port, real, rng, args.seed) as driver:
            run = Run(args, workdir, rng, real, graph, alfred, driver)
            driver.deadline = time.monotonic() + args.seconds + args.drain_timeout
            try:
                alfred.start()
                await alfred.healthy(driver.session)  # type: ignore[arg-type]
                for scenario, seconds, kills in plan(args):
                    await scenario(run, seconds, kills)
                await drain(run, args.drain_timeout)
                await _stop(run, None, final=True)
            except RuntimeError as exc:  # Alfred could not start again: judge what we have
                run.violate(f"run aborted: {exc}")
            result = verdict(run)
    finally:
        alfred.kill()
        await graph.close()
    return timed(result, started, args.seconds)


def timed(result: dict[str, Any], started: float, seconds: float) -> dict[str, Any]:
    """Add the wall time since `started` and the request rate achieved over `seconds` of firing."""
    result["seconds"] = time.monotonic() - started
    result["achieved_rate"] = result["requests_started"] / seconds
    return result


def add_common_options(p: argparse.ArgumentParser, drain_timeout: float = 120.0) -> None:
    """The options this run and the cluster run (chaos/cluster.py) share."""
    p.add_argument("--rate", type=float, default=200.0, help="webhooks per second (default 200)")
    p.add_argument("--seed", type=int, default=1)
    help_drain = f"seconds to drain at the end (default {drain_timeout:.0f})"
    p.add_argument("--drain-timeout", type=float, default=drain_timeout, help=help_drain)
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--repo", type=Path, default=REPO, help="the Alfred checkout to run (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (database and logs)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60.0, help="firing time in total (default 60)")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs in total, at least (default 10)")
    p.add_argument("--batch", type=int, default=5, help="messages per webhook while the Graph API is down")
    p.add_argument("--scenario", choices=["normal", "backpressure", "shutdown", "all"], default="all")
    add_common_options(p)
    return p.parse_args(argv)


@contextlib.contextmanager
def work_directory(keep: bool, prefix: str = "alfred-crash-") -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        log(f"work directory kept: {path}")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_directory(args.keep) as workdir:
        result = asyncio.run(execute(args, workdir))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
