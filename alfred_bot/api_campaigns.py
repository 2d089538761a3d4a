"""`/api/campaigns` and `/api/templates` (Bearer `ALFRED_API_TOKEN`, like every `/api/*` route).

Campaigns: create (JSON, or a CSV upload as multipart), list, show, pause, resume, cancel (see
`alfred_bot.campaigns`). Templates: the synced list, and creation / deletion passed through to
the Graph API after Meta's documented rules are checked here (see `alfred_bot.message_templates`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

import msgspec
from aiohttp import BodyPartReader, web

from alfred_bot import campaigns, keys, schedule
from alfred_bot import message_templates as templates
from alfred_bot.api import MALFORMED_MULTIPART, error, json_response
from alfred_bot.campaigns import CampaignBody, Plan, Recipients
from alfred_bot.config import Config
from alfred_bot.graph import GraphUnavailable
from alfred_bot.store import StoreError
from alfred_bot.store.base import TemplateInfo
from alfred_bot.validate import InvalidMessage

log = logging.getLogger("alfred.api")

ACTIONS = ("pause", "resume", "cancel")
TEMPLATE_BODY_MAX = 1024 * 1024  # a template definition is a few KiB
#: The form fields of a CSV upload besides the file (`template` is the JSON object of the JSON form).
FORM_FIELDS = ("tenant", "name", "template", "send_at", "idempotency_key", "template_name", "template_language")


def invalid(exc: InvalidMessage) -> web.Response:
    return json_response({"error": str(exc), "field": exc.field}, 422)


def _tenant(cfg: Config, value: Any, *, default: bool = True) -> str:
    if value is None and default:
        return next(iter(cfg.tenants))
    if not isinstance(value, str) or value not in cfg.tenants:
        raise InvalidMessage("tenant", f"unknown tenant {str(value)[:100]!r} (have: {', '.join(cfg.tenants)})")
    return value


# ---------------------------------------------------------------------------- create


class _Upload:
    """A CSV upload spooled to a temporary file (memory stays bounded), and the form's fields."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.file: IO[bytes] | None = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class TooLarge(Exception):
    """A body or upload above its cap (answered 413)."""


async def _read_body(request: web.Request, cap: int) -> bytes:
    """The raw body up to `cap` bytes (`campaigns.max_upload_bytes`, not the webhook's cap)."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > cap:
            raise TooLarge(f"body larger than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _field(part: BodyPartReader, cap: int = 64 * 1024) -> str:
    """A form field's text, whole, up to `cap` bytes."""
    data = b""
    while chunk := await part.read_chunk(8192):
        data += chunk
        if len(data) > cap:
            raise InvalidMessage(str(part.name), f"longer than {cap} bytes")
    return data.decode("utf-8", "replace")


async def _spool(request: web.Request, cap: int, upload: _Upload) -> None:
    """Read the form into `upload` (which the caller closes, whatever happens here)."""
    reader = await request.multipart()
    size = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidMessage("body", "nested multipart bodies are not supported")
        if part.name == "file":
            upload.file = upload.file or tempfile.TemporaryFile()  # noqa: SIM115 (closed by the caller)
            while chunk := await part.read_chunk(64 * 1024):
                size += len(chunk)
                if size > cap:
                    raise TooLarge(f"file larger than campaigns.max_upload_bytes ({cap} bytes)")
                upload.file.write(chunk)
        elif part.name in FORM_FIELDS:
            upload.fields[part.name] = await _field(part)


def _form_body(fields: dict[str, str]) -> CampaignBody:
    """The CSV form's fields as the JSON form's body: `template` as a JSON object, or the
    shorthand `template_name` + `template_language`."""
    template: Any = {"name": fields.get("template_name"), "language": fields.get("template_language")}
    if "template" in fields:
        template = msgspec.json.decode(fields["template"])
    send_at: Any = fields.get("send_at")
    if isinstance(send_at, str) and send_at.replace(".", "", 1).isdigit():
        send_at = float(send_at)
    data = {k: v for k, v in fields.items() if k in ("tenant", "name", "idempotency_key")}
    return msgspec.convert({**data, "template": template, "send_at": send_at}, CampaignBody)


_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _decode_error(exc: msgspec.MsgspecError) -> InvalidMessage:
    """msgspec says where (`$.recipients[3].to`): the field is that path (or the unknown field)."""
    text = str(exc)
    where = text.rsplit(" - at `$.", 1)[-1].rstrip("`") if " - at `$." in text else ""
    unknown = _UNKNOWN.search(text)
    if unknown:
        where = f"{where}.{unknown[1]}" if where else unknown[1]
    return InvalidMessage(where or "body", text.split(" - at ", maxsplit=1)[0])


async def _plan(request: web.Request, body: CampaignBody) -> Plan:
    app = request.app
    cfg, store = app[keys.CONFIG], app[keys.STORE]
    tenant = _tenant(cfg, body.tenant)
    if not body.name.strip() or len(body.name) > 200:
        raise InvalidMessage("name", "must be 1-200 characters")
    templates.check_name(body.template.name, "template.name")
    found = await templates.synced(store, cfg, tenant, body.template.name)
    info = campaigns.check_template(body.template, found)
    names = templates.body_names(info) if info is not None and info.parameter_format == "NAMED" else None
    return Plan(
        id=campaigns.campaign_id(tenant, body.idempotency_key),
        tenant=tenant,
        name=body.name.strip(),
        template=body.template,
        info=info,
        send_at=schedule.parse_send_at(body.send_at, time.time()),
        body_names=names,
    )


async def create_campaign(request: web.Request) -> web.Response:
    """`POST /api/campaigns` → 202 `{"id", "state", "recipients", "queued", "skipped", "duplicates"}`."""
    upload = _Upload()
    try:
        return await _accept(request, upload)
    except (msgspec.MsgspecError, InvalidMessage, TooLarge, StoreError, *MALFORMED_MULTIPART) as exc:
        return _refusal(exc)
    finally:
        upload.close()


async def _accept(request: web.Request, upload: _Upload) -> web.Response:
    cap = request.app[keys.CONFIG].campaigns.max_upload_bytes
    if request.content_type.startswith("multipart/"):
        await _spool(request, cap, upload)
        file = upload.file
        if file is None:
            raise InvalidMessage("file", "a CSV file field is required (to,param1,param2,…)")
        return await _create(request, _form_body(upload.fields), lambda: campaigns.csv_recipients(file))
    body = msgspec.json.decode(await _read_body(request, cap), type=CampaignBody)
    return await _create(request, body, lambda: campaigns.json_recipients(body))


def _refusal(exc: Exception) -> web.Response:
    if isinstance(exc, msgspec.MsgspecError):
        return invalid(_decode_error(exc))
    if isinstance(exc, InvalidMessage):
        return invalid(exc)
    if isinstance(exc, TooLarge):
        return error(413, f"{exc}: split the list, or raise campaigns.max_upload_bytes")
    if isinstance(exc, StoreError):
        return error(503, "temporarily unable to store the campaign (the same idempotency_key can be retried)")
    return error(400, f"not a readable multipart/form-data body ({type(exc).__name__})")


async def _create(request: web.Request, body: CampaignBody, source: Callable[[], Recipients]) -> web.Response:
    app = request.app
    store, cfg = app[keys.STORE], app[keys.CONFIG].campaigns
    plan = await _plan(request, body)
    count = await asyncio.to_thread(campaigns.scan, source(), plan, cfg.max_recipients)
    campaigns.check_first(plan, source())
    if not await store.campaigns.create(plan.spec()):
        existing = await store.campaigns.summary(plan.id)
        if existing is not None and existing["state"] != "loading":  # a retry of a finished request
            shown = {"id": plan.id, "state": existing["state"], "recipients": count, "repeated": True}
            return json_response(shown, 202)
    totals = await campaigns.load(store, plan, source(), cfg.batch_size)
    state = await store.campaigns.finish(plan.id)
    app[keys.SENDER].wake()
    log.info("campaign %s of %s: %d queued, %d skipped", plan.id, plan.tenant, totals["queued"], totals["skipped"])
    return json_response({"id": plan.id, "state": state, "recipients": count, **totals}, 202)


# ---------------------------------------------------------------------------- read and control


async def list_campaigns(request: web.Request) -> web.Response:
    """`GET /api/campaigns[?tenant=]`: newest first, with counts (the status page's shape)."""
    tenant = request.query.get("tenant")
    if tenant is not None and tenant not in request.app[keys.CONFIG].tenants:
        return error(400, f"tenant: unknown tenant {tenant[:100]!r}")
    return json_response(await request.app[keys.STORE].campaigns.summaries(tenant))


async def get_campaign(request: web.Request) -> web.Response:
    found = await request.app[keys.STORE].campaigns.summary(request.match_info["id"])
    return error(404, "no such campaign") if found is None else json_response(found)


async def control_campaign(request: web.Request) -> web.Response:
    """`POST /api/campaigns/{id}/pause|resume|cancel`: 200 with the campaign; 409 when the action
    does not apply (resume a cancelled campaign, pause one still loading); the same action twice is fine."""
    action, campaign = request.match_info["action"], request.match_info["id"]
    if action not in ACTIONS:
        return error(404, "no such action (pause, resume or cancel)")
    store = request.app[keys.STORE]
    try:
        state = await store.campaigns.control(campaign, action)
    except StoreError:
        return error(503, "temporarily unable to change the campaign")
    if state is None:
        return error(404, "no such campaign")
    if state != {"pause": "paused", "resume": "running", "cancel": "cancelled"}[action]:
        return error(409, f"the campaign is {state}: cannot {action} it")
    if action == "resume":
        request.app[keys.SENDER].wake()
    return json_response(await store.campaigns.summary(campaign))


# ---------------------------------------------------------------------------- templates


def _shown(tenant: str, t: TemplateInfo) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "name": t.name,
        "language": t.language,
        "status": t.status,
        "category": t.category,
        "id": t.id,
        "parameter_format": t.parameter_format,
        "parameters": templates.parameter_counts(t),
    }


async def list_templates(request: web.Request) -> web.Response:
    """`GET /api/templates[?tenant=]`: the synced templates with their parameter counts per component."""
    cfg, store = request.app[keys.CONFIG], request.app[keys.STORE]
    try:
        chosen = [_tenant(cfg, request.query["tenant"])] if "tenant" in request.query else list(cfg.tenants)
    except InvalidMessage as exc:
        return error(400, str(exc))
    shown = []
    for tenant in chosen:
        shown += [_shown(tenant, t) for t in await store.templates.templates(tenant)]
    return json_response(shown)


def _account(cfg: Config, tenant: str) -> tuple[str, str]:
    t = cfg.tenants[tenant]
    if t.waba_id is None:
        problem = f"tenant {tenant} has no waba_id: set tenants.{tenant}.waba_id to manage templates"
        raise InvalidMessage("tenant", problem)
    return t.phone_number_id, t.waba_id


def _relay(answer_status: int, answer_body: Any) -> web.Response:
    """Meta's refusal, passed on: its 4xx status (a 5xx as 502) and its error object (redacted)."""
    status = answer_status if 400 <= answer_status < 500 else 502
    graph = answer_body.get("error") if isinstance(answer_body, dict) else None
    return json_response({"error": f"Graph API: {templates.graph_message(answer_body)}", "graph_error": graph}, status)


async def create_template(request: web.Request) -> web.Response:
    """`POST /api/templates`: checked, then created at Meta (201 with Meta's `id`, `status`, `category`)."""
    app = request.app
    cfg = app[keys.CONFIG]
    try:
        raw = msgspec.json.decode(await _read_body(request, TEMPLATE_BODY_MAX))
        tenant = _tenant(cfg, raw.get("tenant") if isinstance(raw, dict) else None)
        graph = templates.validate_create(raw)
        pnid, waba = _account(cfg, tenant)
    except msgspec.DecodeError:
        return error(400, "body is not valid JSON")
    except TooLarge as exc:
        return error(413, str(exc))
    except InvalidMessage as exc:
        return invalid(exc)
    try:
        answer = await app[keys.TRANSPORT].manage("POST", pnid, f"{waba}/message_templates", body=graph)
    except GraphUnavailable as exc:
        return error(503, f"Graph API unavailable: {exc}")
    if answer.status != 200 or not isinstance(answer.body, dict):
        return _relay(answer.status, answer.body)
    made = answer.body
    info = TemplateInfo(
        name=graph["name"], language=graph["language"], status=str(made.get("status") or "PENDING"),
        category=made.get("category") or graph["category"], id=str(made.get("id") or "") or None,
        parameter_format=graph.get("parameter_format"), components=graph["components"],
    )  # fmt: skip
    await app[keys.STORE].templates.upsert(tenant, info)
    return json_response({"tenant": tenant, **made}, 201)


async def delete_template(request: web.Request) -> web.Response:
    """`DELETE /api/templates/{name}?tenant=&hsm_id=`: every language of it, or the one `hsm_id`."""
    app = request.app
    cfg, name, hsm_id = app[keys.CONFIG], request.match_info["name"], request.query.get("hsm_id")
    try:
        templates.check_name(name)
        tenant = _tenant(cfg, request.query.get("tenant"))
        pnid, waba = _account(cfg, tenant)
        if hsm_id is not None and not hsm_id.isdigit():
            raise InvalidMessage("hsm_id", "must be the template's numeric id")
    except InvalidMessage as exc:
        return invalid(exc)
    params = {"name": name, **({"hsm_id": hsm_id} if hsm_id else {})}
    try:
        answer = await app[keys.TRANSPORT].manage("DELETE", pnid, f"{waba}/message_templates", params=params)
    except GraphUnavailable as exc:
        return error(503, f"Graph API unavailable: {exc}")
    if answer.status != 200:
        return _relay(answer.status, answer.body)
    removed = await app[keys.STORE].templates.remove(tenant, name, hsm_id)
    return json_response({"tenant": tenant, "name": name, "deleted": True, "forgotten": removed})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/campaigns", create_campaign)
    app.router.add_get("/api/campaigns", list_campaigns)
    app.router.add_get("/api/campaigns/{id}", get_campaign)
    app.router.add_post("/api/campaigns/{id}/{action}", control_campaign)
    app.router.add_get("/api/templates", list_templates)
    app.router.add_post("/api/templates", create_template)
    app.router.add_delete("/api/templates/{name}", delete_template)
