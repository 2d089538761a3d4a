"""Operator endpoints: `/healthz` (open) and `/api/*` (Bearer `ALFRED_API_TOKEN`)."""

from __future__ import annotations

import re
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam
from prometheus_client import CONTENT_TYPE_LATEST

from alfred_bot import __version__, keys
from alfred_bot.bus.health import redis_health
from alfred_bot.config import Config
from alfred_bot.media import MediaError, check_upload, kind_for
from alfred_bot.message_templates import check_send
from alfred_bot.schedule import parse_send_at
from alfred_bot.security import api_token_of, token_ok
from alfred_bot.statuspage.numbers import health
from alfred_bot.store import OutboxRow, StoreError, new_outbox_id
from alfred_bot.validate import InvalidMessage, addressee, is_group, validate_send

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 1000
WINDOW_SECONDS = 24 * 3600


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def error(status: int, message: str) -> web.Response:
    """Every API error is JSON with one `error` line (never a secret, never a traceback)."""
    return json_response({"error": message}, status)


@web.middleware
async def api_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard `/api/*` with a constant-time token check (`Authorization: Bearer` or `X-API-Key`);
    an unset token refuses everyone."""
    if request.path.startswith("/api/"):
        expected = request.app[keys.SECRETS].api_token
        if expected is None:
            return error(401, "the API is disabled: set ALFRED_API_TOKEN to enable it")
        if not token_ok(api_token_of(request.headers), expected):
            return error(401, "missing or wrong API token (Authorization: Bearer or X-API-Key)")
    return await handler(request)


class BadRequest(web.HTTPBadRequest):
    """A 400 with the API's JSON error shape, raised from helpers deep in a handler."""

    def __init__(self, message: str) -> None:
        super().__init__(text=msgspec.json.encode({"error": message}).decode(), content_type="application/json")


async def read_json(request: web.Request) -> Any:
    """The request body decoded as JSON; anything else is a 400 naming why (raised as `BadRequest`).

    Not JSON, not UTF-8, empty, nested deeper than the decoder goes (msgspec raises
    RecursionError, which was a 500), or a transfer the HTTP layer could not frame (broken
    chunked encoding). Bodies above the app's `client_max_size` are aiohttp's 413.
    """
    try:
        raw = await request.read()
    except HttpProcessingError as exc:
        raise BadRequest(f"body could not be read ({type(exc).__name__})") from None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise BadRequest("body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None


async def healthz(request: web.Request) -> web.Response:
    """200 while the store answers and handler workers run; 503 otherwise (for probes)."""
    app = request.app
    dispatcher, sender, store = app[keys.DISPATCHER], app[keys.SENDER], app[keys.STORE]
    telemetry = app[keys.TELEMETRY]
    state = await health(app)
    store_ok = state.store_ok
    outbox = await store.outbox_counts() if store_ok else {}
    body = {
        "status": state.status,
        "mode": app[keys.SECRETS].mode,
        "version": __version__,
        "uptime_seconds": round(time.time() - app[keys.STARTED_AT], 1),
        "store": {"status": "ok" if store_ok else "unavailable", **store.stats()},
        "dispatcher": {
            "running": dispatcher.running,
            "queue": dispatcher.queue.qsize(),
            "queue_size": dispatcher.queue.maxsize,
            "backlog": dispatcher.backlog,
            "handler_limit": dispatcher.admission.limit,  # of dispatch.workers, lower while the process is busy
            "loop_lag_ms": round(dispatcher.admission.lag * 1000, 1),  # how late the 0.1 s timer fired
            "cpu": round(dispatcher.admission.cpu, 2),  # the process's share of one core, last 0.1 s
            "handler_limit_cuts": dispatcher.admission.cuts,
            **telemetry.dispatch,
        },
        "sender": {
            "running": sender.running,
            "workers": sender.workers,
            "queue": sender.queued,
            # open endpoint: kind and code only; the reason is in the authenticated /api/tenants
            "paused": {name: {"kind": p.kind, "code": p.code, "since": p.since} for name, p in sender.pauses.items()},
            **telemetry.sender,
        },
        "outbox": outbox,
        "webhook": dict(telemetry.webhook),
    }
    redis = await redis_health(app)  # only with Redis: shared or fallback pacing, relay, bus consumer
    if redis is not None:
        body["redis"] = redis
    return json_response(body, 200 if state.status == "ok" else 503)


def _limit(request: web.Request, default: int = 50) -> int | web.Response:
    raw = request.query.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        return error(400, "limit: must be an integer")
    if not 1 <= limit <= MAX_LIMIT:
        return error(400, f"limit: must be between 1 and {MAX_LIMIT}")
    return limit


async def inbound(request: web.Request) -> web.Response:
    """The newest received messages, newest first."""
    limit = _limit(request)
    if isinstance(limit, web.Response):
        return limit
    return json_response(await request.app[keys.STORE].recent_inbound(limit))


_FIELD = re.compile(r"[A-Za-z0-9_]{1,100}")


def _events_filters(request: web.Request) -> tuple[str | None, str | None] | web.Response:
    """`field` (a webhook field name, known or not) and `tenant` (a configured one), each optional."""
    field, tenant = request.query.get("field"), request.query.get("tenant")
    if field is not None and not _FIELD.fullmatch(field):
        return error(400, "field: must be a webhook field name (1-100 letters, digits or _)")
    tenants = request.app[keys.CONFIG].tenants
    if tenant is not None and tenant not in tenants:
        return error(400, f"tenant: unknown tenant {tenant[:100]!r} (have: {', '.join(tenants)})")
    return field, tenant


async def events(request: web.Request) -> web.Response:
    """Other webhook fields (templates, account, preferences, unknown ones…), newest first."""
    limit = _limit(request)
    if isinstance(limit, web.Response):
        return limit
    filters = _events_filters(request)
    if isinstance(filters, web.Response):
        return filters
    field, tenant = filters
    return json_response(await request.app[keys.STORE].events(limit, field=field, tenant=tenant))


def _send_target(cfg: Config, body: Any) -> tuple[str, str | None] | web.Response:
    """The tenant (default: the first) and idempotency key of an API send, or a 422."""
    obj = body if isinstance(body, dict) else {}
    tenant = obj.get("tenant", next(iter(cfg.tenants)))
    if not isinstance(tenant, str) or tenant not in cfg.tenants:
        return _invalid("tenant", f"unknown tenant {tenant!r} (have: {', '.join(cfg.tenants)})")
    key = obj.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        return _invalid("idempotency_key", "must be a string of 1–200 characters")
    return tenant, key


def _invalid(field: str, problem: str) -> web.Response:
    return json_response({"error": f"{field}: {problem}", "field": field}, 422)


async def send_message(request: web.Request) -> web.Response:
    """Queue a business-initiated send: 202 {"id", "status"}; 422 naming the field; same key, same id."""
    return await queue_send(request.app, await read_json(request))


async def queue_send(app: web.Application, body: Any) -> web.Response:
    """`POST /api/messages` for a decoded body: every check, the row, the answer. The event bus's
    `alfred-outbox` consumer calls it too, so a bus request is judged exactly as an API call."""
    target = _send_target(app[keys.CONFIG], body)
    if isinstance(target, web.Response):
        return target
    tenant, key = target
    try:
        send_at = parse_send_at(body.get("send_at") if isinstance(body, dict) else None)
        payload = validate_send(_without_send_at(body))
        await check_send(app[keys.STORE], app[keys.CONFIG], tenant, payload)  # the synced templates (issue 17)
    except InvalidMessage as exc:
        return _invalid(exc.field, str(exc).removeprefix(f"{exc.field}: "))
    row = OutboxRow(
        id=new_outbox_id(),
        idem_key=f"api:{tenant}:{key}" if key else f"api:{uuid.uuid4().hex}",
        tenant=tenant,
        recipient=addressee(payload),  # `to` (phone digits, BSUID or group id), else the BSUID in `recipient`
        type=payload["type"],
        payload=msgspec.json.encode(payload),
        priority=1,  # business-initiated: conversations with users go first
        send_at=send_at,  # later: stored `scheduled`, the window checked again when it comes due
    )
    # Templates always pass. A group's window is opened by any member's message (groups/pricing),
    # which Alfred does not record per group: Meta decides (131047) instead of a guess here.
    needs_window = payload["type"] != "template" and not is_group(payload)
    field = "to" if isinstance(payload.get("to"), str) else "recipient"
    try:
        return await _queue(app, row, needs_window, field)
    except StoreError:
        return error(503, "temporarily unable to queue the message")


def _without_send_at(body: Any) -> Any:
    """The send body without Alfred's `send_at` (never sent to Meta)."""
    return {k: v for k, v in body.items() if k != "send_at"} if isinstance(body, dict) else body


async def _queue(app: web.Application, row: OutboxRow, needs_window: bool, field: str = "to") -> web.Response:
    """Queue `row`; a retry with the same idempotency key gets the first message back, even late.

    Opt-out and the 24-hour window are judged by the id the send addresses (`row.recipient`, a
    phone number or a BSUID); `field` names the body field that carried it."""
    store = app[keys.STORE]
    existing = await store.message_by_key(row.idem_key)
    if existing is not None:
        return json_response({"id": existing["id"], "status": existing["state"]}, 202)
    if await store.opted_out(row.tenant, row.recipient):
        return json_response(
            {"error": f"{field}: the recipient opted out (they must write to us again first)", "field": field}, 409
        )
    if needs_window:
        last = await store.last_inbound(row.tenant, row.recipient)
        if last is None or time.time() - last > WINDOW_SECONDS:
            return _invalid(field, "outside the 24-hour customer service window: only a template can be sent")
    [outbox_id] = await store.enqueue([row])
    # a scheduled row's state is the store's (`scheduled`, or `queued` if its time came meanwhile)
    existing = None if outbox_id == row.id and row.send_at is None else await store.message(outbox_id)
    app[keys.SENDER].wake()
    return json_response({"id": outbox_id, "status": existing["state"] if existing else "queued"}, 202)


async def get_message(request: web.Request) -> web.Response:
    """One outbox row: state, attempts, wamid, the error if any, and its times."""
    row = await request.app[keys.STORE].message(request.match_info["id"])
    if row is None:
        return error(404, "no such message")
    err = None
    if row["error_code"] is not None or row["error_message"] is not None:
        err = {
            "code": row["error_code"],
            "message": row["error_message"],
            "details": row["error_details"],
            "fbtrace_id": row["error_fbtrace_id"],
            "needs_template": bool(row["needs_template"]),
        }
    keep = ("id", "tenant", "to", "type", "attempts", "wamid", "created_at", "sent_at", "delivered_at", "read_at")
    return json_response({**{k: row[k] for k in keep}, "send_at": row["send_at"], "status": row["state"], "error": err})


async def cancel_message(request: web.Request) -> web.Response:
    """`DELETE /api/messages/{id}`: cancel a scheduled or still queued send (200, `cancelled`, also
    when it was cancelled before); 409 once it is sending or sent (or failed); 404 if unknown."""
    outbox_id = request.match_info["id"]
    try:
        state = await request.app[keys.STORE].dialogs.cancel(outbox_id)
    except StoreError:
        return error(503, "temporarily unable to cancel the message")
    if state is None:
        return error(404, "no such message")
    if state != "cancelled":
        return json_response({"error": f"the message is {state} already: too late to cancel", "status": state}, 409)
    return json_response({"id": outbox_id, "status": "cancelled"})


async def tenants(request: web.Request) -> web.Response:
    """Each tenant with its number and pause state."""
    cfg, sender = request.app[keys.CONFIG], request.app[keys.SENDER]
    return json_response(
        [
            {
                "name": name,
                "phone_number_id": t.phone_number_id,
                "handler": cfg.handler_for(name),
                "paused": msgspec.to_builtins(sender.pauses[name]) if name in sender.pauses else None,
            }
            for name, t in cfg.tenants.items()
        ]
    )


async def resume_tenant(request: web.Request) -> web.Response:
    """Operator action: lift a tenant's pause (after fixing the token or the account)."""
    name = request.match_info["name"]
    if name not in request.app[keys.CONFIG].tenants:
        return error(404, "no such tenant")
    return json_response({"tenant": name, "resumed": request.app[keys.SENDER].resume(name)})


async def dead_letters(request: web.Request) -> web.Response:
    """Sends that failed for good, newest first (`?tenant=` to filter)."""
    limit = _limit(request)
    if isinstance(limit, web.Response):
        return limit
    tenant = request.query.get("tenant")
    return json_response(await request.app[keys.STORE].dead_letters(limit, tenant))


async def retry_dead_letters(request: web.Request) -> web.Response:
    """Operator action: queue failed sends again. Body `{"ids": [...]}` or `{"all": true}`."""
    body = await read_json(request)
    ids: list[str] | None
    if isinstance(body, dict) and body.get("all") is True:
        ids = None
    elif isinstance(body, dict) and isinstance(body.get("ids"), list) and all(isinstance(i, str) for i in body["ids"]):
        ids = body["ids"][:MAX_LIMIT]
    else:
        return _invalid("ids", 'give {"ids": ["<outbox id>", ...]} or {"all": true}')
    try:
        retried = await request.app[keys.STORE].retry_dead(ids, time.time())
    except StoreError:
        return error(503, "temporarily unable to queue the retry")
    request.app[keys.SENDER].wake()
    return json_response({"retried": retried})


async def upload_media(request: web.Request) -> web.Response:
    """Upload a file for sending: multipart `file` (+ `tenant`, `kind`); answers `{"id": <media id>}`."""
    app = request.app
    fields = await _media_form(request)
    if isinstance(fields, web.Response):
        return fields
    tenant, kind, data, mime_type, filename = fields
    try:
        check_upload(kind, mime_type, len(data))
        phone_number_id = app[keys.CONFIG].tenants[tenant].phone_number_id
        media_id = await app[keys.TRANSPORT].upload(phone_number_id, data, mime_type, filename)
    except MediaError as exc:
        return _invalid("file", str(exc))
    return json_response({"id": media_id, "tenant": tenant, "kind": kind}, 201)


async def _media_form(request: web.Request) -> tuple[str, str, bytes, str, str] | web.Response:
    """Read the multipart form as a stream, so the cap is `media.max_upload_bytes` (not the webhook's)."""
    if not request.content_type.startswith("multipart/"):
        return error(400, "send multipart/form-data with a `file` field")
    cfg = request.app[keys.CONFIG]
    try:
        parts = await _parts(request, cfg.media.max_upload_bytes)
    except MALFORMED_MULTIPART as exc:
        return error(400, f"not a readable multipart/form-data body ({type(exc).__name__})")
    if isinstance(parts, web.Response):
        return parts
    fields, upload = parts
    if upload is None:
        return _invalid("file", "a file field is required")
    tenant = fields.get("tenant") or next(iter(cfg.tenants))
    if tenant not in cfg.tenants:
        return _invalid("tenant", f"unknown tenant {tenant!r} (have: {', '.join(cfg.tenants)})")
    data, mime, filename = upload
    return tenant, fields.get("kind") or kind_for(mime), data, mime, filename


async def _parts(
    request: web.Request, cap: int
) -> tuple[dict[str, str], tuple[bytes, str, str] | None] | web.Response:
    fields: dict[str, str] = {}
    upload: tuple[bytes, str, str] | None = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            return error(400, "nested multipart bodies are not supported")
        name, filename = _disposition(part)
        if name == "file":
            data = await _read_capped(part, cap)
            if data is None:
                return error(413, f"file larger than media.max_upload_bytes ({cap} bytes)")
            upload = (data, part.headers.get("Content-Type", "application/octet-stream"), safe_filename(filename))
        elif name in ("tenant", "kind"):
            # raw bytes, capped: `part.text()` would read any size and inflate a gzip'd part
            value = await _read_capped(part, 1024)
            if value is None:
                return error(400, f"{name}: longer than 1024 bytes")
            fields[name] = value.decode("utf-8", "replace")[:100]
    return fields, upload


#: What aiohttp's multipart reader raises on a body that is not one (no or bad boundary, a body cut
#: short, a bad charset or transfer encoding in a part, undecodable text, a broken HTTP transfer).
MALFORMED_MULTIPART = (
    ValueError,
    LookupError,
    HttpProcessingError,
    BadContentDispositionHeader,
    BadContentDispositionParam,
)
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\\"]")


def _disposition(part: BodyPartReader) -> tuple[str | None, str | None]:
    """The part's name and file name. aiohttp only *warns* about a broken Content-Disposition
    (e.g. `filename*` that is not UTF-8) and then drops it: make that a clear 400 instead."""
    with warnings.catch_warnings():  # no await inside: no other task runs under this filter
        warnings.simplefilter("error", BadContentDispositionHeader)
        warnings.simplefilter("error", BadContentDispositionParam)
        return part.name, part.filename


def safe_filename(name: str | None) -> str:
    """The upload's file name as Graph gets it: no path, quotes or control characters (a CRLF
    would end the part header of the upload Alfred builds), at most 200 characters."""
    cleaned = _UNSAFE_NAME.sub("_", (name or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1]).strip(" .")
    return cleaned[:200] or "file"


async def _read_capped(part: BodyPartReader, cap: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(64 * 1024):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; gauges that mirror the store and the queues are refreshed first.

    The text is built in a worker thread (`Metrics.scrape`) so a large registry never stalls webhooks.
    """
    app = request.app
    m, sender = app[keys.TELEMETRY].metrics, app[keys.SENDER]
    if await app[keys.STORE].healthy():
        for tenant, states in (await app[keys.STORE].outbox_by_tenant()).items():
            for state, count in states.items():
                m.outbox.labels(tenant, state).set(count)
    m.dispatch_queue.set(app[keys.DISPATCHER].queue.qsize())
    for tenant, depth in sender.queue_depths().items():
        m.send_queue.labels(tenant).set(depth)
    for tenant in app[keys.CONFIG].tenants:
        m.paused.labels(tenant).set(1 if tenant in sender.pauses else 0)
    return web.Response(body=await m.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def audit(request: web.Request) -> web.Response:
    """The audit trail of Graph API calls, newest first (`?tenant=`, `?outbox_id=`, `?limit=`)."""
    limit = _limit(request)
    if isinstance(limit, web.Response):
        return limit
    query = request.query
    rows = await request.app[keys.STORE].audit(limit, query.get("tenant"), query.get("outbox_id"))
    return json_response(rows)
