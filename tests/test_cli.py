"""The command line, end to end: `python main.py` as a real subprocess on loopback.

Every subprocess gets a clean environment (no WHATSAPP_*/ALFRED_* variables from the host, no
proxies), a timeout, and is killed in a `finally` if it is still running. One real server is
shared by the simulate/signature tests; the start-up/SIGTERM test runs its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from alfred_bot.cli import announce, text_webhook
from alfred_bot.config import SANDBOX_APP_SECRET, Config, load_config, load_secrets, sandbox_secret
from alfred_bot.security import sign
from tests import payloads
from tests.conftest import db_rows, make_config

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60  # seconds for any one short-lived `python main.py ...`
START_TIMEOUT = 30  # seconds for a server to answer /healthz
STOP_TIMEOUT = 20  # seconds for a server to exit after SIGTERM
MISSING = ["WHATSAPP_ACCESS_TOKEN", "WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN", "ALFRED_API_TOKEN"]
_PROXIES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}

# urllib without any proxy: the tests only ever talk to 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_")) and k.lower() not in _PROXIES
    }
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(directory: Path, port: int, *, extra: str = "", name: str = "config.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[storage]\npath = "{(directory / "alfred.db").as_posix()}"\n\n'
        '[logging]\nformat = "json"\n\n'
        f'[tenants.home]\nphone_number_id = "{payloads.PNID}"\n{extra}',
        encoding="utf-8",
    )
    return path


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=REPO,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=RUN_TIMEOUT,
        check=False,
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def log_records(stderr: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Split a server's stderr into JSON log records and any other (non-log) lines."""
    records, other = [], []
    for line in lines(stderr):
        try:
            record = json.loads(line)
        except ValueError:
            other.append(line)
        else:
            records.append(record)
    return records, other


def assert_one_clean_line(stderr: str, *needles: str) -> str:
    """stderr is exactly one line, containing every needle, and no traceback."""
    assert "Traceback" not in stderr
    got = lines(stderr)
    assert len(got) == 1, f"expected one line on stderr, got: {stderr!r}"
    for needle in needles:
        assert needle in got[0]
    return got[0]


def http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with _opener.open(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.config.parent / "alfred.db"

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")


def _wait_healthy(server: Server) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.stderr()}")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            status, body = http(f"{server.url}/healthz")
            if status == 200:
                health: dict[str, Any] = json.loads(body)
                return health
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz did not answer 200 within {START_TIMEOUT} s:\n{server.stderr()}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_server(directory: Path, env: dict[str, str] | None = None, extra: str = "") -> Iterator[Server]:
    port = free_port()
    config = write_config(directory, port, extra=extra)
    stderr_path = directory / "server.stderr"
    with stderr_path.open("wb") as err, (directory / "server.stdout").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--config", str(config), "--port", str(port)],
            cwd=REPO,
            env=clean_env() if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    server = Server(proc, port, config, stderr_path)
    try:
        _wait_healthy(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


# --- help and version --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], ["usage: python main.py", "simulate", "--config", "--port"]),
        (["simulate", "--help"], ["usage: python main.py simulate", "--from", "--text", "--tenant", "--url"]),
        (["run", "--help"], ["usage: python main.py serve", "--host", "--port"]),
        (["serve", "--help"], ["usage: python main.py serve", "--host", "--port"]),
        (["send", "--help"], ["usage: python main.py send", "--to", "--text", "--template", "--key"]),
        (["status", "--help"], ["usage: python main.py status", "--json", "--url"]),
        (["dead-letters", "--help"], ["usage: python main.py dead-letters", "retry", "--all", "--tenant"]),
        (["check-config", "--help"], ["usage: python main.py check-config", "--config"]),
        (["simulate", "--help"], ["--type", "interactive", "--reply-id", "--payload", "--emoji", "--state"]),
    ],
)
def test_help_exits_zero(args: list[str], expected: list[str]) -> None:
    result = run_main(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for text in expected:
        assert text in result.stdout


def test_version() -> None:
    result = run_main("--version")
    assert result.returncode == 0
    assert result.stdout.strip().startswith("alfred ")


def test_simulate_requires_from() -> None:
    result = run_main("simulate", "--text", "hi")
    assert result.returncode == 2
    assert "--from" in result.stderr
    assert "Traceback" not in result.stderr


# --- configuration errors: one line, exit 2, no traceback --------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (f'[server]\nprt = 8080\n[tenants.home]\nphone_number_id = "{payloads.PNID}"\n', "server.prt"),
        (f'[server]\nport = "x"\n[tenants.home]\nphone_number_id = "{payloads.PNID}"\n', "server.port"),
        ('[tenants.home]\nhandler = "echo"\n', "tenants.home.phone_number_id"),
        (f'[tenants.home]\nphone_number_id = "{payloads.PNID}"\nfoo = 1\n', "tenants.home.foo"),
        ('tenants = "home"\n', "tenants"),
    ],
    ids=["unknown-key", "wrong-type", "missing-phone-number-id", "unknown-tenant-key", "tenants-not-a-table"],
)
@pytest.mark.parametrize("command", [[], ["simulate", "--from", payloads.USER, "--text", "hi"]], ids=["serve", "sim"])
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, body: str, needle: str, command: list[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(body, encoding="utf-8")
    result = run_main("--config", str(path), *command)
    assert result.returncode == 2
    assert result.stdout == ""
    line = assert_one_clean_line(result.stderr, "config error", needle)
    assert line.startswith("alfred: config error: ")


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "config.toml"
    result = run_main("--config", str(path))
    assert result.returncode == 2
    assert_one_clean_line(result.stderr, "config error", str(path), "not found")


def test_invalid_toml_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[server\nport = 1\n", encoding="utf-8")
    result = run_main("--config", str(path))
    assert result.returncode == 2
    assert_one_clean_line(result.stderr, "config error", str(path), "not valid TOML")


def test_default_config_is_config_toml_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[server]\nprt = 1\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py")],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    assert_one_clean_line(result.stderr, "config error", "server.prt")


def test_unknown_handler_module_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port(), extra='handler = "no_such_handler"\n')
    result = run_main("--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    records, other = log_records(result.stderr)
    assert records, "the start-up log comes first"
    assert len(other) == 1, result.stderr
    assert other[0].startswith("alfred: config error: tenants.home.handler: ")
    assert "no_such_handler" in other[0]


@pytest.mark.parametrize("missing", ["WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"])
def test_production_without_a_required_secret_exits_2(tmp_path: Path, missing: str) -> None:
    values = {
        "WHATSAPP_ACCESS_TOKEN": "EAAG-cli-access-token",
        "WHATSAPP_APP_SECRET": "cli-app-secret-value",
        "WHATSAPP_VERIFY_TOKEN": "cli-verify-token-value",
    }
    del values[missing]
    path = write_config(tmp_path, free_port())
    result = run_main("--config", str(path), env=clean_env(**values))
    assert result.returncode == 2
    line = assert_one_clean_line(result.stderr, "config error", missing)
    for value in values.values():
        assert value not in line


def test_production_with_only_an_access_token_names_the_app_secret(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port())
    result = run_main("--config", str(path), env=clean_env(WHATSAPP_ACCESS_TOKEN="EAAG-only-token"))
    assert result.returncode == 2
    line = assert_one_clean_line(result.stderr, "WHATSAPP_APP_SECRET")
    assert "EAAG-only-token" not in line


# --- the real server: start-up log, health, SIGTERM ---------------------------------------------


def test_server_starts_in_sandbox_logs_what_is_missing_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        status, body = http(f"{srv.url}/healthz")
        assert status == 200
        health = json.loads(body)
        assert health["status"] == "ok"
        assert health["mode"] == "sandbox"
        srv.proc.send_signal(signal.SIGTERM)
        returncode = srv.proc.wait(timeout=STOP_TIMEOUT)
    assert returncode == 0
    stderr = srv.stderr()
    assert "Traceback" not in stderr
    records, other = log_records(stderr)
    assert other == [], "with format = json every stderr line is a JSON log record"
    assert (tmp_path / "server.stdout").read_text(encoding="utf-8") == ""
    messages = [r["msg"] for r in records]
    assert any("SANDBOX" in m and r["level"] == "INFO" for m, r in zip(messages, records, strict=True))
    warnings = " ".join(r["msg"] for r in records if r["level"] == "WARNING")
    for name in MISSING:
        assert name in warnings, f"{name} not named in the start-up warnings"
    assert any(f"127.0.0.1:{srv.port}" in m for m in messages)
    assert any(str(tmp_path / "alfred.db") in m for m in messages)
    assert messages[-1] == "store closed", "SIGTERM shuts down gracefully, closing the store last"
    assert (tmp_path / "alfred.db").exists()


def test_server_healthz_from_the_shared_server(server: Server) -> None:
    status, body = http(f"{server.url}/healthz")
    assert status == 200
    assert json.loads(body)["mode"] == "sandbox"


# --- simulate against the shared server ---------------------------------------------------------


def test_simulate_round_trip_with_unicode(server: Server) -> None:
    text = "hello ünïcode"
    result = run_main("--config", str(server.config), "simulate", "--from", payloads.USER, "--text", text)
    assert result.returncode == 0, result.stderr
    assert f"-> POST {server.url}/webhook: HTTP 200" in result.stdout
    replies = [line for line in lines(result.stdout) if line.startswith("<- reply")]
    assert len(replies) == 1, result.stdout
    assert f"for {payloads.USER} (text): You said: {text}" in replies[0]
    # The real database holds the decoded text, not its \u escapes.
    db = Path(load_config(server.config).storage.path)
    rows = db_rows(db, "SELECT text, sender, tenant FROM inbox WHERE text = ?", (text,))
    assert [(r["text"], r["sender"], r["tenant"]) for r in rows] == [(text, payloads.USER, "home")]


def test_simulate_names_the_tenant_and_sender(server: Server) -> None:
    result = run_main(
        "--config", str(server.config), "simulate", "--from", "15550009999", "--text", "ping", "--tenant", "home"
    )
    assert result.returncode == 0, result.stderr
    assert "for 15550009999 (text): You said: ping" in result.stdout


def test_simulate_signed_with_another_secret_is_refused(server: Server) -> None:
    env = clean_env(WHATSAPP_APP_SECRET="not-the-server-secret")
    result = run_main("--config", str(server.config), "simulate", "--from", payloads.USER, "--text", "x", env=env)
    assert result.returncode == 1
    assert "HTTP 403" in result.stdout
    assert "<- reply" not in result.stdout


def test_simulate_unknown_tenant_is_one_line(server: Server) -> None:
    result = run_main(
        "--config", str(server.config), "simulate", "--from", payloads.USER, "--text", "x", "--tenant", "nobody"
    )
    assert result.returncode == 2
    assert_one_clean_line(result.stderr, "nobody", "home")


def test_unsigned_webhook_post_is_403(server: Server) -> None:
    body = text_webhook(payloads.PNID, payloads.USER, "Ana", "unsigned", "wamid.UNSIGNED1")
    status, _ = http(f"{server.url}/webhook", data=body, headers={"Content-Type": "application/json"})
    assert status == 403


def test_webhook_signed_with_a_wrong_secret_is_403(server: Server) -> None:
    body = text_webhook(payloads.PNID, payloads.USER, "Ana", "forged", "wamid.FORGED1")
    status, _ = http(f"{server.url}/webhook", data=body, headers=payloads.headers(body, "wrong-secret"))
    assert status == 403


def test_webhook_signed_with_the_sandbox_secret_is_200(server: Server) -> None:
    """The positive control for the two 403 tests: same body shape, this install's secret."""
    storage = Path(load_config(server.config).storage.path)
    secret_file = storage.parent / "sandbox-app-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = sandbox_secret(storage)
    assert len(secret) == 64 and secret != SANDBOX_APP_SECRET
    body = text_webhook(payloads.PNID, payloads.USER, "Ana", "signed", "wamid.SIGNED1")
    status, _ = http(f"{server.url}/webhook", data=body, headers=payloads.headers(body, secret))
    assert status == 200


def test_the_public_fallback_secret_does_not_sign_for_a_real_server(server: Server) -> None:
    """Anyone can read SANDBOX_APP_SECRET in the source: a running server must refuse it."""
    body = text_webhook(payloads.PNID, payloads.USER, "Ana", "forged", "wamid.PUBLIC1")
    status, _ = http(f"{server.url}/webhook", data=body, headers=payloads.headers(body, SANDBOX_APP_SECRET))
    assert status == 403


def test_second_server_on_a_port_in_use_cannot_start(server: Server, tmp_path: Path) -> None:
    # Its own storage, so the failed instance never touches the running server's database.
    path = write_config(tmp_path, server.port)
    result = run_main("--config", str(path), "--port", str(server.port))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    _, other = log_records(result.stderr)
    assert len(other) == 1, result.stderr
    assert other[0].startswith("alfred: cannot start: ")
    # ...and the first server is unharmed.
    assert http(f"{server.url}/healthz")[0] == 200


# --- failures without a server -------------------------------------------------------------------


def test_simulate_without_a_server_exits_1_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, port)
    result = run_main("--config", str(path), "simulate", "--from", payloads.USER, "--text", "anyone?")
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_clean_line(result.stderr, "python main.py", f"127.0.0.1:{port}")


def test_storage_that_cannot_be_created_cannot_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    path = write_config(tmp_path, free_port())
    text = path.read_text(encoding="utf-8").replace(
        (tmp_path / "alfred.db").as_posix(), (blocker / "sub" / "alfred.db").as_posix()
    )
    path.write_text(text, encoding="utf-8")
    result = run_main("--config", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    _, other = log_records(result.stderr)
    assert len(other) == 1, result.stderr
    assert other[0].startswith("alfred: cannot start: ")


@pytest.mark.parametrize("port", ["70000", "-5"])
def test_out_of_range_port_option_is_one_line(tmp_path: Path, port: str) -> None:
    path = write_config(tmp_path, free_port())
    result = run_main("--config", str(path), "--port", port)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    _, other = log_records(result.stderr)
    assert len(other) == 1, result.stderr
    assert other[0].startswith("alfred: ")


def test_simulate_brackets_an_ipv6_host(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, port)
    path.write_text(path.read_text(encoding="utf-8").replace('host = "127.0.0.1"', 'host = "::1"'), encoding="utf-8")
    result = run_main("--config", str(path), "simulate", "--from", payloads.USER, "--text", "x")
    # Nothing listens there, so it still fails, but the URL it tried must be a valid one.
    assert f"http://[::1]:{port}/webhook" in result.stderr


# --- in-process: text_webhook and announce ------------------------------------------------------


def test_text_webhook_is_ascii_and_round_trips_the_text() -> None:
    text = 'héllo ünïcode 👋 — “quotes” \\ "x"\n中文'
    body = text_webhook(payloads.PNID, payloads.USER, "Zoë", text, "wamid.X1")
    assert body.isascii()
    assert "\\u00fc" in body.decode("ascii")  # ü, escaped as Meta does
    data = json.loads(body)
    assert data["object"] == "whatsapp_business_account"
    value = data["entry"][0]["changes"][0]["value"]
    assert data["entry"][0]["changes"][0]["field"] == "messages"
    assert value["metadata"]["phone_number_id"] == payloads.PNID
    assert value["contacts"] == [{"profile": {"name": "Zoë"}, "wa_id": payloads.USER}]
    (message,) = value["messages"]
    assert message["text"] == {"body": text}
    assert message["from"] == payloads.USER
    assert message["id"] == "wamid.X1"
    assert message["type"] == "text"
    assert message["timestamp"].isdigit()
    assert abs(int(message["timestamp"]) - time.time()) < 60


def test_text_webhook_signature_covers_the_exact_bytes() -> None:
    body = text_webhook(payloads.PNID, payloads.USER, "Ana", "ü", "wamid.X2")
    reencoded = json.dumps(json.loads(body), ensure_ascii=False).encode()
    assert reencoded != body
    assert sign(body, "k") != sign(reencoded, "k")


def _secret_free(records: list[logging.LogRecord], values: list[str]) -> None:
    for record in records:
        rendered = record.getMessage() + repr(record.args) + repr(vars(record))
        for value in values:
            assert value not in rendered


def test_announce_in_production_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "WHATSAPP_ACCESS_TOKEN": "EAAG-announce-access",
        "WHATSAPP_APP_SECRET": "announce-app-secret",
        "WHATSAPP_APP_SECRET_PREVIOUS": "announce-previous-secret",
        "WHATSAPP_VERIFY_TOKEN": "announce-verify",
        "ALFRED_API_TOKEN": "announce-api",
    }
    cfg: Config = make_config(tmp_path)
    caplog.set_level(logging.DEBUG, logger="alfred")
    announce(cfg, load_secrets(env))
    records = [r for r in caplog.records if r.name.startswith("alfred")]
    assert records
    assert any("PRODUCTION" in r.getMessage() for r in records)
    assert not any("SANDBOX" in r.getMessage() for r in records)
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    text = " ".join(r.getMessage() for r in records)
    for name in MISSING:
        assert name not in text
    assert "home, biz" in text
    _secret_free(records, [*env.values(), SANDBOX_APP_SECRET])


def test_announce_in_sandbox_mode_warns_about_each_missing_variable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"WHATSAPP_VERIFY_TOKEN": "sandbox-verify-token"}
    caplog.set_level(logging.DEBUG, logger="alfred")
    announce(make_config(tmp_path), load_secrets(env))
    records = [r for r in caplog.records if r.name.startswith("alfred")]
    assert any("SANDBOX" in r.getMessage() and r.levelno == logging.INFO for r in records)
    warnings = " ".join(r.getMessage() for r in records if r.levelno == logging.WARNING)
    for name in ["WHATSAPP_ACCESS_TOKEN", "WHATSAPP_APP_SECRET", "ALFRED_API_TOKEN"]:
        assert name in warnings
    assert "WHATSAPP_VERIFY_TOKEN" not in warnings, "a variable that is set is not reported missing"
    _secret_free(records, [*env.values(), SANDBOX_APP_SECRET])
