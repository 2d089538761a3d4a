"""The retry policy, unit by unit: real `decide()` answers, a fixed clock, a seeded rng. No I/O, no sleeps.

Meta's error codes and what they mean: developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes
(throughput 130429 / 4 / 80007, pair rate limit 131056, re-engagement 131047, token 190, permissions 10
and 200-299, account blocks 368 / 131031 / 131042 / 131048).
"""

from __future__ import annotations

import json
import random

import pytest

from alfred_bot.config import OutboundConfig
from alfred_bot.outbound.decide import Decision, decide
from alfred_bot.outbound.policy import (
    OUTAGE_AFTER,
    OUTAGE_GATE_BASE,
    OUTAGE_GATE_CAP,
    LaneState,
    PauseOrder,
    RetryPolicy,
    SlowDown,
    Verdict,
)
from alfred_bot.store import OutboxJob

NOW = 1_800_000_000.0
SEED = 14
OUT = OutboundConfig(
    max_attempts=4,
    unknown_max_attempts=2,
    max_age_seconds=3600.0,
    backoff_base_seconds=1.0,
    backoff_cap_seconds=30.0,
    slow_down_factor=0.25,
    slow_down_seconds=90.0,
)


def err(code: int, status: int = 400, headers: dict[str, str] | None = None) -> Decision:
    """A Graph error answer, as Meta writes it, through the real classifier."""
    body = {"error": {"message": f"(#{code}) msg", "type": "OAuthException", "code": code, "fbtrace_id": "Ab"}}
    return decide(status, json.dumps(body).encode(), headers)


def job(attempts: int = 1, age: float = 10.0, recipient: str = "15551230000") -> OutboxJob:
    return OutboxJob("o1", "home", recipient, "text", b"{}", attempts, NOW - age)


def policy(seed: int = SEED, out: OutboundConfig = OUT) -> RetryPolicy:
    return RetryPolicy(out, random.Random(seed))


def verdict(result: Verdict | PauseOrder) -> Verdict:
    assert isinstance(result, Verdict), result
    return result


def pause(result: Verdict | PauseOrder) -> PauseOrder:
    assert isinstance(result, PauseOrder), result
    return result


def test_sent_keeps_the_wamid_clears_the_streak_and_the_recipients_strikes() -> None:
    v = verdict(policy().settle(job(), decide(200, b'{"messages":[{"id":"wamid.OK"}]}'), LaneState(streak=3), NOW))
    assert (v.row.state, v.row.wamid, v.row.attempts, v.row.error_code) == ("sent", "wamid.OK", 1, None)
    assert (v.streak, v.recipient_ok, v.gate, v.slow_down) == (0, True, 0.0, None)


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_a_transient_error_retries_after_full_jitter_backoff_from_the_injected_rng(attempts: int) -> None:
    v = verdict(policy().settle(job(attempts), err(131016, 503), LaneState(), NOW))
    expected = random.Random(SEED).uniform(0.0, min(30.0, 2.0 ** (attempts - 1)))
    assert v.row.state == "queued" and not v.row.refund
    assert v.row.due_at == pytest.approx(NOW + expected)
    assert (v.row.error_code, v.row.error_http_status, v.row.error_fbtrace_id) == (131016, 503, "Ab")
    assert (v.streak, v.gate) == (1, 0.0)


def test_backoff_stays_within_its_bounds_for_every_seed() -> None:
    for seed in range(200):
        first = verdict(policy(seed).settle(job(1), err(2, 503), LaneState(), NOW)).row.due_at
        late = verdict(
            policy(seed, OutboundConfig(max_attempts=99)).settle(job(40), err(2, 503), LaneState(), NOW)
        ).row.due_at
        assert first is not None and NOW <= first <= NOW + 1.0
        assert late is not None and NOW <= late <= NOW + 300.0  # the default cap


@pytest.mark.parametrize(("after", "wins"), [("120", True), ("0", False)])
def test_retry_after_wins_when_it_is_longer_than_the_backoff(after: str, wins: bool) -> None:
    v = verdict(policy().settle(job(1), err(130429, 429, {"Retry-After": after}), LaneState(), NOW))
    backoff = random.Random(SEED).uniform(0.0, 1.0)
    assert v.row.due_at == pytest.approx(NOW + (120.0 if wins else backoff))


def test_gives_up_after_max_attempts() -> None:
    assert verdict(policy().settle(job(3), err(2, 503), LaneState(), NOW)).row.state == "queued"
    v = verdict(policy().settle(job(4), err(2, 503), LaneState(), NOW))
    assert (v.row.state, v.row.attempts, v.why) == ("failed", 4, "after 4 attempts")
    assert v.row.error_message == "gave up after 4 attempts: (#2) msg"


def test_gives_up_after_max_age_whatever_the_attempts() -> None:
    v = verdict(policy().settle(job(1, age=3601.0), err(2, 503), LaneState(), NOW))
    assert (v.row.state, v.why) == ("failed", "too old")
    assert v.row.error_message is not None and v.row.error_message.startswith("gave up too old")
    assert verdict(policy().settle(job(1, age=3599.0), err(2, 503), LaneState(), NOW)).row.state == "queued"


def test_an_outage_of_the_number_does_not_use_up_attempts_and_gates_the_lane() -> None:
    """From the 5th transient failure in a row on the number, an attempt is refunded, not counted."""
    before = verdict(policy().settle(job(4), err(2, 503), LaneState(streak=OUTAGE_AFTER - 2), NOW))
    assert before.row.state == "failed"  # the 4th failure in a row: not an outage yet
    gates = []
    for streak in range(OUTAGE_AFTER - 1, OUTAGE_AFTER + 8):
        v = verdict(policy().settle(job(4), err(2, 503), LaneState(streak=streak), NOW))
        assert (v.row.state, v.row.refund, v.streak) == ("queued", True, streak + 1)
        gates.append(v.gate)
    assert gates[:3] == [OUTAGE_GATE_BASE, 2 * OUTAGE_GATE_BASE, 4 * OUTAGE_GATE_BASE]
    assert gates[-1] == OUTAGE_GATE_CAP and gates == sorted(gates)
    old = verdict(policy().settle(job(1, age=4000.0), err(2, 503), LaneState(streak=20), NOW))
    assert old.row.state == "failed"  # an outage does not keep a message forever


def test_unknown_answers_get_unknown_max_attempts_and_never_count_as_an_outage() -> None:
    assert verdict(policy().settle(job(1), err(131000, 500), LaneState(), NOW)).row.state == "queued"
    v = verdict(policy().settle(job(2), err(131000, 500), LaneState(streak=30), NOW))
    assert (v.row.state, v.why, v.row.error_code) == ("failed", "after 2 attempts", 131000)
    codeless = verdict(policy().settle(job(2), decide(400, b"<html>Bad Request</html>"), LaneState(), NOW))
    assert (codeless.row.state, codeless.row.error_http_status) == ("failed", 400)
    assert codeless.row.error_message == "gave up after 2 attempts: HTTP 400: <html>Bad Request</html>"


@pytest.mark.parametrize("code", [100, 131026, 132001])
def test_a_permanent_error_fails_at_once_with_everything_kept(code: int) -> None:
    v = verdict(policy().settle(job(1), err(code), LaneState(streak=3), NOW))
    assert (v.row.state, v.row.attempts, v.row.needs_template, v.why) == ("failed", 1, False, "permanently")
    assert (v.row.error_code, v.row.error_message, v.row.error_fbtrace_id) == (code, f"(#{code}) msg", "Ab")
    assert v.streak == 0  # not a transient failure: the number's streak ends


def test_131047_fails_and_needs_a_template() -> None:
    v = verdict(policy().settle(job(1), err(131047), LaneState(), NOW))
    assert (v.row.state, v.row.needs_template) == ("failed", True)


@pytest.mark.parametrize(("strikes", "block"), [(0, 1.0), (1, 4.0), (3, 64.0), (10, 900.0)])
def test_131056_defers_only_the_recipient_for_4_to_the_x_seconds_with_the_attempt_refunded(
    strikes: int, block: float
) -> None:
    v = verdict(policy().settle(job(3), err(131056), LaneState(streak=2, pair_strikes=strikes), NOW))
    assert (v.row.state, v.row.refund, v.row.due_at, v.row.error_code) == ("queued", True, NOW + block, 131056)
    assert (v.block_recipient, v.gate, v.streak) == (block, 0.0, 0)


def test_131056_on_a_message_past_its_age_gives_up() -> None:
    v = verdict(policy().settle(job(1, age=7200.0), err(131056), LaneState(), NOW))
    assert (v.row.state, v.why, v.block_recipient) == ("failed", "too old", None)


@pytest.mark.parametrize(("answer", "slows"), [(err(130429), True), (err(4), True), (err(80007), True),
                                               (err(131016, 503), False), (decide(429, b""), True)])
def test_throughput_errors_order_a_slow_down_of_the_number(answer: Decision, slows: bool) -> None:
    v = verdict(policy().settle(job(1), answer, LaneState(), NOW))
    assert v.slow_down == (SlowDown(0.25, 90.0) if slows else None)
    given_up = verdict(policy().settle(job(4), answer, LaneState(), NOW))
    assert given_up.row.state == "failed" and given_up.slow_down == v.slow_down  # slows even when giving up


@pytest.mark.parametrize(
    ("answer", "scope", "kind"),
    [
        (err(190, 401), "token", "token"),
        (err(0, 401), "token", "token"),
        (decide(401, b"<html>Unauthorized</html>"), "token", "token"),
        (err(10, 403), "tenant", "token"),
        (err(200, 403), "tenant", "token"),
        (err(368, 403), "number", "account"),
        (err(131031, 403), "number", "account"),
        (err(131042, 400), "number", "account"),
        (err(131048, 400), "number", "account"),
    ],
)
def test_pauses_name_their_scope_and_keep_the_row_queued_unharmed(answer: Decision, scope: str, kind: str) -> None:
    order = pause(policy().settle(job(2), answer, LaneState(streak=3), NOW))
    assert (order.scope, order.kind, order.code) == (scope, kind, answer.code)
    assert (order.row.state, order.row.refund, order.row.due_at, order.row.attempts) == ("queued", True, NOW, 2)
    expected = f"Graph error {answer.code}: {answer.message}" if answer.code is not None else answer.message
    assert order.reason == expected


def test_a_pause_without_a_scope_falls_back_to_the_outcome() -> None:
    """A transport that builds its own Decision may leave `scope` empty: the number or the tenant pauses."""
    for code, scope in ((368, "number"), (10, "tenant")):
        d = err(code, 403)
        bare = Decision(outcome=d.outcome, code=code, message="m")
        assert pause(policy().settle(job(), bare, LaneState(), NOW)).scope == scope


def test_defer_puts_a_row_back_refunded() -> None:
    s = policy().defer(job(3), 6.0, NOW)
    assert (s.state, s.attempts, s.refund, s.due_at) == ("queued", 3, True, NOW + 6.0)
