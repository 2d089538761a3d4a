"""The Graph answer → decision map: every class, and no input that makes it raise."""

from __future__ import annotations

import json
import random
from email.utils import formatdate

import pytest

from alfred_bot.outbound.decide import Outcome, backoff, decide, retry_after, transport_failure
from alfred_bot.security import Redactor


def err(code: int, status: int = 400, **extra: object) -> tuple[int, bytes]:
    body = {
        "error": {
            "message": f"(#{code}) something",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": "the details"},
            "fbtrace_id": "AbCdEf",
            **extra,
        }
    }
    return status, json.dumps(body).encode()


def test_success_carries_the_wamid() -> None:
    body = b'{"messaging_product":"whatsapp","contacts":[{"input":"+1","wa_id":"1"}],"messages":[{"id":"wamid.X"}]}'
    d = decide(200, body)
    assert (d.outcome, d.wamid) == (Outcome.SENT, "wamid.X")


@pytest.mark.parametrize("body", [b'{"messages": []}', b'{"contacts": []}', b"<html>ok</html>", b""])
def test_accepted_without_an_id_is_sent_not_retried(body: bytes) -> None:
    d = decide(200, body)
    assert (d.outcome, d.wamid) == (Outcome.SENT, None)
    assert d.raw  # kept, so an operator can see what Meta said


def test_mark_read_success() -> None:
    assert decide(200, b'{"success":true}').outcome is Outcome.SENT


@pytest.mark.parametrize("code", [130429, 4, 80007])
def test_throughput_errors_retry_and_slow_down(code: int) -> None:
    d = decide(*err(code))
    assert (d.outcome, d.slow_down, d.limited) == (Outcome.RETRY, True, False)
    assert (d.code, d.details, d.fbtrace_id) == (code, "the details", "AbCdEf")


@pytest.mark.parametrize("code", [2, 131016, 131057, 133004])
def test_transient_errors_retry(code: int) -> None:
    d = decide(*err(code, 503))
    assert (d.outcome, d.slow_down, d.limited) == (Outcome.RETRY, False, False)


@pytest.mark.parametrize("code", [131000, 1])
def test_unknown_errors_retry_a_few_times(code: int) -> None:
    d = decide(*err(code, 500))
    assert (d.outcome, d.limited) == (Outcome.RETRY, True)


@pytest.mark.parametrize("code", [100, 131026, 131008, 131009, 132000, 132001, 131051, 131021, 135000])
def test_permanent_errors_fail_once(code: int) -> None:
    d = decide(*err(code))
    assert d.outcome is Outcome.FAILED
    assert d.needs_template is False
    assert d.message == f"({code}) something".replace("(", "(#")


def test_131047_needs_a_template() -> None:
    d = decide(*err(131047))
    assert (d.outcome, d.needs_template) == (Outcome.FAILED, True)


@pytest.mark.parametrize(("code", "status"), [(190, 400), (190, 401), (0, 401), (10, 403), (200, 403)])
def test_token_and_permission_errors_pause_the_tenant_whatever_the_status(code: int, status: int) -> None:
    assert decide(*err(code, status)).outcome is Outcome.PAUSE_TENANT


@pytest.mark.parametrize("code", [368, 131048, 131031, 131042])
def test_account_blocks_pause_the_number(code: int) -> None:
    assert decide(*err(code, 403)).outcome is Outcome.PAUSE_NUMBER


@pytest.mark.parametrize(
    ("status", "body", "scope"),
    [
        (*err(190, 401), "token"),
        (*err(0, 401), "token"),
        (401, b"<html>Unauthorized</html>", "token"),  # no code: the token is the likely cause
        (*err(3, 403), "tenant"),
        (*err(10, 403), "tenant"),
        (*err(299, 403), "tenant"),
        (*err(368, 403), "number"),
        (*err(131048, 400), "number"),
        (*err(130429, 429), None),
        (*err(131056), None),
        (*err(100), None),
        (200, b'{"messages":[{"id":"wamid.X"}]}', None),
    ],
)
def test_the_scope_of_a_pause_is_classified_here(status: int, body: bytes, scope: str | None) -> None:
    """Who a pause holds (every tenant using the token, the tenant, the number) is decided with the outcome."""
    assert decide(status, body).scope == scope


def test_pair_limit() -> None:
    assert decide(*err(131056)).outcome is Outcome.PAIR_LIMIT


def test_code_wins_over_http_status() -> None:
    assert decide(*err(130429, 429)).outcome is Outcome.RETRY
    assert decide(*err(100, 500)).outcome is Outcome.FAILED


@pytest.mark.parametrize(
    ("status", "outcome", "slow", "limited"),
    [
        (429, Outcome.RETRY, True, False),
        (500, Outcome.RETRY, False, False),
        (502, Outcome.RETRY, False, False),
        (503, Outcome.RETRY, False, False),
        (401, Outcome.PAUSE_TENANT, False, False),
        (400, Outcome.RETRY, False, True),
        (404, Outcome.RETRY, False, True),
        (200, Outcome.SENT, False, False),  # accepted: resending would likely duplicate
    ],
)
@pytest.mark.parametrize("body", [b"", b"<html><body>Bad Gateway</body></html>", b"null", b"[1,2]", b"\xff\xfe", b"{"])
def test_bodies_without_a_code_decide_by_status(
    status: int, outcome: Outcome, slow: bool, limited: bool, body: bytes
) -> None:
    d = decide(status, body)
    assert (d.outcome, d.slow_down, d.limited) == (outcome, slow, limited)
    assert d.http_status == status
    if body.strip():
        assert d.raw


def test_odd_error_shapes_never_raise() -> None:
    for body in [b'{"error": null}', b'{"error": {"code": "190"}}', b'{"error": {"code": null}}', b'{"error": 5}']:
        decide(400, body)
    assert decide(400, b'{"error": {"code": "190"}}').outcome is Outcome.PAUSE_TENANT


def test_retry_after_header() -> None:
    assert decide(*err(130429), headers={"Retry-After": "12"}).retry_after == 12.0
    assert retry_after({"Retry-After": formatdate(1_000_030, usegmt=True)}, now=1_000_000) == pytest.approx(30)
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None


def test_transport_failure_is_transient() -> None:
    d = transport_failure("timeout after 10 s")
    assert (d.outcome, d.message) == (Outcome.RETRY, "timeout after 10 s")


def test_backoff_full_jitter_is_capped() -> None:
    rng = random.Random(7)
    samples = [backoff(a, base=1, cap=60, rng=rng) for a in range(40) for _ in range(20)]
    assert all(0 <= s <= 60 for s in samples)
    early = [backoff(0, base=1, cap=60, rng=rng) for _ in range(200)]
    assert max(early) <= 1.0
    late = [backoff(10, base=1, cap=60, rng=rng) for _ in range(200)]
    assert max(late) > 30  # spread across the whole capped range


def test_redacted_passes_every_text_of_the_answer_through_the_redactor() -> None:
    """What is stored of an answer (message, details, raw, fbtrace id) loses any secret (issue 13.7)."""
    token = "EAAGsecret0123456789"
    error = {"code": 190, "message": f"bad {token.upper()}", "fbtrace_id": token[2:16]}
    body = json.dumps({"error": {**error, "error_data": {"details": f"x{token[:12]}"}}}).encode()
    d = decide(401, body).redacted(Redactor([token]))
    assert (d.message, d.details, d.fbtrace_id, d.code) == ("bad [redacted]", "x[redacted]", "[redacted]", 190)
    html = decide(502, f"<html>{token}</html>".encode()).redacted(Redactor([token]))
    assert html.raw == "<html>[redacted]</html>"
    assert decide(200, b'{"messages":[{"id":"wamid.1"}]}').redacted(Redactor([token])).wamid == "wamid.1"
