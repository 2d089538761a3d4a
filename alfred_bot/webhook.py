"""Meta's webhook: the verify handshake (GET) and updates (POST).

The POST handler is deliberately thin and strictly ordered:
signature present → no content encoding → size → body read (bounded in time, charged to the
body budget as it arrives) → signature valid → decode → durable commit → 200. A 200 is Meta's
only signal to stop retrying, so it is sent only after the commit; anything that prevents the
commit is a 5xx and Meta redelivers.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from alfred_bot import keys, tracing
from alfred_bot.config import Secrets
from alfred_bot.logs import RateLimit, bound, new_trace_id
from alfred_bot.parse import EnvelopeError, InboundItem, ParsedBody, parse_body
from alfred_bot.prometheus import event_field_label, message_type_label
from alfred_bot.security import BodyLease, identity_encoding, signature_scopes, token_ok
from alfred_bot.store import StoreError

log = logging.getLogger("alfred.webhook")


async def verify(request: web.Request) -> web.Response:
    """Answer Meta's subscription handshake: echo `hub.challenge` when the verify token matches."""
    query = request.query
    expected = request.app[keys.SECRETS].verify_token
    challenge = query.get("hub.challenge")
    if (
        query.get("hub.mode") == "subscribe"
        and challenge is not None
        and token_ok(query.get("hub.verify_token"), expected)
    ):
        log.info("webhook verified by Meta")
        return web.Response(text=challenge, content_type="text/plain")
    log.warning("webhook verification refused")
    return web.Response(status=403, text="verification failed")


#: Refusals whose cause is anyone's to choose: one WARNING each would let them fill the disk.
_REFUSALS = RateLimit(per_minute=30)


def _refuse(request: web.Request, status: int, reason: str, *, close: bool = False) -> web.Response:
    """Count, log (rate-limited) and answer a refusal; `close` when the body was left unread."""
    request.app[keys.TELEMETRY].webhook_answered(status)
    allowed, missed = _REFUSALS.allow()
    if allowed:
        more = f" ({missed} more refusals not logged in the last minute)" if missed else ""
        log.warning("webhook refused with %d: %s%s", status, reason, more)
    response = web.Response(status=status, text=reason)
    if close or status in (408, 413):
        response.force_close()  # the unread rest of the body makes the connection unusable
    return response


class _OverBudget(Exception):
    """The bytes that arrived do not fit in the body budget (global, per peer or the reserve)."""


class _TooLarge(Exception):
    """More bytes arrived than `webhook.max_body_bytes` (a chunked body has no length to check first)."""


def _check_headers(request: web.Request, signature: str | None) -> web.Response | None:
    """What the headers alone refuse, before a byte of the body is read (the connection is then
    closed: otherwise aiohttp would keep reading and discarding the unread body for a while)."""
    if not signature:
        return _refuse(request, 403, "missing X-Hub-Signature-256", close=request.body_exists)
    if not identity_encoding(request.headers.get("Content-Encoding")):
        # Meta sends no compressed webhooks; a compressed body would slip past every byte cap
        return _refuse(request, 415, "Content-Encoding is not supported (send the body as is)", close=True)
    cap = request.app[keys.CONFIG].webhook.max_body_bytes
    if request.content_length is not None and request.content_length > cap:
        return _refuse(request, 413, f"body larger than {cap} bytes")
    return None


async def _read_body(request: web.Request) -> bytes | web.Response:
    """Read the body as it arrives, charging each chunk to the body budget (see `BodyBudget`).

    413 as soon as a chunked body passes the cap (a declared length was checked before);
    408 when the whole body is not in by `body_timeout_seconds` (however it drips); 503 when
    what arrived does not fit the budget; 400 for a body the HTTP layer cannot frame.
    """
    cfg = request.app[keys.CONFIG].webhook
    length = request.content_length
    too_large = f"body larger than {cfg.max_body_bytes} bytes"
    lease = request.app[keys.BODY_BUDGET].lease(_peer(request, cfg.client_ip_header), length)
    try:
        async with asyncio.timeout(cfg.body_timeout_seconds):
            return await _read_charged(request, lease, cfg.max_body_bytes)
    except TimeoutError:
        return _refuse(request, 408, "body not received in time")
    except _TooLarge:
        return _refuse(request, 413, too_large)
    except _OverBudget:
        return _refuse(request, 503, "too many request bodies in flight", close=True)
    except (HttpProcessingError, ConnectionError) as exc:
        return _refuse(request, 400, f"body could not be read ({type(exc).__name__})", close=True)
    finally:
        lease.release()


async def _read_charged(request: web.Request, lease: BodyLease, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        if not lease.charge(len(chunk)):
            raise _OverBudget
        chunks.append(chunk)
    return b"".join(chunks)


def _peer(request: web.Request, header: str) -> str:
    """Who holds the bytes, for the per-peer cap: the remote address, or behind a proxy that
    sets it, the client address header (`webhook.client_ip_header`)."""
    if header:
        forwarded = request.headers.get(header, "").strip()
        if forwarded:
            return forwarded[:64]
    return request.remote or "?"


async def receive(request: web.Request) -> web.Response:
    """Accept one POST of updates: 200 only once every update in it is committed.

    Every log line it causes (here, in dispatch and in the sends of its replies) carries one
    trace id: the caller's `X-Trace-Id` when sane, else a new one; it is echoed in the answer.
    """
    trace_id = new_trace_id(request.headers.get("X-Trace-Id"))
    with bound(trace_id=trace_id), tracing.root("webhook", trace_id, {}) as span:
        if request.app[keys.DRAINING].is_set():
            response = _refuse(request, 503, "shutting down: Meta will redeliver")
        else:
            response = await _receive(request, trace_id)
        tracing.annotate(span, {"http.response.status_code": response.status})
    response.headers["X-Trace-Id"] = trace_id
    return response


async def _receive(request: web.Request, trace_id: str) -> web.Response:
    app = request.app
    received_at = time.time()
    header = request.headers.get("X-Hub-Signature-256")
    refused = _check_headers(request, header)
    if refused is not None:
        return refused
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    secrets = app[keys.SECRETS]
    scopes = signature_scopes(body, header, keyring(secrets))
    if not scopes:
        return _refuse(request, 403, "invalid signature")
    try:
        tenants = app[keys.TENANTS]
        parsed = parse_body(body, tenants, trace_id=trace_id, received_at=received_at, wabas=app[keys.WABAS])
    except EnvelopeError as exc:
        return _refuse(request, 400, str(exc))
    foreign = _outside_scope(parsed, scopes, frozenset(secrets.tenant_app_secrets))
    if foreign:
        return _refuse(request, 403, f"signature does not cover phone number or account id {foreign}")
    return await _store(request, parsed)


def keyring(secrets: Secrets) -> dict[str | None, tuple[str, ...]]:
    """Secret owners: None (the global app secret) and each tenant with its own app secret."""
    ring: dict[str | None, tuple[str, ...]] = {None: secrets.app_secrets}
    ring.update(secrets.tenant_app_secrets)
    return ring


def _outside_scope(parsed: ParsedBody, scopes: set[str | None], own: frozenset[str]) -> str | None:
    """The first phone number id in `parsed` that the matching secret may not speak for.

    A tenant with its own app secret accepts only bodies signed with it; the global secret
    speaks for every other tenant and for numbers no tenant owns (stored as unrouted). So a
    body signed by one tenant's app can never inject messages for another tenant's number.
    """
    items: list[tuple[str | None, str | None]] = [(m.tenant, m.phone_number_id) for m in parsed.messages]
    items += [(s.tenant, s.phone_number_id) for s in parsed.statuses]
    # account-level fields (template status, …) of a WABA no tenant claims alone: any configured
    # app may send them; a WABA that `tenants.NAME.waba_id` ties to one tenant is that tenant's
    items += [(e.tenant, e.phone_number_id or e.waba_id) for e in parsed.events if e.phone_number_id or e.tenant]
    for tenant, pnid in items:
        allowed = tenant in scopes or (tenant not in own and None in scopes)
        if not allowed:
            return pnid or "(none)"
    return None


async def _store(request: web.Request, parsed: ParsedBody) -> web.Response:
    app = request.app
    try:
        with tracing.child("commit", {"alfred.updates": len(parsed.messages) + len(parsed.statuses)}) as span:
            fresh = await app[keys.STORE].ingest(parsed)
            tracing.annotate(span, {"alfred.fresh": len(fresh)})
    except StoreError as exc:
        log.error("webhook not stored, Meta will retry: %s", exc)
        return _refuse(request, 503, "temporarily unable to store the update")
    except Exception:  # an unforeseen item must never become a 500 that hides its siblings
        log.exception("webhook not stored (unexpected error), Meta will retry")
        return _refuse(request, 503, "temporarily unable to store the update")
    app[keys.DISPATCHER].offer(fresh)
    telemetry = app[keys.TELEMETRY]
    for item in fresh:
        if isinstance(item, InboundItem):
            telemetry.received(item.tenant, item.message.type)
    _count(app, parsed, sum(1 for item in fresh if isinstance(item, InboundItem)))
    return web.Response(text="OK")


def _count(app: web.Application, parsed: ParsedBody, fresh: int) -> None:
    telemetry = app[keys.TELEMETRY]
    telemetry.webhook_answered(200)
    metrics, stats = telemetry.metrics, telemetry.webhook
    for event in parsed.events:
        metrics.events.labels(event.tenant or "", event_field_label(event.field)).inc()
    stats["messages_new"] += fresh
    broken = [m for m in parsed.messages if m.parse_error is not None]
    for item in broken:  # stored and routed as unknown; counted per delivery (a redelivery counts again)
        metrics.parse_errors.labels(item.tenant or "", message_type_label(item.message.type)).inc()
    if broken:
        stats["parse_errors"] += len(broken)
    if parsed.skipped:
        stats["items_skipped"] += parsed.skipped
    unrouted = sum(1 for m in parsed.messages if m.tenant is None)
    unrouted += sum(1 for s in parsed.statuses if s.tenant is None)
    unrouted += sum(1 for e in parsed.events if e.phone_number_id is not None and e.tenant is None)
    if unrouted:
        stats["updates_unrouted"] += unrouted
        log.warning("%d update(s) for a phone number id no tenant owns: stored, not dispatched", unrouted)
