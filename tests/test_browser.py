"""The status page in a real browser: headless Chromium (Debian's `chromium`) against the running app.

Chromium is driven over the DevTools protocol with aiohttp's own WebSocket client (no browser
driver package to pin). The app runs in production mode on a real loopback port with the fake
Graph API behind it. The test loads the page (the open view: counts and states, no names, texts
or errors), posts a signed webhook and sees the inbound number change without a reload, enters a
wrong API token (still the open view) and then the right one (the detailed view, escaped), clicks
"Retry" on a dead letter, sees it leave the list and the API confirm the resend, and saves a
screenshot (tmp_path, or `$ALFRED_SCREENSHOT`).

Without Chromium the test is skipped locally; under CI (`CI` set) it fails instead, since `.ci/run`
installs Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import html
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.router import Router
from alfred_bot.statuspage import charts
from tests import payloads
from tests.conftest import API_TOKEN, PROD_ENV, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph, graph_error

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
DEAD_TO = "15550001234"
HOSTILE_NAME = "<script>alert(1)</script>\u202eevil"
STEP_TIMEOUT = 8.0  # seconds for one visible change (the page polls every 3 s)
CDP_TIMEOUT = 10.0
# The flags a root, offline, headless machine needs (no sandbox as root, no calls home).
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-proxy-server",
    "--mute-audio",
    "--window-size=1280,900",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def _require_chromium() -> str:
    if CHROMIUM is None:
        reason = "no Chromium on PATH: `apt-get install chromium` (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


class Page:
    """One page target over the DevTools protocol: commands, events, and a few person-like actions."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        future = self._pending[ident] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        reply = await asyncio.wait_for(future, CDP_TIMEOUT)
        assert "error" not in reply, f"{method}: {reply['error']}"
        result: dict[str, Any] = reply["result"]
        return result

    async def eval(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in reply, f"{expression}: {reply['exceptionDetails']}"
        return reply["result"].get("value")

    async def text(self, selector: str) -> str | None:
        value = await self.eval(f"document.querySelector({json.dumps(selector)})?.textContent ?? null")
        return None if value is None else str(value)

    async def until(self, expression: str, timeout: float = STEP_TIMEOUT) -> None:
        """Wait until `expression` is truthy in the page, as a person waits for the screen."""
        try:
            await wait_for(lambda: self._truthy(expression), timeout)
        except AssertionError:
            raise AssertionError(f"not true within {timeout} s: {expression}") from None

    async def _truthy(self, expression: str) -> bool:
        return bool(await self.eval(expression))

    async def navigate(self, url: str) -> None:
        loaded = len([e for e in self.events if e["method"] == "Page.loadEventFired"])
        await self.send("Page.navigate", url=url)
        await wait_for(lambda: len([e for e in self.events if e["method"] == "Page.loadEventFired"]) > loaded)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (after scrolling it into view)."""
        sel = json.dumps(selector)
        x, y = await self.eval(
            f"(() => {{ const e = document.querySelector({sel}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def type(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def problems(self) -> list[str]:
        """Script errors, console errors and browser log errors (CSP violations, failed loads)."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(str(params["exceptionDetails"]))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(str(params.get("args")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(str(params["entry"]))
        return found


async def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], log: Path) -> int:
    active = profile / "DevToolsActivePort"
    deadline = asyncio.get_running_loop().time() + 20
    while not active.exists() or not active.read_text().strip():
        if proc.poll() is not None or asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"Chromium did not start:\n{log.read_text(errors='replace')[-3000:]}")
        await asyncio.sleep(0.05)
    return int(active.read_text().splitlines()[0])


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Page]:
    """Start headless Chromium in its own process group, attach to its first tab, stop it after."""
    profile, log = tmp_path / "chromium-profile", tmp_path / "chromium.log"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [_require_chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    try:
        port = await _devtools_port(profile, proc, log)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(url, max_msg_size=0) as ws:
                page = Page(ws)
                for domain in ("Page", "Runtime", "Log"):
                    await page.send(f"{domain}.enable")
                try:
                    yield page
                finally:
                    await page.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _boom() -> Router:
    router = Router("boom")

    @router.default
    async def boom(message: Message, ctx: Context) -> None:
        raise RuntimeError("handler exploded")

    return router


async def _dead_letter(client: Any, graph: FakeGraph) -> str:
    """One template send that Meta refuses for good (131026): a dead letter."""
    graph.script_for("+" + DEAD_TO, graph_error(131026, message="Message undeliverable"))
    body = {"to": DEAD_TO, "type": "template", "template": {"name": "dead", "language": {"code": "en"}}}
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    assert resp.status == 202
    outbox_id: str = (await resp.json())["id"]
    await wait_for(lambda: _status(client, outbox_id, "failed"))
    return outbox_id


async def _pause_biz(client: Any, graph: FakeGraph) -> None:
    """A permission error (10) pauses only the tenant "biz"; failing probes keep it paused."""
    graph.probe_status = 403
    graph.script_for("+15550009999", graph_error(10, 403, message="Permission <denied> for this number"))
    body = {"to": "15550009999", "type": "template", "template": {"name": "p", "language": {"code": "en"}}}
    resp = await client.post("/api/messages", json={**body, "tenant": "biz"}, headers=AUTH)
    assert resp.status == 202
    await wait_for(lambda: "biz" in client.app[keys.SENDER].pauses)


async def _status(client: Any, outbox_id: str, status: str) -> bool:
    resp = await client.get(f"/api/messages/{outbox_id}", headers=AUTH)
    return bool((await resp.json())["status"] == status)


def _hostile_webhook() -> bytes:
    msg = payloads.text("<img src=x onerror=alert(2)>", id="wamid.BROWSER1")
    return payloads.dump(payloads.envelope(payloads.entry(payloads.change(payloads.value([msg], name=HOSTILE_NAME)))))


INBOUND = '[data-tenant="home"] [data-field="inbound"]'


async def test_status_page_in_chromium(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    _require_chromium()
    cfg = prod_config(tmp_path, graph)
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV), routers={"home": _boom(), "biz": _boom()}))
    dead_id = await _dead_letter(client, graph)
    await _pause_biz(client, graph)
    async with chromium(tmp_path) as page:
        # 1. the page loads, rendered by the server and then redrawn by status.js
        await page.navigate(str(client.make_url("/")))
        assert await page.text("h1") == "Alfred"
        assert await page.text(INBOUND) == "0"
        await page.until("document.getElementById('updated').textContent.startsWith('updated ')")
        await page.eval("window.__sameDocument = 'yes'")
        pause = await page.text('[data-tenant="biz"] .pause .reason')
        assert pause == "the reason needs the API token"  # the open view: Meta's text is not shown
        assert not await page.eval("document.getElementById('open-note').hidden")

        # 2. a signed webhook (whose sender's handler fails) changes the numbers without a reload;
        #    the open view shows that a handler failed, not who wrote what
        assert await post_webhook(client, _hostile_webhook()) == 200
        await page.until(f"document.querySelector({json.dumps(INBOUND)}).textContent === '1'")
        assert await page.eval("window.__sameDocument") == "yes"
        await page.until("document.querySelector('#failures tr:not(.empty)') !== null")
        assert await page.text("#failures tr:not(.empty) td:nth-child(2)") == "home"
        for hidden in ("alert", "evil", "4567", "Permission", "Message undeliverable"):
            assert not await page.eval(f"document.body.innerText.includes({json.dumps(hidden)})"), hidden
        assert await page.eval("document.querySelector('#dead [data-retry]')") is None  # no ids: no retry

        # 3. a wrong token still gets the open view; the right one the detailed view, escaped
        await page.type("#api-token", "not-the-token")
        await page.until("document.getElementById('token-state').textContent === 'not accepted: open view only'")
        assert await page.eval("document.querySelector('#failures tr[data-id]')") is None
        await page.click("#forget-token")
        assert await page.eval("document.getElementById('api-token').value + sessionStorage.length") == "0"
        await page.type("#api-token", API_TOKEN)
        await page.until("document.getElementById('token-state').textContent === 'accepted: detailed view'")
        await page.until("document.querySelector('#failures tr[data-id=\"wamid.BROWSER1\"]') !== null")
        row = '#failures tr[data-id="wamid.BROWSER1"]'
        assert await page.text(f"{row} td:nth-child(4)") == "<script>alert(1)</script>‹U+202E›evil"
        assert await page.text(f"{row} td:nth-child(5)") == "<img src=x onerror=alert(2)>"
        assert await page.text(f"{row} td.phone") == "+15•••••4567"
        assert await page.eval("document.querySelectorAll('script, img').length") == 2  # status.js + JSON
        pause = await page.text('[data-tenant="biz"] .pause .reason')
        assert pause is not None and "Permission <denied> for this number" in pause
        assert await page.eval("document.getElementById('open-note').hidden")
        button = f'#dead [data-retry="{dead_id}"]'
        await page.until(f"!document.querySelector({json.dumps(button)}).disabled")
        shot = tmp_path / "status-page.png"
        await page.screenshot(shot)  # everything on screen: a pause, a failure, a dead letter
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get("ALFRED_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["ALFRED_SCREENSHOT"])
        await page.click(button)
        await page.until(f"document.querySelector({json.dumps(button)}) === null")
        assert await page.text("#action-result") == "Queued again: 1 message(s)."
        await wait_for(lambda: _status(client, dead_id, "sent"))  # the API confirms: resent and accepted
        names = [r.body["template"]["name"] for r in graph.sends if r.body.get("type") == "template"]
        assert names.count("dead") == 2
        assert await page.text("#dead tr.empty td") == "No dead letters."

        # 4. the token stays in this tab: not in a cookie, not in the URL
        assert await page.eval("sessionStorage.getItem('alfred.apiToken')") == API_TOKEN
        assert API_TOKEN not in await page.eval("document.cookie + location.href")
        assert await page.eval("window.__sameDocument") == "yes"
        assert page.problems() == []  # nothing went wrong in the page (a wrong token is no error)


# ------------------------------------------------------------------ the charts (issue 17)


def _png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode Chromium's screenshot (8-bit RGB or RGBA, not interlaced): width, height, RGBA rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", b""
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + size]
        head, idat = (chunk, idat) if kind == b"IHDR" else (head, idat + chunk if kind == b"IDAT" else idat)
        pos += 12 + size
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", head)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    channels = 4 if color == 6 else 3
    raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            line[i] = (line[i] + _predict(kind, left, up, corner)) & 0xFF
        rows.append(
            bytes(line) if channels == 4 else b"".join(bytes(line[i : i + 3]) + b"\xff" for i in range(0, stride, 3))
        )
        prev = line
    return width, height, rows


def _predict(kind: int, left: int, up: int, corner: int) -> int:
    """PNG's five scanline filters (RFC 2083 section 6)."""
    if kind == 0:
        return 0
    if kind == 1:
        return left
    if kind == 2:
        return up
    if kind == 3:
        return (left + up) // 2
    p = left + up - corner
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
    return left if pa <= pb and pa <= pc else up if pb <= pc else corner


def _colours(rows: list[bytes]) -> collections.Counter[tuple[int, int, int]]:
    return collections.Counter((r[i], r[i + 1], r[i + 2]) for r in rows for i in range(0, len(r), 4))


def _near(colours: collections.Counter[tuple[int, int, int]], hex_colour: str, slack: int = 40) -> int:
    """How many pixels are within `slack` per channel of a CSS colour (lines are anti-aliased)."""
    want = bytes.fromhex(hex_colour.lstrip("#"))
    return sum(n for c, n in colours.items() if all(abs(a - b) <= slack for a, b in zip(c, want, strict=True)))


def _echo_router() -> Router:
    router = Router("echo")

    @router.default
    async def echo(message: Message, ctx: Context) -> None:
        ctx.reply("got it")

    return router


async def _chart_shot(page: Page, selector: str, path: Path) -> collections.Counter[tuple[int, int, int]]:
    """A screenshot of exactly one chart (its bounding box, page coordinates), decoded to colour counts."""
    box = await page.eval(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
        " const r = e.getBoundingClientRect();"
        " return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height, scale: 1}; })()"
    )
    assert box["width"] > 250 and box["height"] > 80, box
    shot = await page.send("Page.captureScreenshot", format="png", clip=box, captureBeyondViewport=True)
    data = base64.b64decode(shot["data"])
    path.write_bytes(data)
    width, height, rows = _png(data)
    assert (width, height) == (round(box["width"]), round(box["height"])) or abs(width - box["width"]) <= 1
    return _colours(rows)


async def _json(client: Any) -> dict[str, Any]:
    data: dict[str, Any] = await (await client.get("/status.json")).json()
    return data


def _shapes(svg: str) -> list[tuple[str, dict[str, str], str]]:
    """Every element of an SVG's markup with its attributes (in any order) and its text, in document order."""
    found = re.findall(r"<(\w+)\b([^>]*)>([^<]*)", svg)
    return [
        (tag, dict(re.findall(r'([\w:-]+)="([^"]*)"', attrs)), html.unescape(body).strip())
        for tag, attrs, body in found
    ]


def _svg_of(page_html: str, tenant: str, chart: str) -> str:
    card = page_html[page_html.index(f'data-tenant="{tenant}"') :]
    start = card.index("<svg", card.index(f'data-chart="{chart}"'))
    return card[start : card.index("</svg>", start)]


COUNTS = '[data-tenant="home"] [data-chart="counts"] svg'
LATENCY = '[data-tenant="home"] [data-chart="latency"] svg'


async def test_charts_in_chromium(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    """Per tenant, the last hour per minute drawn as inline SVG: non-empty in a real screenshot,
    axes labelled with the right values, redrawn by status.js as the server draws it."""
    _require_chromium()
    cfg = prod_config(tmp_path, graph)
    client = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV), routers={"home": _echo_router()}))
    for n in range(6):  # six messages, six replies, and one send Meta refuses for good
        assert await post_webhook(client, payloads.body_of(payloads.text(f"hi {n}", id=f"wamid.CHART{n}"))) == 200
    await _dead_letter(client, graph)
    await wait_for(lambda: _totals(client, "sent", 6), timeout=STEP_TIMEOUT)
    campaign = {
        "tenant": "home",
        "name": "Spring sale",
        "template": {"name": "promo", "language": "en"},
        "recipients": [{"to": "15550003001"}, {"to": "15550003002"}],
        "send_at": time.time() + 3600,  # scheduled: under way, nothing sent yet
    }
    assert (await client.post("/api/campaigns", json=campaign, headers=AUTH)).status == 202
    async with chromium(tmp_path) as page:
        await page.navigate(str(client.make_url("/")))
        await page.until("document.getElementById('updated').textContent.startsWith('updated ')")
        assert await page.eval("document.querySelectorAll('[data-tenant] svg.chart-svg').length") == 6  # 3 per tenant
        # the campaigns panel, redrawn by status.js: the open view shows progress, not the name
        row = "#campaigns tr:not(.empty)"
        assert await page.eval(f"document.querySelectorAll('{row}').length") == 1
        assert await page.text(f"{row} [data-field=progress]") == "0 of 2 \u00b7 0.0%"
        assert await page.eval(f"document.querySelector('{row} progress').max") == 2
        assert not await page.eval("document.body.innerText.includes('Spring sale')")

        # the axes: the count scale fits the busiest minute, the times are the minutes in the JSON
        data = await _json(client)
        points = data["tenants"][0]["activity"]
        peak = max(max(p["inbound"], p["sent"], p["failed"]) for p in points)
        top = charts.nice_max(peak)
        assert await page.eval(f"[...document.querySelectorAll('{COUNTS} .y-axis text')].map(t => t.textContent)") == [
            "0",
            f"{top // 2:,}",
            f"{top:,}",
        ]
        x_labels = await page.eval(f"[...document.querySelectorAll('{COUNTS} .x-axis text')].map(t => t.textContent)")
        assert x_labels[0] == charts.hhmm(points[0]["at"]) and x_labels[-1] == charts.hhmm(points[-1]["at"])
        assert len(x_labels) == charts.X_TICKS
        legend = await page.eval(
            "[...document.querySelectorAll('[data-tenant=\"home\"] .legend b')].map(b => b.textContent)"
        )
        assert legend == ["6", "6", "1"]  # inbound, sent, failed
        bars = await page.eval(f"document.querySelectorAll('{LATENCY} rect.bar').length")
        assert bars >= 1  # the minute(s) of the replies

        # accessible: the SVG is an image named by its title and described by its desc
        named = await page.eval(
            f"(() => {{ const s = document.querySelector('{COUNTS}'); return s.getAttribute('role') + '|' +"
            " s.getAttribute('aria-labelledby').split(' ')"
            ".map(id => document.getElementById(id).textContent).join('|'); })()"
        )
        role, title, desc = named.split("|")
        assert (role, title) == ("img", "home: messages per minute, last hour")
        assert "6 inbound, 6 sent, 1 failed" in desc

        # status.js draws exactly what the server drew (same data: retried across a minute boundary)
        for _ in range(3):
            server = _shapes(_svg_of(await (await client.get("/")).text(), "home", "counts"))
            drawn = _shapes(await page.eval(f"document.querySelector('{COUNTS}').outerHTML"))
            if server == drawn:
                break
            await asyncio.sleep(1)
        else:
            raise AssertionError(f"the page and status.js disagree:\n{server}\n---\n{drawn}")
        kinds = [(tag, attrs.get("class")) for tag, attrs, _ in server]
        assert kinds.count(("path", "line sent")) == kinds.count(("path", "line failed")) == 1
        assert ("rect", "bar inbound") in kinds

        # the screenshot: lines and bars really reach the screen in their colours
        counts = await _chart_shot(page, COUNTS, tmp_path / "chart-counts.png")
        background, _ = counts.most_common(1)[0]
        drawn_pixels = sum(n for c, n in counts.items() if c != background)
        assert drawn_pixels > 2000, drawn_pixels  # grid, axes, labels and three lines
        assert _near(counts, "#8fb3ef", 12) > 50  # the inbound bar (light blue)
        assert _near(counts, "#137333") > 20 and _near(counts, "#b3261e") > 20  # sent (green), failed (red)
        latency = await _chart_shot(page, LATENCY, tmp_path / "chart-latency.png")
        assert _near(latency, "#8a5300") > 10  # the p95 bars (amber)
        if os.environ.get("ALFRED_SCREENSHOT"):
            await page.screenshot(Path(os.environ["ALFRED_SCREENSHOT"]))

        # a new message is drawn on the next poll, without a reload
        await page.eval("window.__sameDocument = 'yes'")
        assert await post_webhook(client, payloads.body_of(payloads.text("one more", id="wamid.CHART9"))) == 200
        await page.until("document.querySelector('[data-tenant=\"home\"] .legend b').textContent === '7'")
        assert await page.eval("window.__sameDocument") == "yes"
        assert page.problems() == []  # no CSP violation, no script error


async def _totals(client: Any, key: str, n: int) -> bool:
    data = await _json(client)
    return sum(p[key] for p in data["tenants"][0]["activity"]) >= n
