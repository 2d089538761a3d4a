"""The handler's view of one inbound message (or status update), and how it answers.

Every `reply_*` method builds a Cloud API message, validates it against the reference limits
(a bad reply raises `ReplyError` naming the field before anything is queued) and buffers it;
the dispatcher commits the buffer with the message's completion, so replies are written
exactly once however often a crash makes the handler run.
"""

from __future__ import annotations

import copy
import re
import zoneinfo
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from alfred_bot.config import TenantConfig
from alfred_bot.dialog import DialogState, When, send_time
from alfred_bot.media import MediaError, MediaFile, check_upload
from alfred_bot.models import (
    AudioMessage,
    Contact,
    DocumentMessage,
    ImageMessage,
    Message,
    Status,
    StickerMessage,
    VideoMessage,
)
from alfred_bot.store import OutboxRow, new_outbox_id
from alfred_bot.text import command_of
from alfred_bot.validate import MEDIA_TYPES, InvalidMessage, validate_content

if TYPE_CHECKING:
    from alfred_bot.graph import Transport
    from alfred_bot.store import Queries
    from alfred_bot.store.base import Dialogs

    class ContextStore(Queries, Protocol):
        """What a context reads: history, and the user's state and scheduled sends."""

        @property
        def dialogs(self) -> Dialogs: ...

MAX_TEXT = 4096
_TAG = re.compile(r"[A-Za-z0-9_-]{1,40}")

ReplyError = InvalidMessage  # a reply the Cloud API would refuse; raised before anything is queued

#: A button: `(id, title)`; a list row: `(id, title)` or `(id, title, description)`.
Choice = tuple[str, str] | tuple[str, str, str]
#: What a message says about the user's consent: "out" (an opt-out word), "in" (it lifts one).
Consent = Literal["in", "out"]


def phone_to(user: str) -> str:
    """The `to` of a send: `+` and the digits (without it Meta prefixes our own country code)."""
    return f"+{user}" if user.isdigit() else user


def address_of(phone: str | None, user_id: str | None) -> dict[str, str]:
    """How a send names a user: `to` with their phone number when Meta gave us one, else the
    top-level `recipient` with their business-scoped user id (a username-only user, 2026).

    Meta: `to` is "required unless `recipient` is provided", and `recipient` takes a BSUID
    (calling/call-button-messages-deep-links, calling/business-initiated-calls); a BSUID in `to`
    is not documented."""
    if phone:
        return {"to": phone_to(phone)}
    if user_id:
        return {"recipient": user_id}
    raise ReplyError("to", "this update names no recipient")


@dataclass(frozen=True, slots=True)
class Services:
    """What a context may reach beyond its message: the store (history) and the transport (media)."""

    store: ContextStore
    transport: Transport
    media_dir: Path
    max_download_bytes: int
    #: Each tenant's settings (time zone, reminder template), for handlers that need them.
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    #: Checks a template send against the tenant's synced templates (raises `InvalidMessage`), as
    #: the API does, before a handler's replies are committed; None: unchecked.
    check_template: Callable[[str, dict[str, Any]], Awaitable[object]] | None = None


def _framed(kind: str, text: str, action: dict[str, Any], header: str | None, footer: str | None) -> dict[str, Any]:
    content: dict[str, Any] = {"type": kind, "body": {"text": text}, "action": action}
    if header is not None:
        content["header"] = {"type": "text", "text": header}
    if footer is not None:
        content["footer"] = {"text": footer}
    return content


def _row(choice: Sequence[str]) -> dict[str, str]:
    row = {"id": choice[0], "title": choice[1]}
    if len(choice) > 2:
        row["description"] = choice[2]
    return row


class Outgoing:
    """The reply vocabulary shared by message and status contexts."""

    tenant: str
    replies: list[OutboxRow]
    trace_id: str = ""
    origin_at: float | None = None
    _send_at: float | None = None  # set on the view `schedule` returns
    _tag: str = ""

    @property
    def address(self) -> dict[str, str]:
        """`{"to": "+<phone>"}` or, for a username-only user, `{"recipient": "<BSUID>"}`."""
        raise NotImplementedError

    @property
    def recipient(self) -> str:
        """The id the user is known by here (outbox `recipient`: pair limits, history, opt-out)."""
        raise NotImplementedError

    def _quoted(self) -> str | None:
        return None

    def _idem_prefix(self) -> str:
        raise NotImplementedError

    def _source(self) -> str | None:
        return None

    # ------------------------------------------------------------------ message kinds

    def reply(self, text: str, *, quote: bool = False, preview_url: bool = False, at: When | None = None) -> str:
        """Text (1–4096 characters); `quote` shows it as an answer to the message; `at` sends it
        later (see `schedule`)."""
        if not isinstance(text, str) or not text.strip():
            raise ReplyError("text.body", "must be a non-empty string")
        body: dict[str, Any] = {"body": text}
        if preview_url:
            body["preview_url"] = True
        target = self if at is None else self.schedule(at)
        return target.send("text", body, quote=quote)

    def schedule(self, at: When, *, tag: str = "") -> Outgoing:
        """This context's reply vocabulary, sending at `at` instead of now: Unix seconds, an aware
        `datetime` or a `timedelta` from now (at most a year ahead; a past time is now).

        The send is a durable outbox row in state `scheduled`, queued with the handler's other
        replies (exactly once, however often a crash re-runs the handler) and sent, paced like any
        send, when its time comes; free-form messages only if the 24-hour window is open then.
        `tag` (letters, digits, `_-`) marks it for `scheduled(tag=…)`.
        `ctx.schedule(timedelta(hours=1)).reply_template("we_miss_you")`."""
        if tag and not _TAG.fullmatch(tag):
            raise ReplyError("tag", "must be 1-40 letters, digits, '_' or '-'")
        view = copy.copy(self)  # shares `replies`: what the view queues goes with the completion
        view._send_at, view._tag = send_time(at, field="at"), tag or self._tag
        return view

    def reply_buttons(
        self,
        text: str,
        buttons: Sequence[tuple[str, str]] | Mapping[str, str],
        *,
        header: str | None = None,
        footer: str | None = None,
        quote: bool = False,
    ) -> str:
        """Up to 3 reply buttons, given as `[(id, title), …]` or `{id: title}` (titles ≤ 20)."""
        pairs = list(buttons.items()) if isinstance(buttons, Mapping) else list(buttons)
        action = {"buttons": [{"type": "reply", "reply": {"id": i, "title": t}} for i, t in pairs]}
        return self.send("interactive", _framed("button", text, action, header, footer), quote=quote)

    def reply_list(
        self,
        text: str,
        button: str,
        sections: Mapping[str, Sequence[Choice]],
        *,
        header: str | None = None,
        footer: str | None = None,
        quote: bool = False,
    ) -> str:
        """A list behind a `button`: `{section title: [(id, title[, description]), …]}` (≤ 10 rows)."""
        action = {
            "button": button,
            "sections": [{"title": title, "rows": [_row(r) for r in rows]} for title, rows in sections.items()],
        }
        return self.send("interactive", _framed("list", text, action, header, footer), quote=quote)

    def reply_cta(
        self, text: str, display_text: str, url: str, *, header: str | None = None, footer: str | None = None
    ) -> str:
        """A call-to-action button that opens `url`."""
        action = {"name": "cta_url", "parameters": {"display_text": display_text, "url": url}}
        return self.send("interactive", _framed("cta_url", text, action, header, footer))

    def reply_template(
        self,
        name: str,
        language: str = "en_US",
        *,
        body_params: Sequence[str] = (),
        components: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """An approved template; `body_params` fill {{1}}, {{2}}… of its body (or pass `components`)."""
        comps = list(components or [])
        if body_params:
            comps.append({"type": "body", "parameters": [{"type": "text", "text": p} for p in body_params]})
        content: dict[str, Any] = {"name": name, "language": {"code": language}}
        if comps:
            content["components"] = comps
        return self.send("template", content)

    def reply_media(
        self,
        kind: str,
        *,
        media_id: str | None = None,
        link: str | None = None,
        caption: str | None = None,
        filename: str | None = None,
        quote: bool = False,
    ) -> str:
        """An image, video, audio, document or sticker by uploaded `media_id` or public `link`."""
        if kind not in MEDIA_TYPES:  # a media kind Meta adds later can still go through `send`
            raise ReplyError("type", f"must be one of {', '.join(sorted(MEDIA_TYPES))}")
        content = {"id": media_id, "link": link, "caption": caption, "filename": filename}
        return self.send(kind, {k: v for k, v in content.items() if v is not None}, quote=quote)

    def reply_location(
        self, latitude: float, longitude: float, *, name: str | None = None, address: str | None = None
    ) -> str:
        """A map pin."""
        content: dict[str, Any] = {"latitude": latitude, "longitude": longitude}
        content.update({k: v for k, v in (("name", name), ("address", address)) if v is not None})
        return self.send("location", content)

    def reply_contacts(self, contacts: Sequence[dict[str, Any]]) -> str:
        """Contact cards, each at least `{"name": {"formatted_name": …}}` (plus phones, emails, …)."""
        return self.send("contacts", list(contacts))

    def react(self, emoji: str, message_id: str | None = None) -> str:
        """React to `message_id` (default: the message being answered); "" removes the reaction."""
        target = message_id or self._quoted()
        if target is None:
            raise ReplyError("reaction.message_id", "is required here")
        return self.send("reaction", {"message_id": target, "emoji": emoji})

    def send(self, kind: str, content: Any, *, quote: bool = False) -> str:
        """Queue any Cloud API message object of type `kind` (validated like the API's sends)."""
        validate_content(kind, content)
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            **self.address,
            "type": kind,
            kind: content,
        }
        quoted = self._quoted() if quote else None
        if quote and quoted is None:
            raise ReplyError("context.message_id", "there is no message to quote here")
        if quoted is not None:
            payload["context"] = {"message_id": quoted}
        return self._queue(kind, payload)

    def _queue(self, kind: str, payload: dict[str, Any], *, key: str | None = None) -> str:
        prefix = f"{self._tag}:" if self._tag else ""
        row = OutboxRow(
            id=new_outbox_id(),
            idem_key=key or f"{prefix}{self._idem_prefix()}:{len(self.replies):03d}",
            tenant=self.tenant,
            recipient=self.recipient,
            type=kind,
            payload=msgspec.json.encode(payload),
            source_event_id=self._source(),
            trace_id=self.trace_id or None,
            origin_at=self.origin_at,
            send_at=self._send_at,
        )
        self.replies.append(row)
        return row.id


_MEDIA_OF = (ImageMessage, VideoMessage, AudioMessage, DocumentMessage, StickerMessage)


class Context(Outgoing):
    """What a handler knows about the message it answers, and how it answers.

    `consent` and `limited` are the verdicts of the built-in middleware (`consent.py`,
    `limits.py`), which run before the bot's: the dispatcher records them with the completion.
    """

    def __init__(
        self,
        *,
        tenant: str,
        phone_number_id: str,
        message: Message,
        contact: Contact | None,
        services: Services | None = None,
        early: Callable[[OutboxRow], None] | None = None,
        trace_id: str = "",
        received_at: float | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.origin_at = received_at or None
        self.tenant = tenant
        self.phone_number_id = phone_number_id
        self.message = message
        self.contact = contact
        self.replies = []
        self.consent: Consent | None = None
        #: Over the per-user inbound limit: kept (inbox state `limited`) but not handled.
        self.limited = False
        self._services = services
        self._early = early
        #: The user's conversation state (see `alfred_bot.dialog.DialogState`), as of this message.
        self.state = DialogState()
        #: Scheduled or queued sends to this user to cancel with the completion (`cancel`).
        self.cancels: list[str] = []
        self._state_loaded = False

    @property
    def user_name(self) -> str | None:
        """The sender's WhatsApp profile name, if Meta sent one."""
        return self.contact.name if self.contact else None

    @property
    def recipient(self) -> str:
        """Who replies go to: the sender's phone number (wa_id digits), else their user id."""
        return self.message.sender

    @property
    def address(self) -> dict[str, str]:
        return address_of(self.message.from_, self.message.sender)

    @property
    def command_args(self) -> str:
        """The text after a command word ("/order 2 pizzas" → "2 pizzas"); "" if none."""
        parsed = command_of(self.message.text) if self.message.type == "text" else None
        return parsed[1] if parsed else ""

    def _quoted(self) -> str | None:
        return self.message.id

    def _idem_prefix(self) -> str:
        return f"reply:{self.message.id}"

    def _source(self) -> str | None:
        return self.message.id

    def mark_read(self, *, typing: bool = True) -> str:
        """Queue a read receipt for this message, with a typing indicator (one call, up to 25 s).

        Best-effort (README, Outbound): it never delays the replies, is sent in the number's spare
        budget, and is dropped if a newer receipt of the user supersedes it or it waits too long."""
        payload: dict[str, Any] = {"messaging_product": "whatsapp", "status": "read", "message_id": self.message.id}
        if typing:
            payload["typing_indicator"] = {"type": "text"}
        # its own key: queued early, it must not take the slot of a reply (or of the fallback)
        outbox_id = self._queue("read", payload, key=f"read:{self.message.id}")
        if self._early is not None:
            self._early(self.replies[-1])  # the user sees "typing…" while the handler still works
        return outbox_id

    async def load_state(self) -> None:
        """Read the user's state once, before routing (the router calls this)."""
        if self._state_loaded or self._services is None:
            return
        self.state.load(await self._services.store.dialogs.get(self.tenant, self.recipient))
        self._state_loaded = True

    @property
    def settings(self) -> TenantConfig | None:
        """This tenant's configuration (None when the context has no services, as in unit tests)."""
        return self._services.tenants.get(self.tenant) if self._services is not None else None

    @property
    def timezone(self) -> zoneinfo.ZoneInfo:
        """The tenant's time zone (`tenants.NAME.timezone`, default UTC): how to read "at 18:30"."""
        return zoneinfo.ZoneInfo(self.settings.timezone if self.settings is not None else "UTC")

    async def scheduled(self, tag: str = "") -> list[dict[str, Any]]:
        """The user's sends still waiting for their time (those queued with `tag`, if given), soonest
        first: `id`, `send_at`, `type`, `payload`. Cancels of this handler are not applied yet."""
        prefix = f"{tag}:" if tag else ""
        return await self._need().store.dialogs.scheduled(self.tenant, self.recipient, prefix=prefix)

    def cancel(self, outbox_id: str) -> None:
        """Cancel one of the user's scheduled (or still queued) sends, with this handler's
        completion: if the handler fails or a crash stops it, nothing is cancelled."""
        if not isinstance(outbox_id, str) or not outbox_id:
            raise ReplyError("id", "must be an outbox id")
        self.cancels.append(outbox_id)

    def _need(self) -> Services:
        if self._services is None:
            raise RuntimeError("this context has no store or transport attached")
        return self._services

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The user's recent conversation with this number, oldest first (both directions).

        Each item: `direction` ("in"/"out"), `type`, `text`, `at` (unix time) and, for our
        messages, `state`. The message being handled is the last "in" item.
        """
        return await self._need().store.conversation(self.tenant, self.recipient, max(1, min(limit, 200)))

    async def download_media(self) -> MediaFile:
        """Download this message's image/video/audio/document/sticker into the media folder."""
        media = _media_id(self.message)
        if media is None:
            raise MediaError(f"a {self.message.type} message has no media to download")
        svc = self._need()
        folder = svc.media_dir / self.tenant
        return await svc.transport.download(self.phone_number_id, media, folder, svc.max_download_bytes)

    async def upload_media(self, kind: str, data: bytes, mime_type: str, filename: str = "file") -> str:
        """Upload bytes for sending as `kind` (checked against Meta's type and size limits); the media id."""
        check_upload(kind, mime_type, len(data))
        return await self._need().transport.upload(self.phone_number_id, data, mime_type, filename)


def _media_id(message: Message) -> str | None:
    """The media id of an image/video/audio/document/sticker message (its object is named like its type)."""
    if not isinstance(message, _MEDIA_OF):
        return None
    media_id = getattr(getattr(message, message.type), "id", None)
    return media_id if isinstance(media_id, str) else None


class StatusContext(Outgoing):
    """A delivery update of a message we sent, with the reply vocabulary aimed at its recipient."""

    def __init__(self, *, tenant: str, phone_number_id: str, status: Status) -> None:
        self.tenant = tenant
        self.phone_number_id = phone_number_id
        self.status = status
        self.replies = []

    @property
    def recipient(self) -> str:
        return self.status.recipient_id or self.status.recipient_user_id or ""

    @property
    def address(self) -> dict[str, str]:
        return address_of(self.status.recipient_id, self.status.recipient_user_id)

    def _quoted(self) -> str | None:
        return self.status.id

    def _idem_prefix(self) -> str:
        return f"status:{self.status.id}:{self.status.status}"
