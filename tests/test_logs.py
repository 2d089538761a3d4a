"""Structured logs, and that no secret ever reaches them."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from alfred_bot.logs import OWN_LOGGERS, JsonFormatter, install_redactor, setup_logging
from alfred_bot.security import Redactor
from tests import payloads
from tests.conftest import API_TOKEN, APP_SECRET, VERIFY_TOKEN, post_webhook, wait_for


@pytest.fixture
def saved_logging() -> Iterator[None]:
    """`setup_logging` changes process-wide state (root handlers and levels, our loggers' levels):
    put it back so later tests see pytest's capture as before."""
    root = logging.getLogger()
    own = [logging.getLogger(name) for name in OWN_LOGGERS]
    handlers, level, levels = root.handlers[:], root.level, [logger.level for logger in own]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for logger, was in zip(own, levels, strict=True):
        logger.setLevel(was)


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
def test_setup_logging_formats(fmt: str, capsys: Any, saved_logging: None) -> None:
    setup_logging("INFO", fmt)
    logging.getLogger("alfred.test").info("hello %d", 5)
    err = capsys.readouterr().err.strip()
    if fmt == "json":
        assert json.loads(err)["msg"] == "hello 5"
    else:
        assert err.endswith("alfred.test: hello 5")


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


def test_an_installed_redactor_cleans_every_record_until_uninstalled(caplog: Any) -> None:
    """Message with its arguments, stack and exception text from any logger; string extras in
    our JSON lines (issue 13.7)."""
    caplog.set_level(logging.INFO)
    secret = "s3cr3t-tok-0123"
    log = logging.getLogger("some.library")
    uninstall = install_redactor(Redactor([secret]))
    try:
        log.info("token %s", secret.upper(), extra={"detail": f"has {secret[:13]}"}, stack_info=True)  # s3cr3t-tok-0123
        log.info("bad arguments %d", "x")  # formatting fails: the template is kept, nothing raises
        try:
            raise ValueError(f"boom {secret}")
        except ValueError:
            log.exception("failed")
        line = json.loads(JsonFormatter().format(caplog.records[0]))
    finally:
        uninstall()
    log.info("after: %s", secret)
    first, bad, failed, after = caplog.records
    assert first.getMessage() == line["msg"] == "token [redacted]"
    assert line["detail"] == "has [redacted]"
    assert "[redacted]" in (first.stack_info or "") and secret not in (first.stack_info or "")
    assert bad.getMessage() == "bad arguments %d"
    assert "ValueError: boom [redacted]" in (failed.exc_text or "")
    assert json.loads(JsonFormatter().format(failed))["exc"] == failed.exc_text
    assert after.getMessage() == f"after: {secret}"  # uninstalled: nothing is touched
