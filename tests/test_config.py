"""Configuration: the TOML tree (every error names its key) and secrets from the environment.

Real files under tmp_path go through `load_config`; in-memory documents go through
`parse_config`; `load_secrets` is given explicit environments so the host's variables never leak in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from alfred_bot.config import (
    SANDBOX_APP_SECRET,
    Config,
    ConfigError,
    Secrets,
    load_config,
    load_secrets,
    parse_config,
)
from tests import payloads

REPO = Path(__file__).resolve().parent.parent

TENANT_TOML = f'[tenants.home]\nphone_number_id = "{payloads.PNID}"\n'


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def doc(**sections: Any) -> dict[str, Any]:
    """A minimal valid document (one tenant) with `sections` merged over it."""
    data: dict[str, Any] = {"tenants": {"home": {"phone_number_id": payloads.PNID}}}
    data.update(sections)
    return data


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert "\n" not in message, "a config error is one line"
    return message


# --- the shipped file and storage paths ------------------------------------------------------


def test_shipped_config_toml_loads() -> None:
    cfg = load_config(REPO / "config.toml")
    assert isinstance(cfg, Config)
    assert cfg.server.host == "127.0.0.1"
    assert 1 <= cfg.server.port <= 65535
    assert list(cfg.tenants) == ["home"]
    assert cfg.tenants["home"].phone_number_id == "123456789012345"
    assert cfg.handler_for("home") == "echo"
    assert cfg.tenant_by_phone_number_id() == {"123456789012345": "home"}
    assert Path(cfg.storage.path) == REPO / "data" / "alfred.db"


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, TENANT_TOML))
    assert cfg.server.port == 8080
    assert cfg.graph.base_url == "https://graph.facebook.com"
    assert cfg.graph.api_version == "v23.0"
    assert cfg.outbound.rate_per_second == 80.0
    assert cfg.dispatch.workers == 100
    assert cfg.logging.format == "json"
    assert Path(cfg.storage.path) == tmp_path / "data" / "alfred.db"


def test_relative_storage_path_is_relative_to_the_config_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, f'[storage]\npath = "db/x.db"\n{TENANT_TOML}', name="etc/alfred/config.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # A relative config path, given from another working directory.
    cfg = load_config(Path("../etc/alfred/config.toml"))
    storage = Path(cfg.storage.path)
    assert storage.is_absolute()
    assert storage == (tmp_path / "etc" / "alfred" / "db" / "x.db").resolve()


def test_absolute_storage_path_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "somewhere" / "else.db"
    cfg = load_config(write(tmp_path, f'[storage]\npath = "{target.as_posix()}"\n{TENANT_TOML}', name="c/c.toml"))
    assert cfg.storage.path == str(target)


def test_tenant_handler_overrides_default(tmp_path: Path) -> None:
    text = (
        '[handlers]\ndefault = "echo"\n'
        f'[tenants.home]\nphone_number_id = "{payloads.PNID}"\n'
        f'[tenants.biz]\nphone_number_id = "{payloads.BIZ_PNID}"\nhandler = "shop"\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.handler_for("home") == "echo"
    assert cfg.handler_for("biz") == "shop"
    assert cfg.tenant_by_phone_number_id() == {payloads.PNID: "home", payloads.BIZ_PNID: "biz"}


# --- one ConfigError per kind, naming the key ------------------------------------------------


def test_unknown_top_level_key() -> None:
    message = config_error(doc(srever={"port": 1}))
    assert message.startswith("srever:")
    assert "unknown key" in message


def test_unknown_key_in_a_section() -> None:
    message = config_error(doc(server={"prt": 8080}))
    assert message == "server.prt: unknown key"


def test_unknown_key_in_a_tenant() -> None:
    message = config_error({"tenants": {"home": {"phone_number_id": payloads.PNID, "foo": 1}}})
    assert message == "tenants.home.foo: unknown key"


@pytest.mark.parametrize(
    ("sections", "key", "detail"),
    [
        ({"server": {"port": "x"}}, "server.port", "expected `int`, got `str`"),
        ({"server": {"port": 8080.5}}, "server.port", "expected `int`, got `float`"),
        ({"server": {"port": True}}, "server.port", "expected `int`, got `bool`"),
        ({"server": 5}, "server", "expected `object`, got `int`"),
        ({"outbound": {"rate_per_second": "fast"}}, "outbound.rate_per_second", "expected `float`"),
        ({"logging": {"level": "debug"}}, "logging.level", "debug"),
    ],
)
def test_wrong_type_names_the_key(sections: dict[str, Any], key: str, detail: str) -> None:
    message = config_error(doc(**sections))
    assert message.startswith(f"{key}: ")
    assert detail in message


def test_missing_phone_number_id() -> None:
    message = config_error({"tenants": {"home": {"handler": "echo"}}})
    assert message == "tenants.home.phone_number_id: required key is missing"


def test_phone_number_id_as_a_toml_integer_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tenants\.home\.phone_number_id: expected `str`, got `int`$"):
        load_config(write(tmp_path, f"[tenants.home]\nphone_number_id = {payloads.PNID}\n"))


@pytest.mark.parametrize("pnid", ["12345abc", "+15551234567", "1234", "", "1" * 21])
def test_non_numeric_phone_number_id(pnid: str) -> None:
    message = config_error({"tenants": {"home": {"phone_number_id": pnid}}})
    assert message.startswith("tenants.home.phone_number_id: ")
    assert "numeric" in message


@pytest.mark.parametrize("waba", ["abc", "", "+1020", "1" * 21])
def test_non_numeric_waba_id(waba: str) -> None:
    message = config_error({"tenants": {"home": {"phone_number_id": payloads.PNID, "waba_id": waba}}})
    assert message == "tenants.home.waba_id: must be Meta's numeric WhatsApp Business Account id"


def test_duplicate_phone_number_id_names_both_tenants() -> None:
    message = config_error(
        {"tenants": {"home": {"phone_number_id": payloads.PNID}, "shop": {"phone_number_id": payloads.PNID}}}
    )
    assert message == "tenants.shop.phone_number_id: already used by tenants.home"


@pytest.mark.parametrize("data", [{}, {"tenants": {}}, {"server": {"port": 8080}}])
def test_no_tenants(data: dict[str, Any]) -> None:
    message = config_error(data)
    assert message.startswith("tenants: ")
    assert "at least one" in message


def test_bad_tenant_name() -> None:
    message = config_error({"tenants": {"my home": {"phone_number_id": payloads.PNID}}})
    assert message.startswith("tenants.my home: ")


def test_tenant_that_is_not_a_table() -> None:
    message = config_error({"tenants": {"home": "123456789012345"}})
    assert message.startswith("tenants.home: ")
    assert "expected `object`" in message


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_port_out_of_range(port: int) -> None:
    assert config_error(doc(server={"port": port})) == "server.port: must be between 1 and 65535"


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_are_accepted(port: int) -> None:
    assert parse_config(doc(server={"port": port})).server.port == port


@pytest.mark.parametrize("url", ["ftp://graph.facebook.com", "graph.facebook.com", "", "HTTPS//x"])
def test_bad_graph_base_url_scheme(url: str) -> None:
    message = config_error(doc(graph={"base_url": url}))
    assert message.startswith("graph.base_url: ")
    assert "http://" in message


def test_http_base_url_is_allowed_for_a_local_fake() -> None:
    assert parse_config(doc(graph={"base_url": "http://127.0.0.1:9999"})).graph.base_url == "http://127.0.0.1:9999"


@pytest.mark.parametrize("version", ["23.0", "v23", "v23.0.1", "V23.0", "latest", "v23.0 "])
def test_bad_api_version(version: str) -> None:
    message = config_error(doc(graph={"api_version": version}))
    assert message.startswith("graph.api_version: ")


@pytest.mark.parametrize("rate", [0, -1, -0.5, float("nan")])
def test_rate_per_second_must_be_positive(rate: float) -> None:
    assert config_error(doc(outbound={"rate_per_second": rate})) == "outbound.rate_per_second: must be > 0"


def test_fractional_rate_is_allowed() -> None:
    assert parse_config(doc(outbound={"rate_per_second": 0.5})).outbound.rate_per_second == 0.5


@pytest.mark.parametrize("workers", [0, -3])
def test_dispatch_workers_must_be_at_least_one(workers: int) -> None:
    assert config_error(doc(dispatch={"workers": workers})) == "dispatch.workers: must be at least 1"


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"storage": {"path": "   "}}, "storage.path"),
        ({"graph": {"timeout_seconds": 0}}, "graph.timeout_seconds"),
        ({"webhook": {"max_body_bytes": 1023}}, "webhook.max_body_bytes"),
        ({"webhook": {"body_timeout_seconds": -1}}, "webhook.body_timeout_seconds"),
        ({"dispatch": {"queue_size": 0}}, "dispatch.queue_size"),
        ({"dispatch": {"handler_timeout_seconds": 0}}, "dispatch.handler_timeout_seconds"),
    ],
)
def test_other_range_checks_name_their_key(sections: dict[str, Any], key: str) -> None:
    assert config_error(doc(**sections)).startswith(f"{key}: must")


def test_invalid_toml_syntax_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = = 8080\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 2" in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "config.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file not found"


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (unlike a chmod 000 file).
    path = tmp_path / "config.toml"
    path.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read config file")


def test_file_that_is_not_utf8_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[tenants.home]\nphone_number_id = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read config file")


@pytest.mark.parametrize("tenants", ["home", ["home"], 5])
def test_tenants_not_a_table(tenants: Any) -> None:
    assert config_error({"tenants": tenants}) == "tenants: must be a table of [tenants.NAME] sections"


def test_tenants_not_a_table_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tenants: must be a table"):
        load_config(write(tmp_path, 'tenants = "home"\n'))


def test_errors_from_a_file_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^server\.prt: unknown key$"):
        load_config(write(tmp_path, f"[server]\nprt = 8080\n{TENANT_TOML}"))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # msgspec puts the location inside its message ("... - at `$.logging.level`"); a key or a
        # value that contains that separator must not be mistaken for it.
        ('[logging]\nlevel = "x - at y"\n', "logging.level: invalid enum value 'x - at y'"),
        ('[logging]\nformat = "a - at `$.b`"\n', "logging.format: invalid enum value 'a - at `$.b`'"),
        ('[server]\n"prt - at `$.x`" = 1\n', "server.prt - at `$.x`: unknown key"),
        ('"srever - at x" = 1\n', "srever - at x: unknown key"),
    ],
)
def test_a_key_or_value_like_a_location_still_names_its_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, toml + TENANT_TOML))
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"server": {"public_hosts": ["ok.example", 5]}}, "server.public_hosts[1]: expected `str`, got `int`"),
        ({"limits": {"opt_out_keywords": "STOP"}}, "limits.opt_out_keywords: expected `array`, got `str`"),
        ({"server": {"prt": 1, "port": "x"}}, "server.prt: unknown key"),  # the first bad key in file order
        ({"server": {"port": "x", "prt": 1}}, "server.port: expected `int`, got `str`"),
    ],
)
def test_list_items_and_key_order_in_errors(sections: dict[str, Any], message: str) -> None:
    assert config_error(doc(**sections)) == message


def test_parse_config_does_not_mutate_its_input() -> None:
    data = doc()
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before
    assert parse_config(data).tenants["home"].phone_number_id == payloads.PNID


# --- secrets -----------------------------------------------------------------------------------

PROD = {
    "WHATSAPP_ACCESS_TOKEN": "EAAG-access-token-value",
    "WHATSAPP_APP_SECRET": "app-secret-value-1234",
    "WHATSAPP_VERIFY_TOKEN": "verify-token-value-5678",
    "ALFRED_API_TOKEN": "api-token-value-9012",
}
ALL_VARS = ["WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN", "WHATSAPP_ACCESS_TOKEN", "ALFRED_API_TOKEN"]


def test_sandbox_without_access_token() -> None:
    secrets = load_secrets({})
    assert secrets.mode == "sandbox"
    assert secrets.app_secrets == (SANDBOX_APP_SECRET,)
    assert secrets.app_secret_from_env is False
    assert secrets.verify_token is None
    assert secrets.access_token is None
    assert secrets.api_token is None
    assert secrets.missing() == ALL_VARS


def test_load_secrets_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*ALL_VARS, "WHATSAPP_APP_SECRET_PREVIOUS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WHATSAPP_APP_SECRET", "from-os-environ")
    secrets = load_secrets()
    assert secrets.app_secrets == ("from-os-environ",)
    assert secrets.mode == "sandbox"


def test_app_secret_from_environment_replaces_the_sandbox_secret() -> None:
    secrets = load_secrets({"WHATSAPP_APP_SECRET": "s3cret"})
    assert secrets.app_secrets == ("s3cret",)
    assert SANDBOX_APP_SECRET not in secrets.app_secrets
    assert secrets.app_secret_from_env is True
    assert secrets.mode == "sandbox"
    assert "WHATSAPP_APP_SECRET" not in secrets.missing()


def test_previous_app_secret_is_a_second_secret() -> None:
    secrets = load_secrets({"WHATSAPP_APP_SECRET": "new-secret", "WHATSAPP_APP_SECRET_PREVIOUS": "old-secret"})
    assert secrets.app_secrets == ("new-secret", "old-secret")


def test_previous_app_secret_alone_keeps_the_sandbox_secret_first() -> None:
    secrets = load_secrets({"WHATSAPP_APP_SECRET_PREVIOUS": "old-secret"})
    assert secrets.app_secrets == (SANDBOX_APP_SECRET, "old-secret")
    assert "WHATSAPP_APP_SECRET" in secrets.missing()


def test_production_with_everything_set() -> None:
    secrets = load_secrets(PROD)
    assert secrets.mode == "production"
    assert secrets.app_secrets == (PROD["WHATSAPP_APP_SECRET"],)
    assert secrets.verify_token == PROD["WHATSAPP_VERIFY_TOKEN"]
    assert secrets.access_token == PROD["WHATSAPP_ACCESS_TOKEN"]
    assert secrets.api_token == PROD["ALFRED_API_TOKEN"]
    assert secrets.missing() == []


@pytest.mark.parametrize("name", ["WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"])
@pytest.mark.parametrize("blank", [None, "", "   ", "\t\n"])
def test_production_requires_app_secret_and_verify_token(name: str, blank: str | None) -> None:
    env = dict(PROD)
    if blank is None:
        del env[name]
    else:
        env[name] = blank
    with pytest.raises(ConfigError) as info:
        load_secrets(env)
    message = str(info.value)
    assert message.startswith(f"{name} must be set")
    for value in PROD.values():
        assert value not in message


def test_production_does_not_require_the_api_token() -> None:
    env = {k: v for k, v in PROD.items() if k != "ALFRED_API_TOKEN"}
    secrets = load_secrets(env)
    assert secrets.mode == "production"
    assert secrets.missing() == ["ALFRED_API_TOKEN"]


def test_previous_secret_does_not_stand_in_for_the_app_secret_in_production() -> None:
    env = {k: v for k, v in PROD.items() if k != "WHATSAPP_APP_SECRET"}
    env["WHATSAPP_APP_SECRET_PREVIOUS"] = "old-secret"
    with pytest.raises(ConfigError, match=r"^WHATSAPP_APP_SECRET must be set"):
        load_secrets(env)


@pytest.mark.parametrize("blank", ["", " ", "\t", "\n  \n"])
def test_whitespace_only_values_count_as_unset(blank: str) -> None:
    env = {name: blank for name in [*ALL_VARS, "WHATSAPP_APP_SECRET_PREVIOUS"]}
    secrets = load_secrets(env)
    assert secrets.mode == "sandbox", "a blank access token must not switch to production"
    assert secrets.app_secrets == (SANDBOX_APP_SECRET,)
    assert secrets.missing() == ALL_VARS


def test_surrounding_whitespace_is_stripped() -> None:
    secrets = load_secrets({"WHATSAPP_APP_SECRET": "  s3cret\n", "WHATSAPP_VERIFY_TOKEN": " tok "})
    assert secrets.app_secrets == ("s3cret",)
    assert secrets.verify_token == "tok"


@pytest.mark.parametrize(
    "env",
    [
        PROD,
        {**PROD, "WHATSAPP_APP_SECRET_PREVIOUS": "previous-secret-value-3456"},
        {"WHATSAPP_APP_SECRET": "sandbox-env-secret-7777", "ALFRED_API_TOKEN": "api-token-8888"},
        {},
    ],
)
def test_repr_and_str_never_show_a_secret(env: dict[str, str]) -> None:
    secrets = load_secrets(env)
    shown = [repr(secrets), str(secrets), f"{secrets}", f"{secrets!r}", repr([secrets]), repr({"s": secrets})]
    values = [*env.values(), SANDBOX_APP_SECRET]
    for text in shown:
        assert "Secrets(mode=" in text
        assert secrets.mode in text
        for value in values:
            assert value not in text


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, ALL_VARS),
        ({"WHATSAPP_APP_SECRET": "a"}, ["WHATSAPP_VERIFY_TOKEN", "WHATSAPP_ACCESS_TOKEN", "ALFRED_API_TOKEN"]),
        ({"WHATSAPP_VERIFY_TOKEN": "v"}, ["WHATSAPP_APP_SECRET", "WHATSAPP_ACCESS_TOKEN", "ALFRED_API_TOKEN"]),
        ({"ALFRED_API_TOKEN": "t"}, ["WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN", "WHATSAPP_ACCESS_TOKEN"]),
        ({"WHATSAPP_APP_SECRET_PREVIOUS": "p"}, ALL_VARS),
        ({"WHATSAPP_APP_SECRET": "a", "WHATSAPP_VERIFY_TOKEN": "v"}, ["WHATSAPP_ACCESS_TOKEN", "ALFRED_API_TOKEN"]),
        ({k: v for k, v in PROD.items() if k != "ALFRED_API_TOKEN"}, ["ALFRED_API_TOKEN"]),
        (PROD, []),
    ],
)
def test_missing_lists_exactly_the_unset_variables(env: dict[str, str], missing: list[str]) -> None:
    assert load_secrets(env).missing() == missing


def test_secrets_are_immutable() -> None:
    secrets: Secrets = load_secrets(PROD)
    with pytest.raises(AttributeError):
        secrets.access_token = "other"  # type: ignore[misc]
