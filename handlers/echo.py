"""The default bot: echoes text back and acknowledges everything else.

It shows the whole handler API in a few lines: routes by type, a catch-all, a read receipt with
a typing indicator, and replies that go to the outbox in the same transaction that marks the
message handled.
"""

from __future__ import annotations

from alfred_bot.context import MAX_TEXT, Context
from alfred_bot.models import Message
from alfred_bot.router import Router

router = Router("echo")

PREFIX = "You said: "


@router.message("text")
async def echo_text(message: Message, ctx: Context) -> None:
    """Answer a text with the same text (cut to fit the 4096-character limit)."""
    ctx.mark_read(typing=True)
    text = message.text or ""
    room = MAX_TEXT - len(PREFIX)
    ctx.reply(PREFIX + (text if len(text) <= room else text[: room - 1] + "…"))


@router.message("system")
async def ignore_system(message: Message, ctx: Context) -> None:
    """System notices (a user changed number) need no answer."""


@router.default
async def acknowledge(message: Message, ctx: Context) -> None:
    """Any other message type gets a short acknowledgement."""
    ctx.mark_read(typing=True)
    ctx.reply(f"Thanks! I received your {message.type} message.")
