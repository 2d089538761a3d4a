"""Typed, frozen wire models for Meta's webhook payloads.

Every message type in the Cloud API reference has its own struct, tagged by `type`, so a
handler can `match` on the class. A type Meta adds later decodes as `UnknownMessage` with its
type name and raw JSON: never coerced into a known shape, never a crash. Unknown fields are
ignored (Meta adds fields all the time); missing required ones make that one item malformed.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar

import msgspec

# ---------------------------------------------------------------------------- shared parts

#: Integers SQLite can store: a larger number makes that one item malformed, not the batch.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Wire(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base for every wire struct: immutable, keyword-only, tolerant of unknown fields."""


class ErrorData(_Wire, frozen=True):
    details: str | None = None


class WireError(_Wire, frozen=True):
    """Meta's error object, as found in messages, statuses and `value.errors`."""

    code: Int64
    title: str | None = None
    message: str | None = None
    error_data: ErrorData | None = None
    href: str | None = None


#: An absent raw part (msgspec cannot put `Raw` in a union with None): falsy, unlike `null`.
NO_RAW = msgspec.Raw()

_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_wire_error = msgspec.json.Decoder(WireError, strict=False)


def lenient_errors(raw: msgspec.Raw | None) -> list[WireError] | None:
    """Meta's `errors` array, keeping every element that decodes: one malformed error object must
    not cost the message (or status) that carries it. A lone object is taken as a one-item list."""
    if not raw:
        return None
    try:
        items = _raw_list.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        items = [raw]
    errors: list[WireError] = []
    for item in items:
        try:
            errors.append(_wire_error.decode(item))
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            continue
    return errors or None


class ReferredProduct(_Wire, frozen=True):
    catalog_id: str | None = None
    product_retailer_id: str | None = None


class Context(_Wire, frozen=True):
    """What an inbound message replies to, or forwarding flags (which come without an id)."""

    from_: str | None = msgspec.field(default=None, name="from")
    id: str | None = None
    forwarded: bool = False
    frequently_forwarded: bool = False
    referred_product: ReferredProduct | None = None


class WelcomeMessage(_Wire, frozen=True):
    text: str | None = None


class Referral(_Wire, frozen=True):
    """Click-to-WhatsApp ad or post the conversation started from."""

    source_url: str | None = None
    source_id: str | None = None
    source_type: str | None = None
    body: str | None = None
    headline: str | None = None
    media_type: str | None = None
    image_url: str | None = None
    video_url: str | None = None
    thumbnail_url: str | None = None
    ctwa_clid: str | None = None
    welcome_message: WelcomeMessage | None = None


# ---------------------------------------------------------------------------- type payloads


class Text(_Wire, frozen=True):
    body: str


class Media(_Wire, frozen=True):
    """Image or video: a media id to download, optionally a direct URL (rolled out from 2025-11)."""

    id: str
    mime_type: str | None = None
    sha256: str | None = None
    caption: str | None = None
    url: str | None = None


class Audio(_Wire, frozen=True):
    id: str
    mime_type: str | None = None
    sha256: str | None = None
    voice: bool = False
    url: str | None = None


class Document(_Wire, frozen=True):
    id: str
    mime_type: str | None = None
    sha256: str | None = None
    caption: str | None = None
    filename: str | None = None
    url: str | None = None


class Sticker(_Wire, frozen=True):
    id: str
    mime_type: str | None = None
    sha256: str | None = None
    animated: bool = False
    url: str | None = None


class Location(_Wire, frozen=True):
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None
    url: str | None = None


class ContactName(_Wire, frozen=True):
    formatted_name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    middle_name: str | None = None
    prefix: str | None = None
    suffix: str | None = None


class ContactPhone(_Wire, frozen=True):
    phone: str | None = None
    wa_id: str | None = None
    type: str | None = None


class ContactEmail(_Wire, frozen=True):
    email: str | None = None
    type: str | None = None


class ContactUrl(_Wire, frozen=True):
    url: str | None = None
    type: str | None = None


class ContactOrg(_Wire, frozen=True):
    company: str | None = None
    department: str | None = None
    title: str | None = None


class ContactAddress(_Wire, frozen=True):
    street: str | None = None
    city: str | None = None
    state: str | None = None
    zip: str | None = None
    country: str | None = None
    country_code: str | None = None
    type: str | None = None


class SharedContact(_Wire, frozen=True):
    """A vCard-like contact card a user shared (not the sender: that is `Contact`)."""

    name: ContactName | None = None
    phones: list[ContactPhone] = []
    emails: list[ContactEmail] = []
    urls: list[ContactUrl] = []
    addresses: list[ContactAddress] = []
    org: ContactOrg | None = None
    birthday: str | None = None


class ButtonReply(_Wire, frozen=True):
    id: str
    title: str | None = None


class ListReply(_Wire, frozen=True):
    id: str
    title: str | None = None
    description: str | None = None


class NfmReply(_Wire, frozen=True):
    """A WhatsApp Flow's answer; `response_json` is a JSON string that includes the flow_token."""

    name: str | None = None
    body: str | None = None
    response_json: str | None = None


class CallPermissionReply(_Wire, frozen=True):
    """The user's answer to our call permission request: `accept` or `reject`."""

    response: str | None = None
    is_permanent: bool | None = None
    expiration_timestamp: Int64 | None = None
    response_source: str | None = None  # user_action | automatic


class Interactive(_Wire, frozen=True):
    type: str
    button_reply: ButtonReply | None = None
    list_reply: ListReply | None = None
    nfm_reply: NfmReply | None = None
    call_permission_reply: CallPermissionReply | None = None


class Button(_Wire, frozen=True):
    """A quick-reply button tapped on a template."""

    payload: str | None = None
    text: str | None = None


class Reaction(_Wire, frozen=True):
    """An emoji on one of our messages; an absent or empty emoji means the reaction was removed."""

    message_id: str
    emoji: str | None = None


class ProductItem(_Wire, frozen=True):
    product_retailer_id: str
    quantity: Int64
    item_price: float
    currency: str


class Order(_Wire, frozen=True):
    catalog_id: str | None = None
    text: str | None = None
    product_items: list[ProductItem] = []


class System(_Wire, frozen=True):
    body: str | None = None
    wa_id: str | None = None
    type: str | None = None
    customer: str | None = None
    identity: str | None = None


class UnsupportedInfo(_Wire, frozen=True):
    type: str | None = None


class EditedText(_Wire, frozen=True):
    body: str | None = None


class EditedMedia(_Wire, frozen=True):
    """The media of an edited message: only the caption can change, so nothing here is required."""

    id: str | None = None
    mime_type: str | None = None
    sha256: str | None = None
    caption: str | None = None
    filename: str | None = None
    url: str | None = None


class _EditedBody(_Wire, frozen=True):
    """Where an edit's new content may sit: Meta nests it in `edit.message`; read it flat as well."""

    text: EditedText | None = None
    image: EditedMedia | None = None
    video: EditedMedia | None = None
    document: EditedMedia | None = None
    audio: EditedMedia | None = None
    sticker: EditedMedia | None = None

    @property
    def new_text(self) -> str | None:
        if self.text is not None and self.text.body is not None:
            return self.text.body
        media = self.image or self.video or self.document
        return media.caption if media else None


class EditedMessage(_EditedBody, frozen=True):
    """The message as it reads after the edit (`edit.message`)."""

    type: str | None = None
    context: Context | None = None


class Edit(_EditedBody, frozen=True):
    original_message_id: str | None = None
    message: EditedMessage | None = None


class Revoke(_Wire, frozen=True):
    original_message_id: str | None = None


# ---------------------------------------------------------------------------- messages


class BaseMessage(_Wire, frozen=True, kw_only=True, tag_field="type"):
    """Fields every inbound message has. `sender` is the phone number or, for users who hide it
    behind a username (2026), the business-scoped user id."""

    id: str
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: str | None = None
    timestamp: Int64
    context: Context | None = None
    referral: Referral | None = None
    errors_raw: msgspec.Raw = msgspec.field(default=NO_RAW, name="errors")

    @property
    def type(self) -> str:
        """Meta's `type` name for this message."""
        return str(self.__struct_config__.tag)

    @property
    def sender(self) -> str:
        """Who sent it: the phone number, else the user id ("" only on an item kept with a parse error)."""
        return self.from_ or self.from_user_id or ""

    @property
    def errors(self) -> list[WireError] | None:
        """Meta's `errors` on this message (unsupported types, …), every element that decodes."""
        return lenient_errors(self.errors_raw)

    @property
    def text(self) -> str | None:
        """The human-readable text: body, caption, tapped title, new text of an edit; None when there is none."""
        return None

    @property
    def edited_id(self) -> str | None:
        """For an edit: the id of the message it changes."""
        return None

    @property
    def revoked_id(self) -> str | None:
        """For a revoke: the id of the message the user deleted."""
        return None

    @property
    def call_permission_response(self) -> str | None:
        """For a call permission reply: `accept` or `reject` (as Meta sent it)."""
        return None

    @property
    def flow_response(self) -> dict[str, Any] | None:
        """For a flow completion: the decoded `response_json` object (None if absent or not a JSON object)."""
        return None


class TextMessage(BaseMessage, frozen=True, kw_only=True, tag="text"):
    text_: Text = msgspec.field(name="text")

    @property
    def text(self) -> str | None:
        return self.text_.body


class ImageMessage(BaseMessage, frozen=True, kw_only=True, tag="image"):
    image: Media

    @property
    def text(self) -> str | None:
        return self.image.caption


class AudioMessage(BaseMessage, frozen=True, kw_only=True, tag="audio"):
    audio: Audio


class VideoMessage(BaseMessage, frozen=True, kw_only=True, tag="video"):
    video: Media

    @property
    def text(self) -> str | None:
        return self.video.caption


class DocumentMessage(BaseMessage, frozen=True, kw_only=True, tag="document"):
    document: Document

    @property
    def text(self) -> str | None:
        return self.document.caption


class StickerMessage(BaseMessage, frozen=True, kw_only=True, tag="sticker"):
    sticker: Sticker


class LocationMessage(BaseMessage, frozen=True, kw_only=True, tag="location"):
    location: Location


class ContactsMessage(BaseMessage, frozen=True, kw_only=True, tag="contacts"):
    contacts: list[SharedContact]


class InteractiveMessage(BaseMessage, frozen=True, kw_only=True, tag="interactive"):
    interactive: Interactive

    @property
    def reply_id(self) -> str | None:
        """The id of the tapped button or list row, for routing."""
        reply = self.interactive.button_reply or self.interactive.list_reply
        return reply.id if reply else None

    @property
    def text(self) -> str | None:
        """Tapped title, else the flow's body, else the call permission response."""
        reply = self.interactive.button_reply or self.interactive.list_reply
        if reply is not None:
            return reply.title
        if self.interactive.nfm_reply is not None:
            return self.interactive.nfm_reply.body
        return self.call_permission_response

    @property
    def call_permission_response(self) -> str | None:
        answer = self.interactive.call_permission_reply
        return answer.response if answer else None

    @property
    def flow_response(self) -> dict[str, Any] | None:
        flow = self.interactive.nfm_reply
        return _json_object(flow.response_json) if flow else None


class ButtonMessage(BaseMessage, frozen=True, kw_only=True, tag="button"):
    button: Button

    @property
    def text(self) -> str | None:
        return self.button.text


class ReactionMessage(BaseMessage, frozen=True, kw_only=True, tag="reaction"):
    reaction: Reaction


class OrderMessage(BaseMessage, frozen=True, kw_only=True, tag="order"):
    order: Order

    @property
    def text(self) -> str | None:
        return self.order.text


class SystemMessage(BaseMessage, frozen=True, kw_only=True, tag="system"):
    system: System

    @property
    def text(self) -> str | None:
        return self.system.body


class UnsupportedMessage(BaseMessage, frozen=True, kw_only=True, tag="unsupported"):
    """A message WhatsApp could not pass on (poll, edit, …); details are in `errors`."""

    unsupported: UnsupportedInfo | None = None


class LegacyUnknownMessage(BaseMessage, frozen=True, kw_only=True, tag="unknown"):
    """Meta's legacy name for `unsupported`; same shape."""

    unsupported: UnsupportedInfo | None = None


class EditMessage(BaseMessage, frozen=True, kw_only=True, tag="edit"):
    """The user edited an earlier message (text, or a media caption) within 15 minutes."""

    edit: Edit

    @property
    def text(self) -> str | None:
        inner = self.edit.message
        new = inner.new_text if inner is not None else None
        return new if new is not None else self.edit.new_text

    @property
    def edited_id(self) -> str | None:
        return self.edit.original_message_id


class RevokeMessage(BaseMessage, frozen=True, kw_only=True, tag="revoke"):
    """The user deleted an earlier message for everyone."""

    revoke: Revoke

    @property
    def revoked_id(self) -> str | None:
        return self.revoke.original_message_id


class RequestWelcomeMessage(BaseMessage, frozen=True, kw_only=True, tag="request_welcome"):
    """The user opened the chat for the first time (no content: a welcome is expected)."""


class UnknownMessage(_Wire, frozen=True, kw_only=True):
    """A message type this version does not know yet, or a known one that failed to decode
    (then `InboundItem.parse_error` says why): kept whole, with its raw JSON."""

    id: str
    type: str
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: str | None = None
    timestamp: Int64
    context: Context | None = None
    raw: bytes = b""
    errors_raw: msgspec.Raw = NO_RAW
    parse_error: str | None = None  # why a message of a known type (or without a sender) is kept this way

    text: ClassVar[None] = None
    edited_id: ClassVar[None] = None
    revoked_id: ClassVar[None] = None
    call_permission_response: ClassVar[None] = None
    flow_response: ClassVar[None] = None

    @property
    def sender(self) -> str:
        return self.from_ or self.from_user_id or ""

    @property
    def errors(self) -> list[WireError] | None:
        return lenient_errors(self.errors_raw)


def _json_object(text: str | None) -> dict[str, Any] | None:
    """`response_json` decoded; None when absent, not JSON, or not an object."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


KnownMessage = (
    TextMessage
    | ImageMessage
    | AudioMessage
    | VideoMessage
    | DocumentMessage
    | StickerMessage
    | LocationMessage
    | ContactsMessage
    | InteractiveMessage
    | ButtonMessage
    | ReactionMessage
    | OrderMessage
    | SystemMessage
    | UnsupportedMessage
    | LegacyUnknownMessage
    | EditMessage
    | RevokeMessage
    | RequestWelcomeMessage
)
Message = KnownMessage | UnknownMessage

KNOWN_TYPES: frozenset[str] = frozenset(str(cls.__struct_config__.tag) for cls in KnownMessage.__args__)

#: The message classes a user writes or sends on purpose (the ONE list: consent lifts an opt-out
#: on them, the echo bot acknowledges them). Deliberately absent: reactions, revokes and edits (they
#: change an earlier message, they do not write to us again), system notices (a number change),
#: `unsupported` / `unknown` and any type we cannot read (we cannot tell what the user did),
#: `request_welcome` (opening the chat is not a request for messages), interactive replies (a tap:
#: which ones count depends on the reply's kind).
WRITTEN: tuple[type[KnownMessage], ...] = (
    TextMessage,
    ImageMessage,
    AudioMessage,
    VideoMessage,
    DocumentMessage,
    StickerMessage,
    LocationMessage,
    ContactsMessage,
    ButtonMessage,
    OrderMessage,
)


# ---------------------------------------------------------------------------- envelope parts


class Profile(_Wire, frozen=True):
    name: str | None = None
    username: str | None = None  # a user's WhatsApp username (2026), for display only: it can change


class Contact(_Wire, frozen=True):
    """The sender as described in `value.contacts[]`: profile name and ids."""

    profile: Profile | None = None
    wa_id: str | None = None
    user_id: str | None = None
    parent_user_id: str | None = None  # the parent BSUID, for linked business portfolios
    identity_key_hash: str | None = None

    @property
    def name(self) -> str | None:
        return self.profile.name if self.profile else None


class Metadata(_Wire, frozen=True):
    phone_number_id: str
    display_phone_number: str | None = None


class Pricing(_Wire, frozen=True):
    billable: bool | None = None
    pricing_model: str | None = None
    type: str | None = None
    category: str | None = None


class Status(_Wire, frozen=True):
    """A delivery status of a message we sent: sent, delivered, read, played or failed."""

    id: str
    status: str
    timestamp: Int64
    recipient_id: str | None = None
    recipient_user_id: str | None = None  # username-only users (BSUID, 2026): no recipient_id
    recipient_type: str | None = None
    recipient_participant_id: str | None = None
    biz_opaque_callback_data: str | None = None
    pricing: Pricing | None = None
    errors_raw: msgspec.Raw = msgspec.field(default=NO_RAW, name="errors")

    @property
    def errors(self) -> list[WireError] | None:
        """Why it failed (`failed` statuses), every element that decodes."""
        return lenient_errors(self.errors_raw)


class MessagesValue(_Wire, frozen=True):
    """`value` of a `messages` change; every part stays raw and is decoded on its own, so one bad
    part (or one bad item in a list) cannot sink its siblings."""

    metadata: msgspec.Raw = NO_RAW
    messaging_product: msgspec.Raw = NO_RAW
    contacts: msgspec.Raw = NO_RAW
    messages: msgspec.Raw = NO_RAW
    statuses: msgspec.Raw = NO_RAW
    errors: msgspec.Raw = NO_RAW


class Change(_Wire, frozen=True):
    field: str
    value: msgspec.Raw


class Entry(_Wire, frozen=True):
    """One `entry[]`: `id` (the WABA id) and `time` are read leniently, never failing the entry."""

    id: msgspec.Raw = NO_RAW
    time: msgspec.Raw = NO_RAW
    changes: list[msgspec.Raw] | None = None


class Envelope(_Wire, frozen=True):
    """The POST body. Only `entry` is read here (`object` is not needed and never fails a body)."""

    entry: list[msgspec.Raw]
