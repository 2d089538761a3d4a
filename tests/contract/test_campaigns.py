"""Contract tests of campaigns and templates (`store.campaigns`, `store.templates`), on every engine."""

from __future__ import annotations

from typing import Any

import msgspec

from alfred_bot.store import Completion, OutboxRow, Settlement, Store
from alfred_bot.store.base import CampaignSpec, TemplateInfo
from tests.contract.conftest import START, FakeClock
from tests.contract.helpers import PNID, body, claim_all, event, row, send, state, statuses, text
from tests.payloads import status


def campaign_row(campaign_id: str, to: str, *, tenant: str = "home") -> OutboxRow:
    """One campaign send, as `alfred_bot.campaigns` builds it (priority 1, idem key per recipient)."""
    base = row(f"{campaign_id}-{to}", tenant=tenant, to=to, kind="template", priority=1)
    return msgspec.structs.replace(base, idem_key=f"campaign:{campaign_id}:{to}", campaign_id=campaign_id)


async def test_a_reply_never_waits_for_its_users_queued_campaign_send(engine_store: Store, clock: FakeClock) -> None:
    """Conversation first: the user's own campaign send, still waiting behind the campaign's
    backlog, must not make the answer to what they just wrote wait for the whole backlog."""
    users = [f"1555000{i:04d}" for i in range(20)]
    await engine_store.enqueue([campaign_row("c1", u) for u in users])
    reply = row("reply-1", to=users[-1], priority=0)
    await engine_store.enqueue([reply])
    jobs = await engine_store.claim(clock.now, {"home": 1}, 30.0, frozenset())
    assert [j.id for j in jobs] == ["reply-1"]
    # and the campaign send of that user still goes, after the reply
    rest = await claim_all(engine_store, clock.now)
    assert f"c1-{users[-1]}" not in [j.id for j in rest]  # one send per user at a time: the reply is in flight
    assert len(rest) == len(users) - 1



async def test_one_claim_never_leases_a_reply_beside_the_users_campaign_send(
    engine_store: Store, clock: FakeClock
) -> None:
    """An older campaign send and a newer reply to one user, both due: one claim with room for both
    leases the reply only; the campaign send follows once the reply is settled."""
    user = "15550009999"
    await engine_store.enqueue([campaign_row("c1", user)])
    await engine_store.enqueue([row("reply-2", to=user, priority=0)])
    [job] = await claim_all(engine_store, clock.now)
    assert job.id == "reply-2"
    await send(engine_store, job, clock.now, "wamid.R2")
    assert [j.id for j in await claim_all(engine_store, clock.now)] == [f"c1-{user}"]


# ---------------------------------------------------------------------------- campaigns


def spec(campaign_id: str = "c1", *, tenant: str = "home", send_at: float | None = None) -> CampaignSpec:
    template = {"name": "spring_sale", "language": "en_US", "category": "MARKETING"}
    return CampaignSpec(id=campaign_id, tenant=tenant, name="Spring sale", template=template, send_at=send_at)


async def _opt_out(store: Store, user: str) -> None:
    wamid = f"wamid.STOP{user}"
    await store.ingest(body(text(wamid, "STOP", sender=user)))
    done = Completion(wamid, "handled", (), tenant="home", user=user, consent="out", phone_number_id=PNID)
    assert await store.complete(done)


def _stop_marketing(user: str) -> Any:
    # Meta: Webhooks > user_preferences (the user stopped marketing messages in WhatsApp)
    items = [{"wa_id": user, "category": "marketing_messages", "value": "stop", "timestamp": 100}]
    return event("user_preferences", {"metadata": {"phone_number_id": PNID}, "user_preferences": items}, time=50)


async def test_a_campaign_loads_paused_then_runs_with_skips_and_duplicates_counted(engine_store: Store) -> None:
    store = engine_store
    await _opt_out(store, "15550000002")
    await store.ingest(_stop_marketing("15550000003"))
    assert await store.campaigns.create(spec()) is True
    assert await store.campaigns.create(spec()) is False  # the same id again: nothing changes
    users = [f"1555000000{i}" for i in range(5)]
    part = await store.campaigns.add("c1", [campaign_row("c1", u) for u in users], marketing=True)
    assert part == {"queued": 3, "skipped": 2, "duplicates": 0}
    # while loading, nothing of it may be claimed (a crash mid-upload sends nothing)
    assert await claim_all(store, START) == []
    twice = [campaign_row("c1", u) for u in (*users[:2], "15550000009")]
    again = await store.campaigns.add("c1", twice, marketing=True)
    assert again == {"queued": 1, "skipped": 0, "duplicates": 2}
    loading = await store.campaigns.summary("c1")
    assert loading is not None and loading["state"] == "loading"
    assert await store.campaigns.finish("c1") == "running"
    shown = await store.campaigns.summary("c1")
    assert shown is not None
    assert shown["counts"] == {
        "queued": 4,
        "sent": 0,
        "delivered": 0,
        "read": 0,
        "failed": 0,
        "skipped": 2,
        "cancelled": 0,
    }
    assert (shown["state"], shown["total"], shown["template"]["name"]) == ("running", 6, "spring_sale")
    jobs = await claim_all(store, START)
    assert sorted(j.recipient for j in jobs) == ["15550000000", "15550000001", "15550000004", "15550000009"]


async def test_a_user_who_opts_out_mid_campaign_gets_nothing_more_of_it(engine_store: Store, clock: FakeClock) -> None:
    """Opt-outs are checked when a campaign is loaded, and again whenever a user opts out later:
    their campaign sends not yet done are skipped (counted so) in the same transaction, a leased one
    too (its retry must not send it either); their own conversation and other users' sends stay."""
    store = engine_store
    await store.campaigns.create(spec())
    users = ["15550000001", "15550000002", "15550000003"]
    await store.campaigns.add("c1", [campaign_row("c1", u) for u in users], marketing=True)
    await store.campaigns.finish("c1")
    [leased] = [j for j in await claim_all(store, clock.now) if j.recipient == users[2]] or [None]
    assert leased is not None
    await store.enqueue([row("chat-1", to=users[0])])
    await _opt_out(store, users[0])
    await _opt_out(store, users[2])
    assert await state(store, f"c1-{users[0]}") == "skipped"
    assert await state(store, f"c1-{users[2]}") == "skipped"  # it was leased: Meta says 429, retry later...
    await store.settle(Settlement(id=leased.id, state="queued", attempts=leased.attempts), clock.now)
    assert await state(store, f"c1-{users[2]}") == "skipped"  # ...and the retry does not bring it back
    assert await state(store, "chat-1") == "queued"  # what the user's own conversation queued still goes
    shown = await store.campaigns.summary("c1")
    assert shown is not None and shown["counts"]["skipped"] == 2
    assert [j.id for j in await claim_all(store, clock.now)] == ["chat-1"]


async def test_marketing_stops_only_skip_marketing_templates(engine_store: Store) -> None:
    await engine_store.ingest(_stop_marketing("15550000003"))
    await engine_store.campaigns.create(spec())
    part = await engine_store.campaigns.add("c1", [campaign_row("c1", "15550000003")], marketing=False)
    assert part == {"queued": 1, "skipped": 0, "duplicates": 0}


async def test_pause_resume_and_cancel_act_on_the_rows(engine_store: Store, clock: FakeClock) -> None:
    store = engine_store
    await store.campaigns.create(spec())
    await store.campaigns.add("c1", [campaign_row("c1", f"1555000000{i}") for i in range(4)], marketing=True)
    assert await store.campaigns.control("c1", "pause") == "loading"  # not while loading
    await store.campaigns.finish("c1")
    [first] = await store.claim(clock.now, {"home": 1}, 30.0, frozenset())
    assert await store.campaigns.control("c1", "pause") == "paused"
    assert await claim_all(store, clock.now) == []  # paused rows are not claimed
    await send(store, first, clock.now, "wamid.C1")  # the send in flight still ends
    assert await store.campaigns.control("c1", "resume") == "running"
    resumed = await store.claim(clock.now, {"home": 1}, 30.0, frozenset())
    assert len(resumed) == 1
    assert await store.campaigns.control("c1", "cancel") == "cancelled"
    assert await store.campaigns.control("c1", "resume") == "cancelled"  # stays cancelled
    shown = await store.campaigns.summary("c1")
    assert shown is not None
    assert (shown["state"], shown["counts"]["sent"], shown["counts"]["queued"], shown["counts"]["cancelled"]) == (
        "cancelled",
        1,
        1,
        2,
    )  # (the one in flight when cancelled is still waiting for its answer)
    assert await state(store, "c1-15550000000") in ("sent", "sending")
    assert await store.campaigns.control("nope", "pause") is None


async def test_statuses_and_failures_show_in_the_counts(engine_store: Store, clock: FakeClock) -> None:
    store = engine_store
    await store.campaigns.create(spec())
    await store.campaigns.add("c1", [campaign_row("c1", f"1555000000{i}") for i in range(3)], marketing=True)
    await store.campaigns.finish("c1")
    jobs = await claim_all(store, clock.now)
    await send(store, jobs[0], clock.now, "wamid.R")
    await send(store, jobs[1], clock.now, "wamid.D")
    failure = Settlement(id=jobs[2].id, state="failed", attempts=jobs[2].attempts, error_code=131049)
    await store.settle(failure, clock.now)
    await store.ingest(statuses(status("wamid.R", "read"), status("wamid.D", "delivered")))
    [shown] = await store.campaigns.summaries()
    assert shown["counts"]["read"] == 1 and shown["counts"]["delivered"] == 1 and shown["counts"]["failed"] == 1
    assert shown["failures_by_code"] == {"131049": 1}
    assert shown["state"] == "done"


async def test_summaries_newest_first_and_by_tenant(engine_store: Store, clock: FakeClock) -> None:
    await engine_store.campaigns.create(spec("old"))
    clock.advance(10)
    await engine_store.campaigns.create(spec("new", tenant="biz", send_at=clock.now + 3600))
    await engine_store.campaigns.add("new", [campaign_row("new", "15550000001", tenant="biz")], marketing=True)
    await engine_store.campaigns.finish("new")
    assert [c["id"] for c in await engine_store.campaigns.summaries()] == ["new", "old"]
    [biz] = await engine_store.campaigns.summaries("biz")
    assert (biz["id"], biz["state"], biz["send_at"]) == ("new", "scheduled", clock.now + 3600)
    assert await engine_store.campaigns.summary("missing") is None


async def test_rows_added_to_a_cancelled_campaign_are_cancelled(engine_store: Store) -> None:
    await engine_store.campaigns.create(spec())
    assert await engine_store.campaigns.control("c1", "cancel") == "cancelled"
    await engine_store.campaigns.add("c1", [campaign_row("c1", "15550000001")], marketing=True)
    assert await engine_store.campaigns.finish("c1") == "cancelled"
    assert await claim_all(engine_store, START) == []
    assert await state(engine_store, "c1-15550000001") == "cancelled"


# ---------------------------------------------------------------------------- templates


def template(name: str, language: str = "en_US", status: str = "APPROVED") -> TemplateInfo:
    components = [{"type": "BODY", "text": "Hi {{1}}, your order {{2}} ships today"}]
    return TemplateInfo(
        name=name,
        language=language,
        status=status,
        category="UTILITY",
        id=f"id-{name}-{language}",
        parameter_format="POSITIONAL",
        components=components,
    )


async def test_templates_are_replaced_as_a_set_per_tenant(engine_store: Store, clock: FakeClock) -> None:
    store = engine_store
    assert await store.templates.synced_at("home") is None
    await store.templates.replace("home", [template("b"), template("a", "es"), template("a")])
    await store.templates.replace("biz", [template("other")])
    assert await store.templates.synced_at("home") == clock.now
    assert [(t.name, t.language) for t in await store.templates.templates("home")] == [
        ("a", "en_US"),
        ("a", "es"),
        ("b", "en_US"),
    ]
    assert (await store.templates.templates("home", "b"))[0].components[0]["text"].startswith("Hi {{1}}")
    clock.advance(60)
    await store.templates.replace("home", [template("a", status="PAUSED")])
    [only] = await store.templates.templates("home")
    assert (only.name, only.status, await store.templates.synced_at("home")) == ("a", "PAUSED", clock.now)
    assert [t.name for t in await store.templates.templates("biz")] == ["other"]


async def test_a_template_is_added_and_removed_alone(engine_store: Store) -> None:
    store = engine_store
    await store.templates.upsert("home", template("new", status="PENDING"))
    await store.templates.upsert("home", template("new", "es", status="PENDING"))
    await store.templates.upsert("home", template("new", status="APPROVED"))
    assert {(t.language, t.status) for t in await store.templates.templates("home")} == {
        ("en_US", "APPROVED"),
        ("es", "PENDING"),
    }
    assert await store.templates.synced_at("home") is None  # an upsert is not a sync
    assert await store.templates.remove("home", "new", "id-new-es") == 1
    assert await store.templates.remove("home", "new") == 1
    assert await store.templates.templates("home") == []


async def test_retention_never_scrubs_a_paused_campaigns_sends(engine_store: Store, clock: FakeClock) -> None:
    store = engine_store
    await store.campaigns.create(spec())
    await store.campaigns.add("c1", [campaign_row("c1", "15550000001")], marketing=True)
    await store.campaigns.finish("c1")
    assert await store.campaigns.control("c1", "pause") == "paused"
    cutoff = clock.advance(40 * 86400)  # paused for longer than the hot days
    await store.scrub(b"k" * 32, cutoff)
    await store.purge(cutoff)
    assert await store.campaigns.control("c1", "resume") == "running"
    [job] = await claim_all(store, clock.now)
    assert b"hello" in job.payload and job.recipient == "15550000001"  # resumed whole, not emptied
