"""The `Host` check: with `server.public_hosts` set, a request naming any other host gets 421.

Why: DNS rebinding. A web page an operator visits can point its own domain at 127.0.0.1 (or at
the VM's address) and then read `/`, `/status.json` or `/metrics` from the operator's browser as
if it were same-origin. The browser still sends the attacker's name in `Host`, so answering only
to the names we are published under defeats it. Loopback names and addresses are always
accepted (a rebinding page cannot make a browser send them for its own origin), so Docker's
health check, `curl localhost` and the command line keep working; so is `server.host` when it
is a specific address. The check covers every route, `/webhook` too (Meta calls it by the public
name). The 421 carries no body: nothing about the server is told to a misdirected caller.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from alfred_bot import keys

log = logging.getLogger("alfred.hosts")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
LOG_EVERY = 60.0  # seconds between two warnings about refused hosts (attackers choose the rate)
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 (listen-anywhere addresses are not names)


def host_name(header: str | None) -> str | None:
    """The name of a `Host` header, lower-case, without port or IPv6 brackets (None if unusable)."""
    if not header:
        return None
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:8080
        end = value.find("]")
        return value[1:end] if end > 1 else None
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.partition(":")[0]
    return value.rstrip(".") or None


def is_private_address(name: str) -> bool:
    """A private IP literal (10/8, 172.16/12, 192.168/16, fc00::/7 — Fly's 6PN, a VPC): what a
    platform's health checker or metrics scraper puts in `Host`. A DNS-rebinding page cannot: the
    browser sends the attacker's *name*, so accepting these costs the defence nothing."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return any(address in net for net in PRIVATE_NETWORKS if net.version == address.version)


#: RFC 1918 and RFC 4193 unique-local addresses (not `is_private`, which also covers the
#: documentation ranges: those stay foreign).
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def is_loopback(name: str) -> bool:
    """`localhost` and friends, `*.localhost` (RFC 6761), 127.0.0.0/8 and ::1."""
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(public_hosts: Iterable[str], listen_host: str) -> frozenset[str]:
    """The names accepted besides loopback: the configured ones and a specific listen address."""
    names = {host_name(h) for h in public_hosts}
    if listen_host not in _WILDCARDS:
        names.add(host_name(listen_host))
    return frozenset(n for n in names if n)


def make_host_check(public_hosts: Iterable[str], listen_host: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware for `create_app` (with no public hosts configured it lets everything through)."""
    hosts = list(public_hosts)
    allowed = allowed_hosts(hosts, listen_host)
    last_warning = [0.0]

    @web.middleware
    async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not hosts:
            return await handler(request)
        name = host_name(request.headers.get("Host"))
        if name is not None and (name in allowed or is_loopback(name) or is_private_address(name)):
            return await handler(request)
        request.app[keys.TELEMETRY].webhook["host_refused"] += 1
        now = time.monotonic()
        if now - last_warning[0] >= LOG_EVERY:
            last_warning[0] = now
            log.warning("refused a request for host %r (not in server.public_hosts)", (name or "")[:100])
        return web.Response(status=421)

    return host_check
