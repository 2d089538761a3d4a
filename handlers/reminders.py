"""Reminders: a multi-step dialog with durable scheduled sends. Pick it with `handler = "reminders"`.

    user: remind me                 bot: What should I remind you about?
    user: water the plants          bot: When? For example "in 10 minutes", "at 18:30", "tomorrow at 9".
    user: in 2 hours                bot: OK! I'll remind you to "water the plants" today at 20:15 (Europe/Madrid).
    … two hours later …             bot: ⏰ Reminder: water the plants

"cancel" leaves the dialog at any step; "my reminders" lists the pending ones and "delete 2"
deletes one. Times are read in the tenant's `timezone`. The reminder is a scheduled outbox row
queued with the confirmation (`ctx.schedule`), so it is sent exactly once, whatever restarts or
crashes happen meanwhile. WhatsApp lets a business send free-form messages only within 24 hours
of the user's last message: a later reminder goes as the tenant's `reminder_template` (its one
body parameter is the thing to remember) or, without one, is refused up front.
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from typing import Any
from zoneinfo import ZoneInfo

from alfred_bot.context import Context
from alfred_bot.models import Message
from alfred_bot.router import Router

router = Router("reminders")

ASKING_WHAT, ASKING_WHEN, LISTED = "reminders:what", "reminders:when", "reminders:listed"
IN_DIALOG = (ASKING_WHAT, ASKING_WHEN)
TAG = "reminder"
PREFIX = "⏰ Reminder: "
#: An abandoned dialog ends by itself after this long; a listing is valid for "delete N" this long.
DIALOG_TTL = 3600.0
LISTING_TTL = 900.0
MAX_WHAT = 500
#: The 24-hour window counts from Meta's timestamp of the user's message; keep a margin.
WINDOW = 24 * 3600 - 60
EXAMPLES = 'For example "in 10 minutes", "at 18:30" or "tomorrow at 9".'
HELP = 'I keep reminders for you. Write "remind me" to set one, "my reminders" to see them.'

_FLAGS = re.IGNORECASE
CANCEL = re.compile(r"^\s*(cancel|never\s*mind|forget it)\s*[.!]*\s*$", _FLAGS)
REMIND = re.compile(r"^\s*remind\s+me\b(?:\s+(?:to|about|that)\b)?\s*(?P<what>.*?)\s*$", _FLAGS | re.DOTALL)
LIST = re.compile(r"^\s*(my\s+reminders|list(\s+reminders)?|reminders)\s*[?.!]*\s*$", _FLAGS)
DELETE = re.compile(r"^\s*(delete|remove|cancel)\s+(reminder\s+)?#?(?P<n>\d{1,3})\s*[.!]*\s*$", _FLAGS)

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hr": 3600, "hour": 3600,
          "d": 86400, "day": 86400}  # fmt: skip
_IN = re.compile(r"^in\s+(?P<n>an?|\d{1,6})\s*(?P<unit>[a-z]+?)s?$")
_AT = re.compile(
    r"^(?:(?P<day>today|tomorrow)\s*)?(?:at\s*)?(?P<h>\d{1,2})(?:[:.h](?P<m>\d{2}))?\s*(?P<ampm>am|pm)?$"
)


def parse_when(text: str, now: datetime) -> datetime | None:
    """When the user means, as an aware datetime in `now`'s zone; None if not understood.

    "in N seconds/minutes/hours/days" (also "in an hour", "in 5 min"); "at 18:30", "at 6pm"
    (the next such time: tomorrow if it has passed today); "today at 9", "tomorrow at 9:30"."""
    words = " ".join(text.lower().strip().rstrip(".!").split())
    if match := _IN.fullmatch(words):
        unit = _UNITS.get(match["unit"])
        count = 1 if match["n"] in ("a", "an") else int(match["n"])
        return now + timedelta(seconds=count * unit) if unit and count > 0 else None
    match = _AT.fullmatch(words)
    if match is None or not (match["day"] or match["m"] or match["ampm"] or words.startswith("at")):
        return None
    return _at(match, now)


def _at(match: re.Match[str], now: datetime) -> datetime | None:
    hour, minute = int(match["h"]), int(match["m"] or 0)
    if match["ampm"]:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if match["ampm"] == "pm" else 0)
    if hour > 23 or minute > 59:
        return None
    day: date = now.date() + timedelta(days=1 if match["day"] == "tomorrow" else 0)
    moment = datetime.combine(day, clock_time(hour, minute), tzinfo=now.tzinfo)
    if moment <= now and match["day"] is None:
        moment = datetime.combine(day + timedelta(days=1), clock_time(hour, minute), tzinfo=now.tzinfo)
    return moment if moment > now else None


def describe(at: datetime, now: datetime) -> str:
    """ "in 10 seconds", "today at 18:30", "tomorrow at 09:00", "on Wed 2 Dec at 09:00" (zone named)."""
    seconds = (at - now).total_seconds()
    if seconds < 120:
        count = max(1, round(seconds))
        return f"in {count} second{'s' if count != 1 else ''}"
    days = (at.date() - now.date()).days
    when = {0: "today", 1: "tomorrow"}.get(days, f"on {at:%a} {at.day} {at:%b}")
    return f"{when} at {at:%H:%M} ({at.tzinfo})"


def _text(message: Message) -> str:
    return (message.text or "").strip()


def _thing(item: dict[str, Any]) -> str:
    """What a scheduled reminder reminds of, from its payload (text or template)."""
    payload = item.get("payload") or {}
    if item.get("type") == "text":
        return str(payload.get("text", {}).get("body", "")).removeprefix(PREFIX)
    for component in payload.get("template", {}).get("components", []):
        params = component.get("parameters") or [{}]
        return str(params[0].get("text", "a reminder"))
    return "a reminder"


@router.message("text", text=CANCEL)
async def cancel(message: Message, ctx: Context) -> None:
    """Leave the dialog, whatever its step."""
    if ctx.state.step is None:
        ctx.reply("There is nothing to cancel. " + HELP)
        return
    ctx.state.clear()
    ctx.reply("OK, cancelled.")


@router.message("text", text=LIST)
async def listing(message: Message, ctx: Context) -> None:
    """The pending reminders, numbered; the numbers stay valid for "delete N" a while."""
    items = await ctx.scheduled(TAG)
    if not items:
        ctx.state.clear()
        ctx.reply('You have no reminders. Write "remind me" to set one.')
        return
    now = datetime.now(ctx.timezone)
    lines = [f"{i}. {_thing(item)} — {describe(_local(item, ctx.timezone), now)}" for i, item in enumerate(items, 1)]
    ctx.state.set(LISTED, {"ids": [item["id"] for item in items]}, ttl=LISTING_TTL)
    ctx.reply("Your reminders:\n" + "\n".join(lines) + '\n\nWrite "delete 2" to delete the second one.')


@router.message("text", text=DELETE)
async def delete(message: Message, ctx: Context) -> None:
    """Delete the N-th reminder of the last listing (or of the current list)."""
    match = DELETE.match(_text(message))
    number = int(match["n"]) if match else 0
    pending = {item["id"]: item for item in await ctx.scheduled(TAG)}
    listed = ctx.state.get("ids") if ctx.state.step == LISTED else None
    ids: list[str | None] = listed if isinstance(listed, list) else list(pending)
    if not 1 <= number <= len(ids):
        ctx.reply(f'There is no reminder {number}. Write "my reminders" to see them.')
        return
    chosen = ids[number - 1]
    if chosen is None or chosen not in pending:
        ctx.reply(f"Reminder {number} is not pending any more (already sent or deleted).")
        return
    ctx.cancel(chosen)
    ids[number - 1] = None  # the other numbers stay as listed
    ctx.state.set(LISTED, {"ids": ids}, ttl=LISTING_TTL)
    ctx.reply(f"Deleted reminder {number}: {_thing(pending[chosen])}.")


@router.message("text", text=REMIND)
async def start(message: Message, ctx: Context) -> None:
    """ "remind me" asks what; "remind me to water the plants" goes straight to when."""
    match = REMIND.match(_text(message))
    what = match["what"] if match else ""
    if what:
        await remember(message, ctx, what)
        return
    ctx.state.set(ASKING_WHAT, ttl=DIALOG_TTL)
    ctx.reply("What should I remind you about?")


@router.message("text", state=ASKING_WHAT)
async def what(message: Message, ctx: Context) -> None:
    await remember(message, ctx, _text(message))


async def remember(message: Message, ctx: Context, thing: str) -> None:
    if len(thing) > MAX_WHAT:
        ctx.state.set(ASKING_WHAT, ttl=DIALOG_TTL)
        ctx.reply(f"That is a bit long: please keep it under {MAX_WHAT} characters.")
        return
    ctx.state.set(ASKING_WHEN, {"what": thing}, ttl=DIALOG_TTL)
    ctx.reply("When? " + EXAMPLES)


@router.message("text", state=ASKING_WHEN)
async def when(message: Message, ctx: Context) -> None:
    """Read the time; schedule the reminder with the confirmation (one transaction)."""
    zone = ctx.timezone
    now = datetime.now(zone)
    at = parse_when(_text(message), now)
    if at is None:
        ctx.reply("Sorry, I did not understand that time. " + EXAMPLES + ' Or write "cancel".')
        return
    thing = str(ctx.state.get("what", ""))
    if not _schedule(message, ctx, at, thing):
        ctx.reply(
            "I can only send a reminder within 24 hours of your last message (WhatsApp's rule), "
            "so please choose an earlier time, or write \"cancel\"."
        )
        return
    ctx.state.clear()
    ctx.reply(f'OK! I\'ll remind you to "{thing}" {describe(at, now)}.')


def _schedule(message: Message, ctx: Context, at: datetime, thing: str) -> bool:
    """Queue the reminder: free-form inside the window, else the tenant's template; False if neither."""
    later = ctx.schedule(at, tag=TAG)
    if at.timestamp() <= min(message.timestamp, time.time()) + WINDOW:
        later.reply(PREFIX + thing)
        return True
    settings = ctx.settings
    if settings is None or settings.reminder_template is None:
        return False
    later.reply_template(settings.reminder_template, settings.reminder_template_language, body_params=[thing])
    return True


@router.state(*IN_DIALOG)
async def not_text(message: Message, ctx: Context) -> None:
    """A photo, a sticker… in the middle of the dialog: ask again."""
    question = "What should I remind you about?" if ctx.state.step == ASKING_WHAT else "When? " + EXAMPLES
    ctx.reply(f'Please answer in words, or write "cancel". {question}')


@router.default
async def help_(message: Message, ctx: Context) -> None:
    if message.type in ("reaction", "system", "revoke", "edit"):
        return
    ctx.reply(HELP)


def _local(item: dict[str, Any], zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(float(item["send_at"]), zone)
