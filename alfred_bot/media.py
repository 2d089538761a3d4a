"""Media: the Cloud API's size and type limits, where downloads land, and how long they stay.

Downloading is two hops (media id → a URL valid 5 minutes → the bytes, both with the bearer
token), done by the transport; this module holds what does not need the network, so both the
Graph transport and the tests share one definition of the limits.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import msgspec

log = logging.getLogger("alfred.media")

MB = 1024 * 1024

#: Per kind: the MIME types Meta accepts and the largest file (reference §9).
LIMITS: dict[str, tuple[frozenset[str], int]] = {
    "audio": (
        frozenset({"audio/aac", "audio/amr", "audio/mpeg", "audio/mp4", "audio/ogg"}),
        16 * MB,
    ),
    "document": (
        frozenset(
            {
                "text/plain",
                "application/pdf",
                "application/vnd.ms-excel",
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                "application/msword",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                "application/vnd.ms-powerpoint",
                "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            }
        ),
        100 * MB,
    ),
    "image": (frozenset({"image/jpeg", "image/png"}), 5 * MB),
    "sticker": (frozenset({"image/webp"}), 500 * 1024),
    "video": (frozenset({"video/mp4", "video/3gpp"}), 16 * MB),
}

_EXTENSIONS = {
    "audio/aac": ".aac",
    "audio/amr": ".amr",
    "audio/mpeg": ".mp3",
    "audio/mp4": ".m4a",
    "audio/ogg": ".ogg",
    "text/plain": ".txt",
    "application/pdf": ".pdf",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "video/mp4": ".mp4",
    "video/3gpp": ".3gp",
}

_SAFE = re.compile(r"[^A-Za-z0-9._-]")

#: Where Meta serves media bytes: the Graph API's "Retrieve Media URL" answers
#: `https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=…&ext=…&hash=…`
#: (developers.facebook.com/docs/whatsapp/cloud-api/reference/media). The bearer token is sent
#: only to these hosts (and the configured Graph API host).
DEFAULT_DOWNLOAD_HOSTS = ("lookaside.fbsbx.com", "*.fbsbx.com")


class MediaError(Exception):
    """A media download or upload that cannot be done; the message says why (never a token)."""


class MediaFile(msgspec.Struct, frozen=True):
    """A downloaded media file."""

    id: str
    path: str
    mime_type: str
    size: int
    sha256: str | None = None


class MediaInfo(msgspec.Struct, frozen=True):
    """Graph's answer to `GET /{media_id}`: where to fetch the bytes (valid 5 minutes)."""

    url: str
    mime_type: str = "application/octet-stream"
    sha256: str | None = None
    file_size: int | None = None
    id: str | None = None


def base_mime(mime_type: str) -> str:
    """`audio/ogg; codecs=opus` → `audio/ogg`."""
    return mime_type.split(";", 1)[0].strip().lower()


def limit_for(mime_type: str, cap: int) -> int:
    """The largest file of this MIME type Meta handles, never above the configured `cap`."""
    mime = base_mime(mime_type)
    for types, size in LIMITS.values():
        if mime in types:
            return min(size, cap)
    return cap


def kind_for(mime_type: str) -> str:
    """The message kind a MIME type is sent as (`application/pdf` → document); "" if none."""
    mime = base_mime(mime_type)
    for kind, (types, _) in LIMITS.items():
        if mime in types:
            return kind
    return ""


def check_upload(kind: str, mime_type: str, size: int) -> None:
    """Refuse an upload Meta would refuse, before it is sent."""
    if kind not in LIMITS:
        raise MediaError(
            f"media kind must be one of {', '.join(sorted(LIMITS))}, not {kind!r} (type {mime_type!r} is not accepted)"
        )
    types, limit = LIMITS[kind]
    if base_mime(mime_type) not in types:
        raise MediaError(f"{kind}: MIME type {mime_type!r} is not accepted (use one of {', '.join(sorted(types))})")
    if size == 0:
        raise MediaError(f"{kind}: the file is empty")
    if size > limit:
        raise MediaError(f"{kind}: {size} bytes is above Meta's limit of {limit} bytes")


def target_path(folder: Path, media_id: str, mime_type: str) -> Path:
    """Where a download is kept: a file name derived from the id only (never from user input)."""
    name = _SAFE.sub("_", media_id)[:200].lstrip(".") or "media"
    return folder / f"{name}{_EXTENSIONS.get(base_mime(mime_type), '.bin')}"


def prune(folder: Path, max_age_seconds: float, now: float | None = None) -> int:
    """Delete downloaded files older than `max_age_seconds` (retention); return how many."""
    if not folder.is_dir():
        return 0
    cutoff = (time.time() if now is None else now) - max_age_seconds
    removed = 0
    for path in folder.glob("*/*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError as exc:  # a file removed meanwhile, or a permission problem: try next time
            log.warning("could not prune %s: %s", path.name, exc)
    return removed
