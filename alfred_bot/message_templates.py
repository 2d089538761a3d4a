"""Message templates: what each tenant's WhatsApp Business Account holds, and checks against it.

A tenant with `waba_id` gets its templates listed from the Graph API (`GET /{version}/{waba_id}/
message_templates`, every page) at start-up, every `templates.sync_interval_seconds`, and soon after
a template webhook (`message_template_status_update`, `template_category_update`,
`message_template_quality_update`) is stored: the sync watches the stored events, so it hears of
them whichever node took the webhook. Template sends are then checked before anything is queued
(`check_send`): an unknown name or language, a status other than APPROVED, or the wrong number of
parameters for a component is refused, naming the template and the component, instead of costing
an attempt and coming back as 132000 / 132001 / 132015. A tenant without `waba_id`, or whose first
sync has not succeeded yet, is not checked (Meta decides, as before).

Documentation (base `developers.facebook.com/documentation/business-messaging/whatsapp/`):
templates/overview (names, categories, creation, the list endpoint), templates/components
(header, body, footer, buttons and their limits), templates/template-management (delete by name
or `hsm_id`), webhooks/reference/message_template_status_update.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgspec
from aiohttp import web

from alfred_bot import keys, tasks
from alfred_bot.config import Config
from alfred_bot.graph import GraphUnavailable, Transport
from alfred_bot.store import Store, StoreError
from alfred_bot.store.base import TemplateInfo
from alfred_bot.validate import InvalidMessage

log = logging.getLogger("alfred.templates")

#: The webhook fields that say a template changed (Meta: Webhooks > overview, field list).
TEMPLATE_FIELDS = ("message_template_status_update", "template_category_update", "message_template_quality_update")
LIST_FIELDS = "id,name,language,status,category,parameter_format,components"
#: Webhook-triggered re-lists of one account at most this often (Meta allows 200 management calls
#: per hour per app and account: one every 18 s).
EVENT_SYNC_GAP = 20.0
MAX_PAGES = 200  # 100 per page: far above Meta's cap of templates per account
_VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
#: Header formats that take one media (or location) parameter in the send (templates/components).
MEDIA_HEADERS = frozenset({"IMAGE", "VIDEO", "DOCUMENT", "LOCATION"})
#: Buttons whose send parameter is required: a URL with a variable, a copy-code coupon, a one-time password.
OPTIONAL_BUTTONS = frozenset({"QUICK_REPLY", "FLOW", "PHONE_NUMBER", "VOICE_CALL", "CATALOG", "MPM"})


def _variables(text: Any) -> list[str]:
    """Distinct `{{1}}` / `{{name}}` variables of a text, in order of first appearance."""
    found: list[str] = []
    for name in _VARIABLE.findall(text if isinstance(text, str) else ""):
        if name not in found:
            found.append(name)
    return found


def _button_parameters(button: dict[str, Any]) -> int:
    kind = str(button.get("type", "")).upper()
    if kind == "URL":
        return len(_variables(button.get("url")))
    if kind in ("COPY_CODE", "OTP"):
        return 1
    return 0


def parameter_counts(template: TemplateInfo) -> dict[str, int]:
    """Parameters a send must give per component: `header`, `body`, `button[i]` (templates/components)."""
    counts: dict[str, int] = {}
    for comp in template.components:
        kind = str(comp.get("type", "")).upper()
        if kind == "HEADER":
            media = str(comp.get("format", "TEXT")).upper() in MEDIA_HEADERS
            counts["header"] = 1 if media else len(_variables(comp.get("text")))
        elif kind == "BODY":
            counts["body"] = len(_variables(comp.get("text")))
        elif kind == "BUTTONS":
            for i, button in enumerate(comp.get("buttons") or []):
                if isinstance(button, dict) and _button_parameters(button):
                    counts[f"button[{i}]"] = _button_parameters(button)
    return counts


def body_names(template: TemplateInfo) -> list[str]:
    """The body's variables in order (names of a NAMED template, "1", "2"… of a positional one)."""
    for comp in template.components:
        if str(comp.get("type", "")).upper() == "BODY":
            return _variables(comp.get("text"))
    return []


def _optional_buttons(template: TemplateInfo) -> set[str]:
    """`button[i]` keys a send may fill or leave out (a quick reply's payload, a flow's token)."""
    keys_: set[str] = set()
    for comp in template.components:
        if str(comp.get("type", "")).upper() == "BUTTONS":
            for i, button in enumerate(comp.get("buttons") or []):
                if isinstance(button, dict) and str(button.get("type", "")).upper() in OPTIONAL_BUTTONS:
                    keys_.add(f"button[{i}]")
    return keys_


def given_counts(template: dict[str, Any]) -> dict[str, int]:
    """Parameters a send's `template` object gives per component (shape already validated)."""
    given: dict[str, int] = {}
    for comp in template.get("components") or []:
        kind = str(comp.get("type", "")).lower()
        key = f"button[{comp.get('index', 0)}]" if kind == "button" else kind
        given[key] = given.get(key, 0) + len(comp.get("parameters") or [])
    return given


def describe(template: TemplateInfo) -> str:
    return f"template {template.name!r} ({template.language})"


def check(found: Iterable[TemplateInfo], send: dict[str, Any]) -> TemplateInfo:
    """The synced template a send's `template` object names, if it may be sent as given; else
    `InvalidMessage` naming the template and the component."""
    match = find(found, send.get("name"), (send.get("language") or {}).get("code"))
    check_counts(match, given_counts(send))
    return match


def find(found: Iterable[TemplateInfo], name: Any, language: Any) -> TemplateInfo:
    """The template of that name and language, if APPROVED; else `InvalidMessage` saying what is wrong."""
    same_name = [t for t in found if t.name == name]
    if not same_name:
        raise InvalidMessage("template.name", f"template {name!r} is not among the tenant's synced templates")
    match = next((t for t in same_name if t.language == language), None)
    if match is None:
        have = ", ".join(t.language for t in same_name)
        raise InvalidMessage("template.language.code", f"template {name!r} has no language {language!r} (has: {have})")
    if match.status.upper() != "APPROVED":
        problem = f"{describe(match)} is {match.status}: only APPROVED templates can be sent"
        raise InvalidMessage("template.name", problem)
    return match


def check_counts(template: TemplateInfo, given: dict[str, int]) -> None:
    """Each component's parameters as the template takes them (optional buttons: none or one)."""
    expected, optional = parameter_counts(template), _optional_buttons(template)
    for key in sorted(set(expected) | set(given)):
        want, got = expected.get(key, 0), given.get(key, 0)
        if want == got or (key in optional and got <= 1):
            continue
        raise InvalidMessage(
            f"template.components[{key}]", f"{describe(template)}: {key} takes {want} parameter(s), got {got}"
        )


async def synced(store: Store, cfg: Config, tenant: str, name: Any) -> list[TemplateInfo] | None:
    """The tenant's synced templates named `name`, or None when no check applies (no `waba_id`,
    or no successful sync yet)."""
    if cfg.tenants[tenant].waba_id is None or not isinstance(name, str):
        return None
    if await store.templates.synced_at(tenant) is None:
        return None
    return await store.templates.templates(tenant, name)


async def check_send(store: Store, cfg: Config, tenant: str, payload: dict[str, Any]) -> TemplateInfo | None:
    """Check a validated send against the tenant's synced templates (see the module docstring);
    raises `InvalidMessage` (the API's 422). The synced template, or None when unchecked."""
    if payload.get("type") != "template":
        return None
    template = payload.get("template") or {}
    found = await synced(store, cfg, tenant, template.get("name"))
    return None if found is None else check(found, template)


# ---------------------------------------------------------------------------- sync


class _Page(msgspec.Struct):
    data: list[dict[str, Any]] = []
    paging: dict[str, Any] = {}


def _info(raw: dict[str, Any]) -> TemplateInfo | None:
    try:
        return msgspec.convert(raw, TemplateInfo, strict=False)
    except msgspec.ValidationError:
        return None


def _next_cursor(page: _Page) -> str | None:
    """Meta pages with cursors: `paging.next` is present while there is more (never followed as a
    URL: it would carry the token to whatever host it names); `paging.cursors.after` is the cursor."""
    cursors = page.paging.get("cursors") or {}
    after = cursors.get("after") if isinstance(cursors, dict) else None
    return after if page.paging.get("next") and isinstance(after, str) and after else None


class TemplateSync:
    """Keeps `store.templates` in step with each tenant's account (see the module docstring)."""

    def __init__(self, store: Store, transport: Transport, cfg: Config) -> None:
        self._store, self._transport, self._cfg = store, transport, cfg
        self._seen: dict[str, float] = {}
        self._pending: set[str] = set()
        self._event_synced: dict[str, float] = {}
        self.syncs = 0

    def tenants(self) -> list[str]:
        return [name for name, t in self._cfg.tenants.items() if t.waba_id is not None]

    async def list_all(self, tenant: str) -> list[TemplateInfo]:
        """Every template of the tenant's account, page after page; raises on any failure."""
        t = self._cfg.tenants[tenant]
        found: list[TemplateInfo] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            params = {"fields": LIST_FIELDS, "limit": "100", **({"after": after} if after else {})}
            path = f"{t.waba_id}/message_templates"
            answer = await self._transport.manage("GET", t.phone_number_id, path, params=params)
            if answer.status != 200:
                raise GraphUnavailable(f"HTTP {answer.status}: {graph_message(answer.body)}")
            page = msgspec.convert(answer.body, _Page, strict=False)
            found += [info for info in map(_info, page.data) if info is not None]
            after = _next_cursor(page)
            if after is None:
                return found
        raise GraphUnavailable(f"more than {MAX_PAGES} pages of templates")

    async def sync(self, tenant: str) -> bool:
        """Replace the tenant's stored set with the account's; False (old set kept) on a failure."""
        try:
            found = await self.list_all(tenant)
            await self._store.templates.replace(tenant, found)
        except (GraphUnavailable, msgspec.ValidationError, StoreError) as exc:
            log.warning("template sync of tenant %s failed (the last synced set stays): %s", tenant, exc)
            return False
        self.syncs += 1
        log.info("templates of tenant %s synced: %d", tenant, len(found))
        return True

    async def sync_all(self) -> None:
        for tenant in self.tenants():
            await self.sync(tenant)

    async def changed(self) -> set[str]:
        """Tenants named by template webhooks stored since the last look (the first look only
        remembers where the feed stands: the start-up sync covers what came before)."""
        touched: set[str] = set()
        for field in TEMPLATE_FIELDS:
            events = await self._store.events(20, field=field)
            newest = max((float(e["received_at"]) for e in events), default=0.0)
            first, last = field not in self._seen, self._seen.get(field, 0.0)
            self._seen[field] = max(last, newest)
            for event in events if not first else ():
                if float(event["received_at"]) > last:
                    touched.update(self._owners(event))
        return touched

    def _owners(self, event: dict[str, Any]) -> list[str]:
        """The synced tenants an event is about: its tenant, else every tenant of its account."""
        named = [t for t in self.tenants() if t == event.get("tenant")]
        return named or [t for t in self.tenants() if self._cfg.tenants[t].waba_id == event.get("waba_id")]

    async def run(self) -> None:
        """Sync at start, then on template webhooks and every `sync_interval_seconds`."""
        loop = asyncio.get_running_loop()
        await self.sync_all()
        await self._changed_safely()
        due = loop.time() + self._cfg.templates.sync_interval_seconds
        while True:
            await asyncio.sleep(self._cfg.templates.event_poll_seconds)
            if loop.time() >= due:
                await self.sync_all()
                due = loop.time() + self._cfg.templates.sync_interval_seconds
            await self._after_events(loop.time())

    async def _after_events(self, now: float) -> None:
        """Re-list the accounts template webhooks named; one account at most every
        `EVENT_SYNC_GAP` s (a burst of webhooks is one re-list now and one after the gap)."""
        self._pending |= await self._changed_safely()
        for tenant in sorted(self._pending):
            if now - self._event_synced.get(tenant, -EVENT_SYNC_GAP) >= EVENT_SYNC_GAP:
                self._pending.discard(tenant)
                self._event_synced[tenant] = now
                await self.sync(tenant)

    async def _changed_safely(self) -> set[str]:
        try:
            return await self.changed()
        except StoreError as exc:
            log.warning("template webhooks could not be read: %s", exc)
            return set()


def graph_message(body: Any) -> str:
    """Meta's error text from a Graph error body (already redacted), for logs and API errors."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no error details"
    code = error.get("code")
    text = error.get("error_user_msg") or error.get("message") or "error"
    return f"code {code}: {str(text)[:300]}" if code is not None else str(text)[:300]


SYNC = web.AppKey("template_sync", TemplateSync)


async def sync_ctx(app: web.Application) -> AsyncIterator[None]:
    """The template sync, on nodes that serve the API (it writes only what Graph says: running it
    on several nodes is harmless). Nothing runs when no tenant has a `waba_id`."""
    sync = app[SYNC] = TemplateSync(app[keys.STORE], app[keys.TRANSPORT], app[keys.CONFIG])
    task = None
    if sync.tenants() and app[keys.ROLE] != "worker":
        task = asyncio.create_task(sync.run(), name="alfred-template-sync")
    yield
    await tasks.cancel(task)


# ---------------------------------------------------------------------------- creation (pass-through)

#: templates/overview, "Names": lowercase letters, digits and underscores, at most 512 characters.
_TEMPLATE_NAME = re.compile(r"[a-z0-9_]{1,512}")
#: templates/overview, "Categories".
CATEGORIES = frozenset({"MARKETING", "UTILITY", "AUTHENTICATION"})
#: templates/supported-languages: codes like `en`, `en_US`, `pt_BR`, `zh_CN`, `fil`.
_LANGUAGE = re.compile(r"[a-z]{2,3}(_[A-Za-z0-9]{2,4})?")
#: templates/components: which component types exist, and the text limits Meta documents.
COMPONENT_TEXT_MAX = {"HEADER": 60, "BODY": 1024, "FOOTER": 60}
HEADER_FORMATS = frozenset({"TEXT", *MEDIA_HEADERS})
MAX_BUTTONS = 10  # templates/components, "Buttons": up to 10 buttons


def check_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not _TEMPLATE_NAME.fullmatch(name):
        raise InvalidMessage(field, "must be 1-512 lowercase letters, digits or underscores (Meta's template names)")
    return name


def validate_create(body: Any) -> dict[str, Any]:
    """The Graph body of a template creation (`POST /{waba_id}/message_templates`), checked against
    Meta's documented rules first; fields Alfred does not know are passed on as given."""
    if not isinstance(body, dict):
        raise InvalidMessage("body", "must be a JSON object")
    graph = {k: v for k, v in body.items() if k != "tenant"}
    check_name(graph.get("name"))
    if graph.get("category") not in CATEGORIES:
        raise InvalidMessage("category", f"must be one of {', '.join(sorted(CATEGORIES))}")
    language = graph.get("language")
    if not isinstance(language, str) or not _LANGUAGE.fullmatch(language):
        raise InvalidMessage("language", "must be a language code like en, en_US or pt_BR")
    if graph.get("parameter_format", "POSITIONAL") not in ("POSITIONAL", "NAMED"):
        raise InvalidMessage("parameter_format", "must be POSITIONAL or NAMED")
    _check_components(graph.get("components"), authentication=graph["category"] == "AUTHENTICATION")
    return graph


def _check_components(components: Any, *, authentication: bool) -> None:
    """templates/components: a list with exactly one BODY and at most one of each other type."""
    if not isinstance(components, list) or not components:
        raise InvalidMessage("components", "must be a non-empty list of components")
    seen: set[str] = set()
    for i, comp in enumerate(components):
        where = f"components[{i}]"
        if not isinstance(comp, dict):
            raise InvalidMessage(where, "must be an object")
        kind = comp.get("type")
        if kind not in ("HEADER", "BODY", "FOOTER", "BUTTONS"):
            raise InvalidMessage(f"{where}.type", "must be HEADER, BODY, FOOTER or BUTTONS")
        if kind in seen:
            raise InvalidMessage(f"{where}.type", f"only one {kind} component is allowed")
        seen.add(kind)
        _check_component(kind, comp, where, authentication)
    if "BODY" not in seen:
        raise InvalidMessage("components", "a BODY component is required")


def _check_component(kind: str, comp: dict[str, Any], where: str, authentication: bool) -> None:
    if kind == "HEADER" and comp.get("format", "TEXT") not in HEADER_FORMATS:
        raise InvalidMessage(f"{where}.format", f"must be one of {', '.join(sorted(HEADER_FORMATS))}")
    if kind == "BUTTONS":
        buttons = comp.get("buttons")
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= MAX_BUTTONS:
            raise InvalidMessage(f"{where}.buttons", f"must be a list of 1-{MAX_BUTTONS} buttons")
        return
    text = comp.get("text")
    # authentication bodies are Meta's own text (`add_security_recommendation`), with no `text`
    text_header = kind == "HEADER" and comp.get("format", "TEXT") == "TEXT"
    needs_text = (kind in ("BODY", "FOOTER") and not authentication) or text_header
    if text is None and not needs_text:
        return
    limit = COMPONENT_TEXT_MAX[kind]
    if not isinstance(text, str) or not 1 <= len(text) <= limit:
        raise InvalidMessage(f"{where}.text", f"must be a text of 1-{limit} characters")
