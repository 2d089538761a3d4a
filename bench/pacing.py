"""Pacing benchmark: achieved send rate and the worst sliding 1-second window, at the receiver.

    python bench/pacing.py [--seconds 8]

For each scenario a backlog of template sends is written to a fresh outbox, then Alfred
(`python main.py`, production mode, pinned to CPU 0) drains it to a fake Graph API (pinned to
CPU 1) that answers after a fixed latency and records arrival times on its own clock. The
baseline in the same run is the same backlog with pacing effectively off (rate 100,000/s),
which shows what the send pool can do at that latency. Utilisation of the pool follows from
Little's law: achieved rate x latency / workers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import ALFRED_PYTHON, ALFRED_ROOT, alfred_version, free_port, loadavg, machine, pinned  # noqa: E402

sys.path.insert(0, str(ALFRED_ROOT))  # the store code of the tree being measured fills its outbox

from alfred_bot.store import OutboxRow, SqliteStore, new_outbox_id  # noqa: E402

PNID = "123456789012345"


def get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as r:
        data: dict[str, object] = json.loads(r.read())
        return data


def wait_up(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


async def fill_outbox(db: Path, n: int) -> None:
    store = SqliteStore(db)
    await store.open()
    payload = json.dumps(
        {
            "messaging_product": "whatsapp",
            "to": "+15550000000",
            "type": "template",
            "template": {"name": "hello_world", "language": {"code": "en_US"}},
        }
    ).encode()
    rows = [OutboxRow(new_outbox_id(), f"bench:{i}", "home", f"1555{i:07d}", "template", payload) for i in range(n)]
    for i in range(0, n, 1000):
        await store.enqueue(rows[i : i + 1000])
    await store.close()


def worst_window(times: list[float], width: float = 1.0) -> int:
    worst, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        worst = max(worst, hi - lo + 1)
    return worst


def scenario(name: str, rate: float, latency: float, n: int, workers: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "alfred.db"
        asyncio.run(fill_outbox(db, n))
        fake_port, alfred_port = free_port(), free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[server]\nport = {alfred_port}\n[storage]\npath = "{db}"\n[logging]\nlevel = "WARNING"\n'
            f'[graph]\nbase_url = "http://127.0.0.1:{fake_port}"\n'
            f"[outbound]\nrate_per_second = {rate}\nworkers = {workers}\n"
            f'[tenants.home]\nphone_number_id = "{PNID}"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_"))}
        env |= {"WHATSAPP_ACCESS_TOKEN": "bench", "WHATSAPP_APP_SECRET": "bench", "WHATSAPP_VERIFY_TOKEN": "bench"}
        fake = subprocess.Popen(
            pinned(
                [sys.executable, str(ROOT / "bench" / "fake_graph.py"), str(fake_port), "--latency", str(latency)], 1
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_up(f"http://127.0.0.1:{fake_port}/healthz")
        alfred = subprocess.Popen(
            pinned([ALFRED_PYTHON, "main.py", "--config", str(config)], 0),
            cwd=ALFRED_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + n / min(rate, 5000) * 3 + 30
            # Poll the cheap count: serialising thousands of arrivals every 0.25 s would hold the
            # receiver's loop for milliseconds, and shift its own timestamps.
            while time.monotonic() < deadline:
                if get_json(f"http://127.0.0.1:{fake_port}/_count")["total"] >= n:  # type: ignore[operator]
                    break
                time.sleep(0.25)
            arrivals = sorted(get_json(f"http://127.0.0.1:{fake_port}/_stats")["arrivals"])  # type: ignore[arg-type]
            records = get_json(f"http://127.0.0.1:{fake_port}/_stats")["records"]
            inflight_max = get_json(f"http://127.0.0.1:{fake_port}/_count")["inflight_max"]
        finally:
            alfred.terminate()
            alfred.wait(timeout=30)
            fake.terminate()
            fake.wait(timeout=10)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else float("nan")
    achieved = (len(arrivals) - 1) / span
    steady = [t for t in arrivals if t >= arrivals[0] + 1.1]  # after the first window and its burst
    # Measured at the receiver: mean requests in flight = total time requests were open / span.
    in_flight = sum(r[1] - r[0] for r in records) / span
    return {
        "scenario": name,
        "rate": rate,
        "latency_ms": latency * 1000,
        "sends": len(arrivals),
        "expected": n,
        "achieved": achieved,
        "worst_window": worst_window(arrivals),
        "worst_50ms": worst_window(steady, 0.05),
        "steady_gap_ms": max((b - a for a, b in itertools.pairwise(steady)), default=0.0) * 1000,
        "largest_gap_ms": max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0) * 1000,
        "workers": workers,
        "utilisation": achieved * latency / workers,
        "in_flight": in_flight,
        "in_flight_max": inflight_max,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each paced backlog (default 8)")
    args = parser.parse_args()
    s = args.seconds
    load_before = loadavg()
    results = [
        scenario("80 msg/s, 0 ms", 80, 0.0, int(80 * s), 20),
        scenario("1000 msg/s, 100 ms", 1000, 0.1, int(1000 * s), 250),
        scenario("baseline: unpaced, 100 ms", 100_000, 0.1, int(1000 * s), 250),
    ]
    print(
        f"\npacing: backlog of ~{s:g} s per scenario; Alfred on CPU 0, fake Graph API on CPU 1; times at the receiver\n"
    )
    print(f"machine: {machine()} (load before: {load_before}); {alfred_version()}\n")
    print(
        "| scenario | configured | sends | achieved msg/s | of configured | worst 1 s window | workers "
        "| pool busy (Little) | in flight at Graph: mean / max "
        "| largest gap between arrivals ms: all / after the first 1.1 s | busiest 50 ms after 1.1 s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        share = f"{r['achieved'] / r['rate']:.1%}" if r["rate"] < 100_000 else "–"  # type: ignore[operator]
        print(
            f"| {r['scenario']} | {r['rate']:g} | {r['sends']}/{r['expected']} | {r['achieved']:.1f} | {share} | "
            f"{r['worst_window']} | {r['workers']} | {r['utilisation']:.0%} | "
            f"{r['in_flight']:.1f} / {r['in_flight_max']} | "
            f"{r['largest_gap_ms']:.0f} / {r['steady_gap_ms']:.0f} | {r['worst_50ms']} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
