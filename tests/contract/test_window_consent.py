"""The 24-hour window, consent (opt-out / opt-in) and marketing preferences, across a user's two ids.

Meta: a user may be known by a phone number (`from`, `wa_id`) and, since 2026, a business-scoped
user id (`from_user_id`, `contacts[].user_id`); Webhooks > messages, developers.facebook.com/
documentation/business-messaging/whatsapp/webhooks/reference/messages/. The window opens with a
message the user sends (Cloud API > Messages > customer service window).
"""

from __future__ import annotations

from typing import Any

from alfred_bot.store import Completion, Store
from tests import payloads
from tests.contract.conftest import FakeClock
from tests.contract.helpers import BIZ_PNID, BSUID, PNID, USER, body, event, text

BOTH_IDS = [{"profile": {"name": "Ana"}, "wa_id": USER, "user_id": BSUID}]


async def test_last_inbound_is_the_users_newest_message_time(engine_store: Store) -> None:
    assert await engine_store.last_inbound("home", USER) is None
    await engine_store.ingest(body(text("wamid.1", ts=1000), text("wamid.2", ts=1500)))
    await engine_store.ingest(body(text("wamid.3", ts=1200)))  # arrives late: not the newest
    assert await engine_store.last_inbound("home", USER) == 1500
    assert await engine_store.last_inbound("biz", USER) is None  # per tenant
    assert await engine_store.last_inbound("home", "15550000000") is None


async def test_last_inbound_finds_the_user_by_either_id(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.1", ts=1000), contacts=BOTH_IDS))
    only_id = text("wamid.2", ts=2000)
    del only_id["from"]
    only_id["from_user_id"] = BSUID
    await engine_store.ingest(body(only_id, contacts=[{"profile": {"name": "Ana"}, "user_id": BSUID}]))
    assert await engine_store.last_inbound("home", BSUID) == 2000
    assert await engine_store.last_inbound("home", USER) == 1000  # the phone number's own messages


async def test_system_messages_do_not_open_the_window(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.1", ts=1000)))
    system = dict(payloads.SAMPLES["system"], id="wamid.SYS", timestamp="5000")
    await engine_store.ingest(body(system))
    assert await engine_store.last_inbound("home", USER) == 1000


async def _consent(store: Store, wamid: str, user: str, consent: Any, pnid: str = PNID) -> None:
    tenant = "home" if pnid == PNID else "biz"
    done = Completion(wamid, "handled", tenant=tenant, user=user, consent=consent, phone_number_id=pnid)
    assert await store.complete(done) is True


async def test_an_opt_out_holds_per_tenant_until_the_user_opts_in(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.STOP", "STOP"), text("wamid.LATER", "hello again")))
    assert await engine_store.opted_out("home", USER) is False
    await _consent(engine_store, "wamid.STOP", USER, "out")
    assert await engine_store.opted_out("home", USER) is True
    assert await engine_store.opted_out("biz", USER) is False
    await _consent(engine_store, "wamid.LATER", USER, None)  # a reaction, a notice: no change
    assert await engine_store.opted_out("home", USER) is True
    await engine_store.ingest(body(text("wamid.BACK", "hi")))
    await _consent(engine_store, "wamid.BACK", USER, "in")
    assert await engine_store.opted_out("home", USER) is False


async def test_an_opt_out_by_one_id_covers_the_users_other_id(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.STOP", "STOP"), contacts=BOTH_IDS))
    await _consent(engine_store, "wamid.STOP", USER, "out")
    assert await engine_store.opted_out("home", BSUID) is True
    assert await engine_store.opted_out("home", "US.someone-else") is False
    await engine_store.ingest(body(text("wamid.BACK", "hi"), contacts=BOTH_IDS))
    await _consent(engine_store, "wamid.BACK", BSUID, "in")  # written by the user id: lifts the number's STOP
    assert await engine_store.opted_out("home", USER) is False


async def test_an_opt_out_on_one_number_leaves_the_other(engine_store: Store) -> None:
    await engine_store.ingest(body(text("wamid.B", "STOP"), pnid=BIZ_PNID))
    await _consent(engine_store, "wamid.B", USER, "out", pnid=BIZ_PNID)
    assert (await engine_store.opted_out("biz", USER), await engine_store.opted_out("home", USER)) == (True, False)


def _preferences(items: Any, time: int | None = 50, pnid: str = PNID) -> Any:
    # Meta: Webhooks > user_preferences (marketing_messages stop / resume with a timestamp)
    return event("user_preferences", {"metadata": {"phone_number_id": pnid}, "user_preferences": items}, time=time)


async def test_the_latest_marketing_preference_by_metas_time_wins(engine_store: Store, clock: FakeClock) -> None:
    stop = {"wa_id": "1", "category": "marketing_messages", "value": "stop", "timestamp": 100}
    await engine_store.ingest(_preferences([stop]))
    clock.advance(1)
    await engine_store.ingest(_preferences([dict(stop, value="resume", timestamp=99)], time=51))  # older, later
    assert await engine_store.marketing_stopped("home", "1") is True
    await engine_store.ingest(_preferences([dict(stop, value="resume", timestamp=101)], time=52))
    assert await engine_store.marketing_stopped("home", "1") is False
    assert await engine_store.marketing_stopped("biz", "1") is False


async def test_preferences_are_read_leniently_and_the_event_is_kept(engine_store: Store) -> None:
    await engine_store.ingest(_preferences([{"wa_id": "1", "value": "stop", "timestamp": "100"}]))
    await engine_store.ingest(_preferences([{"wa_id": "1", "value": "resume", "timestamp": "99"}], time=51))
    assert await engine_store.marketing_stopped("home", "1") is True  # "100" read as 100
    await engine_store.ingest(_preferences([{"user_id": "US.9", "value": "stop"}]))  # no timestamp: entry time
    await engine_store.ingest(_preferences([{"user_id": "US.9", "value": "resume", "timestamp": 49}], time=52))
    assert await engine_store.marketing_stopped("home", "US.9") is True
    await engine_store.ingest(_preferences([{"value": "stop"}, {"wa_id": "3"}], time=53))  # unusable items
    await engine_store.ingest(_preferences("not a list", time=54))
    assert await engine_store.marketing_stopped("home", "3") is False
    await engine_store.ingest(_preferences([{"wa_id": "4", "value": "stop", "category": "other"}], time=55))
    assert await engine_store.marketing_stopped("home", "4") is False  # another category
    assert len(await engine_store.events(100, field="user_preferences")) == 7
