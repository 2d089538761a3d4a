"""The default bot: echoes text back and answers everything else like a polite person would.

It shows the smallest useful handler: a route, a catch-all, a read receipt with a typing
indicator, and replies that go to the outbox in the same transaction that marks the message
handled. Text is answered by the catch-all rather than a text route on purpose: with
`[orchestrator] url` set, texts no route claims go to the orchestrator before the catch-all,
so the same bot becomes a bridge to the agent platform without a code change.

What it answers (never with an internal type name): a text is echoed; media, a location,
contacts, button, list and flow replies, an order get a short acknowledgement; a message it cannot
read (`unsupported`, `unknown`, a type added later, one that did not decode) gets one sentence
saying so; a first `request_welcome` gets a greeting. Reactions, deleted and edited messages and
system notices change or comment on the conversation rather than say something new: no reply,
and no read receipt either.
"""

from __future__ import annotations

from alfred_bot.context import MAX_TEXT, Context
from alfred_bot.models import (
    AudioMessage,
    ButtonMessage,
    ContactsMessage,
    DocumentMessage,
    ImageMessage,
    InteractiveMessage,
    LocationMessage,
    Message,
    OrderMessage,
    RequestWelcomeMessage,
    StickerMessage,
    TextMessage,
    VideoMessage,
)
from alfred_bot.router import Router

router = Router("echo")

PREFIX = "You said: "
GREETING = "Hello! Send me a message and I will answer."
CANNOT_DISPLAY = "Sorry, I can't display that kind of message here."
#: Acknowledgements by message class, in words a person would use: every class of `models.WRITTEN`
#: but text (echoed) and audio (voice or not, see `reply_for`).
ACKNOWLEDGE: dict[type, str] = {
    ImageMessage: "Thanks, I got your photo.",
    VideoMessage: "Thanks, I got your video.",
    DocumentMessage: "Thanks, I got your document.",
    StickerMessage: "Thanks for the sticker!",
    LocationMessage: "Thanks, I got your location.",
    ContactsMessage: "Thanks, I got the contact details.",
    ButtonMessage: "Thanks, I got your answer.",
    OrderMessage: "Thanks, I got your order.",
}
_INTERACTIVE = {
    "button_reply": "Thanks, I got your answer.",
    "list_reply": "Thanks, I got your choice.",
    "nfm_reply": "Thanks, I got your form.",
    "call_permission_reply": "Thanks, I noted your answer about calls.",
}


@router.message("system", "reaction", "revoke", "edit")
async def stay_silent(message: Message, ctx: Context) -> None:
    """Number changes, reactions, deletions and edits need no answer (and no read receipt)."""


def reply_for(message: Message) -> str:
    """What the bot says to anything but a text: never an internal type name."""
    if isinstance(message, RequestWelcomeMessage):
        return GREETING
    if isinstance(message, AudioMessage):
        return "Thanks, I got your voice message." if message.audio.voice else "Thanks, I got your audio."
    if isinstance(message, InteractiveMessage):
        return _INTERACTIVE.get(message.interactive.type, CANNOT_DISPLAY)
    return ACKNOWLEDGE.get(type(message), CANNOT_DISPLAY)


@router.default
async def answer(message: Message, ctx: Context) -> None:
    """Echo a text (cut to fit the 4096-character limit); answer any other message politely."""
    ctx.mark_read(typing=True)
    if not isinstance(message, TextMessage):
        ctx.reply(reply_for(message))
        return
    text = message.text or ""
    room = MAX_TEXT - len(PREFIX)
    ctx.reply(PREFIX + (text if len(text) <= room else text[: room - 1] + "…"))
