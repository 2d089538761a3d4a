"""Helpers shared by the benchmarks: loopback ports, CPU pinning, processes, config, machine facts."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
#: Which Alfred tree `python main.py` runs from: this checkout, or e.g. a `git archive HEAD` snapshot
#: (ALFRED_ROOT=/tmp/alfred-head) so that uncommitted work in progress does not move the numbers.
ALFRED_ROOT = Path(os.environ.get("ALFRED_ROOT", str(ROOT))).resolve()
#: The interpreter that runs Alfred (default: this one, i.e. the dev venv).
ALFRED_PYTHON = os.environ.get("ALFRED_PYTHON", sys.executable)
PNID = "123456789012345"
SECRET = "bench-secret"
SERVER_CPU = 0
CLIENT_CPU = 1


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], cpu: int) -> list[str]:
    """`cmd` pinned to one CPU with taskset (unchanged where taskset is missing)."""
    return ["taskset", "-c", str(cpu), *cmd] if shutil.which("taskset") else cmd


def pin_self(cpu: int = CLIENT_CPU) -> None:
    """Pin this (generator) process to `cpu` where the OS allows it."""
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, data: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait_up(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200 (fail early if `proc` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up within {timeout:g} s")


def start(
    cmd: list[str], cpu: int, *, env: dict[str, str] | None = None, log: Path | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start `cmd` pinned to `cpu`, output to `log` (or discarded)."""
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(pinned(cmd, cpu), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time (only this one process)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_fake(port: int, *, latency: float = 0.0, status: int = 200, cpu: int = CLIENT_CPU) -> subprocess.Popen[bytes]:
    """bench/fake_graph.py on `port`, ready."""
    cmd = [sys.executable, str(BENCH / "fake_graph.py"), str(port), "--latency", str(latency), "--status", str(status)]
    proc = start(cmd, cpu)
    wait_up(f"http://127.0.0.1:{port}/healthz", proc=proc)
    return proc


def alfred_env() -> dict[str, str]:
    """Production mode (senders use the Graph transport) with the bench secret; nothing from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_"))}
    env |= {"WHATSAPP_ACCESS_TOKEN": "bench-token", "WHATSAPP_APP_SECRET": SECRET, "WHATSAPP_VERIFY_TOKEN": "bench"}
    return env


def write_config(
    tmp: Path, port: int, *, graph_port: int, rate: float = 80, workers: int = 0, extra: str = ""
) -> tuple[Path, Path]:
    """An Alfred config for one run: (config path, database path)."""
    db = tmp / "alfred.db"
    config = tmp / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\n[storage]\npath = "{db}"\n[logging]\nlevel = "WARNING"\n'
        f'[graph]\nbase_url = "http://127.0.0.1:{graph_port}"\n'
        f"[outbound]\nrate_per_second = {rate}\nworkers = {workers}\n{extra}"
        f'[tenants.home]\nphone_number_id = "{PNID}"\n'
    )
    return config, db


def start_alfred(config: Path, port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    """`python main.py --config …` in production mode on CPU 0, ready."""
    cmd = [ALFRED_PYTHON, "main.py", "--config", str(config)]
    proc = start(cmd, SERVER_CPU, env=alfred_env(), log=log, cwd=ALFRED_ROOT)
    wait_up(f"http://127.0.0.1:{port}/healthz", proc=proc)
    return proc


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read-only query on a (possibly running) Alfred database."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in kB (empty once it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS/VmHWM every `interval` s on a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, rss kB, hwm kB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = proc_status(self.pid)
            if s:
                self.samples.append((time.monotonic(), s.get("VmRSS", 0), s.get("VmHWM", 0)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self, since: float = 0.0) -> tuple[float, float]:
        """(max VmRSS, last VmHWM) in MB over samples taken after `since`."""
        rows = [s for s in self.samples if s[0] >= since] or self.samples
        if not rows:
            return float("nan"), float("nan")
        return max(r[1] for r in rows) / 1024, rows[-1][2] / 1024


def loadavg() -> str:
    """The 1/5/15-minute load averages, as `uptime` shows them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def alfred_version() -> str:
    """Which Alfred tree is measured (ALFRED_ROOT) and, for this checkout, HEAD and whether it is modified."""
    py = "" if sys.executable == ALFRED_PYTHON else f" run by {ALFRED_PYTHON}"
    if ALFRED_ROOT != ROOT:
        return f"Alfred from {ALFRED_ROOT}{py}"
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "--no-optional-locks", "status", "--porcelain", "--", "alfred_bot", "handlers", "main.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return f"Alfred from this checkout, HEAD {head.stdout.strip()}{py}" + (
        " with uncommitted changes in alfred_bot/" if dirty.stdout.strip() else ""
    )


def machine() -> str:
    """One line: cores, Python, SQLite, aiohttp, load average now."""
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"aiohttp {aiohttp.__version__}, load average {loadavg()}"
    )


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy record of a process (all threads, idle too, collapsed stacks) until `stop_profiler`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["py-spy", "record", "--pid", str(pid), "--threads", "--idle", "--nonblocking", "--format", "raw"]
    proc = subprocess.Popen(
        [*cmd, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(1.0)  # let it attach before the load starts
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    """py-spy writes its output when it gets SIGINT."""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
