"""The per-user inbound limit: counted by Meta's timestamps, applied by the built-in limit middleware."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alfred_bot.config import LimitsConfig
from alfred_bot.limits import PRUNE_EVERY, InboundLimiter
from tests import payloads
from tests.conftest import (
    db_rows,
    inbox_state,
    outbox_texts,
    recording_app,
    send_and_settle,
)

T0 = 1_760_000_000
LIMITS = {"inbound_per_user": 3, "inbound_window_seconds": 60}
NOTICE = LimitsConfig().limit_notice
OTHER = "15550004444"


# ---------------------------------------------------------------------------- the inbound limit, end to end


async def test_a_burst_over_the_limit_is_kept_but_not_handled_with_one_notice(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    seen: list[str] = []
    client, db = await recording_app(aiohttp_client, tmp_path, seen, **LIMITS)
    burst = [payloads.text(f"m{i}", id=f"wamid.L{i}", timestamp=str(T0 + i * 5)) for i in range(5)]
    await send_and_settle(client, db, *burst)

    states = {r[0]: r[1] for r in db_rows(db, "SELECT event_id, state FROM inbox")}
    assert sorted(states.values()) == ["handled"] * 3 + ["limited"] * 2
    assert len(seen) == 3
    assert {i for i, s in states.items() if s == "limited"}.isdisjoint(seen)
    texts = outbox_texts(db)
    assert texts.count(NOTICE) == 1, texts
    assert sorted(seen) == ["wamid.L0", "wamid.L1", "wamid.L2"]  # the first three the user wrote
    assert sorted(t for t in texts if t != NOTICE) == ["ok m0", "ok m1", "ok m2"]
    rows = db_rows(db, "SELECT source_event_id, payload FROM outbox WHERE type = 'text'")
    [notice_for] = [r[0] for r in rows if json.loads(r[1])["text"]["body"] == NOTICE]
    assert states[notice_for] == "limited"

    # Another user in the same minute is not affected.
    await send_and_settle(client, db, payloads.text("hello", id="wamid.OTHER1", sender=OTHER, timestamp=str(T0 + 20)))
    assert inbox_state(db, "wamid.OTHER1") == "handled"
    assert outbox_texts(db, OTHER) == ["ok hello"]

    # Still inside the window: limited again, and no second notice.
    await send_and_settle(client, db, payloads.text("m5", id="wamid.L5", timestamp=str(T0 + 30)))
    assert inbox_state(db, "wamid.L5") == "limited"
    assert outbox_texts(db).count(NOTICE) == 1

    # A window after the burst the user is answered again.
    await send_and_settle(client, db, payloads.text("later", id="wamid.L6", timestamp=str(T0 + 30 + 60)))
    assert inbox_state(db, "wamid.L6") == "handled"
    assert outbox_texts(db)[-1] == "ok later"


async def test_the_limit_is_off_with_zero(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await recording_app(aiohttp_client, tmp_path, seen, inbound_per_user=0)
    await send_and_settle(client, db, *[payloads.text(f"m{i}", id=f"wamid.Z{i}", timestamp=str(T0)) for i in range(30)])
    assert len(seen) == 30
    assert db_rows(db, "SELECT COUNT(*) FROM inbox WHERE state = 'limited'")[0][0] == 0


async def test_no_notice_when_configured_empty(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    client, db = await recording_app(aiohttp_client, tmp_path, seen, inbound_per_user=1, limit_notice="")
    await send_and_settle(client, db, *[payloads.text(f"m{i}", id=f"wamid.Q{i}", timestamp=str(T0)) for i in range(3)])
    assert len(seen) == 1
    assert outbox_texts(db) == [f"ok {db_rows(db, 'SELECT text FROM inbox WHERE state = ?', ('handled',))[0][0]}"]


# ---------------------------------------------------------------------------- InboundLimiter (unit)


def test_limiter_counts_per_window_by_message_time() -> None:
    limiter = InboundLimiter(3, 60, clock=lambda: 0.0)
    verdicts = [limiter.check("home", "u", T0 + t) for t in (0, 10, 20, 30, 40)]
    assert [(v.allowed, v.notify) for v in verdicts] == [
        (True, False),
        (True, False),
        (True, False),
        (False, True),
        (False, False),
    ]
    # 60 s after the first message it leaves the window, but the limited ones still count.
    assert not limiter.check("home", "u", T0 + 60).allowed
    # A whole window after the last message: allowed again.
    assert limiter.check("home", "u", T0 + 60 + 60).allowed


def test_limiter_judges_a_replayed_backlog_by_when_users_wrote() -> None:
    limiter = InboundLimiter(2, 60, clock=lambda: 0.0)
    # Messages written an hour apart, handled in one go after an outage: none is limited.
    assert all(limiter.check("home", "u", T0 + 3600 * i).allowed for i in range(10))


def test_limiter_separates_users_and_tenants() -> None:
    limiter = InboundLimiter(1, 60, clock=lambda: 0.0)
    assert limiter.check("home", "a", T0).allowed
    assert not limiter.check("home", "a", T0 + 1).allowed
    assert limiter.check("home", "b", T0 + 1).allowed
    assert limiter.check("biz", "a", T0 + 1).allowed


def test_limiter_notifies_once_per_window() -> None:
    limiter = InboundLimiter(1, 60, clock=lambda: 0.0)
    notices = [limiter.check("home", "u", T0 + t).notify for t in range(0, 200, 10)]
    # over the limit from t=10; notices at 10, 70, 130, 190 (one per 60 s of flooding)
    assert [t for t, n in zip(range(0, 200, 10), notices, strict=True) if n] == [10, 70, 130, 190]


def test_limiter_disabled_with_zero() -> None:
    limiter = InboundLimiter(0, 60, clock=lambda: 0.0)
    assert all(limiter.check("home", "u", T0).allowed for _ in range(100))
    assert limiter.tracked == 0


def test_limiter_forgets_quiet_users() -> None:
    now = [0.0]
    limiter = InboundLimiter(5, 60, clock=lambda: now[0])
    limiter.check("home", "quiet", T0)
    limiter.check("home", "busy", T0 + 400)
    assert limiter.tracked == 2
    now[0] = PRUNE_EVERY + 1
    limiter.check("home", "busy", T0 + 401)
    assert limiter.tracked == 1  # "quiet" wrote more than a window before: forgotten
