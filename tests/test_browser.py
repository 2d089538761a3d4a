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
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
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
