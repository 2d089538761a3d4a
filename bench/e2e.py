"""End-to-end latency: webhook sent → read receipt and reply arriving at the (fake) Graph API.

    python bench/e2e.py [--seconds 60] [--long] [--msgs-per-second 50] [--users 500]
                        [--baseline unpaced|head|none] [--head-root DIR] [--throttle-at 20]

`--long` is the integration guide's acceptance test: 50 msg/s × 300 s from 500 users at the
DEFAULT config (80 msg/s per number), the fake Graph API answering in 100 ms; errors are replies
still missing a minute after the load (target ≤ 1 %), reply p95 < 2 s. Read receipts are
best-effort (sent in the spare budget, dropped when superseded or stale): they are reported as
sent / dropped, not as errors. The baseline runs in the same invocation: `unpaced` (rate 1000,
pacing not binding), `head` (the previous code, from a `git archive HEAD` tree at `--head-root`,
same config) or `none`. `--throttle-at T` makes the fake Graph API answer every send with 130429
for one second at T s into the load (a burst of inbound volume at Meta), to measure the slow-down.

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

After the load the script waits for the backlog until no send arrived for 3 s, at most 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
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
    post_json,
    start_alfred,
    stop,
    wait_up,
    write_config,
)
from common import start as start_process
from loadgen import Result, Signed, percentile, run_load, sign, webhook_body

REPLY_PREFIX = "You said: "


def worst_window(times: list[float]) -> int:
    """Most arrivals in any sliding 1-second window (times sorted)."""
    worst, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        worst = max(worst, hi - lo + 1)
    return worst


THROTTLE_BODY = json.dumps(
    {"error": {"message": "(#130429) Rate limit hit", "type": "OAuthException", "code": 130429, "fbtrace_id": "T"}}
)


def serve_fake(argv: list[str]) -> None:
    """bench/fake_graph.py whose error answers are 130429 (throughput) instead of 2 (down)."""
    import fake_graph  # noqa: PLC0415 (only in the fake's own process)

    fake_graph.DOWN_BODY = THROTTLE_BODY
    sys.argv = [sys.argv[0], *argv]
    fake_graph.main()


def start_fake(port: int, latency: float, agent_latency: float = 0.0) -> Any:
    cmd = [sys.executable, __file__, "--serve-fake", str(port), "--latency", str(latency)]
    cmd += ["--agent-latency", str(agent_latency)]
    proc = start_process(cmd, CLIENT_CPU)
    wait_up(f"http://127.0.0.1:{port}/healthz", proc=proc)
    return proc


def throttle_later(fake_port: int, at: float, seconds: float = 1.0) -> threading.Timer:
    """At `at` s from now, every send is answered 130429 for `seconds` s."""

    def burst() -> None:
        post_json(f"http://127.0.0.1:{fake_port}/_mode", {"status": 400})
        time.sleep(seconds)
        post_json(f"http://127.0.0.1:{fake_port}/_mode", {"status": 200})

    timer = threading.Timer(at, burst)
    timer.start()
    return timer


def wait_for_sends(fake_port: int, expected: int, deadline: float, quiet: float = 3.0) -> None:
    """Poll the fake Graph API until `expected` distinct sends were answered 2xx, no send came for
    `quiet` s (receipts may be dropped, so fewer than `expected` can be all), or the deadline."""
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = get_json(f"http://127.0.0.1:{fake_port}/_count")
        if count["distinct_ok"] >= expected:
            return
        if count["total"] != last:
            last, since = count["total"], time.monotonic()
        elif time.monotonic() - since >= quiet:
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


def timed_bodies(n: int, tag: str, args: argparse.Namespace) -> list[Signed]:
    """Signed webhooks whose Meta `timestamp` is when each is due (as Meta's would be): the per-user
    inbound limit (`limits.inbound_per_user`, by Meta's timestamps) then sees 6 messages a minute
    per user, not all of a user's 30 messages in one second (which would mark a third `limited`)."""
    start = time.time() + 3.0  # Alfred's start-up
    out = []
    for i in range(n):
        now = int(start + i / args.msgs_per_second)
        body, wamid, text, sender = webhook_body(i, tag=tag, senders=args.users, now=now)
        out.append(Signed(body, sign(body, SECRET), wamid, text, sender))
    return out


def scenario(name: str, rate: float, args: argparse.Namespace, tag: str, root: Path | None = None) -> dict:
    n = int(args.msgs_per_second * args.seconds)
    bodies = timed_bodies(n, tag, args)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake_port, port = free_port(), free_port()
        fake = start_fake(fake_port, latency=args.graph_latency, agent_latency=args.agent_latency or 0.0)
        config, _db = write_config(tmp, port, graph_port=fake_port, rate=rate, extra=extra_config(args, fake_port))
        common.ALFRED_ROOT = root or ROOT_OF_THIS_TREE
        alfred = start_alfred(config, port, log=tmp / "alfred.log")
        timer = throttle_later(fake_port, args.throttle_at) if args.throttle_at is not None else None
        try:
            load = asyncio.run(
                run_load(f"http://127.0.0.1:{port}/webhook", bodies, args.concurrency, rate=args.msgs_per_second)
            )
            # the guide's definition: what has not arrived a minute after the load is an error
            wait_for_sends(fake_port, 2 * load.summary()["ok"], time.monotonic() + 60.0)
            stats = get_json(f"http://127.0.0.1:{fake_port}/_stats", timeout=60)
            counts = health_counts(port)
        finally:
            if timer is not None:
                timer.cancel()
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
        "counts": counts,
    }


def extra_config(args: argparse.Namespace, fake_port: int) -> str:
    """Config sections beyond the rate: the fake agent as orchestrator, the handler workers."""
    extra = ""
    if args.agent_latency is not None:
        extra += f'[orchestrator]\nurl = "http://127.0.0.1:{fake_port}/agent"\ntimeout_seconds = 20\n'
        extra += "[dispatch]\nhandler_timeout_seconds = 60\n"
    if args.dispatch_workers:
        extra += "" if "[dispatch]" in extra else "[dispatch]\n"
        extra += f"workers = {args.dispatch_workers}\n"
    return extra


def health_counts(port: int) -> dict[str, int]:
    """The sender's counters from /healthz (receipts dropped by reason, 130429s seen)."""
    try:
        sender = get_json(f"http://127.0.0.1:{port}/healthz").get("sender", {})
    except OSError:
        return {}
    return {k: v for k, v in sender.items() if isinstance(v, int)}


def summary_row(s: dict) -> str:
    load: Result = s["load"]
    n = s["n"]
    hook = load.summary()
    rep = lat_ms(s["replies"], load, range(n))
    rec = lat_ms(s["receipts"], load, range(n))
    errors = hook["non200"] + (n - len(s["replies"]))
    counts = s["counts"]
    dropped = "/".join(str(counts.get(f"receipts_dropped_{r}", 0)) for r in ("superseded", "stale", "failed"))
    arr = s["arrivals"]
    span = arr[-1] - arr[0] if len(arr) > 1 else float("nan")
    achieved = (len(arr) - 1) / span if len(arr) > 1 else float("nan")
    return (
        f"| {s['name']} | {s['rate']:g} | {n} | {hook['p99']:.1f} | {pcts(rep)} | "
        f"{(rep[-1] if rep else float('nan')):.0f} | {errors:.0f} ({errors / n:.2%}) | {len(s['receipts'])} | "
        f"{dropped} | {pcts(rec)} | {s['bad']} ({counts.get('error_130429', 0)}) | {s['dupes']} | "
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


def plan(args: argparse.Namespace) -> list[tuple[str, float, str, Path | None]]:
    """The scenarios: (name, rate_per_second, tag suffix, Alfred tree or None for this one)."""
    todo: list[tuple[str, float, str, Path | None]] = []
    if args.baseline == "unpaced":
        todo.append(("baseline: pacing not binding", 1000.0, "u", None))
    elif args.baseline == "head":
        todo.append(("baseline: previous code (HEAD), default config", 80.0, "h", args.head_root))
    todo.append(("this tree, default config", 80.0, "p", None))
    return todo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--long", action="store_true", help="the guide's test: 300 s per scenario")
    parser.add_argument("--msgs-per-second", type=float, default=50.0)
    parser.add_argument("--users", type=int, default=500, help="distinct senders (0: one per message)")
    parser.add_argument("--concurrency", type=int, default=8, help="generator connections")
    parser.add_argument("--graph-latency", type=float, default=0.1, help="fake Graph API answer delay, s")
    parser.add_argument("--baseline", choices=["unpaced", "head", "none"], default="unpaced")
    parser.add_argument("--head-root", type=Path, help="the previous code (git archive HEAD) for --baseline head")
    parser.add_argument("--throttle-at", type=float, help="130429 for every send for 1 s at this second of the load")
    parser.add_argument(
        "--agent-latency", type=float, help="texts go to a fake orchestrator answering after this many s (echo's text)"
    )
    parser.add_argument("--dispatch-workers", type=int, help="dispatch.workers (default: the config's default)")
    parser.add_argument("--serve-fake", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake is not None:
        serve_fake(args.serve_fake)
        return
    if args.long:
        args.seconds = 300.0
    if args.baseline == "head" and args.head_root is None:
        parser.error("--baseline head needs --head-root (e.g. git archive HEAD | tar -x -C /tmp/alfred-head)")
    load_before = loadavg()
    pin_self(CLIENT_CPU)
    tag = f"E{int(time.time()) % 100000}"
    results = [scenario(name, rate, args, f"{tag}{key}", root) for name, rate, key, root in plan(args)]
    throttle = f"; 130429 for every send at {args.throttle_at:g}–{args.throttle_at + 1:g} s" if args.throttle_at else ""
    print(
        f"\ne2e: {args.msgs_per_second:g} msg/s for {args.seconds:g} s from {args.users or 'one per message'} users "
        f"per scenario; Alfred on CPU {SERVER_CPU}, generator and fake Graph API (answers in "
        f"{args.graph_latency * 1000:g} ms) on CPU {CLIENT_CPU}{throttle}"
    )
    print(f"machine: {machine()} (load before: {load_before}, after: {loadavg()}); {alfred_version()}\n")
    print(
        "| scenario | rate_per_second | messages | webhook p99 ms | reply p50 / p95 / p99 ms | reply max ms | "
        "errors | receipts sent | receipts dropped (superseded/stale/failed) | receipt p50 / p95 / p99 ms | "
        "non-2xx at Graph (130429 seen) | duplicates | sends/s at Graph | worst 1 s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in results:
        print(summary_row(s))
    print(
        "\nErrors = webhook non-200 + replies still missing a minute after the load (share of messages). "
        "Every message asks for TWO sends against Meta's per-number msg/s: the read receipt (with typing "
        "indicator) and the reply; receipts are best-effort (spare budget only), so dropped ones are not errors."
    )
    for s in results:
        if s["rate"] < 2 * args.msgs_per_second:
            print(
                f"\nWhat users see at rate_per_second = {s['rate']:g}: {2 * args.msgs_per_second:g} sends/s offered "
                f"for {s['rate']:g} allowed, the backlog grows by {2 * args.msgs_per_second - s['rate']:g} sends/s:\n"
            )
            print("\n".join(slices(s, args)))


ROOT_OF_THIS_TREE = common.ALFRED_ROOT

if __name__ == "__main__":
    main()
