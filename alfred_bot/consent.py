"""Consent: the opt-out words, what ends an opt-out, and the built-in middleware that applies both.

The middleware runs before everything else in a tenant's router (the dispatcher installs it
outermost, `Router.mount`): an opt-out word is answered here and never reaches the bot, and the
verdict goes on the context (`ctx.consent`), which the dispatcher records in the same transaction
as the message's completion.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from alfred_bot.config import LimitsConfig
from alfred_bot.models import WRITTEN, ButtonMessage, InteractiveMessage, Message

if TYPE_CHECKING:
    from alfred_bot.context import Context
    from alfred_bot.router import Middleware, Next


def is_opt_out(message: Message, limits: LimitsConfig) -> bool:
    """A STOP-like text (whole message, any case) or a template button with an opt-out payload."""
    if isinstance(message, ButtonMessage):
        return message.button.payload is not None and message.button.payload in limits.opt_out_payloads
    if message.type != "text" or message.text is None:
        return False
    word = message.text.strip().rstrip(".!").strip().casefold()
    return any(word == k.strip().casefold() for k in limits.opt_out_keywords)


#: Taps on our interactive messages: reply buttons, list rows, a completed flow. Not a
#: `call_permission_reply`: accepting calls says nothing about wanting messages again.
_TAPPED = frozenset({"button_reply", "list_reply", "nfm_reply"})


def ends_opt_out(message: Message) -> bool:
    """True when this message means the user wants to hear from us again (lifts an opt-out).

    Judged by the decoded class, never by the `type` string: a message kept with a parse error
    is an `UnknownMessage` whatever type it claims, and never ends an opt-out.
    """
    if isinstance(message, InteractiveMessage):
        return message.interactive.type in _TAPPED
    return isinstance(message, WRITTEN)


def consent_middleware(limits: LimitsConfig, counts: Counter[str]) -> Middleware:
    """The built-in consent step: an opt-out word ends handling here (with `limits.opt_out_reply`,
    counted as `opted_out`); any other message the user writes or taps lifts an opt-out, even if
    the bot then fails (the user did write), so `ctx.consent` is set before the bot runs."""

    async def consent(message: Message, ctx: Context, call_next: Next) -> Any:
        if is_opt_out(message, limits):
            counts["opted_out"] += 1
            ctx.consent = "out"
            if limits.opt_out_reply.strip():
                ctx.reply(limits.opt_out_reply[:4096])
            return None
        ctx.consent = "in" if ends_opt_out(message) else None
        return await call_next()

    return consent
