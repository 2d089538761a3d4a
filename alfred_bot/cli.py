"""Command line: `python main.py [run]` serves; `python main.py simulate …` plays Meta.

Every expected failure (bad config, port in use, unreachable server) ends with one clear line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from alfred_bot import __version__
from alfred_bot.app import create_app
from alfred_bot.config import Config, ConfigError, Secrets, load_config, load_secrets, sandbox_secret
from alfred_bot.logs import setup_logging
from alfred_bot.security import sign
from alfred_bot.store import StoreError

log = logging.getLogger("alfred.main")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (default ./config.toml)")
    parser = argparse.ArgumentParser(
        prog="python main.py", parents=[common], description="Alfred, a WhatsApp Cloud API bot runtime."
    )
    parser.add_argument("--version", action="version", version=f"alfred {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", parents=[common], help="serve the webhook, API and workers (the default)")
    for p in (parser, run):
        p.add_argument("--host", help="listen address (overrides server.host)")
        p.add_argument("--port", type=int, help="listen port (overrides server.port)")
    sim = sub.add_parser(
        "simulate", parents=[common], help="post a correctly signed text webhook to the running server"
    )
    sim.add_argument("--from", dest="sender", required=True, help="the user's phone number, e.g. 15551234567")
    sim.add_argument("--text", required=True, help="the message text")
    sim.add_argument("--name", default="Sandbox User", help="the user's profile name")
    sim.add_argument("--tenant", help="which tenant's number receives it (default: the first)")
    sim.add_argument("--url", help="webhook URL (default: from server.host/port)")
    sim.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the reply (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(getattr(args, "config", Path("config.toml")))
        secrets = load_secrets(sandbox=_sandbox_secret(cfg))
    except ConfigError as exc:
        print(f"alfred: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"alfred: cannot start: {exc}", file=sys.stderr)
        return 1
    if args.command == "simulate":
        return simulate(args, cfg, secrets)
    return serve(cfg, secrets, host=args.host, port=args.port)


def _sandbox_secret(cfg: Config) -> str:
    """Only touch the data folder for a sandbox secret when no real app secret is set."""
    if os.environ.get("WHATSAPP_APP_SECRET", "").strip():
        return ""
    return sandbox_secret(cfg.storage.path)


def announce(cfg: Config, secrets: Secrets) -> None:
    """The first log lines: which mode this is and what is missing, so nobody has to guess."""
    log.info("Alfred %s starting in %s mode, tenants: %s", __version__, secrets.mode.upper(), ", ".join(cfg.tenants))
    missing = set(secrets.missing())
    if secrets.mode == "sandbox":
        log.warning(
            "SANDBOX mode: WHATSAPP_ACCESS_TOKEN is not set, "
            "so sends go to a local sink with sandbox wamids (nothing is sent to Meta)"
        )
    if "WHATSAPP_APP_SECRET" in missing:
        log.warning(
            "WHATSAPP_APP_SECRET is not set: webhooks are verified with this install's random sandbox "
            "secret (kept beside the database; `python main.py simulate` uses it)"
        )
    if "WHATSAPP_VERIFY_TOKEN" in missing:
        log.warning("WHATSAPP_VERIFY_TOKEN is not set: GET /webhook refuses Meta's verification handshake")
    if "ALFRED_API_TOKEN" in missing:
        log.warning("ALFRED_API_TOKEN is not set: /api/* is disabled")
    log.info("storage: %s", cfg.storage.path)


def serve(cfg: Config, secrets: Secrets, *, host: str | None = None, port: int | None = None) -> int:
    """Run the server until SIGINT/SIGTERM."""
    setup_logging(cfg.logging.level, cfg.logging.format)
    announce(cfg, secrets)
    host = host or cfg.server.host
    port = cfg.server.port if port is None else port
    try:
        if not 1 <= port <= 65535:
            raise ConfigError(f"--port: must be between 1 and 65535, got {port}")
        app = create_app(cfg, secrets)
        # Bind before the app starts, so a busy port fails before the store or workers run.
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        log.info("listening on %s", _http_url(host, port, "/"))
        web.run_app(app, sock=sock, print=None, access_log=None, shutdown_timeout=10)
    except ConfigError as exc:
        print(f"alfred: config error: {exc}", file=sys.stderr)
        return 2
    except (OSError, StoreError, sqlite3.Error) as exc:
        print(f"alfred: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _http_url(host: str, port: int, path: str) -> str:
    """A URL for `host`, bracketing IPv6 literals."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def text_webhook(phone_number_id: str, sender: str, name: str, text: str, wamid: str) -> bytes:
    """A text-message webhook as Meta sends it (escaped-unicode JSON)."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": phone_number_id, "phone_number_id": phone_number_id},
        "contacts": [{"profile": {"name": name}, "wa_id": sender}],
        "messages": [
            {"from": sender, "id": wamid, "timestamp": str(int(time.time())), "type": "text", "text": {"body": text}}
        ],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "0", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(body, ensure_ascii=True).encode()


def simulate(args: argparse.Namespace, cfg: Config, secrets: Secrets) -> int:
    """Play Meta: post a signed text webhook, then show the reply Alfred queued for it."""
    tenant = args.tenant or next(iter(cfg.tenants))
    if tenant not in cfg.tenants:
        print(f"alfred: no tenant {tenant!r} in the config (have: {', '.join(cfg.tenants)})", file=sys.stderr)
        return 2
    wildcard = cfg.server.host in ("0.0.0.0", "::", "")  # noqa: S104 (a comparison, not a bind)
    host = "127.0.0.1" if wildcard else cfg.server.host
    url = args.url or _http_url(host, cfg.server.port, "/webhook")
    wamid = f"wamid.SIM{uuid.uuid4().hex}"
    body = text_webhook(cfg.tenants[tenant].phone_number_id, args.sender, args.name, args.text, wamid)
    status = _post(url, body, sign(body, secrets.app_secrets[0]))
    if status is None:
        print(f"alfred: no server at {url}: start it with `python main.py` first", file=sys.stderr)
        return 1
    print(f"-> POST {url}: HTTP {status} (message {wamid})")
    if status != 200:
        return 1
    replies = _wait_for_replies(Path(cfg.storage.path), wamid, args.wait)
    for reply in replies:
        if reply["type"] == "read":
            print(f"<- read receipt + typing indicator {reply['state']}")
        else:
            print(f"<- reply {reply['state']} for {reply['recipient']} ({reply['type']}): {_reply_text(reply)}")
    if not replies:
        print(f"<- no reply queued within {args.wait:g} s (see the server log)")
    return 0


def _post(url: str, body: bytes, signature: str) -> int | None:
    if not url.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        url, data=body, method="POST", headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _wait_for_replies(db: Path, event_id: str, wait: float) -> list[dict[str, Any]]:
    """Poll until the handler's replies are queued and none is still waiting to be sent."""
    deadline = time.monotonic() + wait
    while True:
        replies = _read_replies(db, event_id)
        settled = replies and all(r["state"] not in ("queued", "sending") for r in replies)
        if settled or time.monotonic() >= deadline:
            return replies
        time.sleep(0.05)


def _read_replies(db: Path, event_id: str) -> list[dict[str, Any]]:
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT recipient, type, payload, state FROM outbox WHERE source_event_id = ? ORDER BY idem_key",
            (event_id,),
        ).fetchall()
        return [dict(row) for row in rows]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def _reply_text(reply: dict[str, Any]) -> str:
    payload = json.loads(reply["payload"])
    text = payload.get("text", {}).get("body")
    return str(text) if text is not None else json.dumps(payload.get(reply["type"]), ensure_ascii=False)
