"""A stand-alone fake Graph API for benchmarks: answers every send after `--latency` seconds.

    python bench/fake_graph.py PORT [--latency 0.1]

It records the arrival time of every POST (monotonic, on this server's clock: pacing is judged
where Meta would judge it) and serves them at GET /_stats.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    arrivals: list[float] = []
    ids = itertools.count(1)

    async def messages(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        await request.read()
        if args.latency:
            await asyncio.sleep(args.latency)
        return web.json_response({"messaging_product": "whatsapp", "messages": [{"id": f"wamid.B{next(ids)}"}]})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"arrivals": arrivals})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{version}/{pnid}/messages", messages)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/healthz", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
