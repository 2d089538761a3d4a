"""Command line: `python main.py [serve]` serves; the other commands live in `commands.py`.

Every expected failure (bad config, port in use, unreachable server) ends with one clear line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from yarl import URL

from alfred_bot import __version__, commands, privacy
from alfred_bot.app import ROLES, create_app
from alfred_bot.commands import http_url
from alfred_bot.config import Config, ConfigError, Secrets, database_url, load_config, load_secrets, sandbox_secret
from alfred_bot.logs import setup_logging
from alfred_bot.simulate import text_webhook
from alfred_bot.store import StoreError, describe

__all__ = ["announce", "main", "serve", "text_webhook"]

log = logging.getLogger("alfred.main")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (default ./config.toml)")
    parser = argparse.ArgumentParser(
        prog="python main.py", parents=[common], description="Alfred, a WhatsApp Cloud API bot runtime."
    )
    parser.add_argument("--version", action="version", version=f"alfred {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_help = "serve the webhook, API and workers (the default)"
    run = sub.add_parser("serve", aliases=["run"], parents=[common], help=serve_help, description=serve_help)
    for p in (parser, run):
        p.add_argument("--host", help="listen address (overrides server.host)")
        p.add_argument("--port", type=int, help="listen port (overrides server.port)")
        p.add_argument(
            "--role",
            choices=ROLES,
            default="all",
            help="all (default) | web: webhooks, API and page | worker: handlers and sends (needs PostgreSQL)",
        )
    commands.add_parsers(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(getattr(args, "config", Path("config.toml")))
        secrets = load_secrets(sandbox=_sandbox_secret(cfg), cfg=cfg)
        if args.command == "check-config":
            return commands.check_config(cfg, secrets)
    except ConfigError as exc:
        print(f"alfred: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"alfred: cannot start: {exc}", file=sys.stderr)
        return 1
    if args.command in commands.TOOLS:
        return commands.TOOLS[args.command](args, cfg, secrets)
    return serve(cfg, secrets, host=args.host, port=args.port, role=args.role)


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
    for name, tenant in cfg.tenants.items():
        if name in secrets.tenant_tokens or name in secrets.tenant_app_secrets:
            log.info("tenant %s uses its own credentials (%s)", name, tenant.access_token_env or tenant.app_secret_env)
    if cfg.orchestrator.url:
        where = URL(cfg.orchestrator.url).with_user(None).with_query(None)  # never log credentials in a URL
        log.info("orchestrator: texts no route claims go to %s", where)
    _announce_storage(cfg)


def _announce_storage(cfg: Config) -> None:
    log.info("storage: %s", describe(cfg))
    if database_url(cfg) and not os.environ.get(privacy.KEY_ENV, "").strip():
        log.warning("%s is not set: each node pseudonymises old numbers with its own key", privacy.KEY_ENV)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (about 25 % more webhooks per second in bench/ingest.py), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415 (optional at import time: the stdlib loop works too)
    except ImportError:  # pragma: no cover (uvloop is in requirements.txt)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _tune_gc() -> None:
    """Fewer, cheaper collections: a busy bot allocates many short-lived objects per webhook and
    keeps many long-lived ones (queues, limiter state); with the default thresholds full
    collections ran often enough to stall the loop (bench/burst.py: p99 109 → 69 ms, 1,221 →
    1,866 webhooks/s, RSS unchanged). What is loaded at start-up is frozen out of collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 1000)


def serve(
    cfg: Config, secrets: Secrets, *, host: str | None = None, port: int | None = None, role: str = "all"
) -> int:
    """Run the server until SIGINT/SIGTERM, as `role` (see `app.create_app`)."""
    setup_logging(cfg.logging.level, cfg.logging.format, cfg.logging.library_level)
    announce(cfg, secrets)
    host = host or cfg.server.host
    port = cfg.server.port if port is None else port
    try:
        if not 1 <= port <= 65535:
            raise ConfigError(f"--port: must be between 1 and 65535, got {port}")
        app = create_app(cfg, secrets, role=role)
        log.info("role: %s", role)
        _tune_gc()
        # Bind before the app starts, so a busy port fails before the store or workers run.
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        log.info("listening on %s", http_url(host, port, "/"))
        # On SIGTERM, requests in flight get the grace too (then handlers, then sends get theirs).
        grace = cfg.dispatch.shutdown_grace_seconds
        web.run_app(app, sock=sock, print=None, access_log=None, shutdown_timeout=grace, loop=_new_loop())
    except ConfigError as exc:
        print(f"alfred: config error: {exc}", file=sys.stderr)
        return 2
    except (OSError, StoreError) as exc:
        print(f"alfred: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


