"""A household/business concierge: commands, buttons, a list menu, reactions and delivery follow-ups.

The example the README's "Writing a bot" walks through. Pick it for a tenant with
`handler = "concierge"` in `[tenants.NAME]`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from alfred_bot.context import Context, StatusContext
from alfred_bot.models import Message, Status
from alfred_bot.router import CONTINUE, Next, Router

log = logging.getLogger("handlers.concierge")

router = Router("concierge")

OPENING_HOURS = "Mon–Fri 9:00–18:00, Sat 10:00–14:00"


@router.use
async def timed(message: Message, ctx: Context, call_next: Next) -> Any:
    """Middleware: log how long each handler took (outermost, so it times everything)."""
    started = time.perf_counter()
    try:
        return await call_next()
    finally:
        log.info("%s handled in %.1f ms", message.type, (time.perf_counter() - started) * 1000)


@router.message()
async def seen(message: Message, ctx: Context) -> object:
    """Every message is marked read first; CONTINUE lets the real route answer it."""
    if message.type not in ("reaction", "system"):
        ctx.mark_read(typing=True)
    return CONTINUE


@router.command("help", "start", "menu")
async def menu(message: Message, ctx: Context) -> None:
    name = ctx.user_name or "there"
    ctx.reply_buttons(
        f"Hi {name}! What can I do for you?",
        [("hours", "Opening hours"), ("book", "Book a visit"), ("where", "Where are you?")],
        footer="Write STOP at any time to stop messages",
    )


@router.command("ping")
async def ping(message: Message, ctx: Context) -> None:
    ctx.reply("pong", quote=True)


@router.interactive("hours")
async def hours(message: Message, ctx: Context) -> None:
    ctx.reply(f"We are open {OPENING_HOURS}.")


@router.interactive("book")
async def book(message: Message, ctx: Context) -> None:
    ctx.reply_list(
        "When would you like to come?",
        "Pick a slot",
        {
            "Tomorrow": [("slot-tomorrow-10", "10:00", "Morning"), ("slot-tomorrow-15", "15:00", "Afternoon")],
            "Saturday": [("slot-sat-11", "11:00", "Late morning")],
        },
    )


@router.interactive(pattern=r"^slot-")
async def booked(message: Message, ctx: Context) -> None:
    ctx.reply(f"Booked: {message.text}. See you then!", quote=True)
    ctx.react("✅")


@router.interactive("where")
async def where(message: Message, ctx: Context) -> None:
    ctx.reply_location(51.5014, -0.1419, name="Alfred & Co.", address="1 Example Street, London")
    ctx.reply_cta("Directions and parking", "Open map", "https://maps.example.com/alfred")


@router.command("history")
async def history(message: Message, ctx: Context) -> None:
    """Read the conversation back from the store (both directions, oldest first)."""
    items = await ctx.history(limit=6)
    lines = [f"{'you' if i['direction'] == 'in' else 'me'}: {i['text'] or '[' + i['type'] + ']'}" for i in items]
    ctx.reply("\n".join(lines) or "Nothing yet.")


@router.button("confirm")
async def confirmed(message: Message, ctx: Context) -> None:
    """A tap on a template's quick-reply button whose payload is "confirm"."""
    ctx.reply("Thanks, your appointment is confirmed.")


@router.reaction()
async def reacted(message: Message, ctx: Context) -> None:
    """Reactions need no answer; a real bot might record them as feedback."""


@router.message("image", "document")
async def received_file(message: Message, ctx: Context) -> None:
    ctx.reply("Thanks, we received your file and will look at it.", quote=True)


@router.default
async def fallback(message: Message, ctx: Context) -> None:
    ctx.reply("Sorry, I did not get that. Write *menu* to see what I can do.")


@router.status("failed")
async def undelivered(status: Status, ctx: StatusContext) -> None:
    """Outside the 24-hour window only templates reach the user: re-engage with one."""
    if status.errors and status.errors[0].code == 131047:
        ctx.reply_template("we_miss_you", "en_US")
