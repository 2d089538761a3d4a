"""Where Alfred's time goes: summarise a py-spy profile (collapsed stacks) by thread and by concern.

    python bench/ingest.py --no-pywa --rounds 1 --profile bench/profiles      # records it
    python bench/profile.py bench/profiles/alfred-ingest.txt --requests 20000 [--rate 100]

`py-spy record --format raw --threads --idle` writes one line per distinct stack with its sample
count. Each sample is 1/rate s of wall time of one thread. Stacks are put in the first bucket
whose marker appears in them (so a store write started by a handler counts as dispatch on the
event loop, and as its own SQL on the writer thread). With `--requests`, every bucket is also
given as µs per webhook (wall time of that thread / requests).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

#: Event-loop thread buckets, first match wins (markers are substrings of py-spy frame names).
LOOP_BUCKETS = [
    # asyncio waits in EpollSelector.select; uvloop waits inside its C run loop (leaf: run_app / run_forever)
    ("idle (epoll wait)", ("EpollSelector.select", "run_app (", "run_forever (", "run_until_complete (")),
    ("signature (HMAC)", ("alfred_bot/security.py",)),
    ("parse (msgspec, items)", ("alfred_bot/parse.py",)),
    ("webhook → store.ingest (submit, await)", ("alfred_bot/webhook.py",)),
    ("dispatch (handler, ctx, complete)", ("alfred_bot/dispatch.py", "handlers/")),
    ("sender (pump, workers, limiter)", ("alfred_bot/outbound/",)),
    ("graph client (aiohttp ClientSession)", ("alfred_bot/graph.py", "aiohttp/client", "aiohttp/connector")),
    ("writer task (group hand-off)", ("alfred_bot/store/sqlite/writer.py",)),
    ("aiohttp server (HTTP parse, response)", ("aiohttp/web_protocol", "aiohttp/http_", "aiohttp/web_")),
    ("asyncio (loop, futures, call_soon_threadsafe)", ("asyncio/",)),
]
#: SQLite writer thread buckets.
WRITER_BUCKETS = [
    ("idle (waiting for a group)", ("_queue.SimpleQueue.get", "thread.py:81", "thread.py:80")),
    ("claim (outbox UPDATE … RETURNING)", ("claim (alfred_bot/store/sqlite/outbox.py",)),
    ("settle (sent/queued/failed)", ("settle (alfred_bot/store/sqlite/outbox.py",)),
    ("ingest op (inbox INSERT)", ("_ingest_op",)),
    ("complete op (inbox UPDATE + outbox INSERT)", ("_complete_op",)),
    ("next_due (read on the writer connection)", ("next_due",)),
    ("COMMIT / BEGIN / SAVEPOINT (fsync)", ("apply_group", "_apply_one")),
    ("wake the loop (call_soon_threadsafe)", ("call_soon_threadsafe", "set_result")),
]


def load(path: Path) -> dict[str, Counter[str]]:
    """thread name → Counter(stack → samples)."""
    threads: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        head, _, rest = stack.partition(";")
        name = head.split(": ", 1)[-1]
        threads[name][rest] += int(count)
    return threads


def kind(name: str) -> str:
    if name.startswith("MainThread"):
        return "loop"
    if "sqlite-writer" in name:
        return "writer"
    return "other"


def bucket(stack: str, buckets: list[tuple[str, tuple[str, ...]]]) -> str:
    frames = stack.split(";")
    leaf = frames[-1] if frames else ""
    for label, markers in buckets:
        if label.startswith("idle") and any(m in leaf for m in markers):
            return label
        if not label.startswith("idle") and any(m in stack for m in markers):
            return label
    return "other"


def summarise(threads: dict[str, Counter[str]], rate: float, requests: int | None) -> str:
    lines = ["| thread | where | samples | share of thread | µs per webhook |", "|---|---|---:|---:|---:|"]
    for name, stacks in sorted(threads.items()):
        k = kind(name)
        total = sum(stacks.values())
        if k == "other":
            per = {"(all: aiosqlite reader, executor, …)": total}
        else:
            per = Counter()
            for stack, n in stacks.items():
                per[bucket(stack, LOOP_BUCKETS if k == "loop" else WRITER_BUCKETS)] += n
        for label, n in sorted(per.items(), key=lambda kv: -kv[1]):
            us = f"{n / rate / requests * 1e6:.0f}" if requests else "–"
            lines.append(f"| {name} | {label} | {n} | {n / total:.0%} | {us} |")
    return "\n".join(lines)


def top_frames(threads: dict[str, Counter[str]], count: int) -> str:
    """The most sampled leaf functions of the busy threads (idle excluded)."""
    leaves: Counter[str] = Counter()
    for name, stacks in threads.items():
        if kind(name) == "other":
            continue
        for stack, n in stacks.items():
            leaf = stack.split(";")[-1]
            if "EpollSelector.select" in leaf or "SimpleQueue.get" in leaf:
                continue
            leaves[f"{kind(name)}: {leaf}"] += n
    return "\n".join(f"{n:6d}  {leaf}" for leaf, n in leaves.most_common(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy sampling rate (default 100/s)")
    parser.add_argument("--requests", type=int, help="webhooks sent while it recorded")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    threads = load(args.profile)
    print(summarise(threads, args.rate, args.requests))
    print(f"\nmost sampled leaf frames (busy only):\n{top_frames(threads, args.top)}")


if __name__ == "__main__":
    main()
