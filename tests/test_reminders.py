"""The reminders example (`handlers/reminders.py`) end to end: signed webhooks into the real app
(chosen by `tenants.NAME.handler`), replies and reminders at the fake Graph API on loopback, a real
SQLite file; restarts in the middle of a dialog and with a reminder pending, and `kill -9` of a
real `python main.py` process with a reminder scheduled."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from aiohttp.test_utils import TestClient

from alfred_bot.app import create_app
from alfred_bot.config import load_secrets
from chaos.crash import Alfred, free_port
from handlers.reminders import describe, parse_when
from tests import payloads
from tests.conftest import APP_SECRET, FAST_OUTBOUND, PROD_ENV, db_rows, post_webhook, prod_config, wait_for
from tests.fakes import FakeGraph

MADRID = ZoneInfo("Europe/Madrid")
REMINDER = "⏰ Reminder: "


def fresh(words: str) -> dict[str, Any]:
    """A text the user wrote just now (Meta's timestamp opens the 24-hour window)."""
    return payloads.text(words, timestamp=str(int(time.time())))


def tenants(**home: Any) -> dict[str, Any]:
    return {"home": {"phone_number_id": payloads.PNID, "handler": "reminders", "timezone": "Europe/Madrid", **home}}


async def reminders_app(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph, **home: Any) -> TestClient[Any, Any]:
    """The real app; the router comes from the config (`handler = "reminders"`), as in production."""
    cfg = prod_config(tmp_path, graph, schedule={"interval_seconds": 0.05}, tenants=tenants(**home))
    client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV)))
    return client


async def say(client: TestClient[Any, Any], graph: FakeGraph, words: str) -> str:
    """The user writes `words`; the bot's answer as Meta received it."""
    before = len(graph.texts())
    assert await post_webhook(client, payloads.body_of(fresh(words))) == 200
    await wait_for(lambda: len(graph.texts()) > before)
    return graph.texts()[-1]


def reminders_sent(graph: FakeGraph) -> list[str]:
    return [t for t in graph.texts() if t.startswith(REMINDER)]


# ---------------------------------------------------------------------------- reading times


def test_parse_when() -> None:
    now = datetime(2026, 11, 30, 17, 0, 0, tzinfo=MADRID)
    assert parse_when("in 10 seconds", now) == datetime(2026, 11, 30, 17, 0, 10, tzinfo=MADRID)
    assert parse_when("In 5 min", now) == datetime(2026, 11, 30, 17, 5, tzinfo=MADRID)
    assert parse_when("in an hour.", now) == datetime(2026, 11, 30, 18, 0, tzinfo=MADRID)
    assert parse_when("in 2 days", now) == datetime(2026, 12, 2, 17, 0, tzinfo=MADRID)
    assert parse_when("at 18:30", now) == datetime(2026, 11, 30, 18, 30, tzinfo=MADRID)
    assert parse_when("at 9", now) == datetime(2026, 12, 1, 9, 0, tzinfo=MADRID)  # passed today: tomorrow
    assert parse_when("at 6pm", now) == datetime(2026, 11, 30, 18, 0, tzinfo=MADRID)
    assert parse_when("tomorrow at 9", now) == datetime(2026, 12, 1, 9, 0, tzinfo=MADRID)
    assert parse_when("tomorrow 9:30am", now) == datetime(2026, 12, 1, 9, 30, tzinfo=MADRID)
    assert parse_when("18:45", now) == datetime(2026, 11, 30, 18, 45, tzinfo=MADRID)
    for junk in ("whenever", "at 25:00", "at 13pm", "today at 9", "in 0 minutes", "in 5 fortnights", "9", ""):
        assert parse_when(junk, now) is None, junk
    # across the end of summer time the wall clock is kept (2026-10-25 03:00 CEST -> 02:00 CET)
    autumn = datetime(2026, 10, 24, 20, 0, tzinfo=MADRID)
    assert parse_when("tomorrow at 9", autumn) == datetime(2026, 10, 25, 9, 0, tzinfo=MADRID)
    assert describe(datetime(2026, 12, 1, 9, 0, tzinfo=MADRID), now) == "tomorrow at 09:00 (Europe/Madrid)"
    assert describe(datetime(2026, 11, 30, 17, 0, 30, tzinfo=MADRID), now) == "in 30 seconds"


# ---------------------------------------------------------------------------- the dialog


async def test_the_whole_dialog_and_the_reminder_exactly_once(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await reminders_app(aiohttp_client, tmp_path, graph)
    assert await say(client, graph, "hello") == (
        'I keep reminders for you. Write "remind me" to set one, "my reminders" to see them.'
    )
    assert await say(client, graph, "Remind me") == "What should I remind you about?"
    assert (await say(client, graph, "water the plants")).startswith("When? For example")
    assert await say(client, graph, "in 1 second") == 'OK! I\'ll remind you to "water the plants" in 1 second.'
    await wait_for(lambda: reminders_sent(graph) == [REMINDER + "water the plants"])
    await asyncio.sleep(0.5)
    assert reminders_sent(graph) == [REMINDER + "water the plants"]  # once
    db = tmp_path / "alfred.db"
    assert db_rows(db, "SELECT COUNT(*) FROM dialogs")[0][0] == 0  # the dialog is over


async def test_cancel_leaves_the_dialog_at_any_step(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await reminders_app(aiohttp_client, tmp_path, graph)
    assert (await say(client, graph, "cancel")).startswith("There is nothing to cancel.")
    await say(client, graph, "remind me")
    assert await say(client, graph, "Cancel!") == "OK, cancelled."
    assert (await say(client, graph, "water the plants")).startswith("I keep reminders")  # not in a dialog any more
    await say(client, graph, "remind me to call mom")
    assert (await say(client, graph, "whenever")).startswith("Sorry, I did not understand that time.")
    assert await say(client, graph, "never mind") == "OK, cancelled."
    assert db_rows(tmp_path / "alfred.db", "SELECT COUNT(*) FROM outbox WHERE state = 'scheduled'")[0][0] == 0


async def test_a_photo_mid_dialog_asks_again(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await reminders_app(aiohttp_client, tmp_path, graph)
    await say(client, graph, "remind me")
    before = len(graph.texts())
    image = {**payloads.SAMPLES["image"], "id": payloads.wamid(), "timestamp": str(int(time.time()))}
    assert await post_webhook(client, payloads.body_of(image)) == 200
    await wait_for(lambda: len(graph.texts()) > before)
    assert graph.texts()[-1] == 'Please answer in words, or write "cancel". What should I remind you about?'


async def test_my_reminders_lists_and_deletes(aiohttp_client: Any, tmp_path: Path, graph: FakeGraph) -> None:
    client = await reminders_app(aiohttp_client, tmp_path, graph)
    assert await say(client, graph, "my reminders") == 'You have no reminders. Write "remind me" to set one.'
    await say(client, graph, "remind me to buy bread")
    await say(client, graph, "in 2 hours")
    await say(client, graph, "remind me to call mom")
    await say(client, graph, "in 1 hour")
    listing = await say(client, graph, "My reminders")
    assert listing.startswith("Your reminders:\n1. call mom — ")
    assert "\n2. buy bread — " in listing and listing.endswith('Write "delete 2" to delete the second one.')
    assert await say(client, graph, "delete 2") == "Deleted reminder 2: buy bread."
    assert await say(client, graph, "delete 2") == "Reminder 2 is not pending any more (already sent or deleted)."
    assert await say(client, graph, "delete 7") == 'There is no reminder 7. Write "my reminders" to see them.'
    db = tmp_path / "alfred.db"
    rows = db_rows(db, "SELECT state, payload FROM outbox WHERE idem_key LIKE 'reminder:%' ORDER BY send_at")
    states = [(r["state"], "call mom" in r["payload"].decode()) for r in rows]
    assert states == [("scheduled", True), ("cancelled", False)]
    resp = await client.get("/api/messages/nope", headers={"Authorization": "Bearer test-api-token"})
    assert resp.status == 404


async def test_a_reminder_past_the_window_is_refused_without_a_template(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    # Meta: free-form messages only within 24 h of the user's last message, templates any time
    # (developers.facebook.com/documentation/business-messaging/whatsapp/messages/send-messages)
    client = await reminders_app(aiohttp_client, tmp_path, graph)
    await say(client, graph, "remind me to renew the passport")
    answer = await say(client, graph, "in 2 days")
    assert answer.startswith("I can only send a reminder within 24 hours of your last message")
    assert db_rows(tmp_path / "alfred.db", "SELECT COUNT(*) FROM outbox WHERE state = 'scheduled'")[0][0] == 0
    assert (await say(client, graph, "in 3 hours")).startswith('OK! I\'ll remind you to "renew the passport"')


async def test_a_reminder_past_the_window_goes_as_the_template(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    client = await reminders_app(
        aiohttp_client, tmp_path, graph, reminder_template="reminder_v1", reminder_template_language="es"
    )
    await say(client, graph, "remind me to renew the passport")
    assert (await say(client, graph, "in 2 days")).startswith('OK! I\'ll remind you to "renew the passport" on ')
    [row] = db_rows(tmp_path / "alfred.db", "SELECT type, state, payload FROM outbox WHERE state = 'scheduled'")
    assert (row["type"], row["state"]) == ("template", "scheduled")
    template = json.loads(row["payload"])["template"]
    assert template["name"] == "reminder_v1" and template["language"] == {"code": "es"}
    assert template["components"][0]["parameters"] == [{"type": "text", "text": "renew the passport"}]
    listing = await say(client, graph, "my reminders")
    assert "1. renew the passport — on " in listing


async def test_restarts_in_the_middle_of_a_dialog_and_with_a_reminder_pending(
    aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    first = await reminders_app(aiohttp_client, tmp_path, graph)
    await say(first, graph, "remind me")
    await say(first, graph, "feed the cat")
    await first.close()  # mid-dialog: the step and the thing to remember are in the database
    second = await reminders_app(aiohttp_client, tmp_path, graph)
    assert await say(second, graph, "in 2 seconds") == 'OK! I\'ll remind you to "feed the cat" in 2 seconds.'
    await second.close()  # with the reminder still scheduled
    assert reminders_sent(graph) == []
    await reminders_app(aiohttp_client, tmp_path, graph)
    await wait_for(lambda: reminders_sent(graph) == [REMINDER + "feed the cat"], timeout=10)
    await asyncio.sleep(0.5)
    assert reminders_sent(graph) == [REMINDER + "feed the cat"]


async def test_two_nodes_on_postgresql_share_the_dialog_and_send_the_reminder_once(
    pg_url: str, aiohttp_client: Any, tmp_path: Path, graph: FakeGraph
) -> None:
    """Each step of the dialog reaches another node; both nodes run the promoter: one reminder."""
    nodes = []
    for name in ("a", "b"):
        folder = tmp_path / name
        storage = {"path": str(folder / "alfred.db"), "url": pg_url}
        cfg = prod_config(folder, graph, storage=storage, schedule={"interval_seconds": 0.05}, tenants=tenants())
        nodes.append(await aiohttp_client(create_app(cfg, load_secrets(PROD_ENV))))
    a, b = nodes
    assert await say(a, graph, "remind me") == "What should I remind you about?"
    assert (await say(b, graph, "water the plants")).startswith("When?")
    assert (await say(a, graph, "in 1 second")).startswith('OK! I\'ll remind you to "water the plants"')
    await wait_for(lambda: reminders_sent(graph) == [REMINDER + "water the plants"], timeout=15)
    await asyncio.sleep(1.0)
    assert reminders_sent(graph) == [REMINDER + "water the plants"]


# ---------------------------------------------------------------------------- kill -9 of a real process


def _process_config(directory: Path, port: int, graph_url: str) -> Path:
    outbound = "\n".join(f"{k} = {v}" for k, v in FAST_OUTBOUND.items())
    path = directory / "config.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\npath = "{(directory / "alfred.db").as_posix()}"\n'
        f'[graph]\nbase_url = "{graph_url}"\ntimeout_seconds = 1.0\n'
        f"[outbound]\n{outbound}\n[schedule]\ninterval_seconds = 0.1\n"
        '[logging]\nformat = "text"\n'
        f'[tenants.home]\nphone_number_id = "{payloads.PNID}"\nhandler = "reminders"\ntimezone = "Europe/Madrid"\n'
    )
    return path


async def _say_to(session: aiohttp.ClientSession, port: int, graph: FakeGraph, words: str) -> str:
    before = len(graph.texts())
    body = payloads.body_of(fresh(words))
    async with session.post(
        f"http://127.0.0.1:{port}/webhook", data=body, headers=payloads.headers(body, APP_SECRET)
    ) as resp:
        assert resp.status == 200
    await wait_for(lambda: len(graph.texts()) > before, timeout=10)
    return graph.texts()[-1]


async def test_kill_9_with_a_reminder_scheduled_sends_it_exactly_once(tmp_path: Path, graph: FakeGraph) -> None:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_"))}, **PROD_ENV}
    alfred = Alfred(_process_config(tmp_path, port, graph.url), env, tmp_path / "alfred.log", port)
    alfred.start()
    try:
        async with aiohttp.ClientSession() as session:
            await alfred.healthy(session)
            await _say_to(session, port, graph, "remind me to stretch")
            assert (await _say_to(session, port, graph, "in 3 seconds")).startswith('OK! I\'ll remind you to "stretch"')
            assert alfred.kill()  # SIGKILL, with the reminder scheduled
            rows = db_rows(tmp_path / "alfred.db", "SELECT state FROM outbox WHERE idem_key LIKE 'reminder:%'")
            assert [r[0] for r in rows] == ["scheduled"]
            await asyncio.sleep(3.5)  # its time passes while Alfred is down
            assert reminders_sent(graph) == []
            alfred.start()
            await alfred.healthy(session)
            await wait_for(lambda: reminders_sent(graph) == [REMINDER + "stretch"], timeout=15)
            await asyncio.sleep(1.0)
            assert reminders_sent(graph) == [REMINDER + "stretch"]
    finally:
        alfred.kill()
