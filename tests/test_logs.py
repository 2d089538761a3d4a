"""Structured logs, and that no secret ever reaches them."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest

from alfred_bot.logs import JsonFormatter, setup_logging
from tests import payloads
from tests.conftest import API_TOKEN, APP_SECRET, VERIFY_TOKEN, post_webhook, wait_for


def test_json_lines_carry_extras_and_exceptions() -> None:
    record = logging.makeLogRecord(
        {"name": "alfred.test", "levelname": "ERROR", "msg": "sent %s", "args": ("x",), "tenant": "home"}
    )
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "sent x"
    assert line["logger"] == "alfred.test"
    assert line["tenant"] == "home"
    assert "ValueError: boom" in line["exc"]
    assert line["ts"].endswith("Z")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_setup_logging_formats(fmt: str, capsys: Any) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("INFO", fmt)
        logging.getLogger("alfred.test").info("hello %d", 5)
        err = capsys.readouterr().err.strip()
        if fmt == "json":
            assert json.loads(err)["msg"] == "hello 5"
        else:
            assert err.endswith("alfred.test: hello 5")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_no_secret_in_logs_or_answers(client: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    body = payloads.body_of(payloads.text("hi", id="wamid.LOG"))
    signature = payloads.headers(body, APP_SECRET)["X-Hub-Signature-256"]
    answers = []
    assert await post_webhook(client, body) == 200
    for bad in (b"not json", body + b" "):
        resp = await client.post("/webhook", data=bad, headers={"X-Hub-Signature-256": signature})
        answers.append(await resp.text())
    for params in ({"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "c"},):
        answers.append(await (await client.get("/webhook", params=params)).text())
    answers.append(await (await client.get("/api/inbound", headers={"Authorization": "Bearer nope"})).text())
    answers.append(await (await client.get("/healthz")).text())
    await wait_for(lambda: any(r.getMessage().startswith("handled wamid.LOG") for r in caplog.records))
    text = "\n".join([*(r.getMessage() + repr(r.__dict__) for r in caplog.records), *answers])
    for secret in (APP_SECRET, VERIFY_TOKEN, API_TOKEN, signature.removeprefix("sha256=")):
        assert secret not in text
