"""Typed, frozen wire models for Meta's webhook payloads.

Every message type in the Cloud API reference has its own struct, tagged by `type`, so a
handler can `match` on the class. A type Meta adds later decodes as `UnknownMessage` with its
type name and raw JSON: never coerced into a known shape, never a crash. Unknown fields are
ignored (Meta adds fields all the time); missing required ones make that one item malformed.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

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


class Interactive(_Wire, frozen=True):
    type: str
    button_reply: ButtonReply | None = None
    list_reply: ListReply | None = None
    nfm_reply: NfmReply | None = None


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
    errors: list[WireError] | None = None

    @property
    def type(self) -> str:
        """Meta's `type` name for this message."""
        return str(self.__struct_config__.tag)

    @property
    def sender(self) -> str:
        """Who sent it: the phone number, else the user id (one of them is always present)."""
        return self.from_ or self.from_user_id or ""

    @property
    def text(self) -> str | None:
        """The human-readable text: body, caption or tapped title; None when there is none."""
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
        reply = self.interactive.button_reply or self.interactive.list_reply
        return reply.title if reply else None


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


class UnknownMessage(_Wire, frozen=True, kw_only=True):
    """A message type this version does not know yet: kept whole, with its raw JSON."""

    id: str
    type: str
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: str | None = None
    timestamp: Int64
    context: Context | None = None
    raw: bytes = b""

    text: ClassVar[None] = None

    @property
    def sender(self) -> str:
        return self.from_ or self.from_user_id or ""


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
)
Message = KnownMessage | UnknownMessage

KNOWN_TYPES: frozenset[str] = frozenset(str(cls.__struct_config__.tag) for cls in KnownMessage.__args__)


class MessageHead(_Wire, frozen=True, kw_only=True):
    """Just enough of any message to keep an unknown type: decoded only when the typed decode fails."""

    id: str
    type: str
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: str | None = None
    timestamp: Int64
    context: Context | None = None


# ---------------------------------------------------------------------------- envelope parts


class Profile(_Wire, frozen=True):
    name: str | None = None


class Contact(_Wire, frozen=True):
    """The sender as described in `value.contacts[]`: profile name and ids."""

    profile: Profile | None = None
    wa_id: str | None = None
    user_id: str | None = None
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
    recipient_type: str | None = None
    recipient_participant_id: str | None = None
    biz_opaque_callback_data: str | None = None
    pricing: Pricing | None = None
    errors: list[WireError] | None = None


class MessagesValue(_Wire, frozen=True):
    """`value` of a `messages` change; each list stays raw so one bad item cannot sink its siblings."""

    metadata: Metadata | None = None
    messaging_product: str | None = None
    contacts: list[msgspec.Raw] | None = None
    messages: list[msgspec.Raw] | None = None
    statuses: list[msgspec.Raw] | None = None
    errors: list[msgspec.Raw] | None = None


class Change(_Wire, frozen=True):
    field: str
    value: msgspec.Raw


class Entry(_Wire, frozen=True):
    id: str | None = None
    time: Int64 | None = None
    changes: list[msgspec.Raw] | None = None


class Envelope(_Wire, frozen=True):
    """The POST body. Only `entry` is read here (`object` is not needed and never fails a body)."""

    entry: list[msgspec.Raw]
