"""Outbox contract: idempotency, per-user order, priorities, leases, claim tokens, conditional settles."""

from __future__ import annotations

from alfred_bot.store import Settlement, Store
from alfred_bot.store.base import RECEIPT_SWEEP
from tests.contract.conftest import FakeClock
from tests.contract.helpers import claim_all, row, send, state


async def test_an_idempotency_key_queues_one_row_per_tenant(engine_store: Store) -> None:
    first = row("o-home", key="api:k1")
    assert await engine_store.enqueue([first]) == ["o-home"]
    assert await engine_store.enqueue([row("o-home-2", key="api:k1")]) == ["o-home"]  # same tenant: the first row
    assert await engine_store.enqueue([row("o-biz", key="api:k1", tenant="biz")]) == ["o-biz"]
    assert await engine_store.message("o-home-2") is None
    assert (await engine_store.message_by_key("api:k1") or {}).get("id") == "o-home"
    assert await engine_store.message_by_key("api:nope") is None
    assert await engine_store.outbox_counts() == {"queued": 2}


async def test_a_message_is_shown_as_the_api_shows_it(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    shown = await engine_store.message("o1") or {}
    assert {"id", "tenant", "to", "type", "state", "attempts", "wamid", "error_code", "created_at"} <= set(shown)
    assert (shown["tenant"], shown["type"], shown["state"], shown["attempts"]) == ("home", "text", "queued", 0)
    assert shown["created_at"] == clock.now
    assert await engine_store.message("missing") is None


async def test_a_claim_gives_only_each_users_oldest_pending_row(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("a1", to="1"), row("a2", to="1"), row("b1", to="2")])
    jobs = await claim_all(engine_store, clock.now)
    assert sorted(j.id for j in jobs) == ["a1", "b1"]
    assert await claim_all(engine_store, clock.now) == []  # a1 still in flight: a2 waits behind it
    a1 = next(j for j in jobs if j.id == "a1")
    await send(engine_store, a1, clock.now, "wamid.A1")
    assert [j.id for j in await claim_all(engine_store, clock.now)] == ["a2"]


async def test_conversation_goes_before_campaigns(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("camp", to="1", priority=1)])
    clock.advance(1)
    await engine_store.enqueue([row("reply", to="2", priority=0)])
    [first] = await engine_store.claim(clock.now, {"home": 1}, 30, frozenset())
    assert first.id == "reply"


async def test_quotas_are_per_tenant_and_other_tenants_are_untouched(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row(f"h{i}", to=str(i)) for i in range(3)] + [row("b0", tenant="biz")])
    jobs = await engine_store.claim(clock.now, {"home": 2}, 30, frozenset())
    assert [j.tenant for j in jobs] == ["home", "home"]
    assert await engine_store.claim(clock.now, {"home": 0, "biz": 0}, 30, frozenset()) == []
    assert [j.id for j in await engine_store.claim(clock.now, {"biz": 5}, 30, frozenset())] == ["b0"]


async def test_a_row_not_yet_due_is_not_claimed(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    assert await claim_all(engine_store, clock.now - 1) == []
    assert [j.id for j in await claim_all(engine_store, clock.now)] == ["o1"]


async def test_a_lease_that_runs_out_gives_the_row_back(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    now = clock.now
    [job] = await claim_all(engine_store, now, lease=30)  # a process that then dies
    assert (job.attempts, await state(engine_store, "o1")) == (1, "sending")
    assert await claim_all(engine_store, now + 29) == []  # leased
    [again] = await claim_all(engine_store, now + 31)
    assert (again.id, again.attempts) == ("o1", 2)


async def test_a_held_row_is_never_claimed_again(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    [job] = await claim_all(engine_store, clock.now, lease=0.0)  # lease over at once
    assert await engine_store.claim(clock.now + 5, {"home": 5}, 30, frozenset({job.id})) == []
    assert [j.id for j in await engine_store.claim(clock.now + 5, {"home": 5}, 30, frozenset())] == ["o1"]


async def test_a_settle_for_an_older_claim_is_ignored(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    [job] = await claim_all(engine_store, clock.now, lease=0.0)
    [again] = await claim_all(engine_store, clock.now + 1, lease=60)  # the lease ran out: claimed again
    await engine_store.settle(Settlement(id="o1", state="failed", attempts=job.attempts), clock.now + 2)
    await engine_store.settle(Settlement(id="o1", state="sent", attempts=job.attempts, wamid="wamid.OLD"), clock.now)
    assert await state(engine_store, "o1") == "sending"
    await send(engine_store, again, clock.now + 2, "wamid.NEW")
    shown = await engine_store.message("o1") or {}
    assert (shown["state"], shown["wamid"]) == ("sent", "wamid.NEW")


async def test_settles_apply_only_to_a_leased_row(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    await engine_store.settle(Settlement(id="o1", state="sent", attempts=0, wamid="wamid.X"), clock.now)
    assert await state(engine_store, "o1") == "queued"  # never claimed: nothing to settle
    [job] = await claim_all(engine_store, clock.now)
    await send(engine_store, job, clock.now, "wamid.1")
    failed = Settlement(id="o1", state="failed", attempts=job.attempts, error_code=131026)
    await engine_store.settle(failed, clock.now)  # a second answer for the same claim
    await engine_store.settle(Settlement(id="o1", state="queued", attempts=job.attempts), clock.now)
    shown = await engine_store.message("o1") or {}
    assert (shown["state"], shown["wamid"], shown["error_code"]) == ("sent", "wamid.1", None)


async def test_a_failed_settle_keeps_the_error(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    [job] = await claim_all(engine_store, clock.now)
    result = Settlement(
        id="o1",
        state="failed",
        attempts=job.attempts,
        error_code=131047,
        error_message="Re-engagement message",
        error_details="more than 24 hours",
        error_fbtrace_id="Atrace",
        error_http_status=400,
        needs_template=True,
    )
    await engine_store.settle(result, clock.now)
    shown = await engine_store.message("o1") or {}
    assert (shown["state"], shown["error_code"], shown["error_message"], shown["error_details"]) == (
        "failed",
        131047,
        "Re-engagement message",
        "more than 24 hours",
    )
    assert (shown["error_fbtrace_id"], bool(shown["needs_template"])) == ("Atrace", True)


async def test_a_retry_waits_until_due_and_keeps_the_users_order(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("a1", to="1"), row("a2", to="1")])
    now = clock.now
    [job] = await claim_all(engine_store, now)
    await engine_store.settle(Settlement(id="a1", state="queued", attempts=job.attempts, due_at=now + 10), now)
    assert await engine_store.next_due(frozenset({"home"})) == now + 10
    assert await claim_all(engine_store, now + 5) == []  # a2 never overtakes the deferred a1
    [retry] = await claim_all(engine_store, now + 10)
    assert (retry.id, retry.attempts) == ("a1", 2)


async def test_a_refunded_deferral_gives_the_attempt_back(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.enqueue([row("o1")])
    [job] = await claim_all(engine_store, clock.now)
    deferred = Settlement(id="o1", state="queued", attempts=job.attempts, due_at=clock.now, refund=True)
    await engine_store.settle(deferred, clock.now)
    [again] = await claim_all(engine_store, clock.now)
    assert again.attempts == 1


async def test_next_due_is_the_earliest_pending_send_of_those_tenants(engine_store: Store, clock: FakeClock) -> None:
    assert await engine_store.next_due(frozenset({"home"})) is None
    await engine_store.enqueue([row("b1", tenant="biz")])
    assert await engine_store.next_due(frozenset({"home"})) is None
    clock.advance(5)
    await engine_store.enqueue([row("h1")])
    assert await engine_store.next_due(frozenset({"home"})) == clock.now
    assert await engine_store.next_due(frozenset({"home", "biz"})) == clock.now - 5
    [job] = await claim_all(engine_store, clock.now, lease=30)
    assert await engine_store.next_due(frozenset({"home"})) == clock.now + 30  # the lease's end
    await send(engine_store, job, clock.now, "wamid.H1")
    assert await engine_store.next_due(frozenset({"home"})) is None


async def _dead(store: Store, outbox_id: str, now: float, tenant: str = "home") -> None:
    await store.enqueue([row(outbox_id, tenant=tenant, to=outbox_id)])
    [job] = [j for j in await claim_all(store, now, tenant=tenant) if j.id == outbox_id]
    failed = Settlement(id=outbox_id, state="failed", attempts=job.attempts, error_code=131026, error_message="x")
    await store.settle(failed, now)


async def test_retry_dead_requeues_only_failed_rows(engine_store: Store, clock: FakeClock) -> None:
    for outbox_id in ("d1", "d2", "d3"):
        await _dead(engine_store, outbox_id, clock.now)
    await engine_store.enqueue([row("live", to="9")])
    assert await engine_store.retry_dead(["d1", "live", "missing"], clock.now) == 1
    shown = await engine_store.message("d1") or {}
    assert (shown["state"], shown["attempts"], shown["error_code"], shown["error_message"]) == ("queued", 0, None, None)
    assert await engine_store.retry_dead(None, clock.now) == 2
    assert await engine_store.retry_dead(None, clock.now) == 0
    assert await engine_store.dead_letters(10) == []
    assert sorted(j.id for j in await claim_all(engine_store, clock.now)) == ["d1", "d2", "d3", "live"]


async def test_dead_letters_are_listed_newest_first_by_tenant(engine_store: Store, clock: FakeClock) -> None:
    await _dead(engine_store, "d1", clock.now)
    clock.advance(1)
    await _dead(engine_store, "d2", clock.now, tenant="biz")
    clock.advance(1)
    await _dead(engine_store, "d3", clock.now)
    assert [d["id"] for d in await engine_store.dead_letters(10)] == ["d3", "d2", "d1"]
    assert [d["id"] for d in await engine_store.dead_letters(10, "home")] == ["d3", "d1"]
    [one] = await engine_store.dead_letters(1)
    assert (one["id"], one["to"], one["tenant"], one["error_code"], one["attempts"]) == ("d3", "d3", "home", 131026, 1)


async def test_read_receipts_are_dropped_before_each_claim_of_them_and_swept_a_few_times_a_second(
    engine_store: Store, clock: FakeClock
) -> None:
    """A receipt over `receipt_max_age` or superseded by a newer one of the same user is dropped
    (a notice, never sent). A claim that takes receipts drops first; one that takes none sweeps at
    most every RECEIPT_SWEEP s (under a backlog the pump claims many times a second)."""

    async def claim(receipt_room: int) -> list[tuple[str, str | None]]:
        jobs = await engine_store.claim(
            clock.now, {"home": 0}, 30, frozenset(), receipts={"home": receipt_room}, receipt_max_age=5
        )
        return [(j.id, j.dropped) for j in jobs]

    await engine_store.enqueue([row("r1", kind="read", to="1")])
    clock.advance(4.9)
    assert await claim(0) == []  # this claim sweeps: nothing stale yet
    clock.advance(0.2)  # r1 is stale now
    assert await claim(0) == []  # swept 0.2 s ago and takes no receipt: skips
    clock.advance(RECEIPT_SWEEP)
    assert await claim(0) == [("r1", "stale")]
    await engine_store.enqueue([row("r2", kind="read", to="2")])
    clock.advance(0.01)
    await engine_store.enqueue([row("r3", kind="read", to="2")])
    assert await claim(5) == [("r2", "superseded"), ("r3", None)]  # taking receipts: dropped first
    assert await state(engine_store, "r2") == "dropped"
