"""Which stored webhook events need a person: an account restricted or disabled, a template paused,
disabled or rejected, a quality downgrade. The status page lists the latest of them per tenant.

Values are Meta's, compared case-insensitively and read defensively (a field of another type, an
unknown event or an undecodable value is simply not listed). Sources, all under
developers.facebook.com/docs/whatsapp/cloud-api/webhooks/reference/:
- `account_update`: `event` ACCOUNT_RESTRICTION (`restriction_info[].restriction_type`),
  ACCOUNT_VIOLATION (`violation_info.violation_type`), DISABLED_UPDATE (`ban_info.waba_ban_state`
  e.g. DISABLE, SCHEDULE_FOR_DISABLE, REINSTATE), ACCOUNT_DELETED, ACCOUNT_OFFBOARDED, PARTNER_REMOVED,
  PARTNER_APP_UNINSTALLED.
- `message_template_status_update`: `event` APPROVED, REJECTED, PENDING, PAUSED, DISABLED, FLAGGED,
  LOCKED, LIMIT_EXCEEDED, REINSTATED, …, with `message_template_id`/`_name`/`_language` and `reason`.
- `message_template_quality_update`: `previous_quality_score` → `new_quality_score` (GREEN,
  YELLOW, RED, UNKNOWN).
- `phone_number_quality_update`: `event` (DOWNGRADE, FLAGGED, UNFLAGGED, UPGRADE, ONBOARDING,
  THROUGHPUT_UPGRADE), `display_phone_number`, `current_limit`.

Only the newest event about one subject counts: a template PAUSED then APPROVED again, a number
FLAGGED then UNFLAGGED, an account disabled then reinstated no longer need anyone.

The open view shows the kind and time only; `detail` (template name, reason, restriction types,
the business number) is for the detailed view behind the API token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: The fields read, in the order they are fetched from the store.
FIELDS = (
    "account_update",
    "message_template_status_update",
    "message_template_quality_update",
    "phone_number_quality_update",
)

ACCOUNT_EVENTS = {
    "ACCOUNT_RESTRICTION": "account restricted",
    "ACCOUNT_VIOLATION": "account policy violation",
    "ACCOUNT_DELETED": "account deleted",
    "ACCOUNT_OFFBOARDED": "account offboarded",
    "PARTNER_REMOVED": "account unshared from the partner",
    "PARTNER_APP_UNINSTALLED": "app access revoked",
}
BAN_STATES = {"DISABLE": "account disabled", "SCHEDULE_FOR_DISABLE": "account to be disabled"}
BAN_STATES_OK = frozenset({"REINSTATE", "REINSTATED", "ACTIVE"})
TEMPLATE_EVENTS = {
    "PAUSED": "template paused",
    "DISABLED": "template disabled",
    "REJECTED": "template rejected",
    "FLAGGED": "template flagged",
    "LOCKED": "template locked",
    "LIMIT_EXCEEDED": "template limit exceeded",
}
TEMPLATE_QUALITY_BAD = frozenset({"RED", "YELLOW"})
NUMBER_EVENTS = {"DOWNGRADE": "number quality downgraded", "FLAGGED": "number quality flagged"}
DETAIL_MAX = 300


def _text(value: Any) -> str:
    """A scalar as upper-case text ("" for anything else), for comparing Meta's enum values."""
    return str(value).strip().upper() if isinstance(value, str | int) and not isinstance(value, bool) else ""


def _get(value: Any, *path: str) -> Any:
    """`value[path[0]][path[1]]…`, or None where a level is missing or not an object."""
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _join(*parts: Any) -> str:
    """The non-empty scalar parts, joined; capped so a hostile value cannot flood the page."""
    text = " · ".join(str(p) for p in parts if isinstance(p, str | int) and not isinstance(p, bool) and str(p))
    return text[:DETAIL_MAX]


def _account(value: Mapping[str, Any]) -> tuple[str, str | None, str] | None:
    event = _text(value.get("event"))
    if event == "DISABLED_UPDATE":
        state = _text(_get(value, "ban_info", "waba_ban_state"))
        if state in BAN_STATES_OK:
            return "", "ban", ""
        kind = BAN_STATES.get(state, "account disabled")
        return kind, "ban", _join(state, _get(value, "ban_info", "waba_ban_date"))
    found = ACCOUNT_EVENTS.get(event)
    if found is None:
        return None
    restrictions = value.get("restriction_info")
    types = [_get(r, "restriction_type") for r in restrictions] if isinstance(restrictions, list) else []
    return found, None, _join(*types[:5], _get(value, "violation_info", "violation_type"))


def _template(value: Mapping[str, Any]) -> tuple[str, str | None, str]:
    subject = f"template:{_text(value.get('message_template_id'))}:{_text(value.get('message_template_language'))}"
    kind = TEMPLATE_EVENTS.get(_text(value.get("event")), "")
    detail = _join(value.get("message_template_name"), value.get("message_template_language"), value.get("reason"))
    return kind, subject, detail


def _template_quality(value: Mapping[str, Any]) -> tuple[str, str | None, str]:
    subject = f"quality:{_text(value.get('message_template_id'))}:{_text(value.get('message_template_language'))}"
    score = _text(value.get("new_quality_score"))
    kind = f"template quality {score}" if score in TEMPLATE_QUALITY_BAD else ""
    previous = _text(value.get("previous_quality_score"))
    return kind, subject, _join(value.get("message_template_name"), f"{previous or '?'} → {score or '?'}")


def _number_quality(value: Mapping[str, Any]) -> tuple[str, str | None, str]:
    number = value.get("display_phone_number")
    kind = NUMBER_EVENTS.get(_text(value.get("event")), "")
    return kind, f"number:{_text(number)}", _join(number, value.get("current_limit"))


def classify(field: str, value: Any) -> tuple[str, str | None, str] | None:
    """(kind, subject, detail) of one event; kind "" = about a subject but needs no one now;
    None = not an event this page follows. `subject` names what a later event supersedes."""
    if not isinstance(value, Mapping):
        return None
    if field == "account_update":
        return _account(value)
    if field == "message_template_status_update":
        return _template(value)
    if field == "message_template_quality_update":
        return _template_quality(value)
    if field == "phone_number_quality_update":
        return _number_quality(value)
    return None


def needing_a_person(events: Iterable[Mapping[str, Any]], per_tenant: int) -> list[dict[str, Any]]:
    """The newest events that need someone, at most `per_tenant` per tenant (None: WABA-level).

    `events` must be newest first (as `Store.events` returns them). An event whose subject was
    already seen in a newer event is superseded and skipped.
    """
    seen: set[tuple[str | None, str, str]] = set()
    shown: dict[str | None, int] = {}
    out: list[dict[str, Any]] = []
    for event in events:
        tenant, field = event.get("tenant"), str(event.get("field") or "")
        found = classify(field, event.get("value"))
        if found is None:
            continue
        kind, subject, detail = found
        if subject is not None:
            key = (str(event.get("waba_id") or ""), field, subject)
            if key in seen:
                continue
            seen.add(key)
        if not kind or shown.get(tenant, 0) >= per_tenant:
            continue
        shown[tenant] = shown.get(tenant, 0) + 1
        out.append(_row(event, field, kind, detail))
    return out


def _row(event: Mapping[str, Any], field: str, kind: str, detail: str) -> dict[str, Any]:
    return {
        "tenant": event.get("tenant"),
        "field": field,
        "kind": kind,
        "time": event.get("time"),
        "received_at": event.get("received_at"),
        "waba_id": event.get("waba_id"),
        "detail": detail,
    }


#: What the open view keeps of a row (the kind and when; names, reasons and ids need the token).
OPEN_KEYS = ("tenant", "field", "kind", "time", "received_at")
