"""The two HTTP routes of the status surface: `GET /` (the page) and `GET /status.json` (its numbers).

Both answer from one `numbers.collect(app)` so the page, the JSON and `python main.py status` can
never disagree; both choose the open or the detailed view the same way (`numbers.authorized`).
"""

from __future__ import annotations

import time

import aiohttp_jinja2
from aiohttp import web

from alfred_bot.api import json_response
from alfred_bot.statuspage.numbers import authorized, collect
from alfred_bot.statuspage.page import view


async def page(request: web.Request) -> web.Response:
    """The status page, rendered from the same data as `/status.json` (503 while unavailable).

    A browser's navigation carries no token, so it gets the open view; `status.js` then fetches
    the detailed one with the token kept in the tab. `curl -H "Authorization: Bearer …"` gets it here.
    """
    data = await collect(request.app, detailed=authorized(request))
    context = {**view(data), "rendered_at": time.time()}
    status = 200 if context["status"] == "ok" else 503
    return aiohttp_jinja2.render_template("status.html", request, context, status=status)


async def status_json(request: web.Request) -> web.Response:
    """The status page's numbers (also what `python main.py status` prints): counts and states for
    anyone, names, texts and errors only with the API token (a wrong token gets the open view)."""
    data = await collect(request.app, detailed=authorized(request))
    response = json_response(data, 200 if data["status"] == "ok" else 503)
    response.headers["Cache-Control"] = "no-store"  # the detailed view must not sit in any cache
    response.headers["Vary"] = "Authorization, X-API-Key"
    return response


def add_routes(app: web.Application) -> None:
    """Register `GET /` and `GET /status.json` on `app` (the page's setup is `page.setup`)."""
    app.router.add_get("/", page, name="status_page")
    app.router.add_get("/status.json", status_json)
