"""Issue 13 items 3 and 9: one tenant cannot write another's statuses or shadow its ids, and
label values taken from signed bodies cannot grow `/metrics` without end.

Two tenants with their own app secrets (home: the global secret; biz: its own), production mode
against the fake Graph API. "Signed by home" means a body home's app could really sign: it names
home's own phone number id, so the signature check lets it through; only scoping stops it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from alfred_bot import keys
from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.parse import parse_body
from alfred_bot.prometheus import MAX_ERROR_CODES
from alfred_bot.store import Completion, OutboxRow, SqliteStore
from alfred_bot.telemetry import Telemetry
from tests import payloads as p
from tests.conftest import API_TOKEN, APP_SECRET, db_rows, make_config, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph
from tests.test_tenants import BIZ_ENV, BIZ_SECRET, BIZ_USER, TENANTS, _echo

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def _app(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> Any:
    cfg = prod_config(tmp_path, graph, tenants=TENANTS)
    routers = {"home": _echo("home"), "biz": _echo("biz")}
    return await aiohttp_client(create_app(cfg, load_secrets(BIZ_ENV, cfg=cfg), routers=routers))


def _db(client: Any) -> Path:
    return Path(client.app[keys.CONFIG].storage.path)


def _statuses(pnid: str, *statuses: dict[str, Any]) -> bytes:
    return p.dump(p.envelope(p.entry(p.change(p.value(statuses=list(statuses), pnid=pnid)))))


async def _biz_send(client: Any) -> tuple[str, str]:
    """A template biz sends through the API, sent by the fake Graph API: (outbox id, wamid)."""
    body = {
        "to": f"+{BIZ_USER}",
        "type": "template",
        "tenant": "biz",
        "template": {"name": "p", "language": {"code": "en"}},
    }
    resp = await client.post("/api/messages", json=body, headers=AUTH)
    assert resp.status == 202
    outbox_id = (await resp.json())["id"]
    db = _db(client)
    await wait_for(lambda: db_rows(db, "SELECT state FROM outbox WHERE id = ?", (outbox_id,))[0][0] == "sent")
    return outbox_id, str(db_rows(db, "SELECT wamid FROM outbox WHERE id = ?", (outbox_id,))[0][0])


async def _row(client: Any, outbox_id: str) -> Any:
    return await (await client.get(f"/api/messages/{outbox_id}", headers=AUTH)).json()


async def test_a_status_signed_for_one_number_cannot_touch_another_numbers_send(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _app(aiohttp_client, tmp_path, graph)
    outbox_id, wamid = await _biz_send(client)
    failed = p.status(wamid, "failed", errors=[{"code": 131026, "title": "Message undeliverable"}])
    forged = _statuses(p.PNID, failed, p.status(wamid, "delivered"), p.status(wamid, "read"))
    assert await post_webhook(client, forged, APP_SECRET) == 200  # home may speak for its own number
    row = await _row(client, outbox_id)
    assert (row["status"], row["error"], row["delivered_at"], row["read_at"]) == ("sent", None, None, None)

    # the genuine biz statuses still apply (the forged ones did not take their dedupe keys)
    assert await post_webhook(client, _statuses(p.BIZ_PNID, p.status(wamid, "delivered")), BIZ_SECRET) == 200
    assert (await _row(client, outbox_id))["status"] == "delivered"
    assert await post_webhook(client, _statuses(p.BIZ_PNID, p.status(wamid, "read")), BIZ_SECRET) == 200
    assert (await _row(client, outbox_id))["status"] == "read"
    keys_ = sorted(r[0] for r in db_rows(_db(client), "SELECT key FROM statuses"))
    assert keys_ == sorted(
        [f"{p.PNID}:{wamid}:{s}" for s in ("failed", "delivered", "read")]
        + [f"{p.BIZ_PNID}:{wamid}:{s}" for s in ("delivered", "read")]
    )


async def test_a_wamid_used_first_by_one_number_does_not_make_anothers_message_vanish(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _app(aiohttp_client, tmp_path, graph)
    db = _db(client)
    squat = p.body_of(p.text("squatting", id="wamid.SHARED"))
    assert await post_webhook(client, squat, APP_SECRET) == 200
    genuine = p.body_of(p.text("genuine", id="wamid.SHARED", sender=BIZ_USER), pnid=p.BIZ_PNID)
    assert await post_webhook(client, genuine, BIZ_SECRET) == 200
    assert await post_webhook(client, genuine, BIZ_SECRET) == 200  # a redelivery is still one message

    sql = "SELECT COUNT(*) FROM inbox WHERE state = 'handled'"
    await wait_for(lambda: db_rows(db, sql)[0][0] == 2)
    rows = {r["tenant"]: r["text"] for r in db_rows(db, "SELECT tenant, text FROM inbox")}
    assert rows == {"home": "squatting", "biz": "genuine"}
    # both answered, each by its own number: the reply idempotency keys are per tenant too
    await wait_for(lambda: len([s for s in graph.sends if s.body.get("type") == "text"]) == 2)
    answers = sorted(
        (s.phone_number_id, s.body["to"], s.body["text"]["body"]) for s in graph.sends if s.body.get("type") == "text"
    )
    assert answers == sorted([(p.PNID, f"+{p.USER}", "home: squatting"), (p.BIZ_PNID, f"+{BIZ_USER}", "biz: genuine")])


def _two_numbers_one_wamid() -> Any:
    body = p.dump(
        p.envelope(
            p.entry(
                p.change(p.value([p.text("home", id="wamid.TWIN")])),
                p.change(p.value([p.text("biz", id="wamid.TWIN", sender=BIZ_USER)], pnid=p.BIZ_PNID)),
            )
        )
    )
    return parse_body(body, {p.PNID: "home", p.BIZ_PNID: "biz"})


async def test_a_completion_finishes_only_the_row_of_its_number(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "alfred.db")
    await store.open()
    try:
        assert len(await store.ingest(_two_numbers_one_wamid())) == 2
        # without the number the wamid is ambiguous: nothing is finished
        assert await store.complete(Completion("wamid.TWIN", "handled")) is False
        done = Completion("wamid.TWIN", "handled", tenant="biz", user=BIZ_USER, phone_number_id=p.BIZ_PNID)
        assert await store.complete(done) is True
        assert await store.complete(done) is False  # once
        [left] = await store.pending(0, 10)
        assert (left.item.phone_number_id, left.item.message.text) == (p.PNID, "home")
        assert left.item.key == f"{p.PNID}:wamid.TWIN"
    finally:
        await store.close()


async def test_reply_idempotency_keys_are_scoped_by_tenant(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "alfred.db")
    await store.open()
    try:
        row = OutboxRow(
            id="o-home",
            idem_key="reply:wamid.TWIN:000",
            tenant="home",
            recipient=p.USER,
            type="text",
            payload=b"{}",
            source_event_id="wamid.TWIN",
        )
        twin = msgspec.structs.replace(row, id="o-biz", tenant="biz", recipient=BIZ_USER)
        again = msgspec.structs.replace(row, id="o-home-2")
        assert await store.enqueue([row]) == ["o-home"]
        assert await store.enqueue([twin]) == ["o-biz"]
        assert await store.enqueue([again]) == ["o-home"]  # same tenant, same key: the first row
    finally:
        await store.close()


# ---------------------------------------------------------------------------- item 9: bounded labels


def _label_values(text: str, metric: str) -> list[dict[str, str]]:
    found = []
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            inner = line[line.index("{") + 1 : line.rindex("}")]
            found.append(dict(pair.split("=", 1) for pair in inner.replace('"', "").split(",")))
    return found


async def test_message_type_and_event_field_labels_are_bounded(client: Any) -> None:
    long_type, long_field = "t" * 5000, "f" * 5000
    msg = p.message(long_type, {"x": 1}, id="wamid.LONGTYPE")
    assert await post_webhook(client, p.body_of(msg)) == 200
    assert await post_webhook(client, p.dump(p.envelope(p.entry(p.change({"x": 1}, long_field))))) == 200
    text = await (await client.get("/metrics")).text()
    assert max(len(line) for line in text.splitlines()) < 300
    assert {"tenant": "home", "type": "other"} in _label_values(text, "alfred_inbound_messages_total")
    assert {"tenant": "", "field": "other"} in _label_values(text, "alfred_events_total")
    # the data itself is kept whole: only the label is bounded
    db = client.app[keys.CONFIG].storage.path
    assert db_rows(db, "SELECT type FROM inbox")[0][0] == long_type
    assert db_rows(db, "SELECT field FROM events")[0][0] == long_field
    # known names keep their own series
    assert await post_webhook(client, p.body_of(p.text("hi"))) == 200
    text = await (await client.get("/metrics")).text()
    assert {"tenant": "home", "type": "text"} in _label_values(text, "alfred_inbound_messages_total")


def test_graph_error_code_labels_are_bounded() -> None:
    telemetry = Telemetry(["home"])
    for code in range(1000, 1000 + 3 * MAX_ERROR_CODES):
        telemetry.send_done("home", "failed", 0.01, code)
    telemetry.send_done("home", "failed", 0.01, 1000)  # an early code keeps its series
    series = _label_values(telemetry.metrics.render().decode(), "alfred_graph_errors_total")
    assert len(series) == MAX_ERROR_CODES + 1
    assert {"tenant": "home", "code": "other"} in series
    errors = telemetry.errors_by_code("home")
    assert len(errors) == MAX_ERROR_CODES + 1
    assert errors["1000"] == 2
    assert errors["other"] == 2 * MAX_ERROR_CODES


# ---------------------------------------------------------------------------- account-level events by WABA

HOME_WABA, BIZ_WABA = "102290129340398", "109876543210987"


def _account_event(waba: str, event: str = "ACCOUNT_RESTRICTION") -> bytes:
    """An `account_update` as Meta sends it: the WABA id in `entry.id`, no phone number id
    (Meta: webhooks/reference/account_update)."""
    value = {"phone_number": "15550783881", "event": event}
    entry = {"id": waba, "time": 1739321024, "changes": [{"field": "account_update", "value": value}]}
    return p.dump({"object": "whatsapp_business_account", "entry": [entry]})


async def _waba_app(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> Any:
    tenants = {
        "home": {**TENANTS["home"], "waba_id": HOME_WABA},
        "biz": {**TENANTS["biz"], "waba_id": BIZ_WABA},
    }
    cfg = prod_config(tmp_path, graph, tenants=tenants)
    routers = {"home": _echo("home"), "biz": _echo("biz")}
    return await aiohttp_client(create_app(cfg, load_secrets(BIZ_ENV, cfg=cfg), routers=routers))


async def test_account_events_belong_to_the_tenant_of_their_waba_and_only_its_app_may_send_them(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await _waba_app(aiohttp_client, tmp_path, graph)
    assert await post_webhook(client, _account_event(BIZ_WABA), BIZ_SECRET) == 200
    assert await post_webhook(client, _account_event(HOME_WABA, "DISABLED_UPDATE"), APP_SECRET) == 200
    # home's app cannot speak for biz's account (a forged "restricted" would alarm biz's operator)
    forged = _account_event(BIZ_WABA, "ACCOUNT_VIOLATION")
    assert await post_webhook(client, forged, APP_SECRET) == 403
    events = await (await client.get("/api/events?field=account_update", headers=AUTH)).json()
    assert sorted((e["tenant"], e["value"]["event"]) for e in events) == [
        ("biz", "ACCOUNT_RESTRICTION"),
        ("home", "DISABLED_UPDATE"),
    ]
    # a WABA no tenant names stays account-wide and any configured app may send it, as before
    assert await post_webhook(client, _account_event("555555555555555"), APP_SECRET) == 200
    events = await (await client.get("/api/events?field=account_update", headers=AUTH)).json()
    assert [e["tenant"] for e in events if e["waba_id"] == "555555555555555"] == [None]


def test_a_waba_shared_by_two_numbers_stays_account_wide(tmp_path: Path) -> None:
    shared = {"home": {"phone_number_id": p.PNID, "waba_id": HOME_WABA}}
    shared["biz"] = {"phone_number_id": p.BIZ_PNID, "waba_id": HOME_WABA}
    cfg = make_config(tmp_path, tenants=shared)
    assert cfg.tenant_by_waba_id() == {}
    parsed = parse_body(_account_event(HOME_WABA), cfg.tenant_by_phone_number_id(), wabas=cfg.tenant_by_waba_id())
    assert [e.tenant for e in parsed.events] == [None]
