"""Campaigns: one approved template sent to many recipients, each with their own parameters.

How a campaign goes in (`create`):

1. The recipients (a JSON list, or a CSV file spooled to disk) are read once, in a thread, to
   check every number and every parameter count before anything is stored: a bad line is a 422
   naming it, and nothing was queued.
2. The template is checked against the tenant's synced templates (`alfred_bot.message_templates`), once.
3. The campaign is recorded as `loading` and the recipients are read again and queued in batches
   of `campaigns.batch_size`, one transaction each (memory stays bounded whatever the list's
   size). Each send is an outbox row of priority 1 (a user's conversation always goes first), with
   the idem key `campaign:<id>:<recipient>`: a recipient listed twice, or an upload retried after
   a crash, queues nothing twice. Users who opted out, or stopped marketing messages (for a
   MARKETING template), are skipped and counted, in the same transaction.
4. `finish` makes the rows due (or `scheduled`, with `send_at`): until then nothing of a
   half-loaded campaign is sent. Retrying the same `idempotency_key` completes a campaign a
   crash left `loading`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import IO, Any

import msgspec

from alfred_bot import message_templates as templates
from alfred_bot.store import OutboxRow, Store, new_outbox_id
from alfred_bot.store.base import CampaignSpec, TemplateInfo
from alfred_bot.validate import InvalidMessage, addressee, normalize_recipient, validate_content

log = logging.getLogger("alfred.campaigns")

Param = str | int | float
#: A source of recipients (read twice: checked, then queued), closed when left early.
Recipients = Generator["Recipient", None, None]


class TemplateSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    language: str
    components: list[dict[str, Any]] = []
    #: Only for a tenant without synced templates: MARKETING (the default) honours marketing stops.
    category: str | None = None


class RecipientSpec(msgspec.Struct, forbid_unknown_fields=True):
    to: str
    params: list[Param] | dict[str, Param] = []


class CampaignBody(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /api/campaigns` as JSON (the CSV form carries the same fields as form fields)."""

    name: str
    template: TemplateSpec
    tenant: str | None = None
    recipients: list[RecipientSpec] = []
    send_at: float | str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Recipient:
    where: str  # `recipients[3]` or `file line 4`: what an error names
    to: str  # as written
    params: list[str]
    names: list[str] | None  # parameter names of a NAMED template, else None


@dataclass(frozen=True)
class Plan:
    """A checked campaign, ready to be stored."""

    id: str
    tenant: str
    name: str
    template: TemplateSpec
    info: TemplateInfo | None  # the synced template (None: tenant not synced)
    send_at: float | None
    body_names: list[str] | None  # a NAMED template's body variables, in order

    @property
    def marketing(self) -> bool:
        category = self.info.category if self.info is not None else self.template.category
        return (category or "MARKETING").upper() == "MARKETING"

    def spec(self) -> CampaignSpec:
        category = self.info.category if self.info is not None else self.template.category
        shown = {"name": self.template.name, "language": self.template.language, "category": category}
        return CampaignSpec(id=self.id, tenant=self.tenant, name=self.name, template=shown, send_at=self.send_at)


def campaign_id(tenant: str, key: str | None) -> str:
    """A retried request with the same idempotency key names the same campaign."""
    if key is None:
        return f"cmp_{uuid.uuid4().hex[:26]}"
    return "cmp_" + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:26]


# ---------------------------------------------------------------------------- recipients


def json_recipients(body: CampaignBody) -> Recipients:
    for i, r in enumerate(body.recipients):
        if isinstance(r.params, dict):
            yield Recipient(f"recipients[{i}]", r.to, [str(v) for v in r.params.values()], list(r.params))
        else:
            yield Recipient(f"recipients[{i}]", r.to, [str(v) for v in r.params], None)


def csv_recipients(file: IO[bytes]) -> Recipients:
    """`to,param1,param2,…` per line, optionally under a header line. A header naming its columns
    other than `param1…` gives a NAMED template's parameter names (`to,first_name,order_id`)."""
    file.seek(0)
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    try:
        names: list[str] | None = None
        for line, raw in enumerate(csv.reader(text), start=1):
            cells = [c.strip() for c in raw]
            if not any(cells):
                continue
            if line == 1 and _is_header(cells):
                names = _header_names(cells[1:])
                continue
            yield Recipient(f"file line {line}", cells[0], _trimmed(cells[1:]), names)
    except UnicodeDecodeError:
        raise InvalidMessage("file", "must be UTF-8 text (CSV)") from None
    except csv.Error as exc:
        raise InvalidMessage("file", f"is not readable CSV: {exc}") from None
    finally:
        with contextlib.suppress(ValueError):  # the upload is closed already: nothing to give back
            text.detach()  # the wrapper must not close the upload: it is read twice


def _trimmed(cells: list[str]) -> list[str]:
    """Trailing empty cells are not parameters (spreadsheets pad rows to the widest line)."""
    while cells and not cells[-1]:
        cells.pop()
    return cells


def _is_header(cells: list[str]) -> bool:
    try:
        normalize_recipient(cells[0])
    except InvalidMessage:
        return True
    return False


def _header_names(names: list[str]) -> list[str] | None:
    names = _trimmed(list(names))
    positional = all(n.lower() in (f"param{i}", str(i), f"{{{{{i}}}}}") for i, n in enumerate(names, start=1))
    return None if positional else names


# ---------------------------------------------------------------------------- checks


def check_template(spec: TemplateSpec, found: list[TemplateInfo] | None) -> TemplateInfo | None:
    """Name, language and status against the synced set (None: not synced, not checked), and the
    parameters of the fixed components; the body's are each recipient's own (`scan` counts them)."""
    if found is None:
        return None
    info = templates.find(found, spec.name, spec.language)
    given = templates.given_counts({"components": spec.components})
    given.setdefault("body", templates.parameter_counts(info).get("body", 0))
    templates.check_counts(info, given)
    return info


def scan(recipients: Recipients, plan: Plan, max_recipients: int) -> int:
    """Check every recipient (run in a thread: a large list must not stall the event loop); how many."""
    expected = None if plan.info is None else templates.parameter_counts(plan.info).get("body", 0)
    fixed_body = any(str(c.get("type", "")).lower() == "body" for c in plan.template.components)
    count = 0
    with contextlib.closing(recipients):
        for r in recipients:
            count += 1
            _check(r, plan, count=count, max_recipients=max_recipients, expected=expected, fixed_body=fixed_body)
    if count == 0:
        raise InvalidMessage("recipients", "at least one recipient is required")
    return count


def _check(
    r: Recipient, plan: Plan, *, count: int, max_recipients: int, expected: int | None, fixed_body: bool
) -> None:
    """One recipient: a number Meta can address, and as many body parameters as the template takes."""
    if count > max_recipients:
        raise InvalidMessage("recipients", f"more than campaigns.max_recipients ({max_recipients})")
    _normalised(r)
    if fixed_body and r.params:
        raise InvalidMessage(f"{r.where}.params", "the body's parameters are given in template.components already")
    if expected is not None and not fixed_body and len(r.params) != expected:
        assert plan.info is not None
        raise InvalidMessage(
            f"{r.where}.params",
            f"{templates.describe(plan.info)}: body takes {expected} parameter(s), got {len(r.params)}",
        )


def _normalised(r: Recipient) -> str:
    try:
        return normalize_recipient(r.to)
    except InvalidMessage as exc:
        raise InvalidMessage(f"{r.where}.to", str(exc).removeprefix("to: ")) from None


# ---------------------------------------------------------------------------- rows


def payload(plan: Plan, r: Recipient) -> dict[str, Any]:
    """The Cloud API template message for one recipient (messages/template-messages)."""
    components = list(plan.template.components)
    if r.params:
        names = r.names or plan.body_names
        params: list[dict[str, Any]] = [{"type": "text", "text": p} for p in r.params]
        if names and len(names) == len(params) and not all(n.isdigit() for n in names):
            params = [{**p, "parameter_name": n} for p, n in zip(params, names, strict=True)]
        components.append({"type": "body", "parameters": params})
    template: dict[str, Any] = {"name": plan.template.name, "language": {"code": plan.template.language}}
    if components:
        template["components"] = components
    to = _normalised(r)
    return {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, "type": "template",
            "template": template}  # fmt: skip


def row(plan: Plan, r: Recipient) -> OutboxRow:
    body = payload(plan, r)
    recipient = addressee(body)
    return OutboxRow(
        id=new_outbox_id(),
        idem_key=f"campaign:{plan.id}:{recipient}",
        tenant=plan.tenant,
        recipient=recipient,
        type="template",
        payload=msgspec.json.encode(body),
        priority=1,  # business-initiated: every conversation goes first
        send_at=plan.send_at,
        campaign_id=plan.id,
    )


def check_first(plan: Plan, recipients: Recipients) -> None:
    """The shape of the first send, as the API's own check would see it."""
    with contextlib.closing(recipients):
        first = next(recipients, None)
    if first is not None:
        validate_content("template", payload(plan, first)["template"])


async def load(store: Store, plan: Plan, recipients: Recipients, batch_size: int) -> dict[str, int]:
    """Queue every recipient in batches (see the module docstring); totals of this request."""
    totals = {"queued": 0, "skipped": 0, "duplicates": 0}
    batch: list[OutboxRow] = []
    with contextlib.closing(recipients):
        for r in recipients:
            batch.append(row(plan, r))
            if len(batch) >= batch_size:
                _add(totals, await store.campaigns.add(plan.id, batch, marketing=plan.marketing))
                batch = []
    if batch:
        _add(totals, await store.campaigns.add(plan.id, batch, marketing=plan.marketing))
    return totals


def _add(totals: dict[str, int], part: dict[str, int]) -> None:
    for key, value in part.items():
        totals[key] = totals.get(key, 0) + value
