"""End-to-end latency: webhook sent → read receipt and reply arriving at the (fake) Graph API.

    python bench/e2e.py [--seconds 60] [--long] [--msgs-per-second 50]

Alfred (`python main.py`, production mode, CPU 0) receives signed text webhooks at a fixed
50 msg/s (raw engine, latency from the intended send time, CPU 1) and its echo handler answers
each with a read receipt + typing indicator and the reply "You said: <text>", sent to
bench/fake_graph.py (CPU 1), which timestamps each arrival on the same monotonic clock. Every
message has its own text, wamid and sender, so each reply is matched to its webhook by text and
each receipt by message id. Two scenarios, each on a fresh database:

1. `rate_per_second = 1000` (an upgraded number): pacing does not bind, so the latency is the
   runtime's own (signature, commit, dispatch, handler, outbox commit, claim, send);
2. `rate_per_second = 80` (Meta's default): the receipt AND the reply count against the
   80 msg/s, so 50 msg/s offer 100 sends/s; the backlog grows by 20 sends/s, and what the user
   sees (receipt, then reply) is shown per 10-second slice of the run.

`--long` runs 300 s per scenario. After the load the script waits (bounded) for the backlog.
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
    alfred_version,
    free_port,
    get_json,
    loadavg,
    machine,
    pin_self,
    start_alfred,
    start_fake,
    stop,
    write_config,
)
from loadgen import Result, Signed, make_bodies, percentile, run_load

REPLY_PREFIX = "You said: "


def worst_window(times: list[float]) -> int:
    """Most arrivals in any sliding 1-second window (times sorted)."""
    worst, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        worst = max(worst, hi - lo + 1)
    return worst


def wait_for_sends(fake_port: int, expected: int, deadline: float) -> None:
    """Poll the fake Graph API until `expected` distinct sends were answered 2xx, or the deadline."""
    while time.monotonic() < deadline:
        if get_json(f"http://127.0.0.1:{fake_port}/_count")["distinct_ok"] >= expected:
            return
        time.sleep(0.5)


def match(records: list[list], bodies: list[Signed]) -> tuple[dict[int, float], dict[int, float], int, int]:
    """First arrival of each message's reply and receipt: (replies, receipts, duplicates, non-2xx)."""
    by_text = {b.text: i for i, b in enumerate(bodies)}
    by_wamid = {b.wamid: i for i, b in enumerate(bodies)}
    replies: dict[int, float] = {}
    receipts: dict[int, float] = {}
    dupes = bad = 0
    for t_in, _t_out, kind, key, status in records:
        if status >= 300:
            bad += 1
            continue
        if kind == "text" and key.startswith(REPLY_PREFIX):
            i, seen = by_text.get(key[len(REPLY_PREFIX) :]), replies
        elif kind == "read":
            i, seen = by_wamid.get(key), receipts
        else:
            continue
        if i is None:
            continue
        if i in seen:
            dupes += 1
        else:
            seen[i] = t_in
    return replies, receipts, dupes, bad


def lat_ms(arrivals: dict[int, float], result: Result, indices: range | list[int]) -> list[float]:
    return sorted((arrivals[i] - result.sent_at[i]) * 1000 for i in indices if i in arrivals)


def pcts(values: list[float]) -> str:
    return " / ".join(f"{percentile(values, q):.0f}" for q in (50, 95, 99))


def scenario(name: str, rate: float, args: argparse.Namespace, tag: str) -> dict:
    n = int(args.msgs_per_second * args.seconds)
    bodies = make_bodies(n, SECRET, tag=tag)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake_port, port = free_port(), free_port()
        fake = start_fake(fake_port, latency=args.graph_latency)
        config, _db = write_config(tmp, port, graph_port=fake_port, rate=rate)
        alfred = start_alfred(config, port, log=tmp / "alfred.log")
        try:
            load = asyncio.run(
                run_load(f"http://127.0.0.1:{port}/webhook", bodies, args.concurrency, rate=args.msgs_per_second)
            )
            backlog = 2 * n / rate  # how long the sends take at the configured pace, at best
            wait_for_sends(fake_port, 2 * load.summary()["ok"], time.monotonic() + max(30.0, backlog * 1.5))
            stats = get_json(f"http://127.0.0.1:{fake_port}/_stats", timeout=60)
        finally:
            stop(alfred)
            stop(fake)
    replies, receipts, dupes, bad = match(stats["records"], bodies)
    arrivals = sorted(r[0] for r in stats["records"])
    return {
        "name": name,
        "rate": rate,
        "n": n,
        "load": load,
        "replies": replies,
        "receipts": receipts,
        "dupes": dupes,
        "bad": bad,
        "arrivals": arrivals,
    }


def summary_row(s: dict) -> str:
    load: Result = s["load"]
    n = s["n"]
    hook = load.summary()
    rep = lat_ms(s["replies"], load, range(n))
    rec = lat_ms(s["receipts"], load, range(n))
    missing = (n - len(s["replies"])) + (n - len(s["receipts"]))
    errors = hook["non200"] + missing + s["bad"]
    arr = s["arrivals"]
    span = arr[-1] - arr[0] if len(arr) > 1 else float("nan")
    achieved = (len(arr) - 1) / span if len(arr) > 1 else float("nan")
    return (
        f"| {s['name']} | {s['rate']:g} | {n} | {hook['p99']:.1f} | {pcts(rec)} | {pcts(rep)} | "
        f"{(rep[-1] if rep else float('nan')):.0f} | {errors:.0f} ({errors / (3 * n):.2%}) | {s['dupes']} | "
        f"{achieved:.1f} | {worst_window(arr)} |"
    )


def slices(s: dict, args: argparse.Namespace) -> list[str]:
    """What users see over time: latency of messages sent in each 10-second slice of the run."""
    load: Result = s["load"]
    per = int(args.msgs_per_second * 10)
    rows = ["| messages sent in | receipt p50 / p95 ms | reply p50 / p95 / p99 ms |", "|---|---:|---:|"]
    for start in range(0, s["n"], per):
        idx = list(range(start, min(s["n"], start + per)))
        rec = lat_ms(s["receipts"], load, idx)
        rep = lat_ms(s["replies"], load, idx)
        t0 = start / args.msgs_per_second
        rows.append(
            f"| {t0:.0f}–{t0 + 10:.0f} s | {percentile(rec, 50):.0f} / {percentile(rec, 95):.0f} | {pcts(rep)} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--long", action="store_true", help="300 s per scenario")
    parser.add_argument("--msgs-per-second", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=8, help="generator connections")
    parser.add_argument("--graph-latency", type=float, default=0.0, help="fake Graph API answer delay, s")
    parser.add_argument("--only", choices=["unpaced", "paced"], help="run one scenario")
    args = parser.parse_args()
    if args.long:
        args.seconds = 300.0
    load_before = loadavg()
    pin_self(CLIENT_CPU)
    tag = f"E{int(time.time()) % 100000}"
    todo = [("pacing not binding", 1000.0, "unpaced"), ("default pacing", 80.0, "paced")]
    results = [scenario(name, rate, args, f"{tag}{key[0]}") for name, rate, key in todo if args.only in (None, key)]
    print(
        f"\ne2e: {args.msgs_per_second:g} msg/s for {args.seconds:g} s per scenario; Alfred on CPU {SERVER_CPU}, "
        f"generator and fake Graph API (answers in {args.graph_latency * 1000:g} ms) on CPU {CLIENT_CPU}"
    )
    print(f"machine: {machine()} (load before: {load_before}, after: {loadavg()}); {alfred_version()}\n")
    print(
        "| scenario | rate_per_second | messages | webhook p99 ms | receipt p50 / p95 / p99 ms | "
        "reply p50 / p95 / p99 ms | reply max ms | errors | duplicates | sends/s at Graph | worst 1 s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in results:
        print(summary_row(s))
    print(
        "\nErrors = webhook non-200 + receipts or replies that never arrived + non-2xx Graph answers "
        "(share of 3 events per message). Every message causes TWO sends that count against Meta's "
        "per-number msg/s: the read receipt (with typing indicator) and the reply."
    )
    for s in results:
        if s["rate"] < 2 * args.msgs_per_second:
            print(
                f"\nWhat users see at rate_per_second = {s['rate']:g}: {2 * args.msgs_per_second:g} sends/s offered "
                f"for {s['rate']:g} allowed, the backlog grows by {2 * args.msgs_per_second - s['rate']:g} sends/s:\n"
            )
            print("\n".join(slices(s, args)))


if __name__ == "__main__":
    main()
