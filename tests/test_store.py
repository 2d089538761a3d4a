"""The SQLite engine on its own: durability settings, group commit, isolation, migrations, the file
lock and the read-only mode. What every engine must do is in tests/contract/."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from alfred_bot.parse import InboundItem, parse_body
from alfred_bot.store import Completion, SqliteStore, StoreError, claim_after, make_store
from alfred_bot.store.base import Dialog
from alfred_bot.store.sqlite.outbox import FREE_RESTARTS
from alfred_bot.store.sqlite.schema import SCHEMA_VERSION
from tests import payloads
from tests.conftest import db_rows
from tests.contract.helpers import USER, body, handled, row, send, text

TENANTS = {payloads.PNID: "home"}


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SqliteStore(tmp_path / "sub" / "alfred.db")
    await s.open()
    yield s
    await s.close()


def _body(*msgs: dict[str, Any]) -> Any:
    return parse_body(payloads.body_of(*msgs), TENANTS)


async def test_pragmas_in_force(store: SqliteStore) -> None:
    mode = await store.writer.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    sync = await store.writer.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    assert (mode, sync) == ("wal", 2)  # 2 = FULL


async def test_concurrent_ingests_share_commits(store: SqliteStore) -> None:
    bodies = [_body(payloads.text(f"m{i}")) for i in range(200)]
    results = await asyncio.gather(*(store.ingest(b) for b in bodies))
    assert all(len(r) == 1 for r in results)
    assert store.writer.writes == 200
    assert store.writer.groups < 50


async def test_failing_write_is_isolated_in_its_group(store: SqliteStore) -> None:
    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO events (key, field, raw, received_at) VALUES ('k', 'f', x'00', 0)")
        raise ValueError("bug in one write")

    results = await asyncio.gather(
        store.ingest(_body(payloads.text("a", id="wamid.A"))),
        store.writer.submit(bad),
        store.ingest(_body(payloads.text("b", id="wamid.B"))),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert (store.writer.writes, store.writer.groups) == (3, 1)  # they shared one transaction
    assert [len(r) for r in (results[0], results[2])] == [1, 1]
    assert [r["id"] for r in await store.recent_inbound(10)] == ["wamid.B", "wamid.A"]
    assert await store.writer.read(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0]) == 0


async def test_newer_schema_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "alfred.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    await store.close()


async def test_undecodable_pending_row_is_skipped_not_blocking(store: SqliteStore) -> None:
    def insert_bad(conn: sqlite3.Connection) -> None:
        for event_id, raw in (
            ("wamid.OLD", b'{"id": "wamid.OLD", "type": "text", "timestamp": 1, "from": "1", "text": null}'),
            ("wamid.NOID", b'{"type": "text", "timestamp": 1, "from": "1"}'),
        ):
            conn.execute(
                "INSERT INTO inbox (event_id, tenant, phone_number_id, type, timestamp, raw, state, received_at) "
                "VALUES (?, 'home', ?, 'text', 1, ?, 'pending', 0)",
                (event_id, payloads.PNID, raw),
            )

    await store.writer.submit(insert_bad)
    await store.ingest(_body(payloads.text("after", id="wamid.AFTER")))
    pending = await store.pending(0, 10)
    # a row without an id is skipped; a text that no longer decodes is routed as an unknown type
    assert [p.item.message.id for p in pending] == ["wamid.OLD", "wamid.AFTER"]
    old = pending[0].item
    assert old.message.type == "text" and old.parse_error is not None and old.message.text is None
    assert pending[1].item.parse_error is None


# ---------------------------------------------------------------------------- migration v2 -> v3

#: The v2 schema exactly as Alfred v2 created it (alfred_bot/store/sqlite.py at e2515f1).
V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    tenant TEXT,
    phone_number_id TEXT NOT NULL,
    sender TEXT,
    user_id TEXT,
    wa_id TEXT,
    name TEXT,
    type TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    text TEXT,
    context_id TEXT,
    raw BLOB NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    received_at REAL NOT NULL,
    handled_at REAL,
    trace_id TEXT
);
CREATE INDEX IF NOT EXISTS inbox_pending ON inbox(seq) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS statuses (
    key TEXT PRIMARY KEY,
    wamid TEXT NOT NULL,
    tenant TEXT,
    phone_number_id TEXT NOT NULL,
    status TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    recipient_id TEXT,
    error_code INTEGER,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS statuses_wamid ON statuses(wamid);
CREATE TABLE IF NOT EXISTS events (
    key TEXT PRIMARY KEY,
    field TEXT NOT NULL,
    tenant TEXT,
    phone_number_id TEXT,
    waba_id TEXT,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    key TEXT PRIMARY KEY,
    what TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    idem_key TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    recipient TEXT NOT NULL,
    type TEXT NOT NULL,
    payload BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL,
    created_at REAL NOT NULL,
    source_event_id TEXT,
    wamid TEXT,
    error_code INTEGER,
    error_message TEXT,
    error_details TEXT,
    error_fbtrace_id TEXT,
    error_http_status INTEGER,
    needs_template INTEGER NOT NULL DEFAULT 0,
    sent_at REAL,
    delivered_at REAL,
    read_at REAL,
    trace_id TEXT,
    origin_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(tenant, due_at) WHERE state IN ('queued', 'sending');
CREATE INDEX IF NOT EXISTS outbox_claim ON outbox(tenant, priority, due_at) WHERE state IN ('queued', 'sending');
CREATE INDEX IF NOT EXISTS outbox_user ON outbox(tenant, recipient) WHERE state IN ('queued', 'sending');
CREATE INDEX IF NOT EXISTS outbox_source ON outbox(source_event_id);
CREATE INDEX IF NOT EXISTS outbox_wamid ON outbox(wamid) WHERE wamid IS NOT NULL;
CREATE INDEX IF NOT EXISTS inbox_sender ON inbox(tenant, sender, timestamp);
CREATE INDEX IF NOT EXISTS inbox_user ON inbox(tenant, user_id, timestamp);
CREATE INDEX IF NOT EXISTS outbox_recipient ON outbox(tenant, recipient, created_at);
CREATE INDEX IF NOT EXISTS outbox_failed ON outbox(created_at) WHERE state = 'failed';
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    tenant TEXT NOT NULL,
    outbox_id TEXT NOT NULL,
    type TEXT NOT NULL,
    recipient TEXT NOT NULL,
    http_status INTEGER,
    error_code INTEGER,
    fbtrace_id TEXT,
    latency_ms REAL NOT NULL,
    outcome TEXT NOT NULL,
    trace_id TEXT
);
CREATE INDEX IF NOT EXISTS audit_outbox ON audit(outbox_id);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE INDEX IF NOT EXISTS inbox_received ON inbox(received_at);
CREATE INDEX IF NOT EXISTS inbox_failed ON inbox(seq) WHERE state = 'failed';
CREATE INDEX IF NOT EXISTS outbox_sent ON outbox(sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS statuses_received ON statuses(received_at);
CREATE TABLE IF NOT EXISTS optouts (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (tenant, user)
);
"""


def _v2_database(path: Path, extra: str = "") -> None:
    """A real v2 file with rows in every table the migration touches."""
    conn = sqlite3.connect(path)
    conn.executescript(
        V2_SCHEMA
        + f"""
        INSERT INTO inbox (seq, event_id, tenant, phone_number_id, sender, type, timestamp, text, raw, state,
                           received_at, trace_id)
        VALUES (1, 'wamid.A', 'home', '{payloads.PNID}', '{payloads.USER}', 'text', 1, 'a', x'7b7d', 'handled', 1,
                NULL),
               (2, 'wamid.B', 'home', '{payloads.PNID}', '{payloads.USER}', 'text', 2, 'b',
                CAST('{{"from":"{payloads.USER}","id":"wamid.B","timestamp":"2","type":"text","text":{{"body":"b"}}}}'
                     AS BLOB), 'pending', 2, 'trace-b'),
               (5, 'wamid.GONE', 'home', '{payloads.PNID}', '{payloads.USER}', 'text', 3, 'c', x'7b7d', 'handled', 3,
                NULL);
        DELETE FROM inbox WHERE seq = 5;
        INSERT INTO outbox (rowid, id, idem_key, tenant, recipient, type, payload, state, due_at, created_at, wamid)
        VALUES (7, 'o-sent', 'reply:wamid.A:000', 'home', '{payloads.USER}', 'text', x'7b7d', 'sent', 0, 1,
                'wamid.OUT1'),
               (9, 'o-queued', 'api:home:k1', 'home', '{payloads.USER}', 'text', x'7b7d', 'queued', 0, 2, NULL);
        INSERT INTO statuses (key, wamid, tenant, phone_number_id, status, timestamp, recipient_id, raw, received_at)
        VALUES ('wamid.OUT1:delivered', 'wamid.OUT1', 'home', '{payloads.PNID}', 'delivered', 5,
                '{payloads.USER}', x'7b7d', 5);
        INSERT INTO events (key, field, tenant, phone_number_id, waba_id, raw, received_at)
        VALUES ('k1', 'account_update', NULL, NULL, 'WABA1', CAST('{{"event":"ACCOUNT_OFFBOARDED"}}' AS BLOB), 6);
        INSERT INTO optouts VALUES ('home', '15550001111', 7);
        {extra}
        PRAGMA user_version = 2;
        """
    )
    conn.close()


async def test_a_v2_database_is_migrated_to_v3(tmp_path: Path) -> None:
    path = tmp_path / "alfred.db"
    _v2_database(path)
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.writer.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
        [pending] = await store.pending(0, 10)
        assert (pending.seq, pending.item.message.text, pending.item.trace_id) == (2, "b", "trace-b")
        # the AUTOINCREMENT counter survived the rebuild: a deleted seq is never handed out again
        [fresh] = await store.ingest(_body(payloads.text("c", id="wamid.C")))
        assert [p.seq for p in await store.pending(0, 10)] == [2, 6]
        assert isinstance(fresh, InboundItem)
        # the inbox is unique per number now: the same wamid on biz is a new message, on home a duplicate
        biz = parse_body(
            payloads.body_of(payloads.text("a", id="wamid.A"), pnid=payloads.BIZ_PNID), {payloads.BIZ_PNID: "biz"}
        )
        assert len(await store.ingest(biz)) == 1
        assert await store.ingest(_body(payloads.text("a", id="wamid.A"))) == []
        # old status keys were rewritten: a redelivery of the old status is still a duplicate
        status = payloads.dump(
            payloads.envelope(
                payloads.entry(payloads.change(payloads.value(statuses=[payloads.status("wamid.OUT1", "delivered")])))
            )
        )
        assert await store.ingest(parse_body(status, TENANTS)) == []
        # outbox rowids kept (claim order) and idempotency keys still found
        rows = await store.writer.read(lambda c: c.execute("SELECT rowid, id FROM outbox ORDER BY rowid").fetchall())
        assert rows == [(7, "o-sent"), (9, "o-queued")]
        assert (await store.message_by_key("api:home:k1") or {}).get("id") == "o-queued"
        assert [j.id for j in await store.claim(10.0, {"home": 5}, 30, frozenset())] == ["o-queued"]
        assert await store.complete(Completion("wamid.B", "handled", phone_number_id=payloads.PNID)) is True
        [event] = await store.events(10)
        assert (event["field"], event["time"], event["value"]) == (
            "account_update",
            None,
            {"event": "ACCOUNT_OFFBOARDED"},
        )
        assert await store.opted_out("home", "15550001111") is True

        def check(c: sqlite3.Connection) -> tuple[str, set[str], set[str]]:
            indexes = {r[1] for r in c.execute("PRAGMA index_list(inbox)")} | {
                r[1] for r in c.execute("PRAGMA index_list(outbox)")
            }
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return c.execute("PRAGMA integrity_check").fetchone()[0], indexes, tables

        integrity, indexes, tables = await store.writer.read(check)
        assert integrity == "ok"
        assert {"inbox_pending", "inbox_sender", "inbox_failed", "outbox_claim", "outbox_wamid"} <= indexes
        assert {"preferences", "inbox", "outbox"} <= tables and not any(t.endswith("_v3") for t in tables)
    finally:
        await store.close()
    columns = {r["name"] for t in ("inbox", "statuses", "events") for r in db_rows(path, f"PRAGMA table_info({t})")}
    assert {"parse_error", "errors", "recipient_user_id", "time"} <= columns


async def test_a_failed_migration_leaves_the_v2_database_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "alfred.db"
    # a view in the way of the outbox rebuild: the migration fails after the inbox was rebuilt
    _v2_database(path, extra="CREATE VIEW outbox_v3 AS SELECT 1;")
    store = SqliteStore(path)
    try:
        with pytest.raises(StoreError, match="cannot open"):  # callers never see the driver's exceptions
            await store.open()
    finally:
        await store.close()
    assert db_rows(path, "PRAGMA user_version")[0][0] == 2
    inbox_sql = db_rows(path, "SELECT sql FROM sqlite_master WHERE name = 'inbox'")[0][0]
    assert "event_id TEXT NOT NULL UNIQUE" in inbox_sql
    assert [r[0] for r in db_rows(path, "SELECT seq FROM inbox ORDER BY seq")] == [1, 2]
    assert db_rows(path, "SELECT seq FROM sqlite_sequence WHERE name = 'inbox'")[0][0] == 5
    assert db_rows(path, "SELECT name FROM sqlite_master WHERE name = 'inbox_v3'") == []


async def test_an_event_whose_body_no_longer_decodes_has_value_none(store: SqliteStore) -> None:
    """The engine-neutral part of `events` is in tests/contract; this one needs a row no ingest makes."""

    def insert(conn: sqlite3.Connection) -> None:
        rows = [
            ("k1", "account_update", None, None, "W", b'{"event":"A"}', 1.0, 100),
            ("k2", "message_template_status_update", "home", payloads.PNID, "W", b'{"event":"B"}', 2.0, None),
            ("k3", "account_update", "home", payloads.PNID, "W", b"not json", 3.0, 300),
        ]
        conn.executemany(
            "INSERT INTO events (key, field, tenant, phone_number_id, waba_id, raw, received_at, time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    await store.writer.submit(insert)
    events = await store.events(10)
    assert [(e["field"], e["time"], e["received_at"]) for e in events] == [
        ("account_update", 300, 3.0),
        ("message_template_status_update", None, 2.0),
        ("account_update", 100, 1.0),
    ]
    assert set(events[0]) == {"field", "tenant", "phone_number_id", "waba_id", "time", "received_at", "value"}
    assert events[0]["value"] is None and events[1]["value"] == {"event": "B"}
    assert [e["time"] for e in await store.events(10, field="account_update")] == [300, 100]
    assert [e["time"] for e in await store.events(10, field="account_update", tenant="home")] == [300]
    assert len(await store.events(1)) == 1


async def test_a_row_with_unreadable_errors_or_raw_is_still_shown(store: SqliteStore) -> None:
    def insert(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO inbox (event_id, tenant, phone_number_id, type, timestamp, raw, state, received_at, errors) "
            "VALUES ('wamid.ODD', 'home', ?, 'edit', 1, x'7b7d', 'handled', 0, 'not json')",
            (payloads.PNID,),
        )

    await store.writer.submit(insert)
    [item] = await store.recent_inbound(10)
    assert (item["id"], item["errors"], item["edited_id"]) == ("wamid.ODD", [], None)


# ---------------------------------------------------------------------------- read-only mode


async def test_read_only_refuses_a_missing_file_and_creates_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path / "none" / "alfred.db", read_only=True)
    try:
        with pytest.raises(StoreError, match="cannot open"):
            await store.open()
    finally:
        await store.close()
    assert not (tmp_path / "none").exists()


async def test_read_only_refuses_a_schema_it_cannot_read_and_takes_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "alfred.db"
    _v2_database(path)
    old = SqliteStore(path, read_only=True)
    try:
        with pytest.raises(StoreError, match="schema v2"):
            await old.open()
    finally:
        await old.close()
    assert db_rows(path, "PRAGMA user_version")[0][0] == 2  # not migrated by a reader
    writer = SqliteStore(path)
    await writer.open()  # the lock was never taken
    reader = SqliteStore(path, read_only=True)
    try:
        await reader.open()  # beside a running writer
        assert (await reader.message_by_key("api:home:k1") or {}).get("id") == "o-queued"
    finally:
        await reader.close()
        await writer.close()


async def test_sends_a_dead_process_had_in_flight_are_due_again_when_the_next_one_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kill -9 between the Graph API's answer and the settle leaves a row `sending` with a lease
    in the future; the next process (holding the lock, so the claimer is gone) need not wait it out,
    and the user's later rows are not held behind it."""
    path = tmp_path / "alfred.db"
    clock = [1000.0]
    first = SqliteStore(path, clock=lambda: clock[0])
    await first.open()
    assert first.writer.groups == 0  # a clean start (nothing left leased) commits nothing
    await first.enqueue([row("o1", to="1"), row("o2", to="1"), row("b1", to="2")])
    jobs = await first.claim(clock[0], {"home": 5}, 60, frozenset())
    assert sorted(j.id for j in jobs) == ["b1", "o1"]
    await send(first, next(j for j in jobs if j.id == "b1"), clock[0], "wamid.B1")
    await first.close()  # o1 stays `sending` with 60 s of lease left, as after a kill -9

    clock[0] += 1
    again = SqliteStore(path, clock=lambda: clock[0])
    await again.open()
    try:
        assert "1 sends were in flight" in caplog.text
        assert (await again.message("o1") or {})["state"] == "queued"
        [job] = await again.claim(clock[0], {"home": 5}, 60, frozenset())
        assert (job.id, job.attempts) == ("o1", 1)  # at once, not in 59 s; the crash cost no attempt
        await send(again, job, clock[0], "wamid.O1")
        assert [j.id for j in await again.claim(clock[0], {"home": 5}, 60, frozenset())] == ["o2"]
    finally:
        await again.close()


async def test_dialog_state_is_read_from_memory_once_known_and_follows_every_change(tmp_path: Path) -> None:
    """The state of a recently active user is kept in memory (this process is the file's only
    writer): a row changed behind the store's back shows it, and every write of ours goes through."""
    path = tmp_path / "alfred.db"
    clock = [1000.0]
    store = SqliteStore(path, clock=lambda: clock[0])
    await store.open()

    def behind_our_back(sql: str) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(sql)

    async def handle(wamid: str, dialog: Dialog) -> None:
        await store.ingest(body(text(wamid)))
        assert await handled(store, wamid, dialog=dialog, tenant="home", user=USER)

    try:
        assert await store.dialogs.get("home", USER) is None  # read from the file, remembered
        behind_our_back(f"INSERT INTO dialogs VALUES ('home', '{USER}', 'ghost', '{{}}', NULL, 0)")
        assert await store.dialogs.get("home", USER) is None  # from memory: the file was not read
        await handle("wamid.C1", Dialog("asking", b'{"n":1}', expires_at=1010.0))
        assert await store.dialogs.get("home", USER) == Dialog("asking", b'{"n":1}', 1010.0)
        clock[0] = 1010.0
        assert await store.dialogs.get("home", USER) is None  # expired, though still in memory
        assert await store.dialogs.purge(clock[0]) == 1  # the purge empties the cache too
        behind_our_back(f"INSERT INTO dialogs VALUES ('home', '{USER}', 'from-file', '{{}}', NULL, 0)")
        assert (await store.dialogs.get("home", USER) or Dialog()).step == "from-file"

        large = Dialog("big", b'{"x":"' + b"y" * 2000 + b'"}')  # above CACHE_BYTES: always from the file
        await handle("wamid.C2", large)
        assert await store.dialogs.get("home", USER) == large
        behind_our_back("DELETE FROM dialogs")
        assert await store.dialogs.get("home", USER) is None

        await handle("wamid.C3", Dialog("cached"))
        await store.ingest(body(text("wamid.C4")))
        with pytest.raises(UnicodeDecodeError):  # a write that fails in its transaction: the cache forgets the user
            await handled(store, "wamid.C4", dialog=Dialog("bad", b"\xff"), tenant="home", user=USER)
        behind_our_back("DELETE FROM dialogs")
        assert await store.dialogs.get("home", USER) is None
    finally:
        await store.close()


async def test_a_completion_cancelled_while_its_write_waits_never_leaves_its_old_state_cached(
    tmp_path: Path,
) -> None:
    """A completion cancelled after its write was queued may still commit later: until one of the
    user's completions is known to have committed, the state is read from the file."""
    store = SqliteStore(tmp_path / "alfred.db")
    await store.open()
    gate = threading.Event()
    try:
        await store.ingest(body(text("wamid.D1")))
        assert await handled(store, "wamid.D1", dialog=Dialog("a"), tenant="home", user=USER)
        await store.ingest(body(text("wamid.D2")))
        blocker = asyncio.create_task(store.writer.submit(lambda _: gate.wait(10)))  # holds the writer
        await asyncio.sleep(0.05)
        pending = asyncio.create_task(handled(store, "wamid.D2", dialog=Dialog("b"), tenant="home", user=USER))
        await asyncio.sleep(0.05)  # its write is queued behind the blocker
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert (await store.dialogs.get("home", USER) or Dialog()).step == "a"  # the file, before the write
        gate.set()
        await blocker
        await store.writer.submit(lambda _: None)  # the cancelled completion's write has committed
        assert (await store.dialogs.get("home", USER) or Dialog()).step == "b"
    finally:
        gate.set()
        await store.close()


async def test_a_send_that_brings_the_process_down_is_a_dead_letter_after_many_restarts(tmp_path: Path) -> None:
    """A crash is not the send's failure (restarts cost it no attempt), but a send that itself
    kills the process (memory, a native crash) gets no answer that could ever count its attempts:
    the restart after FREE_RESTARTS that finds it in flight makes it a dead letter."""
    path, attempts = tmp_path / "alfred.db", []
    for _ in range(FREE_RESTARTS + 1):
        store = SqliteStore(path)
        await store.open()
        if not attempts:
            await store.enqueue([row("o1"), row("o2", to="2")])
        jobs = await store.claim(time.time(), {"home": 5}, 60, frozenset())
        attempts.append(sorted((j.id, j.attempts) for j in jobs))
        if len(attempts) == 1:
            await send(store, next(j for j in jobs if j.id == "o2"), time.time(), "wamid.O2")  # o2 went out
        await store.close()  # o1 still `sending`: the process died with it
    assert attempts == [[("o1", 1), ("o2", 1)]] + [[("o1", 1)]] * FREE_RESTARTS  # the restarts cost nothing
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.claim(time.time(), {"home": 5}, 60, frozenset()) == []
        shown = await store.message("o1") or {}
        assert shown["state"] == "failed" and f"stopped {FREE_RESTARTS + 1} times" in str(shown["error_message"])
        assert (await store.message("o2") or {})["state"] == "sent"
    finally:
        await store.close()


@pytest.mark.parametrize(("shared", "order"), [(False, ["wake", "write"]), (True, ["write", "wake"])])
async def test_claim_after_wakes_the_sender_where_its_claim_will_see_the_write(shared: bool, order: list[str]) -> None:
    """One writer queues the woken claim behind the write (wake first: they share a commit);
    several writers run it beside, so there the wake waits for the commit."""

    class Engine:  # only what `claim_after` reads of a store: whether others write it too
        def __init__(self) -> None:
            self.shared = shared

    seen: list[str] = []

    async def write() -> int:
        seen.append("write")
        return 7

    assert await claim_after(Engine(), write(), lambda: seen.append("wake")) == 7  # type: ignore[arg-type]
    assert seen == order
    assert await claim_after(Engine(), write(), None) == 7  # nothing to wake
