"""What only the PostgreSQL engine has: migrations while other nodes run, the advisory lock,
heartbeats, takeover after a node is killed, wake-ups across nodes, and outages of the database.

The contract suite (`tests/contract/`) proves the engine answers like SQLite; these tests use a
real server too (`tests/pgserver.py`), several `PostgresStore`s on one database standing in for
several nodes, and for the kill a real second process. SQL appears only where a test sets up or
reads what no interface shows (the schema version row).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from alfred_bot.store import Completion, NodeInfo, Settlement, StoreError
from alfred_bot.store.postgres.engine import PostgresStore
from alfred_bot.store.postgres.schema import SCHEMA_VERSION
from tests import payloads
from tests.conftest import ENV, make_config, post_webhook
from tests.contract.helpers import PNID, body, row, text
from tests.pgserver import PgServer, pg_server, pg_url  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent


def node(name: str, role: str = "all") -> NodeInfo:
    return NodeInfo(id=name, host="test-host", role=role, version="test", started_at=time.time(), pid=os.getpid())


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[list[PostgresStore]]:  # noqa: F811
    """Stores the test opens (append them); all closed after it, whatever happened."""
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        await store.close()


async def opened(stores: list[PostgresStore], url: str, **kw: object) -> PostgresStore:
    store = PostgresStore(url, **kw)  # type: ignore[arg-type]
    await store.open()
    stores.append(store)
    return store


async def eventually(check: object, within: float = 10.0) -> object:
    """Await `check()` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = await check()  # type: ignore[operator]
        except StoreError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------ migrations


async def test_a_new_node_migrates_an_empty_database_and_the_next_finds_it_current(
    pg_server: PgServer,  # noqa: F811
    pg_url: str,  # noqa: F811
    stores: list[PostgresStore],
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    assert pg_server.sql("SELECT to_regclass('inbox') IS NULL", database).strip() == "t"
    first = await opened(stores, pg_url, node=node("a"))
    assert pg_server.sql("SELECT version FROM schema_version", database).strip() == str(SCHEMA_VERSION)
    await first.ingest(body(text("wamid.1")))
    # a second node starts while the first one runs: nothing is migrated again, both share the rows
    second = await opened(stores, pg_url, node=node("b"))
    assert [p.item.message.id for p in await second.pending(0, 10)] == ["wamid.1"]
    await second.ingest(body(text("wamid.2")))
    assert [p.item.message.id for p in await first.pending(0, 10)] == ["wamid.1", "wamid.2"]
    assert pg_server.sql("SELECT count(*) FROM schema_version", database).strip() == "1"


async def test_nodes_starting_at_once_migrate_the_schema_exactly_once(
    pg_server: PgServer,  # noqa: F811
    pg_url: str,  # noqa: F811
    stores: list[PostgresStore],
) -> None:
    """Without the advisory lock, concurrent CREATE TABLEs collide ("already exists")."""
    nodes = [PostgresStore(pg_url, node=node(f"n{i}")) for i in range(4)]
    stores.extend(nodes)
    await asyncio.gather(*(n.open() for n in nodes))
    assert all([await n.healthy() for n in nodes])
    assert pg_server.sql("SELECT count(*), max(version) FROM schema_version", pg_url.rsplit("/", 1)[1]).strip() == (
        f"1|{SCHEMA_VERSION}"
    )
    assert len(await nodes[0].nodes()) == 4


async def test_a_newer_schema_is_refused_and_read_only_never_migrates(
    pg_server: PgServer,  # noqa: F811
    pg_url: str,  # noqa: F811
    stores: list[PostgresStore],
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    reader = PostgresStore(pg_url, read_only=True)
    with pytest.raises(StoreError, match="start the server once"):
        await reader.open()
    assert pg_server.sql("SELECT to_regclass('inbox') IS NULL", database).strip() == "t"
    await opened(stores, pg_url)
    pg_server.sql("UPDATE schema_version SET version = version + 1", database)  # a newer Alfred ran
    with pytest.raises(StoreError, match="newer than this Alfred"):
        await PostgresStore(pg_url).open()


async def test_read_only_reads_and_refuses_every_write(pg_url: str, stores: list[PostgresStore]) -> None:  # noqa: F811
    writer = await opened(stores, pg_url, node=node("writer"))
    await writer.ingest(body(text("wamid.R", "hello")))
    reader = await opened(stores, pg_url, read_only=True, node=node("reader"))
    assert [p.item.message.text for p in await reader.pending(0, 10)] == ["hello"]
    assert [n["id"] for n in await reader.nodes()] == ["writer"]  # a reader is no node: no heartbeat
    writes = [
        reader.ingest(body(text("wamid.W"))),
        reader.complete(Completion("wamid.R", "handled", phone_number_id=PNID)),
        reader.enqueue([row("o1")]),
        reader.take(10),
        reader.purge(time.time()),
    ]
    for write in writes:
        with pytest.raises(StoreError, match="read-only"):
            await write
    assert [p.item.message.id for p in await writer.pending(0, 10)] == ["wamid.R"]


async def test_a_nul_character_is_accepted_and_the_original_kept(pg_url: str, stores: list[PostgresStore]) -> None:  # noqa: F811
    """JSON may carry U+0000 (`\\u0000`), which PostgreSQL text refuses: refusing the webhook would
    answer 503 for ever and hold back the rest of it."""
    store = await opened(stores, pg_url)
    name = [{"profile": {"name": "A\u0000na"}, "wa_id": "15551234567"}]
    fresh = await store.ingest(body(text("wamid.\u0000Z", "a\u0000b"), text("wamid.OK"), contacts=name))
    assert [f.message.text for f in fresh] == ["a\u0000b", "hi"]  # type: ignore[union-attr]
    assert await store.ingest(body(text("wamid.\u0000Z", "a\u0000b"))) == []  # a redelivery is known
    pending = await store.pending(0, 10)
    assert [p.item.message.text for p in pending] == ["a\u0000b", "hi"]  # decoded from the raw JSON, intact
    assert pending[0].item.contact is not None and pending[0].item.contact.name == "A\ufffdna"
    [shown] = [m for m in await store.recent_inbound(10) if m["id"] != "wamid.OK"]
    assert (shown["id"], shown["text"]) == ("wamid.\ufffdZ", "a\ufffdb")
    reply = row("o-nul", key="reply:wamid.\u0000Z:000", source="wamid.\u0000Z")
    failed = Completion("wamid.\u0000Z", "failed", (reply,), error="bad input 'a\u0000b'", phone_number_id=PNID)
    assert await store.complete(failed) is True
    assert [f["error"] for f in await store.recent_failures(10)] == ["bad input 'a\ufffdb'"]
    assert [r["id"] for r in await store.replies_to("home", "wamid.\u0000Z")] == ["o-nul"]
    [job] = await store.claim(time.time(), {"home": 10}, 30.0, frozenset())
    error = Settlement(id=job.id, state="failed", attempts=job.attempts, error_message="Meta said \u0000")
    await store.settle(error, time.time())
    assert (await store.message("o-nul") or {})["error_message"] == "Meta said \ufffd"


# ----------------------------------------------------------------------------- nodes and leases


async def test_each_node_heartbeats_and_a_stopped_node_shows_as_gone(pg_url: str, stores: list[PostgresStore]) -> None:  # noqa: F811
    web = await opened(stores, pg_url, node=node("web-1", "web"), takeover_seconds=1.5)
    worker = await opened(stores, pg_url, node=node("worker-1", "worker"), takeover_seconds=1.5)
    listed = {n["id"]: n for n in await web.nodes()}
    assert set(listed) == {"web-1", "worker-1"}
    assert (listed["worker-1"]["role"], listed["worker-1"]["alive"], listed["worker-1"]["host"]) == (
        "worker",
        True,
        "test-host",
    )
    first_seen = listed["worker-1"]["seen_at"]
    await asyncio.sleep(1.2)  # over two heartbeats (every takeover_seconds / 3)
    assert {n["id"]: n for n in await web.nodes()}["worker-1"]["seen_at"] > first_seen
    await worker.close()
    stores.remove(worker)
    after = {n["id"]: n["alive"] for n in await web.nodes()}
    assert after == {"web-1": True, "worker-1": False}


_DOOMED_NODE = """
import asyncio, sys
from alfred_bot.store.postgres.engine import PostgresStore

async def main() -> None:
    store = PostgresStore(sys.argv[1], takeover_seconds=1.0)
    await store.open()
    taken = await store.take(10)
    jobs = await store.claim(__import__("time").time(), {"home": 10}, 300.0, frozenset())
    print(" ".join([p.item.message.id for p in taken] + [j.id for j in jobs]), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.fixture
def doomed_node(pg_url: str) -> Iterator[subprocess.Popen[str]]:  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_NODE, pg_url], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    with proc:  # closes its stdout pipe
        yield proc
        proc.kill()


async def test_a_killed_nodes_messages_and_sends_pass_to_another_node_within_takeover_seconds(
    pg_url: str,  # noqa: F811
    stores: list[PostgresStore],
    doomed_node: subprocess.Popen[str],
) -> None:
    survivor = await opened(stores, pg_url, node=node("survivor"), takeover_seconds=1.0)
    await survivor.ingest(body(text("wamid.FIRST"), text("wamid.SECOND")))
    await survivor.enqueue([row("o-inflight")])
    line = await asyncio.to_thread(doomed_node.stdout.readline)  # type: ignore[union-attr]
    assert line.split() == ["wamid.FIRST", "o-inflight"]
    # while the other node lives, its message (and the user's next one) and its send stay with it
    assert await survivor.take(10) == []
    assert await survivor.claim(time.time(), {"home": 10}, 30.0, frozenset()) == []
    os.kill(doomed_node.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    taken = await eventually(lambda: survivor.take(10))
    jobs = await eventually(lambda: survivor.claim(time.time(), {"home": 10}, 30.0, frozenset()))
    assert time.monotonic() - killed_at < 5.0  # takeover_seconds (1 s) plus a heartbeat, not the 300 s lease
    assert [p.item.message.id for p in taken] == ["wamid.FIRST"]  # type: ignore[attr-defined]
    assert [(j.id, j.attempts) for j in jobs] == [("o-inflight", 2)]  # type: ignore[attr-defined]
    assert [n["alive"] for n in await survivor.nodes() if n["id"] != "survivor"] == [False]


async def test_a_stopping_node_hands_its_messages_back_at_once(pg_url: str, stores: list[PostgresStore]) -> None:  # noqa: F811
    leaving = await opened(stores, pg_url, node=node("leaving"), takeover_seconds=300.0)
    staying = await opened(stores, pg_url, node=node("staying"), takeover_seconds=300.0)
    await staying.ingest(body(text("wamid.L")))
    assert [p.item.message.id for p in await leaving.take(10)] == ["wamid.L"]
    assert await staying.take(10) == []
    await leaving.close()
    stores.remove(leaving)
    assert [p.item.message.id for p in await staying.take(10)] == ["wamid.L"]  # not after 300 s


async def test_two_nodes_taking_at_once_handle_each_message_once_and_each_user_in_order(
    pg_url: str,  # noqa: F811
    stores: list[PostgresStore],
) -> None:
    users = [f"1555{n:07d}" for n in range(3)]
    nodes = [await opened(stores, pg_url, node=node(f"n{i}")) for i in range(2)]
    for batch in range(10):
        await nodes[0].ingest(body(*(text(f"wamid.{batch}.{u}", sender=u) for u in users)))
    handled: list[str] = []
    in_flight: set[str] = set()  # users with a message taken and not completed yet, on either node

    async def work(store: PostgresStore) -> None:
        while len(handled) < 10 * len(users):
            taken = await store.take(5)
            for message in taken:
                assert message.item.message.sender not in in_flight  # a user's next message waits
                in_flight.add(message.item.message.sender)
            for message in taken:
                handled.append(message.item.message.id)
                # the other node runs while this one completes (a round trip to the database)
                assert await store.complete(Completion(message.item.message.id, "handled", phone_number_id=PNID))
                in_flight.discard(message.item.message.sender)
            await asyncio.sleep(0.001)

    await asyncio.wait_for(asyncio.gather(*(work(n) for n in nodes)), 30)
    assert len(handled) == len(set(handled)) == 30  # each exactly once
    for user in users:
        assert [h for h in handled if h.endswith(user)] == [f"wamid.{b}.{user}" for b in range(10)]


# --------------------------------------------------------------------------------------- wake-ups


async def test_a_write_on_one_node_wakes_the_others(pg_url: str, stores: list[PostgresStore]) -> None:  # noqa: F811
    sleeper = await opened(stores, pg_url, node=node("sleeper"))
    writer = await opened(stores, pg_url, node=node("writer"))
    inbox, outbox = asyncio.Event(), asyncio.Event()
    sleeper.watch(inbox.set, outbox.set)
    await writer.ingest(body(text("wamid.N")))
    await asyncio.wait_for(inbox.wait(), 5)
    assert not outbox.is_set()
    await writer.ingest(body(text("wamid.N")))  # a redelivery is nothing new: no wake-up
    await writer.enqueue([row("o-api")])
    await asyncio.wait_for(outbox.wait(), 5)
    inbox.clear()
    outbox.clear()
    await writer.complete(Completion("wamid.N", "handled", (row("o-reply", key="reply:N:0"),), phone_number_id=PNID))
    await asyncio.wait_for(outbox.wait(), 5)
    assert not inbox.is_set()


# ------------------------------------------------------------------------------------ outages


@pytest.fixture(scope="module")
def durable_server() -> Iterator[PgServer]:
    """A server apart from the shared one, durable (fsync on), which the outage tests stop and restart."""
    server = PgServer(fsync=True)
    yield server
    server.destroy()


@pytest.fixture
def own_server(durable_server: PgServer) -> PgServer:
    """`durable_server`, running (whatever the previous test left it as)."""
    if not durable_server.running:
        durable_server.start()
    return durable_server


async def test_a_database_outage_is_a_store_error_and_the_store_recovers(own_server: PgServer) -> None:
    url = own_server.fresh_database()
    store = PostgresStore(url, node=node("n1"), takeover_seconds=0.6)
    await store.open()
    try:
        woken: list[str] = []
        store.watch(lambda: woken.append("inbox"), lambda: woken.append("outbox"))
        await store.ingest(body(text("wamid.BEFORE")))
        own_server.stop()
        with pytest.raises(StoreError):
            await store.ingest(body(text("wamid.DURING")))
        with pytest.raises(StoreError):
            await store.recent_inbound(10)
        assert await store.healthy() is False
        assert store.stats()["errors"] >= 1
        woken.clear()
        own_server.start()
        await eventually(lambda: store.ingest(body(text("wamid.AFTER"))))
        assert await store.healthy() is True
        assert [p.item.message.id for p in await store.pending(0, 10)] == ["wamid.BEFORE", "wamid.AFTER"]
        # the LISTEN connection came back by itself and woke everyone once (a NOTIFY may have been lost)
        await eventually(lambda: asyncio.sleep(0, result=store.stats()["reconnects"] >= 1))
        assert {"inbox", "outbox"} <= set(woken)
    finally:
        await store.close()


async def test_opening_without_a_server_is_a_store_error_without_the_password(own_server: PgServer) -> None:
    url = own_server.url().replace("postgres@", "postgres:s3cret-pw@")
    own_server.stop()
    with pytest.raises(StoreError) as caught:
        await PostgresStore(url).open()
    assert f"127.0.0.1:{own_server.port}" in str(caught.value) and "s3cret-pw" not in str(caught.value)


async def test_the_webhook_answers_503_while_the_database_is_down_and_200_once_it_is_back(
    aiohttp_client: Any, tmp_path: Path, own_server: PgServer
) -> None:
    """Meta retries a 503 (Webhooks > Retries); a 200 is only given for a committed message."""
    url = own_server.fresh_database()
    store = PostgresStore(url, node=node("web"))
    client = await aiohttp_client(create_app(make_config(tmp_path), load_secrets(ENV), store=store))
    await eventually(lambda: _status(client, "/healthz", 200))  # a joining node sends after a short grace
    assert await post_webhook(client, payloads.body_of(payloads.text("one", id="wamid.UP"))) == 200
    own_server.stop()
    assert await post_webhook(client, payloads.body_of(payloads.text("two", id="wamid.DOWN"))) == 503
    assert await _status(client, "/healthz", 503)
    own_server.start()
    retry = payloads.body_of(payloads.text("two", id="wamid.DOWN"))  # Meta's redelivery of the refused one
    await eventually(lambda: _accepted(client, retry))
    await eventually(lambda: _status(client, "/healthz", 200))
    ids = {m["id"] for m in await store.recent_inbound(10)}
    assert ids == {"wamid.UP", "wamid.DOWN"}


async def _accepted(client: Any, raw: bytes) -> bool:
    return await post_webhook(client, raw) == 200


async def _status(client: Any, path: str, expected: int) -> bool:
    response = await client.get(path)
    await response.read()
    return bool(response.status == expected)
