"""The operator commands end to end: `python main.py check-config | send | status | dead-letters |
simulate --type ...` as real subprocesses against a real server on loopback.

Every subprocess gets a clean environment (no WHATSAPP_*/ALFRED_* variables from the host, no
proxies) and a timeout; servers are stopped (SIGTERM, then kill) in a `finally`.
"""

from __future__ import annotations

import fcntl
import json
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from alfred_bot.commands import summary_lines
from alfred_bot.store.sqlite.engine import connect_writer
from tests import payloads
from tests.conftest import db_rows
from tests.test_cli import (
    REPO,
    RUN_TIMEOUT,
    STOP_TIMEOUT,
    Server,
    clean_env,
    free_port,
    run_main,
    running_server,
    write_config,
)

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

API = "commands-api-token-0123"
SECRETS = {
    "WHATSAPP_APP_SECRET": "commands-app-secret-4567",
    "WHATSAPP_VERIFY_TOKEN": "commands-verify-token-89",
    "ALFRED_API_TOKEN": API,
}
BIZ = f'\n[tenants.biz]\nphone_number_id = "{payloads.BIZ_PNID}"\n'
WAMID = re.compile(r"\((\w+) (wamid\.SIM[0-9a-f]+)\)")


# ---------------------------------------------------------------------------- helpers


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_clean_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr
    got = lines(stderr)
    assert len(got) == 1, f"expected one line on stderr, got: {stderr!r}"
    for needle in needles:
        assert needle in got[0], got[0]
    return got[0]


def insert_failed(db: Path, outbox_id: str, *, tenant: str = "home", recipient: str = payloads.USER) -> None:
    """A send that failed for good, written as an operator would find it (schema made by Alfred)."""
    conn = connect_writer(db)  # creates or migrates the schema exactly as the server does
    try:
        payload = {"messaging_product": "whatsapp", "to": f"+{recipient}", "type": "text", "text": {"body": "x"}}
        now = time.time() - 60
        conn.execute(
            "INSERT INTO outbox (id, idem_key, tenant, recipient, type, payload, state, attempts, due_at, created_at, "
            "error_code, error_message) VALUES (?, ?, ?, ?, 'text', ?, 'failed', 1, ?, ?, 131026, ?)",
            (
                outbox_id,
                f"test:{outbox_id}",
                tenant,
                recipient,
                json.dumps(payload).encode(),
                now,
                now,
                "undeliverable",
            ),
        )
    finally:
        conn.close()


def state_of(db: Path, outbox_id: str) -> str:
    return str(db_rows(db, "SELECT state FROM outbox WHERE id = ?", (outbox_id,))[0][0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("commands")
    insert_failed(directory / "alfred.db", "dead00000001")  # before the server starts
    with running_server(directory, clean_env(**SECRETS), extra=BIZ) as srv:
        yield srv


def _main(server: Server, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_main("--config", str(server.config), *args, env=clean_env(**SECRETS) if env is None else env)


# ---------------------------------------------------------------------------- check-config


def test_check_config_in_sandbox_names_mode_tenants_and_handler(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port(), extra=BIZ)
    result = run_main("--config", str(path), "check-config", env=clean_env(**SECRETS))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("config ok: sandbox mode")
    assert f"tenant home: phone_number_id {payloads.PNID}, handler echo (echo)" in out
    assert f"tenant biz: phone_number_id {payloads.BIZ_PNID}, handler echo (echo)" in out
    assert "orchestrator: off" in out
    assert "not set: WHATSAPP_ACCESS_TOKEN" in out
    for value in SECRETS.values():
        assert value not in out + result.stderr
    assert not (tmp_path / "alfred.db").exists(), "check-config does not create the database"


def test_check_config_in_production_with_tenant_credentials_shows_no_secret(tmp_path: Path) -> None:
    extra = BIZ + 'access_token_env = "BIZ_TOKEN"\napp_secret_env = "BIZ_SECRET"\n'
    extra += '\n[orchestrator]\nurl = "http://127.0.0.1:9/v1/orchestrate"\n'
    path = write_config(tmp_path, free_port(), extra=extra)
    env = {
        **SECRETS,
        "WHATSAPP_ACCESS_TOKEN": "EAAG-commands-global-token",
        "BIZ_TOKEN": "EAAG-commands-biz-token",
        "BIZ_SECRET": "commands-biz-app-secret",
        "ORCHESTRATOR_API_KEY": "commands-orchestrator-key",
    }
    result = run_main("--config", str(path), "check-config", env=clean_env(**env))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("config ok: production mode")
    assert "tenant home" in out and "token from WHATSAPP_ACCESS_TOKEN" in out
    biz_line = next(line for line in lines(out) if "tenant biz" in line)
    assert "token from BIZ_TOKEN" in biz_line and "app secret from BIZ_SECRET" in biz_line
    assert "orchestrator: http://127.0.0.1:9/v1/orchestrate (key from ORCHESTRATOR_API_KEY)" in out
    assert "not set" not in out
    for value in env.values():
        assert value not in out + result.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("\n[limits]\ninbound_per_usr = 1\n", "limits.inbound_per_usr"),
        ('handler = "no_such_handler"\n', "tenants.home.handler"),
        ('\n[orchestrator]\nurl = "http://127.0.0.1:9/x"\ntimeout_seconds = 20\nretries = 2\n', "orchestrator"),
    ],
    ids=["unknown-key", "missing-handler", "orchestrator-too-slow"],
)
def test_check_config_with_a_bad_config_is_one_line_exit_2(tmp_path: Path, extra: str, needle: str) -> None:
    path = write_config(tmp_path, free_port(), extra=extra)
    result = run_main("--config", str(path), "check-config", env=clean_env(**SECRETS))
    assert result.returncode == 2
    assert result.stdout == ""
    line = assert_one_clean_line(result.stderr, "config error", needle)
    assert line.startswith("alfred: config error: ")


# ---------------------------------------------------------------------------- send


def test_send_a_template_through_the_api(server: Server) -> None:
    result = _main(server, "send", "--to", "+15550001234", "--template", "hello", "--param", "Ana", "--key", "k-1")
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"queued (\w+) \((queued|sending|sent)\)", result.stdout.strip())
    assert match, result.stdout
    outbox_id = match.group(1)
    [row] = db_rows(server.db, "SELECT tenant, recipient, type, payload FROM outbox WHERE id = ?", (outbox_id,))
    assert (row["tenant"], row["recipient"], row["type"]) == ("home", "15550001234", "template")
    template = json.loads(row["payload"])["template"]
    assert template == {
        "name": "hello",
        "language": {"code": "en_US"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ana"}]}],
    }
    # The same idempotency key queues nothing new and prints the same id.
    again = _main(server, "send", "--to", "+15550001234", "--template", "hello", "--param", "Ana", "--key", "k-1")
    assert again.returncode == 0
    assert again.stdout.split()[1] == outbox_id


def test_send_to_another_tenant(server: Server) -> None:
    result = _main(server, "send", "--to", "+15550001235", "--template", "hello", "--tenant", "biz")
    assert result.returncode == 0, result.stderr
    outbox_id = result.stdout.split()[1]
    assert db_rows(server.db, "SELECT tenant FROM outbox WHERE id = ?", (outbox_id,))[0][0] == "biz"


def test_send_text_outside_the_window_is_one_line(server: Server) -> None:
    result = _main(server, "send", "--to", "+15550009876", "--text", "hello out of the blue")
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, "HTTP 422", "24-hour")


def test_send_without_the_api_token_is_one_line(server: Server) -> None:
    env = clean_env(**{k: v for k, v in SECRETS.items() if k != "ALFRED_API_TOKEN"})
    result = _main(server, "send", "--to", "+15550001234", "--template", "hello", env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, "ALFRED_API_TOKEN")


def test_send_with_a_wrong_api_token_is_one_line(server: Server) -> None:
    env = clean_env(**{**SECRETS, "ALFRED_API_TOKEN": "not-the-token"})
    result = _main(server, "send", "--to", "+15550001234", "--template", "hello", env=env)
    assert result.returncode == 1
    line = assert_one_clean_line(result.stderr, "HTTP 401")
    assert "not-the-token" not in line


def test_send_with_no_server_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, port)
    result = run_main(
        "--config", str(path), "send", "--to", "+15550001234", "--template", "hello", env=clean_env(**SECRETS)
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, "no server", f"127.0.0.1:{port}")


# ---------------------------------------------------------------------------- status


def test_status_prints_a_line_per_tenant(server: Server) -> None:
    result = _main(server, "status")
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert re.match(r"Alfred \S+ — SANDBOX — ok — up \d+ s", out[0]), out[0]
    assert any(line.startswith("  home: in ") and "limit 80.0/s" in line for line in out)
    assert any(line.startswith("  biz: in ") for line in out)
    assert any(line.startswith("  queues: dispatch ") for line in out)
    for value in SECRETS.values():
        assert value not in result.stdout


def test_status_json_is_valid_json_with_the_tenants(server: Server) -> None:
    result = _main(server, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "ok"
    assert data["mode"] == "sandbox"
    assert [t["name"] for t in data["tenants"]] == ["home", "biz"]
    assert all(t["handler"] == "echo" for t in data["tenants"])
    assert payloads.PNID not in result.stdout  # phone numbers stay out of the open status


def test_status_sends_the_api_token_for_the_detailed_view(server: Server) -> None:
    result = _main(server, "status", "--json")  # ALFRED_API_TOKEN is set: sent as a Bearer header
    data = json.loads(result.stdout)
    assert data["view"] == "detailed"
    assert data["dead_letters"][0]["error_message"] == "undeliverable"
    assert data["dead_letters"][0]["to"].startswith("+15•")  # masked, as on the page


def test_status_without_the_token_is_the_open_view(server: Server) -> None:
    env = clean_env(**{k: v for k, v in SECRETS.items() if k != "ALFRED_API_TOKEN"})
    result = _main(server, "status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["view"] == "open"
    assert "undeliverable" not in result.stdout and payloads.USER not in result.stdout
    assert data["dead_letters"][0]["error_code"] == 131026  # the state is still there
    text = _main(server, "status", env=env)
    assert "(open view: set ALFRED_API_TOKEN for details)" in lines(text.stdout)[0]


def test_status_with_no_server_is_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port())
    result = run_main("--config", str(path), "status", env=clean_env(**SECRETS))
    assert result.returncode == 1
    assert_one_clean_line(result.stderr, "no server")


# ---------------------------------------------------------------------------- dead letters


def test_dead_letters_list_shows_failed_sends(server: Server) -> None:
    insert_failed(server.db, "dead00000002", tenant="biz", recipient="15550007777")
    result = _main(server, "dead-letters", "list")
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    [biz] = [line for line in out if line.startswith("dead00000002")]
    assert "  biz  " in biz and "attempts 1" in biz and "code 131026: undeliverable" in biz
    assert "+15•••••7777" in biz and "15550007777" not in biz  # the number is masked
    assert re.fullmatch(r"\d+ dead letter\(s\)", out[-1])
    assert int(out[-1].split()[0]) == len(out) - 1 >= 1
    only_biz = _main(server, "dead-letters", "list", "--tenant", "biz")
    assert lines(only_biz.stdout)[-1] == "1 dead letter(s)"
    assert "dead00000002" in only_biz.stdout


def test_dead_letters_retry_all_through_the_server(server: Server) -> None:
    insert_failed(server.db, "dead00000003")
    failed = int(db_rows(server.db, "SELECT COUNT(*) FROM outbox WHERE state = 'failed'")[0][0])
    assert failed >= 1
    result = _main(server, "dead-letters", "retry", "--all")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"queued again: {failed}"
    assert state_of(server.db, "dead00000003") in {"queued", "sending", "sent"}
    deadline = time.monotonic() + 10
    while state_of(server.db, "dead00000003") != "sent" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state_of(server.db, "dead00000003") == "sent"  # the sandbox sender sent it again
    row = db_rows(server.db, "SELECT attempts, error_code FROM outbox WHERE id = 'dead00000003'")[0]
    assert (row["attempts"], row["error_code"]) == (1, None)
    assert db_rows(server.db, "SELECT COUNT(*) FROM outbox WHERE state = 'failed'")[0][0] == 0


def test_dead_letters_retry_needs_ids_or_all(server: Server) -> None:
    result = _main(server, "dead-letters", "retry")
    assert result.returncode == 2
    assert_one_clean_line(result.stderr, "--all")


def test_dead_letters_retry_without_a_server_retries_locally(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port())
    insert_failed(tmp_path / "alfred.db", "dead00000004")
    listed = run_main("--config", str(path), "dead-letters", "list", env=clean_env(**SECRETS))
    assert listed.returncode == 0
    assert lines(listed.stdout)[-1] == "1 dead letter(s)"
    result = run_main("--config", str(path), "dead-letters", "retry", "--all", env=clean_env(**SECRETS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("queued again: 1")
    row = db_rows(tmp_path / "alfred.db", "SELECT state, attempts, error_code FROM outbox WHERE id = 'dead00000004'")
    assert tuple(row[0]) == ("queued", 0, None)
    assert _unlocked(tmp_path / "alfred.db.lock")


def test_dead_letters_list_without_a_database_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port())
    result = run_main("--config", str(path), "dead-letters", "list", env=clean_env(**SECRETS))
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, "cannot list dead letters", "alfred.db")
    assert not (tmp_path / "alfred.db").exists()


def test_dead_letters_list_beside_a_running_server_takes_no_lock(server: Server) -> None:
    """The list reads through a read-only store: the server keeps its lock and keeps writing."""
    insert_failed(server.db, "dead00000005")
    listed = _main(server, "dead-letters", "list")
    assert listed.returncode == 0, listed.stderr
    assert "dead00000005" in listed.stdout
    assert not _unlocked(server.db.parent / "alfred.db.lock")  # still the server's
    sent = _main(server, "send", "--to", "+15550001236", "--template", "hello")
    assert sent.returncode == 0, sent.stderr


def _unlocked(lock: Path) -> bool:
    """The local retry released the database lock (a server could start now)."""
    with lock.open("ab") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True


# ---------------------------------------------------------------------------- simulate --type


SIMULATIONS = {
    "interactive": ["--type", "interactive", "--reply-id", "size:m", "--text", "Medium"],
    "reaction": ["--type", "reaction", "--message-id", "wamid.OURS42", "--emoji", "❤️"],
    "image": ["--type", "image", "--text", "a caption"],
    "button": ["--type", "button", "--payload", "STOP_PROMOS", "--tenant", "biz"],
    "status": ["--type", "status", "--message-id", "wamid.X77", "--state", "read"],
}


@pytest.fixture(scope="module")
def simulated(server: Server) -> dict[str, tuple[int, str, str]]:
    """Every `simulate --type ...` of SIMULATIONS, run at the same time: name → (exit code, stdout, stderr)."""
    procs: dict[str, subprocess.Popen[str]] = {}
    command = [sys.executable, "main.py", "--config", str(server.config), "simulate", "--from", payloads.USER]
    try:
        for name, args in SIMULATIONS.items():
            procs[name] = subprocess.Popen(
                [*command, "--wait", "3", *args],
                cwd=REPO,
                env=clean_env(**SECRETS),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
            )
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
            results[name] = (proc.returncode, out, err)
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)


def _simulate(server: Server, simulated: dict[str, tuple[int, str, str]], name: str) -> tuple[str, str]:
    code, out, err = simulated[name]
    assert code == 0, out + err
    assert f"-> POST {server.url}/webhook: HTTP 200" in out
    match = WAMID.search(out)
    assert match, out
    return match.group(1), match.group(2)


def _inbox(server: Server, event_id: str) -> sqlite3.Row:
    [row] = db_rows(server.db, "SELECT type, tenant, sender, raw, state FROM inbox WHERE event_id = ?", (event_id,))
    return row


def test_simulate_interactive_reply(server: Server, simulated: dict[str, tuple[int, str, str]]) -> None:
    kind, wamid = _simulate(server, simulated, "interactive")
    assert kind == "interactive"
    row = _inbox(server, wamid)
    assert (row["type"], row["tenant"], row["sender"]) == ("interactive", "home", payloads.USER)
    raw = json.loads(row["raw"])
    assert raw["interactive"] == {"type": "button_reply", "button_reply": {"id": "size:m", "title": "Medium"}}


def test_simulate_reaction(server: Server, simulated: dict[str, tuple[int, str, str]]) -> None:
    _, wamid = _simulate(server, simulated, "reaction")
    row = _inbox(server, wamid)
    assert row["type"] == "reaction"
    assert json.loads(row["raw"])["reaction"] == {"message_id": "wamid.OURS42", "emoji": "❤️"}


def test_simulate_image(server: Server, simulated: dict[str, tuple[int, str, str]]) -> None:
    _, wamid = _simulate(server, simulated, "image")
    row = _inbox(server, wamid)
    assert row["type"] == "image"
    image = json.loads(row["raw"])["image"]
    assert image["mime_type"] == "image/jpeg" and image["caption"] == "a caption" and image["id"]


def test_simulate_button_to_biz(server: Server, simulated: dict[str, tuple[int, str, str]]) -> None:
    _, wamid = _simulate(server, simulated, "button")
    row = _inbox(server, wamid)
    assert (row["type"], row["tenant"]) == ("button", "biz")
    assert json.loads(row["raw"])["button"]["payload"] == "STOP_PROMOS"


def test_simulate_status(server: Server, simulated: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = simulated["status"]
    assert code == 0, out + err
    assert f"-> POST {server.url}/webhook: HTTP 200 (status " in out
    assert "<- " not in out  # a status has no replies to wait for
    [row] = db_rows(server.db, "SELECT status, tenant, recipient_id FROM statuses WHERE wamid = 'wamid.X77'")
    assert tuple(row) == ("read", "home", payloads.USER)
    assert not db_rows(server.db, "SELECT 1 FROM inbox WHERE event_id = 'wamid.X77'")


def test_status_text_shows_nodes_redis_and_campaigns_when_there_are_some() -> None:
    """The terminal view of /status.json carries what the page shows beyond one plain node."""
    base = {"version": "0.1.0", "mode": "production", "status": "ok", "uptime_seconds": 5, "tenants": []}
    assert summary_lines({**base, "role": "all", "nodes": [{"role": "all", "alive": True}]})[1:] == []
    data = {
        **base,
        "role": "web",
        "nodes": [
            {"role": "web", "alive": True},
            {"role": "worker", "alive": True},
            {"role": "worker", "alive": False},
        ],
        "redis": {"status": "degraded", "pacing": {"mode": "fallback", "nodes_on_redis": 1}, "relay": {"backlog": 12}},
        "campaigns": [
            {"name": "spring\x1b[31m sale", "state": "running", "done": 40, "total": 100, "delivered_ratio": 0.9,
             "read_ratio": 0.25},
            {"tenant": "biz", "state": "paused", "done": 0, "total": 7, "delivered_ratio": None},
        ],
    }  # fmt: skip
    assert summary_lines(data)[1:] == [
        "  nodes: 2 alive of 3 (web 1, worker 1); this one: web",
        "  redis: degraded, pacing fallback (1 nodes on Redis), bus relay backlog 12",
        "  campaign spring?[31m sale: running, 40/100 done, delivered 90%, read 25%",  # no escape reaches the tty
        "  campaign biz: paused, 0/7 done",
    ]
