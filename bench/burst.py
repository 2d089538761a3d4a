"""Burst: 100,000 webhooks while the Graph API is down, then the drain once it is back.

    python bench/burst.py [--messages 100000] [--concurrency 32] [--down 503|refuse] [--rate 1000]

Alfred (`python main.py`, production mode, `rate_per_second = 1000`, CPU 0) takes a closed-loop
burst of distinct signed text webhooks (raw engine, CPU 1) while the fake Graph API is down:
`--down 503` answers every send 503 with a transient Graph error (code 2), `--down refuse` is not
listening at all (connection refused). Alfred's VmRSS / VmHWM are sampled from /proc every
0.2 s. When the last webhook is answered the Graph API comes back (answers 200 at once) and the
drain time is measured at the fake: from then until the last of the 2 × N sends (read receipt +
reply per message) arrived. Finally the SQLite database is checked: every webhook answered 200
is stored and handled, every outbox row is `sent`, and every message's receipt and reply reached
the Graph API (nothing lost). Bounded: the drain is given `--drain-timeout` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLIENT_CPU,
    SECRET,
    SERVER_CPU,
    RssSampler,
    alfred_version,
    free_port,
    get_json,
    loadavg,
    machine,
    pin_self,
    post_json,
    proc_status,
    query,
    start_alfred,
    start_fake,
    start_profiler,
    stop,
    stop_profiler,
    write_config,
)
from loadgen import make_bodies, run_load


def drain(fake_port: int, expected: int, up_at: float, limit: float) -> tuple[float, dict]:
    """Wait until `expected` distinct sends were answered 2xx; (seconds from `up_at` to the last, counts)."""
    deadline = time.monotonic() + limit
    counts: dict = {}
    while time.monotonic() < deadline:
        counts = get_json(f"http://127.0.0.1:{fake_port}/_count")
        if counts["distinct_ok"] >= expected:
            return counts["last_ok"] - up_at, counts
        time.sleep(1.0)
    return float("nan"), counts


def check(db: Path, ok_wamids: set[str]) -> dict[str, int]:
    """Counts from the database after the drain."""
    stored = {r[0] for r in query(db, "SELECT event_id FROM inbox")}
    states = dict(query(db, "SELECT state, COUNT(*) FROM inbox GROUP BY state"))
    outbox = dict(query(db, "SELECT state, COUNT(*) FROM outbox GROUP BY state"))
    return {
        "accepted": len(ok_wamids),
        "stored": len(ok_wamids & stored),
        "handled": int(states.get("handled", 0)),
        "outbox_rows": sum(outbox.values()),
        "outbox_sent": int(outbox.get("sent", 0)),
        "outbox_failed": int(outbox.get("failed", 0)),
        "outbox_pending": int(outbox.get("queued", 0)) + int(outbox.get("sending", 0)),
    }


def graph_up(args: argparse.Namespace, fake_port: int, fake: object | None) -> object:
    """Bring the fake Graph API back (answer 200, or start it where nothing listened)."""
    if args.down == "503":
        post_json(f"http://127.0.0.1:{fake_port}/_mode", {"status": 200})
        return fake
    return start_fake(fake_port)


def run(args: argparse.Namespace, tmp: Path) -> dict:
    fake_port, port = free_port(), free_port()
    fake = start_fake(fake_port, status=503) if args.down == "503" else None
    config, db = write_config(tmp, port, graph_port=fake_port, rate=args.rate)
    bodies = make_bodies(args.messages, SECRET, tag=f"X{int(time.time()) % 100000}x")
    alfred = start_alfred(config, port, log=tmp / "alfred.log")
    try:
        idle_rss = proc_status(alfred.pid).get("VmRSS", 0) / 1024
        with RssSampler(alfred.pid) as rss:
            url = f"http://127.0.0.1:{port}/webhook"
            profiler = start_profiler(alfred.pid, Path(args.profile) / "alfred-burst.txt") if args.profile else None
            load = asyncio.run(run_load(url, bodies, args.concurrency, limit=args.burst_timeout))
            if profiler is not None:
                stop_profiler(profiler)
            burst_rss, burst_hwm = rss.peak_mb()
            up_at = time.monotonic()
            fake = graph_up(args, fake_port, fake)
            down_counts = get_json(f"http://127.0.0.1:{fake_port}/_count") if args.down == "503" else {}
            ok = {b.wamid for b, s in zip(bodies, load.status, strict=True) if s == 200}
            drain_s, counts = drain(fake_port, 2 * len(ok), up_at, args.drain_timeout)
            drain_rss, drain_hwm = rss.peak_mb(since=up_at)
        time.sleep(1.0)  # let the last settles commit
        db_counts = check(db, ok)
    finally:
        stop(alfred)
        if fake is not None:
            stop(fake)  # type: ignore[arg-type]
    return {
        "load": load,
        "idle_rss": idle_rss,
        "burst_rss": burst_rss,
        "burst_hwm": burst_hwm,
        "drain_rss": drain_rss,
        "drain_hwm": drain_hwm,
        "drain_s": drain_s,
        "counts": counts,
        "down_counts": down_counts,
        "db": db_counts,
    }


def slow_seconds(load: object, top: int = 3) -> str:
    """The seconds of the burst with the worst webhook latency: where the tail comes from."""
    start = min(t for t in load.sent_at if t == t)  # type: ignore[attr-defined]
    worst: dict[int, float] = {}
    for t, lat, status in zip(load.sent_at, load.latency, load.status, strict=True):  # type: ignore[attr-defined]
        if status:
            sec = int(t - start)
            worst[sec] = max(worst.get(sec, 0.0), lat)
    ranked = sorted(worst.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{lat * 1000:.0f} ms at {sec} s" for sec, lat in ranked)


def report(r: dict, args: argparse.Namespace, load_before: str) -> None:
    s = r["load"].summary()
    db, counts = r["db"], r["counts"]
    lost = db["accepted"] - db["stored"]
    unanswered = 2 * db["accepted"] - counts.get("distinct_ok", 0)
    print(
        f"\nburst: {args.messages} webhooks, closed loop, {args.concurrency} connections, Graph API down "
        f"({args.down}) during the burst, then back; rate_per_second = {args.rate:g}; Alfred on CPU {SERVER_CPU}, "
        f"generator and fake Graph API on CPU {CLIENT_CPU}"
    )
    print(f"machine: {machine()} (load before: {load_before}, after: {loadavg()}); {alfred_version()}\n")
    print("| phase | value |\n|---|---:|")
    rows = [
        ("burst: webhooks/s", f"{s['rps']:.0f}"),
        ("burst: webhook p50 / p95 / p99 / max ms", " / ".join(f"{s[k]:.1f}" for k in ("p50", "p95", "p99", "max"))),
        ("burst: non-200 (of which unanswered)", f"{s['non200']:.0f} ({s['unanswered']:.0f})"),
        ("burst: duration s", f"{r['load'].elapsed:.1f}"),
        ("burst: slowest seconds (max latency, offset from start)", slow_seconds(r["load"])),
        ("Graph answers while down (by status)", str(r["down_counts"].get("by_status", "refused"))),
        ("RSS at start / peak during burst MB", f"{r['idle_rss']:.0f} / {r['burst_rss']:.0f}"),
        ("peak RSS during drain MB (VmHWM at the end)", f"{r['drain_rss']:.0f} ({r['drain_hwm']:.0f})"),
        ("drain: Graph back → last of 2 × N sends, s", f"{r['drain_s']:.1f}"),
        ("drain: sends/s", f"{2 * db['accepted'] / r['drain_s']:.0f}" if r["drain_s"] == r["drain_s"] else "–"),
        ("accepted (200) / stored / handled", f"{db['accepted']} / {db['stored']} / {db['handled']}"),
        (
            "outbox rows / sent / failed / still pending",
            f"{db['outbox_rows']} / {db['outbox_sent']} / {db['outbox_failed']} / {db['outbox_pending']}",
        ),
        ("distinct sends answered 200 at the Graph API (expected 2 × accepted)", f"{counts.get('distinct_ok', 0)}"),
        ("lost (accepted but not stored) / never sent", f"{lost} / {unanswered}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--down", choices=["503", "refuse"], default="503")
    parser.add_argument("--rate", type=float, default=1000.0, help="Alfred's outbound.rate_per_second")
    parser.add_argument("--burst-timeout", type=float, default=900.0, help="bound on the burst itself, s")
    parser.add_argument("--drain-timeout", type=float, default=900.0)
    parser.add_argument("--profile", help="directory for a py-spy profile of Alfred during the burst")
    args = parser.parse_args()
    load_before = loadavg()
    pin_self(CLIENT_CPU)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    report(result, args, load_before)


if __name__ == "__main__":
    main()
