"""Property tests (hypothesis) on the real app: the webhook decoder and the /api/messages validator.

Promises: any JSON or bytes, correctly signed, get 200 / 400 / 413 / 422 from POST /webhook,
never a 500 and never an exception escaping; every row stored decodes back to the model with the
columns it was stored with. POST /api/messages answers only 2xx / 4xx, and every row it queued
is a message the validator accepts. The example counts are bounded so the file takes seconds;
`HYPOTHESIS_PROFILE=deep` runs 20x more. The atheris target (fuzz/) gets a 2-second smoke run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alfred_bot.models import KNOWN_TYPES
from alfred_bot.parse import decode_message
from alfred_bot.validate import validate_send
from tests import payloads
from tests.conftest import API_TOKEN, db_rows, post_webhook

REPO = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1

settings.register_profile(
    "alfred",
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
    database=None,
)
FAST = settings(settings.get_profile("alfred"), max_examples=120 * SCALE)

# ---------------------------------------------------------------- strategies

TEXT = st.text(max_size=30) | st.sampled_from(["", "\u202e", "\ud83d\udc4b", "'; DROP TABLE inbox; --", "\x00"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)


def _weighted(plausible: st.SearchStrategy[Any], junk_one_in: int) -> st.SearchStrategy[Any]:
    # not st.one_of(p, p, p, JSON): one_of drops repeated branches, which would make it 1 in 2
    return st.integers(0, junk_one_in - 1).flatmap(lambda n: plausible if n else JSON)


def sometimes(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, one time in four any JSON at all."""
    return _weighted(plausible, 4)


TIMESTAMP = sometimes(
    st.integers(min_value=0, max_value=2**64).map(str) | st.integers(min_value=-(2**64), max_value=2**64)
)
CONTENT = st.fixed_dictionaries(
    {},
    optional={
        "body": sometimes(TEXT),
        "caption": sometimes(TEXT),
        "id": sometimes(TEXT),
        "title": sometimes(TEXT),
        "latitude": sometimes(st.floats(allow_nan=False)),
        "longitude": sometimes(st.floats(allow_nan=False)),
        "type": sometimes(st.sampled_from(["button_reply", "list_reply", "x"])),
        "button_reply": sometimes(st.fixed_dictionaries({"id": sometimes(TEXT), "title": sometimes(TEXT)})),
        "message_id": sometimes(TEXT),
        "emoji": sometimes(TEXT),
        "voice": sometimes(st.booleans()),
    },
)


@st.composite
def message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(sometimes(st.sampled_from([*sorted(KNOWN_TYPES), "poll", "edit"])))
    msg: dict[str, Any] = {
        "from": draw(sometimes(st.sampled_from([payloads.USER, "", "15550001111"]))),
        "id": draw(sometimes(st.integers(0, 10**6).map(lambda n: f"wamid.FUZZ{n}"))),
        "timestamp": draw(TIMESTAMP),
        "type": kind,
    }
    if isinstance(kind, str):
        msg[kind] = draw(sometimes(CONTENT | st.lists(CONTENT, max_size=2)))
    extra = draw(st.dictionaries(st.sampled_from(["context", "from_user_id", "errors", "referral"]), JSON, max_size=2))
    drop = draw(st.sets(st.sampled_from(sorted(msg)), max_size=1))
    return {k: v for k, v in {**msg, **extra}.items() if k not in drop}


STATUS = st.fixed_dictionaries(
    {
        "id": sometimes(st.integers(0, 1000).map(lambda n: f"wamid.OUT{n}")),
        "status": sometimes(st.sampled_from(["sent", "delivered", "read", "failed", "played"])),
        "timestamp": TIMESTAMP,
    },
    optional={"recipient_id": sometimes(TEXT), "errors": JSON},
)
VALUE = st.fixed_dictionaries(
    {
        "metadata": sometimes(
            st.fixed_dictionaries({"phone_number_id": sometimes(st.sampled_from([payloads.PNID, "1"]))})
        )
    },
    optional={
        "messages": sometimes(st.lists(message(), max_size=3)),
        "statuses": sometimes(st.lists(STATUS, max_size=2)),
        "contacts": sometimes(st.lists(st.fixed_dictionaries({"wa_id": sometimes(TEXT)}, optional={"profile": JSON}))),
        "errors": sometimes(st.lists(JSON, max_size=2)),
    },
)
CHANGE = st.fixed_dictionaries(
    {"field": sometimes(st.sampled_from(["messages", "account_update"])), "value": sometimes(VALUE)}
)
ENVELOPE = st.fixed_dictionaries(
    {
        "entry": sometimes(
            st.lists(st.fixed_dictionaries({"changes": sometimes(st.lists(CHANGE, max_size=3))}), max_size=2)
        )
    },
    optional={"object": JSON},
)


# ---------------------------------------------------------------- webhook

ALLOWED = {200, 400, 413, 422}


def _check_stored(path: str) -> None:
    """Every stored message decodes, from its raw bytes, into the model it was stored as."""
    for row in db_rows(path, "SELECT * FROM inbox"):
        message = decode_message(row["raw"], user_id=row["user_id"])
        assert (message.id, message.type, message.timestamp) == (row["event_id"], row["type"], row["timestamp"])
        assert message.text == row["text"]
        assert message.sender or row["parse_error"]  # only a message kept with a parse error may lack one
        assert (message.from_ or None) == row["sender"]
        assert -(2**63) <= row["timestamp"] < 2**63
    for row in db_rows(path, "SELECT status, timestamp FROM statuses"):
        assert isinstance(row["status"], str) and isinstance(row["timestamp"], int)
    for row in db_rows(path, "SELECT reason FROM rejected"):
        assert row["reason"]


async def _post_and_check(client: Any, cfg: Any, body: bytes) -> None:
    status = await post_webhook(client, body)
    event(f"webhook {status}")
    assert status in ALLOWED, f"{status} for {body[:300]!r}"
    _check_stored(cfg.storage.path)


@FAST
@given(ENVELOPE)
async def test_webhook_any_envelope_shape_is_never_a_500(client: Any, cfg: Any, envelope: dict[str, Any]) -> None:
    await _post_and_check(client, cfg, json.dumps(envelope).encode())


@FAST
@given(JSON)
async def test_webhook_any_json_is_never_a_500(client: Any, cfg: Any, value: Any) -> None:
    await _post_and_check(client, cfg, json.dumps(value).encode())


@FAST
@given(st.binary(max_size=400))
async def test_webhook_any_bytes_are_never_a_500(client: Any, cfg: Any, body: bytes) -> None:
    await _post_and_check(client, cfg, body)


@FAST
@given(ENVELOPE, st.data())
async def test_webhook_corrupted_bytes_are_never_a_500(client: Any, cfg: Any, envelope: Any, data: Any) -> None:
    """A real-looking body with bytes flipped, cut or inserted (invalid UTF-8, broken escapes)."""
    ascii_only = data.draw(st.booleans())  # else raw UTF-8, lone surrogates as CESU-8 (invalid UTF-8)
    body = bytearray(json.dumps(envelope, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "cut":
            del body[at:]
        elif action == "insert":
            body[at:at] = data.draw(st.sampled_from([b"\xff", b"\\u", b"\\ud800", b'"', b"{", b"]", b"\x00", b"1e999"]))
        elif at < len(body):
            body[at] ^= 1 << data.draw(st.integers(0, 7))
    await _post_and_check(client, cfg, bytes(body))


# ---------------------------------------------------------------- /api/messages


def rarely(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nearly always a plausible value, one time in ten any JSON."""
    return _weighted(plausible, 10)


LANGUAGE = st.just({"code": "en_US"})
RECIPIENT = rarely(
    st.sampled_from([payloads.USER, "+" + payloads.USER, "0015551234567", "+1 555 123 4567", "US.abc", ""])
)
WORDS = st.text(alphabet="abcxyz_ <>'\"\u202e👋", min_size=1, max_size=20)
CONTENTS: dict[str, st.SearchStrategy[Any]] = {
    "text": st.fixed_dictionaries({"body": rarely(WORDS)}, optional={"preview_url": rarely(st.booleans())}),
    "template": st.fixed_dictionaries(
        {
            "name": rarely(st.from_regex(r"[a-z_]{1,30}", fullmatch=True)),
            "language": rarely(st.just({"code": "en_US"})),
        }
    ),
    "reaction": st.fixed_dictionaries(
        {"message_id": rarely(st.just("wamid.X")), "emoji": rarely(st.sampled_from(["👍", "", "ab"]))}
    ),
    "image": st.one_of(
        st.fixed_dictionaries({"id": rarely(st.from_regex(r"[0-9]{1,20}", fullmatch=True))}),
        st.fixed_dictionaries({"link": rarely(st.just("https://example.com/a.jpg"))}, optional={"caption": WORDS}),
    ),
    "location": st.fixed_dictionaries(
        {"latitude": rarely(st.floats(-90, 90)), "longitude": rarely(st.floats(-180, 180))},
        optional={"name": WORDS},
    ),
}
EXTRAS: dict[str, st.SearchStrategy[Any]] = {
    "tenant": sometimes(st.sampled_from(["home", "biz", "nobody"])),
    "idempotency_key": sometimes(WORDS),
    "context": sometimes(st.fixed_dictionaries({"message_id": sometimes(WORDS)})),
    "biz_opaque_callback_data": sometimes(WORDS),
    "recipient_type": sometimes(st.just("individual")),
    "surprise": JSON,
}


@st.composite
def api_send(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed sends of every kind (so 202s happen), each part sometimes anything."""
    kind = draw(rarely(st.sampled_from([*CONTENTS, "interactive", "contacts", "fax"])))
    body: dict[str, Any] = {"to": draw(RECIPIENT), "type": kind}
    if isinstance(kind, str):
        body[kind] = draw(sometimes(CONTENTS.get(kind, JSON)))
    for key in draw(st.sets(st.sampled_from(sorted(EXTRAS)), max_size=2)):
        body[key] = draw(EXTRAS[key])
    return body


@pytest.fixture
async def window(client: Any) -> Any:
    """The user wrote to us just now, so free-form sends to them are allowed (more 202s to check)."""
    body = payloads.body_of(payloads.text("hi", timestamp=str(int(time.time()))))
    assert await post_webhook(client, body) == 200
    return client


def _check_queued(path: str) -> None:
    for row in db_rows(path, "SELECT type, payload FROM outbox WHERE idem_key LIKE 'api:%'"):
        payload = msgspec.json.decode(row["payload"])
        assert validate_send(payload) == payload  # what was queued is a valid, normalised message
        assert payload["type"] == row["type"]


async def _send_and_check(client: Any, cfg: Any, body: bytes) -> None:
    resp = await client.post("/api/messages", data=body, headers={**AUTH, "Content-Type": "application/json"})
    answer = await resp.read()
    event(f"api {resp.status}")
    assert 200 <= resp.status < 500, f"{resp.status} for {body[:300]!r}: {answer[:300]!r}"
    if resp.status >= 400:
        assert "error" in json.loads(answer)
    _check_queued(cfg.storage.path)


@FAST
@given(api_send())
async def test_api_send_any_message_shape_is_2xx_or_4xx(window: Any, cfg: Any, send: dict[str, Any]) -> None:
    await _send_and_check(window, cfg, json.dumps(send).encode())


@FAST
@given(JSON | st.binary(max_size=200))
async def test_api_send_any_json_or_bytes_is_2xx_or_4xx(window: Any, cfg: Any, value: Any) -> None:
    await _send_and_check(window, cfg, value if isinstance(value, bytes) else json.dumps(value).encode())


# ---------------------------------------------------------------- atheris


def test_atheris_target_runs_and_counts_inputs(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    cmd = [sys.executable, "fuzz/run.py", "--seconds", "2", "--corpus", str(tmp_path / "corpus")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    tried = int(done.stdout.split(" inputs tried")[0].rsplit(" ", 1)[-1])
    assert tried > 1000
