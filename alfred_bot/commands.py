"""The operator's commands besides `serve`: simulate, send, status, dead-letters, check-config, archive.

They talk to the running server over loopback HTTP (the API needs `ALFRED_API_TOKEN`), except
where a local read of the database answers as well (listing dead letters, the replies a simulated
message got, and retrying dead letters while the server is stopped). Local reads go through the
store's interfaces in read-only mode (no lock, no writer), so they work on any engine and beside a
running server. Every expected failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from alfred_bot.archive import ArchiveError, S3Archive
from alfred_bot.config import Config, ConfigError, Secrets
from alfred_bot.loader import routers_for
from alfred_bot.privacy import install_key, mask
from alfred_bot.retention import Retention
from alfred_bot.security import sign
from alfred_bot.simulate import KINDS, simulated_body
from alfred_bot.store import Queries, Store, StoreError, configured_store, describe

Tool = Callable[[argparse.Namespace, Config, Secrets], int]
T = TypeVar("T")

# Loopback only: never route the operator's commands through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_url(host: str, port: int, path: str) -> str:
    """A URL for `host`, bracketing IPv6 literals."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def _fail(message: str, code: int = 1) -> int:
    print(f"alfred: {message}", file=sys.stderr)
    return code


def _base_url(cfg: Config, override: str | None = None) -> str:
    if override:
        return override.rstrip("/")
    wildcard = cfg.server.host in ("0.0.0.0", "::", "")  # noqa: S104 (a comparison, not a bind)
    return http_url("127.0.0.1" if wildcard else cfg.server.host, cfg.server.port, "")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register every command of this module on the `python main.py` parser."""
    _simulate_parser(sub, common)
    send = sub.add_parser("send", parents=[common], help="queue a message through the running server's API")
    send.add_argument("--to", required=True, help="phone number in international format, e.g. +15551234567")
    group = send.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="a text message (only inside the 24-hour window)")
    group.add_argument("--template", help="an approved template's name")
    send.add_argument("--language", default="en_US", help="template language (default en_US)")
    send.add_argument("--param", action="append", default=[], help="a template body parameter (repeatable)")
    send.add_argument("--tenant", help="which number sends it (default: the first tenant)")
    send.add_argument("--key", help="idempotency key: sending twice with the same key queues one message")
    send.add_argument("--url", help="server URL (default: from server.host/port)")
    status = sub.add_parser("status", parents=[common], help="the running server's health, queues and outbox")
    status.add_argument("--url", help="server URL (default: from server.host/port)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    dead = sub.add_parser("dead-letters", parents=[common], help="list failed sends, or queue them again")
    dead.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    dead.add_argument("ids", nargs="*", help="outbox ids to retry")
    dead.add_argument("--all", action="store_true", help="retry every failed send")
    dead.add_argument("--tenant", help="only this tenant's (list)")
    dead.add_argument("--limit", type=int, default=50, help="how many to list (default 50)")
    dead.add_argument("--url", help="server URL (default: from server.host/port)")
    sub.add_parser("check-config", parents=[common], help="validate the config, secrets and handlers, then exit")
    sub.add_parser(
        "archive", parents=[common], help="copy rows past retention.hot_days to retention.archive_url, then scrub them"
    )


def _simulate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    sim = sub.add_parser("simulate", parents=[common], help="post a correctly signed webhook to the running server")
    sim.add_argument("--from", dest="sender", required=True, help="the user's phone number, e.g. 15551234567")
    sim.add_argument("--type", dest="kind", choices=KINDS, default="text", help="what the user sends (default text)")
    sim.add_argument("--text", default="", help="the text (or caption, title, contact name)")
    sim.add_argument("--reply-id", default="menu", help="interactive: the tapped button or row id")
    sim.add_argument("--payload", default="yes", help="button: the template button payload")
    sim.add_argument("--emoji", default="👍", help="reaction: the emoji")
    sim.add_argument("--message-id", default="", help="reaction/status: the wamid it refers to")
    sim.add_argument("--state", default="delivered", help="status: sent, delivered, read or failed")
    sim.add_argument("--name", default="Sandbox User", help="the user's profile name")
    sim.add_argument("--tenant", help="which tenant's number receives it (default: the first)")
    sim.add_argument("--url", help="webhook URL (default: from server.host/port)")
    sim.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the reply (default 5)")


# ---------------------------------------------------------------------------- HTTP


def _request(url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes] | None:
    """(status, body) of one request to the local server; None when nothing answers."""
    if not url.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        url, data=body, method="POST" if body is not None else "GET", headers=headers or {}
    )
    try:
        with _opener.open(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError):
        return None


def _api(cfg: Config, secrets: Secrets, path: str, body: Any = None, url: str | None = None) -> Any:
    """JSON from the server's API, or a one-line problem as `str`."""
    if secrets.api_token is None:
        return "ALFRED_API_TOKEN is not set: the API (and this command) need it"
    headers = {"Authorization": f"Bearer {secrets.api_token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    answer = _request(f"{_base_url(cfg, url)}{path}", body=data, headers=headers)
    if answer is None:
        return f"no server at {_base_url(cfg, url)}: start it with `python main.py` first"
    status, raw = answer
    try:
        parsed = json.loads(raw)
    except ValueError:
        return f"HTTP {status} from the server"
    if status >= 400:
        return f"HTTP {status}: {parsed.get('error', raw[:200]) if isinstance(parsed, dict) else status}"
    return parsed


# ---------------------------------------------------------------------------- simulate


def simulate(args: argparse.Namespace, cfg: Config, secrets: Secrets) -> int:
    """Play Meta: post a signed webhook of any type, then show what Alfred queued for it."""
    tenant = args.tenant or next(iter(cfg.tenants))
    if tenant not in cfg.tenants:
        return _fail(f"no tenant {tenant!r} in the config (have: {', '.join(cfg.tenants)})", 2)
    url = args.url or f"{_base_url(cfg)}/webhook"
    wamid = f"wamid.SIM{uuid.uuid4().hex}"
    body = simulated_body(
        args.kind,
        phone_number_id=cfg.tenants[tenant].phone_number_id,
        sender=args.sender,
        name=args.name,
        wamid=wamid,
        text=args.text,
        reply_id=args.reply_id,
        payload=args.payload,
        emoji=args.emoji,
        message_id=args.message_id,
        state=args.state,
    )
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, secrets.app_secrets[0])}
    answer = _request(url, body=body, headers=headers)
    if answer is None:
        return _fail(f"no server at {url}: start it with `python main.py` first")
    print(f"-> POST {url}: HTTP {answer[0]} ({args.kind} {wamid})")
    if answer[0] != 200:
        return 1
    if args.kind != "status":
        _show_replies(_wait_for_replies(cfg, tenant, wamid, args.wait), args.wait)
    return 0


def _show_replies(replies: list[dict[str, Any]], wait: float) -> None:
    for reply in replies:
        if reply["type"] == "read":
            print(f"<- read receipt + typing indicator {reply['state']}")
        else:
            print(f"<- reply {reply['state']} for {reply['to']} ({reply['type']}): {_reply_text(reply)}")
    if not replies:
        print(f"<- no reply queued within {wait:g} s (see the server log)")


def _wait_for_replies(cfg: Config, tenant: str, event_id: str, wait: float) -> list[dict[str, Any]]:
    """Poll until the handler's replies are queued and none is still waiting to be sent."""
    deadline = time.monotonic() + wait
    while True:
        replies = _read_replies(cfg, tenant, event_id)
        settled = replies and all(r["state"] not in ("queued", "sending") for r in replies)
        if settled or time.monotonic() >= deadline:
            return replies
        time.sleep(0.05)


def _read(cfg: Config, query: Callable[[Queries], Awaitable[T]]) -> T:
    """Run one query on a read-only store beside the server (StoreError if it cannot be read)."""

    async def run() -> T:
        store = configured_store(cfg, read_only=True)
        try:
            await store.open()
            return await query(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _read_replies(cfg: Config, tenant: str, event_id: str) -> list[dict[str, Any]]:
    try:
        return _read(cfg, lambda store: store.replies_to(tenant, event_id))
    except StoreError:
        return []  # not written yet (or not readable): the caller polls until its deadline


def _reply_text(reply: dict[str, Any]) -> str:
    payload = reply["payload"] or {}
    text = payload.get("text", {}).get("body")
    return str(text) if text is not None else json.dumps(payload.get(reply["type"]), ensure_ascii=False)


# ---------------------------------------------------------------------------- send / status


def send(args: argparse.Namespace, cfg: Config, secrets: Secrets) -> int:
    """Queue one text or template through POST /api/messages."""
    body: dict[str, Any] = {"to": args.to, "tenant": args.tenant or next(iter(cfg.tenants))}
    if args.text is not None:
        body.update(type="text", text={"body": args.text})
    else:
        template: dict[str, Any] = {"name": args.template, "language": {"code": args.language}}
        if args.param:
            template["components"] = [{"type": "body", "parameters": [{"type": "text", "text": p} for p in args.param]}]
        body.update(type="template", template=template)
    if args.key:
        body["idempotency_key"] = args.key
    result = _api(cfg, secrets, "/api/messages", body, args.url)
    if isinstance(result, str):
        return _fail(result)
    print(f"queued {result['id']} ({result['status']})")
    return 0


def status(args: argparse.Namespace, cfg: Config, secrets: Secrets) -> int:
    """Print the numbers the status page shows (from `/status.json`): the detailed view when
    ALFRED_API_TOKEN is set (pause reasons, failures), else the open one (counts and states)."""
    headers = {"Authorization": f"Bearer {secrets.api_token}"} if secrets.api_token else {}
    answer = _request(f"{_base_url(cfg, args.url)}/status.json", headers=headers)
    if answer is None:
        return _fail(f"no server at {_base_url(cfg, args.url)}: start it with `python main.py` first")
    try:
        data = json.loads(answer[1])
    except ValueError:
        return _fail(f"HTTP {answer[0]}: the server did not answer with JSON")
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        for line in summary_lines(data):
            print(line)
    return 0 if answer[0] == 200 else 1


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A terminal view of `/status.json`."""
    lines = [
        f"Alfred {data.get('version')} — {str(data.get('mode', '?')).upper()} — {data.get('status')} — "
        f"up {data.get('uptime_seconds', 0):.0f} s"
        + (" (open view: set ALFRED_API_TOKEN for details)" if data.get("view") == "open" else "")
    ]
    for tenant in data.get("tenants", []):
        paused = tenant.get("paused")
        pause = f" PAUSED ({paused.get('kind')}: {paused.get('reason') or paused.get('code')})" if paused else ""
        outbox = ", ".join(f"{k} {v}" for k, v in sorted(tenant.get("outbox", {}).items())) or "empty"
        lines.append(
            f"  {tenant.get('name')}: in {tenant.get('inbound_per_minute', 0)}/min, "
            f"out {tenant.get('outbound_per_minute', 0)}/min (limit {tenant.get('rate_limit')}/s), "
            f"outbox: {outbox}{pause}"
        )
    queues = data.get("queues", {})
    if queues:
        lines.append("  queues: " + ", ".join(f"{k} {v}" for k, v in queues.items()))
    lines += _node_lines(data) + _redis_lines(data.get("redis")) + _campaign_lines(data.get("campaigns") or [])
    return lines + _attention_lines(data.get("attention") or [])


def _node_lines(data: dict[str, Any]) -> list[str]:
    """Several nodes on one database: how many are alive, by role (one node says nothing)."""
    nodes = [n for n in data.get("nodes") or [] if isinstance(n, dict)]
    if len(nodes) < 2 and data.get("role", "all") == "all":
        return []
    alive = [n for n in nodes if n.get("alive")]
    roles = Counter(str(n.get("role")) for n in alive)
    by_role = ", ".join(f"{role} {count}" for role, count in sorted(roles.items()))
    return [f"  nodes: {len(alive)} alive of {len(nodes)} ({by_role or 'none'}); this one: {data.get('role')}"]


def _redis_lines(redis: Any) -> list[str]:
    """The event bus and shared pacing, when Redis is configured."""
    if not isinstance(redis, dict):
        return []
    pacing, relay = redis.get("pacing") or {}, redis.get("relay") or {}
    return [
        f"  redis: {redis.get('status')}, pacing {pacing.get('mode')}"
        + (f" ({pacing['nodes_on_redis']} nodes on Redis)" if pacing.get("nodes_on_redis") is not None else "")
        + f", bus relay backlog {relay.get('backlog')}"
    ]


def _campaign_lines(rows: list[Any]) -> list[str]:
    """Campaigns under way: progress and delivery (names in the detailed view only)."""
    lines = []
    for row in (r for r in rows if isinstance(r, dict)):
        ratios = [f"{label} {row[key]:.0%}" for label, key in (("delivered", "delivered_ratio"), ("read", "read_ratio"))
                  if isinstance(row.get(key), (int, float))]  # fmt: skip
        lines.append(
            f"  campaign {row.get('name') or row.get('tenant')}: {row.get('state')}, "
            f"{row.get('done', 0)}/{row.get('total', 0)} done" + "".join(f", {r}" for r in ratios)
        )
    return ["".join(c if c.isprintable() else "?" for c in line) for line in lines]  # names are the operator's


def _attention_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Meta's account, template and quality updates that need someone (newest first)."""
    lines = [
        f"  NEEDS ATTENTION: {row.get('tenant') or 'account'}: {row.get('kind')}"
        + (f" ({row['detail']})" if row.get("detail") else "")
        for row in rows
    ]
    # Meta's texts (template names, reasons) reach a terminal: no escape sequences through
    return ["".join(c if c.isprintable() else "?" for c in line) for line in lines]


# ---------------------------------------------------------------------------- dead letters


def dead_letters(args: argparse.Namespace, cfg: Config, secrets: Secrets) -> int:
    """List failed sends (read locally), or retry some/all (through the server, or locally if it is down)."""
    if args.action == "list":
        return _list_dead(cfg, args.tenant, args.limit)
    if not args.ids and not args.all:
        return _fail("dead-letters retry: give outbox ids or --all", 2)
    body: dict[str, Any] = {"all": True} if args.all else {"ids": args.ids}
    result = _api(cfg, secrets, "/api/dead-letters/retry", body, args.url)
    if isinstance(result, str) and result.startswith("no server"):
        return _retry_locally(cfg, None if args.all else list(args.ids))
    if isinstance(result, str):
        return _fail(result)
    print(f"queued again: {result['retried']}")
    return 0


def _list_dead(cfg: Config, tenant: str | None, limit: int) -> int:
    try:
        rows = _read(cfg, lambda store: store.dead_letters(max(1, limit), tenant))
    except StoreError as exc:
        return _fail(f"cannot list dead letters: {exc}")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["created_at"]))
        print(
            f"{row['id']}  {when}Z  {row['tenant']}  {mask(row['to'])}  {row['type']}  "
            f"attempts {row['attempts']}  code {row['error_code']}: {row['error_message'] or ''}"
        )
    print(f"{len(rows)} dead letter(s)")
    return 0


def _retry_locally(cfg: Config, ids: list[str] | None) -> int:
    """The server is down: open the store for writing ourselves (on SQLite this takes the
    database lock, so a server starting meanwhile waits for us) and queue the rows again."""

    async def run() -> int:
        store: Store = configured_store(cfg)
        try:
            await store.open()
            return await store.retry_dead(ids, time.time())
        finally:
            await store.close()

    try:
        retried = asyncio.run(run())
    except StoreError as exc:
        return _fail(f"cannot retry: {exc}")
    print(f"queued again: {retried} (the server sends them when it starts)")
    return 0


# ---------------------------------------------------------------------------- check-config


def check_config(cfg: Config, secrets: Secrets) -> int:
    """Load everything `serve` would (handlers included) and say what would run; never a secret."""
    routers = routers_for(cfg)
    print(f"config ok: {secrets.mode} mode, storage {describe(cfg)}")
    for name, tenant in cfg.tenants.items():
        token = tenant.access_token_env if name in secrets.tenant_tokens else "WHATSAPP_ACCESS_TOKEN"
        signed_by = tenant.app_secret_env if name in secrets.tenant_app_secrets else "WHATSAPP_APP_SECRET"
        if name not in secrets.tenant_app_secrets and not secrets.app_secret_from_env:
            signed_by = "the sandbox secret file"
        print(
            f"  tenant {name}: phone_number_id {tenant.phone_number_id}, handler {cfg.handler_for(name)} "
            f"({routers[name].name or 'unnamed router'}), token from {token if secrets.token_for(name) else 'none'}, "
            f"app secret from {signed_by}"
        )
    orch = cfg.orchestrator
    key = f" (key from {orch.api_key_env})" if secrets.orchestrator_key else ""
    print(f"  orchestrator: {orch.url or 'off'}{key}")
    archive_to = S3Archive.from_config(cfg.retention, os.environ)  # missing credentials: ConfigError, exit 2
    print(f"  archive: {archive_to.location + ' (keys from AWS_ACCESS_KEY_ID)' if archive_to else 'off'}")
    lim = cfg.limits
    print(f"  inbound limit: {lim.inbound_per_user or 'off'} per user per {lim.inbound_window_seconds:g} s")
    for missing in secrets.missing():
        print(f"  not set: {missing}")
    return 0


# ---------------------------------------------------------------------------- archive


def archive(args: argparse.Namespace, cfg: Config, secrets: Secrets) -> int:
    """Archive and scrub now what the retention job would (it does so every pass by itself)."""
    if not cfg.retention.archive_url:
        return _fail("retention.archive_url is not set: there is nowhere to archive to", 2)
    done = {"archived": 0, "objects": 0, "scrubbed": 0}
    try:
        where = asyncio.run(_archive(cfg, done))
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    except StoreError as exc:
        return _fail(f"cannot archive: {exc} (a running server archives by itself each retention pass)")
    except ArchiveError as exc:
        print(f"archived {done['archived']} row(s) in {done['objects']} object(s) before the failure", file=sys.stderr)
        return _fail(f"archive failed, the rest stays unscrubbed: {exc}")
    print(f"archived {done['archived']} row(s) in {done['objects']} object(s) to {where}; scrubbed {done['scrubbed']}")
    return 0


async def _archive(cfg: Config, done: dict[str, int]) -> str:
    job_cfg = cfg.retention
    store: Store = configured_store(cfg)
    key = install_key(Path(cfg.storage.path).parent)  # the server's key: the same pseudonyms
    job = Retention(store, job_cfg, key, cfg.media_dir(), media_days=cfg.media.retention_days)
    await store.open()
    try:
        await job.archive_once(done)
    finally:
        await store.close()
    return job.archive.location if job.archive else job_cfg.archive_url


TOOLS: dict[str, Tool] = {
    "simulate": simulate,
    "send": send,
    "status": status,
    "dead-letters": dead_letters,
    "archive": archive,
}
