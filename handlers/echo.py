"""The default bot: echoes text back and acknowledges everything else.

It shows the smallest useful handler: a route, a catch-all, a read receipt with a typing
indicator, and replies that go to the outbox in the same transaction that marks the message
handled. Text is answered by the catch-all rather than a text route on purpose: with
`[orchestrator] url` set, texts no route claims go to the orchestrator before the catch-all,
so the same bot becomes a bridge to the agent platform without a code change.
"""

from __future__ import annotations

from alfred_bot.context import MAX_TEXT, Context
from alfred_bot.models import Message
from alfred_bot.router import Router

router = Router("echo")

PREFIX = "You said: "


@router.message("system")
async def ignore_system(message: Message, ctx: Context) -> None:
    """System notices (a user changed number) need no answer."""


@router.default
async def answer(message: Message, ctx: Context) -> None:
    """Echo a text (cut to fit the 4096-character limit); acknowledge any other type."""
    ctx.mark_read(typing=True)
    if message.type != "text":
        ctx.reply(f"Thanks! I received your {message.type} message.")
        return
    text = message.text or ""
    room = MAX_TEXT - len(PREFIX)
    ctx.reply(PREFIX + (text if len(text) <= room else text[: room - 1] + "…"))
