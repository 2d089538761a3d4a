"""Several nodes, the parts that need no shared database: roles, the rate share, the node list,
the storage settings and the privacy key every node must share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alfred_bot import cli
from alfred_bot.app import create_app
from alfred_bot.cluster import ClusterView
from alfred_bot.config import ConfigError, database_url, load_config, load_secrets, parse_config
from alfred_bot.outbound.ratelimit import SlidingWindowLimiter
from alfred_bot.privacy import KEY_ENV, KEY_FILE, install_key
from alfred_bot.security import url_where
from alfred_bot.store import SqliteStore, StoreError, describe
from tests.conftest import API_TOKEN, make_config


def test_the_database_url_comes_from_the_environment_first(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, storage={"path": str(tmp_path / "a.db"), "url": "postgresql://cfg-host/alfred"})
    assert database_url(cfg, {}) == "postgresql://cfg-host/alfred"
    assert database_url(cfg, {"ALFRED_DATABASE_URL": "postgresql://u:pw@env-host:6543/db"}).endswith("env-host:6543/db")
    assert database_url(make_config(tmp_path), {}) is None


def test_where_the_data_lives_is_said_without_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALFRED_DATABASE_URL", "postgresql://alfred:s3cret-pw@db.example:5432/alfred")
    said = describe(make_config(tmp_path))
    assert said == "PostgreSQL db.example:5432/alfred" and "s3cret" not in said and "alfred:" not in said
    monkeypatch.delenv("ALFRED_DATABASE_URL")
    assert describe(make_config(tmp_path)).startswith("SQLite ")


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"url": "mysql://x/y"}, "storage.url: must start with postgresql://"),
        ({"pool_size": 0}, "storage.pool_size: must be between 1 and 200"),
        ({"takeover_seconds": 1}, "storage.takeover_seconds: must be >= 3"),
    ],
)
def test_storage_settings_are_checked(storage: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"storage": storage})


@pytest.mark.parametrize("role", ["web", "worker"])
def test_a_split_role_needs_a_shared_database(tmp_path: Path, role: str) -> None:
    with pytest.raises(ConfigError, match=f"--role {role} needs a database shared"):
        create_app(make_config(tmp_path), load_secrets({}), role=role)
    with pytest.raises(ConfigError, match="--role: must be one of"):
        create_app(make_config(tmp_path), load_secrets({}), role="leader")


def test_the_command_line_offers_the_roles() -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--role", "boss"])
    assert exit_.value.code == 2


def test_an_equal_share_of_the_rate_per_sending_node() -> None:
    limiter = SlidingWindowLimiter(80)
    assert limiter.capacity == 80
    limiter.split(2)
    assert limiter.capacity == 40
    limiter.split(3)
    assert limiter.capacity == 26  # floor: three nodes never exceed 80 together
    limiter.split(0)
    assert limiter.capacity == 80


async def test_the_view_counts_sending_nodes_and_hands_the_share_on(tmp_path: Path) -> None:
    shares: list[int] = []
    store = SqliteStore(tmp_path / "alfred.db")
    await store.open()
    try:
        view = ClusterView(store, on_share=shares.append)
        await view.refresh()
        assert [n["id"] for n in view.nodes] == [store.node.id] and view.senders == 1 and shares == [1]
    finally:
        await store.close()


async def test_a_failed_read_keeps_the_last_node_list(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "alfred.db")
    await store.open()
    view = ClusterView(store)
    await view.refresh()
    await store.close()
    known = view.nodes

    class Broken(SqliteStore):
        async def nodes(self) -> list[dict[str, Any]]:
            raise StoreError("database unreachable")

    view = ClusterView(Broken(tmp_path / "b.db"))
    view.nodes = known
    await view.refresh()
    assert view.nodes == known


async def test_the_status_shows_this_node_and_hides_its_host_from_the_open_view(client: Any) -> None:
    data = await (await client.get("/status.json")).json()
    assert data["role"] == "all"
    [node] = data["nodes"]
    assert node["alive"] is True and node["role"] == "all" and "host" not in node and "id" not in node
    detailed = await (await client.get("/status.json", headers={"Authorization": f"Bearer {API_TOKEN}"})).json()
    assert {"id", "host", "pid"} <= set(detailed["nodes"][0])
    page = await (await client.get("/")).text()
    assert "1 alive: all" in page


def test_nodes_share_the_privacy_key_from_the_environment(tmp_path: Path) -> None:
    key = "ab" * 32
    assert install_key(tmp_path, {KEY_ENV: key}) == bytes.fromhex(key)
    assert not (tmp_path / KEY_FILE).exists()  # nothing written: the key lives in the environment
    assert install_key(tmp_path, {}) != bytes.fromhex(key)  # without it: this node's own file
    with pytest.raises(ConfigError, match=KEY_ENV):
        install_key(tmp_path, {KEY_ENV: "not-hex"})
    with pytest.raises(ConfigError, match=KEY_ENV):
        install_key(tmp_path, {KEY_ENV: "abcd"})


def test_the_storage_settings_of_a_config_file_are_kept(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[storage]\npath = "data/a.db"\nurl = "postgresql://db.internal/alfred"\npool_size = 4\n'
        'takeover_seconds = 9\n[tenants.home]\nphone_number_id = "1234567890"\n'
    )
    storage = load_config(config).storage
    assert storage.path == str(tmp_path / "data/a.db")  # anchored to the file, as before
    assert (storage.url, storage.pool_size, storage.takeover_seconds) == ("postgresql://db.internal/alfred", 4, 9)


def test_a_url_is_logged_without_any_password() -> None:
    for url in (
        "postgresql://alfred:s3cret@db.internal:5432/alfred",
        "redis://db.internal:6379/0?password=s3cret",
        "postgresql://db.internal/alfred?user=a&password=s3cret",
    ):
        assert "s3cret" not in url_where(url) and url_where(url).startswith("db.internal")
