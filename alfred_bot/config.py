"""Configuration: a tree of msgspec structs decoded from TOML, plus secrets from the environment.

Why structs and not dicts: every key is known, typed and documented in one place, an unknown
key is an error (a typo must not silently fall back to a default), and every error names the
key so an operator can fix the file without reading a traceback.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets as secrets_module
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import msgspec

from alfred_bot.media import DEFAULT_DOWNLOAD_HOSTS

#: Fallback sandbox secret for callers that pass none (tests). `python main.py` instead uses a
#: random per-install secret kept in the data folder (`sandbox_secret`), which `simulate` reads.
SANDBOX_APP_SECRET = "alfred-sandbox-app-secret"  # noqa: S105 (public by design, tests only)
SANDBOX_SECRET_FILE = "sandbox-app-secret"  # noqa: S105 (a file name)

_DIGITS = re.compile(r"^[0-9]{5,20}$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,100}")
_HOST_PATTERN = re.compile(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]{1,253}")
_TEMPLATE_NAME = re.compile(r"[a-z0-9_]{1,512}")  # Meta: lower case letters, digits, underscores
_LANGUAGE = re.compile(r"[a-z]{2,3}(_[A-Za-z]{2,4})?")


class ConfigError(Exception):
    """A configuration problem, with a one-line message that names the key."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class ServerConfig(_Section, frozen=True):
    """Where the HTTP server listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Host names (or addresses) this server answers to; any other `Host` header gets 421, which
    #: defeats DNS rebinding. Empty: no check. Loopback names and `host` itself are always accepted.
    public_hosts: list[str] = msgspec.field(default_factory=list)


class StorageConfig(_Section, frozen=True):
    """Where data lives. `path`: the SQLite database (relative paths are relative to the config
    file), and beside it the local files every engine keeps (privacy key, media). `url`: a
    PostgreSQL database shared by several nodes instead (`ALFRED_DATABASE_URL` wins: a URL with a
    password belongs in the environment, not in this file)."""

    path: str = "data/alfred.db"
    url: str = ""
    #: Connections per process to PostgreSQL (the webhook, the dispatcher and the senders share them).
    pool_size: int = 10
    #: A node silent this long loses its leased messages and sends to the others.
    takeover_seconds: float = 15.0


class GraphConfig(_Section, frozen=True):
    """The Graph API endpoint the senders talk to."""

    base_url: str = "https://graph.facebook.com"
    api_version: str = "v23.0"
    timeout_seconds: float = 10.0


#: Meta's highest per-number throughput ("up to 1,000 messages per second" after the upgrade).
META_MAX_RATE = 1000.0
#: The Graph API latency the automatic sender pool covers at full rate (measured p95 ~ 0.1-0.2 s).
SEND_LATENCY_BUDGET = 0.25
#: The most senders `outbound.workers = 0` gives one number: META_MAX_RATE x SEND_LATENCY_BUDGET.
MAX_AUTO_WORKERS = 250


class OutboundConfig(_Section, frozen=True):
    """Outbound pacing (Meta's default is 80 messages/s per phone number), retries and pauses."""

    rate_per_second: float = 80.0
    workers: int = 0  # 0: enough for rate x 0.25 s of latency (at least 4, at most MAX_AUTO_WORKERS)
    max_attempts: int = 10
    max_age_seconds: float = 86400.0
    unknown_max_attempts: int = 3
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 300.0
    #: AIMD after 130429 / 4 / 80007: the rate is multiplied by this (once per window) ...
    slow_down_factor: float = 0.5
    #: ... and climbs back linearly to the full rate over this many seconds of success.
    slow_down_seconds: float = 5.0
    probe_interval_seconds: float = 60.0
    pair_burst: int = 45
    pair_interval_seconds: float = 6.0
    #: Read receipts (with their typing indicator) older than this are dropped, not sent.
    receipt_max_age_seconds: float = 5.0
    #: Receipts take slots of the number's rate (only spare ones: replies always go first).
    receipts_use_budget: bool = True

    def worker_count(self, tenants: int) -> int:
        """Senders needed so that Graph latency never caps throughput: rate x tenants x 0.25 s,
        the rate counted up to Meta's highest per-number tier (1,000 msg/s): a higher configured
        rate cannot be delivered by Meta, and 25,000 idle tasks (~38 MB) would buy nothing."""
        if self.workers:
            return self.workers
        rate = min(self.rate_per_second, META_MAX_RATE) * tenants
        return max(4, min(MAX_AUTO_WORKERS * tenants, math.ceil(rate * SEND_LATENCY_BUDGET)))


class WebhookConfig(_Section, frozen=True):
    """Limits on the webhook request (Meta sends bodies up to 3 MB)."""

    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_seconds: float = 10.0
    max_inflight_bytes: int = 32 * 1024 * 1024
    max_inflight_per_peer: int = 8 * 1024 * 1024  # one remote address may hold this much of the above
    client_ip_header: str = ""  # behind a proxy that sets it (e.g. Fly-Client-IP): the peer for the cap above


class DispatchConfig(_Section, frozen=True):
    """The inbound dispatcher: queue bound, handler workers and what to say when a handler fails."""

    #: Handlers that wait (on an agent platform, a database, an API) need one worker per message
    #: waiting: 50 msg/s to an agent answering in 2 s keep 100 busy. Four made a 1 s agent a
    #: limit of 4 msg/s (replies a minute late at the guide's load); an idle worker costs ~1.5 KB.
    #: Fewer run while the process is busy (admission.py).
    workers: int = 100
    queue_size: int = 1000
    handler_timeout_seconds: float = 30.0
    shutdown_grace_seconds: float = 5.0
    fallback_text: str = "Sorry, something went wrong on our side. Please try again in a moment."
    #: Workers one tenant may hold at once; 0: workers - (tenants - 1), at least 1, so every other
    #: tenant always finds a free worker however slow this tenant's handlers (or orchestrator) are.
    max_workers_per_tenant: int = 0

    def tenant_cap(self, tenants: int, running: int | None = None) -> int:
        """How many workers one tenant may occupy (see `max_workers_per_tenant`), of `running`
        allowed to run now (default: all of them)."""
        workers = self.workers if running is None else running
        if self.max_workers_per_tenant:
            return min(self.max_workers_per_tenant, workers)
        return max(1, workers - (tenants - 1))


class HandlersConfig(_Section, frozen=True):
    """Which module of handlers/ answers tenants that do not choose their own."""

    default: str = "echo"


class LoggingConfig(_Section, frozen=True):
    """Log verbosity and format (JSON lines for machines, text for a terminal)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    # third-party loggers (aiosqlite logs query parameters at DEBUG): never more verbose than this
    library_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class OrchestratorConfig(_Section, frozen=True):
    """The agent platform text messages are forwarded to (off while `url` is empty)."""

    url: str = ""
    timeout_seconds: float = 8.0
    retries: int = 1
    api_key_env: str = "ORCHESTRATOR_API_KEY"
    fallback_text: str = "Lo siento, no pude procesar tu mensaje."
    max_answer_bytes: int = 65536  # a larger answer is a failure (the fallback is sent)
    max_parts: int = 4  # WhatsApp messages one answer may become; the rest is cut with "…"


class LimitsConfig(_Section, frozen=True):
    """Inbound limits and consent: a per-user inbound limit and the opt-out words and button payloads."""

    inbound_per_user: int = 20  # messages per window; 0 turns the limit off
    inbound_window_seconds: float = 60.0
    limit_notice: str = "You are sending messages very quickly. I will answer again in a minute."
    opt_out_keywords: list[str] = msgspec.field(default_factory=lambda: ["STOP"])
    opt_out_payloads: list[str] = msgspec.field(default_factory=list)
    opt_out_reply: str = "You will not get messages from us any more. Write to us again any time to resume."


class MediaConfig(_Section, frozen=True):
    """Where downloaded media lands and how long it stays (empty path: `media/` beside the database)."""

    path: str = ""
    retention_days: float = 30.0
    max_download_bytes: int = 100 * 1024 * 1024
    max_upload_bytes: int = 16 * 1024 * 1024  # POST /api/media holds the file in memory: keep it modest
    # hosts the access token may be sent to for a download (plus graph.base_url's host); `*.` = subdomains
    download_hosts: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_DOWNLOAD_HOSTS))


class RetentionConfig(_Section, frozen=True):
    """Personal data: scrubbed (texts removed, numbers pseudonymised) after hot_days, rows deleted after delete_days."""

    hot_days: float = 30.0
    delete_days: float = 90.0
    interval_seconds: float = 3600.0
    #: `s3://bucket/prefix`: rows are copied there (gzip JSON lines) before they are scrubbed;
    #: empty: scrubbed without a copy. Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY only.
    archive_url: str = ""
    #: S3-compatible endpoint (MinIO, R2, a local test server), e.g. `https://ACCOUNT.r2.cloudflarestorage.com`;
    #: empty: AWS S3 itself.
    archive_endpoint: str = ""
    archive_region: str = "us-east-1"


#: A bucket name as S3 allows it, then an optional prefix of S3's "safe" characters.
_ARCHIVE_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?")


class TenantConfig(_Section, frozen=True):
    """One WhatsApp business phone number served by this process.

    `access_token_env` / `app_secret_env` name environment variables holding this number's own
    credentials (numbers of different Meta apps or businesses); unset, the global ones apply.
    """

    phone_number_id: str
    handler: str | None = None
    access_token_env: str | None = None
    app_secret_env: str | None = None
    waba_id: str | None = None  # the WhatsApp Business Account: account-level webhooks name only this
    #: IANA time zone of this number's users (e.g. "Europe/Madrid"): how handlers read "at 18:30".
    timezone: str = "UTC"
    #: An approved template with one body parameter (the thing to remember) for reminders that come
    #: due outside the 24-hour window; unset: such reminders are refused up front.
    reminder_template: str | None = None
    reminder_template_language: str = "en_US"


class RedisConfig(_Section, frozen=True):
    """The Redis of the event bus and of the pacing shared by every node (issue 16). Empty `url`
    (and no `ALFRED_REDIS_URL`, which wins: a URL with a password belongs in the environment):
    no Redis, nothing changes."""

    url: str = ""
    ingest_stream: str = "alfred-ingest"
    outbox_stream: str = "alfred-outbox"
    dead_stream: str = "alfred-outbox-dead"
    events_stream: str = "alfred-events"
    group: str = "alfred"
    #: `XADD … MAXLEN ~ n` on every stream Alfred writes: Redis keeps about this many entries each.
    maxlen: int = 100_000
    #: An `alfred-outbox` entry a consumer has held this long without acknowledging it (the node
    #: died) is taken over by another node (XAUTOCLAIM).
    claim_idle_seconds: float = 5.0


class ScheduleConfig(_Section, frozen=True):
    """Scheduled sends: how often a sending node looks for sends whose time has come."""

    interval_seconds: float = 1.0


class TemplatesConfig(_Section, frozen=True):
    """Syncing each tenant's message templates (tenants with a `waba_id`) from the Graph API."""

    sync_interval_seconds: float = 300.0  # a full re-list this often (Meta: 200 management calls/h/app/WABA)
    event_poll_seconds: float = 2.0  # how often the template webhooks seen are checked, to re-list at once


class CampaignsConfig(_Section, frozen=True):
    """Campaigns: how recipients are taken in (memory stays bounded by `batch_size`)."""

    batch_size: int = 500  # recipients per transaction
    max_recipients: int = 1_000_000  # per campaign
    max_upload_bytes: int = 64 * 1024 * 1024  # a CSV upload (spooled to disk) or a JSON body


def _campaign_checks(cfg: Config) -> list[tuple[bool, str]]:
    return [
        (cfg.templates.sync_interval_seconds >= 1, "templates.sync_interval_seconds: must be >= 1"),
        (cfg.templates.event_poll_seconds > 0, "templates.event_poll_seconds: must be > 0"),
        (1 <= cfg.campaigns.batch_size <= 10_000, "campaigns.batch_size: must be between 1 and 10000"),
        (cfg.campaigns.max_recipients >= 1, "campaigns.max_recipients: must be at least 1"),
        (cfg.campaigns.max_upload_bytes >= 1024, "campaigns.max_upload_bytes: must be at least 1024"),
    ]


class Config(_Section, frozen=True):
    """The whole configuration file."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    graph: GraphConfig = msgspec.field(default_factory=GraphConfig)
    outbound: OutboundConfig = msgspec.field(default_factory=OutboundConfig)
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    dispatch: DispatchConfig = msgspec.field(default_factory=DispatchConfig)
    handlers: HandlersConfig = msgspec.field(default_factory=HandlersConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    orchestrator: OrchestratorConfig = msgspec.field(default_factory=OrchestratorConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    media: MediaConfig = msgspec.field(default_factory=MediaConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    # sections: scheduled sends
    schedule: ScheduleConfig = msgspec.field(default_factory=ScheduleConfig)
    # sections: campaigns and templates
    templates: TemplatesConfig = msgspec.field(default_factory=TemplatesConfig)
    campaigns: CampaignsConfig = msgspec.field(default_factory=CampaignsConfig)
    # sections: event bus
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    tenants: dict[str, TenantConfig] = msgspec.field(default_factory=dict)

    def handler_for(self, tenant: str) -> str:
        """The handlers/ module that answers `tenant`."""
        return self.tenants[tenant].handler or self.handlers.default

    def media_dir(self) -> Path:
        """The folder downloaded media goes to."""
        return Path(self.media.path) if self.media.path else Path(self.storage.path).parent / "media"

    def tenant_by_phone_number_id(self) -> dict[str, str]:
        """Map Meta's phone_number_id to our tenant name, for routing inbound updates."""
        return {t.phone_number_id: name for name, t in self.tenants.items()}

    def tenant_by_waba_id(self) -> dict[str, str]:
        """Map a WhatsApp Business Account id to the ONE tenant that names it.

        Account-level webhooks (account, template and quality updates) carry the WABA id in
        `entry.id` and no phone number id; they belong to a tenant only when no other tenant
        shares that account (several numbers of one WABA keep them account-wide).
        """
        owners: dict[str, list[str]] = {}
        for name, t in self.tenants.items():
            if t.waba_id is not None:
                owners.setdefault(t.waba_id, []).append(name)
        return {waba: names[0] for waba, names in owners.items() if len(names) == 1}


@dataclass(frozen=True, slots=True)
class Secrets:
    """Credentials, read from the environment only. `repr` never shows their values.

    `app_secrets` and `access_token` are the global ones; `tenant_app_secrets` and
    `tenant_tokens` hold a tenant's own (from `access_token_env` / `app_secret_env`), which are
    used for that tenant's number only and verify only its webhooks.
    """

    app_secrets: tuple[str, ...]
    verify_token: str | None
    access_token: str | None
    api_token: str | None
    app_secret_from_env: bool
    tenant_tokens: Mapping[str, str] = field(default_factory=dict)
    tenant_app_secrets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    orchestrator_key: str | None = None

    @property
    def mode(self) -> Literal["production", "sandbox"]:
        """Production sends to Meta; sandbox keeps replies local (no access token)."""
        return "production" if self.access_token or self.tenant_tokens else "sandbox"

    def token_for(self, tenant: str) -> str | None:
        """The access token that sends for `tenant`: its own, else the global one."""
        return self.tenant_tokens.get(tenant) or self.access_token

    def values(self) -> list[str]:
        """Every secret value (for redaction and for tests that scan output for leaks)."""
        found = [*self.app_secrets, *self.tenant_tokens.values()]
        for pair in self.tenant_app_secrets.values():
            found += pair
        found += [v for v in (self.verify_token, self.access_token, self.api_token, self.orchestrator_key) if v]
        return found

    def missing(self) -> list[str]:
        """Names of the environment variables that are not set, for the start-up log."""
        pairs = [
            ("WHATSAPP_APP_SECRET", self.app_secret_from_env),
            ("WHATSAPP_VERIFY_TOKEN", self.verify_token is not None),
            ("WHATSAPP_ACCESS_TOKEN", self.access_token is not None or bool(self.tenant_tokens)),
            ("ALFRED_API_TOKEN", self.api_token is not None),
        ]
        return [name for name, present in pairs if not present]

    def __repr__(self) -> str:
        return f"Secrets(mode={self.mode!r}, missing={self.missing()!r})"


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def database_url(cfg: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The PostgreSQL URL this process should use, or None for the embedded SQLite database."""
    env = os.environ if environ is None else environ
    return _env(env, "ALFRED_DATABASE_URL") or cfg.storage.url or None


def redis_url(cfg: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The Redis URL of the event bus and shared pacing, or None (no Redis: nothing changes)."""
    env = os.environ if environ is None else environ
    return _env(env, "ALFRED_REDIS_URL") or cfg.redis.url or None


def sandbox_secret(storage_path: str | Path) -> str:
    """The random sandbox app secret of this install, created (mode 0600) beside the database.

    Why not a constant: anyone who can reach the port could then sign webhooks. The file is
    shared with `python main.py simulate`, which reads the same config.
    """
    path = Path(storage_path).parent / SANDBOX_SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets_module.token_hex(32))
    return path.read_text(encoding="ascii").strip()


def load_secrets(
    environ: Mapping[str, str] | None = None, *, sandbox: str = SANDBOX_APP_SECRET, cfg: Config | None = None
) -> Secrets:
    """Read credentials from the environment (with `cfg`, also each tenant's own variables).

    `<NAME>_PREVIOUS` (e.g. `WHATSAPP_APP_SECRET_PREVIOUS`) lets two app secrets verify webhooks
    while one is rotated. Production (any access token is set) refuses to start unless every
    tenant has a token and an app secret and the verify token is set: otherwise some webhooks
    could not be verified, or some replies could not be sent.
    """
    env = os.environ if environ is None else environ
    secret = _env(env, "WHATSAPP_APP_SECRET")
    tokens: dict[str, str] = {}
    app_secrets: dict[str, tuple[str, ...]] = {}
    for name, tenant in (cfg.tenants if cfg else {}).items():
        if tenant.access_token_env and (token := _env(env, tenant.access_token_env)):
            tokens[name] = token
        if tenant.app_secret_env and (own := _pair(env, tenant.app_secret_env)):
            app_secrets[name] = own
    secrets = Secrets(
        app_secrets=tuple(s for s in (secret or sandbox, _env(env, "WHATSAPP_APP_SECRET_PREVIOUS")) if s),
        verify_token=_env(env, "WHATSAPP_VERIFY_TOKEN"),
        access_token=_env(env, "WHATSAPP_ACCESS_TOKEN"),
        api_token=_env(env, "ALFRED_API_TOKEN"),
        app_secret_from_env=secret is not None,
        tenant_tokens=tokens,
        tenant_app_secrets=app_secrets,
        orchestrator_key=_env(env, cfg.orchestrator.api_key_env) if cfg else None,
    )
    if secrets.mode == "production":
        _check_production(secrets, cfg)
    return secrets


def _pair(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """The secret in `name` and, while rotating, the one in `name_PREVIOUS`."""
    return tuple(s for s in (_env(env, name), _env(env, f"{name}_PREVIOUS")) if s)


def _check_production(secrets: Secrets, cfg: Config | None) -> None:
    tenants = cfg.tenants if cfg else {}
    global_secret_needed = cfg is None or any(not t.app_secret_env for t in tenants.values())
    if global_secret_needed and not secrets.app_secret_from_env:
        raise ConfigError("WHATSAPP_APP_SECRET must be set when an access token is (production mode)")
    if secrets.verify_token is None:
        raise ConfigError("WHATSAPP_VERIFY_TOKEN must be set when an access token is (production mode)")
    for name, tenant in tenants.items():
        if tenant.access_token_env and name not in secrets.tenant_tokens:  # never fall back to another token
            raise ConfigError(f"tenants.{name}: no access token: set {tenant.access_token_env} (production mode)")
        if secrets.token_for(name) is None:
            raise ConfigError(f"tenants.{name}: no access token: set WHATSAPP_ACCESS_TOKEN (production mode)")
        if tenant.app_secret_env and name not in secrets.tenant_app_secrets:
            raise ConfigError(f"tenants.{name}: no app secret: set {tenant.app_secret_env} (production mode)")


def _join(path: str, key: object) -> str:
    """`server` + `port` -> `server.port`, the way an operator writes the key."""
    return f"{path}.{key}" if path else str(key)


def _convert(value: Any, kind: Any, path: str) -> Any:
    """Convert `value` to `kind` with msgspec, or raise `ConfigError` naming the key at fault.

    msgspec's `ValidationError` has its location only inside the message ("- at `$.a.b`"; no
    structured path as of 0.22, see github.com/msgspec/msgspec issues 264 and 1158), and parsing
    that text broke on keys or values containing " - at ". So tables and lists are walked here,
    naming each key as we go, and msgspec converts only the leaves, whose errors are about the
    value itself ("Expected `int`, got `str`").
    """
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct) and isinstance(value, dict):
        return _convert_table(value, kind, path)
    if get_origin(kind) is list and isinstance(value, list):
        (item,) = get_args(kind)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise ConfigError(f"{path or '(top level)'}: {text[:1].lower()}{text[1:]}") from None


def _convert_table(table: dict[Any, Any], kind: type[msgspec.Struct], path: str) -> Any:
    """One section: keys in file order (the first bad one is reported), then the missing ones."""
    specs = {spec.encode_name: spec for spec in msgspec.structs.fields(kind)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        spec = specs.get(key)
        if spec is None:
            raise ConfigError(f"{_join(path, key)}: unknown key")
        values[spec.name] = _convert(value, spec.type, _join(path, key))
    for spec in specs.values():
        if spec.required and spec.name not in values:
            raise ConfigError(f"{_join(path, spec.encode_name)}: required key is missing")
    return kind(**values)


def _check(cfg: Config) -> None:
    """Cross-field checks msgspec's types cannot express, each naming its key."""
    checks: list[tuple[bool, str]] = [
        (1 <= cfg.server.port <= 65535, "server.port: must be between 1 and 65535"),
        (bool(cfg.storage.path.strip()), "storage.path: must not be empty"),
        (
            not cfg.storage.url or cfg.storage.url.startswith(("postgresql://", "postgres://")),
            "storage.url: must start with postgresql:// (empty: SQLite at storage.path)",
        ),
        (1 <= cfg.storage.pool_size <= 200, "storage.pool_size: must be between 1 and 200"),
        (cfg.storage.takeover_seconds >= 3, "storage.takeover_seconds: must be >= 3"),
        (cfg.graph.base_url.startswith(("http://", "https://")), "graph.base_url: must start with http:// or https://"),
        (re.fullmatch(r"v\d+\.\d+", cfg.graph.api_version) is not None, "graph.api_version: must look like v23.0"),
        (cfg.graph.timeout_seconds > 0, "graph.timeout_seconds: must be > 0"),
        (cfg.outbound.rate_per_second > 0, "outbound.rate_per_second: must be > 0"),
        (cfg.outbound.workers >= 0, "outbound.workers: must be >= 0 (0 = automatic)"),
        (cfg.outbound.max_attempts >= 1, "outbound.max_attempts: must be at least 1"),
        (cfg.outbound.unknown_max_attempts >= 1, "outbound.unknown_max_attempts: must be at least 1"),
        (cfg.outbound.max_age_seconds > 0, "outbound.max_age_seconds: must be > 0"),
        (
            0 < cfg.outbound.backoff_base_seconds <= cfg.outbound.backoff_cap_seconds,
            "outbound.backoff_base_seconds: must be > 0 and <= outbound.backoff_cap_seconds",
        ),
        (0 < cfg.outbound.slow_down_factor <= 1, "outbound.slow_down_factor: must be in (0, 1]"),
        (cfg.outbound.slow_down_seconds > 0, "outbound.slow_down_seconds: must be > 0"),
        (cfg.outbound.receipt_max_age_seconds > 0, "outbound.receipt_max_age_seconds: must be > 0"),
        (cfg.outbound.probe_interval_seconds > 0, "outbound.probe_interval_seconds: must be > 0"),
        (cfg.outbound.pair_burst >= 1, "outbound.pair_burst: must be at least 1"),
        (cfg.outbound.pair_interval_seconds > 0, "outbound.pair_interval_seconds: must be > 0"),
        (cfg.webhook.max_body_bytes >= 1024, "webhook.max_body_bytes: must be at least 1024"),
        (cfg.webhook.body_timeout_seconds > 0, "webhook.body_timeout_seconds: must be > 0"),
        (
            cfg.webhook.max_inflight_bytes >= cfg.webhook.max_body_bytes,
            "webhook.max_inflight_bytes: must be at least webhook.max_body_bytes",
        ),
        (
            cfg.webhook.max_inflight_per_peer >= cfg.webhook.max_body_bytes,
            "webhook.max_inflight_per_peer: must be at least webhook.max_body_bytes",
        ),
        (
            not cfg.webhook.client_ip_header or _HEADER_NAME.fullmatch(cfg.webhook.client_ip_header) is not None,
            "webhook.client_ip_header: must be a header name like Fly-Client-IP",
        ),
        (cfg.dispatch.workers >= 1, "dispatch.workers: must be at least 1"),
        (cfg.dispatch.queue_size >= 1, "dispatch.queue_size: must be at least 1"),
        (cfg.dispatch.handler_timeout_seconds > 0, "dispatch.handler_timeout_seconds: must be > 0"),
        (cfg.dispatch.shutdown_grace_seconds >= 0, "dispatch.shutdown_grace_seconds: must be >= 0"),
        (
            0 <= cfg.dispatch.max_workers_per_tenant <= cfg.dispatch.workers,
            "dispatch.max_workers_per_tenant: must be between 0 (automatic) and dispatch.workers",
        ),
        (
            all(_host_ok(h) for h in cfg.server.public_hosts),
            "server.public_hosts: give host names or IP addresses only (no scheme, port or path)",
        ),
        (bool(cfg.tenants), "tenants: at least one [tenants.NAME] section with a phone_number_id is required"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_tenants(cfg)
    _check_sections(cfg)
    _check_schedule(cfg)


def _host_ok(host: str) -> bool:
    """A host name or an IP address (IPv6 with or without brackets), with no scheme, port or path."""
    if ":" not in host:
        return _HOSTNAME.fullmatch(host) is not None
    try:
        ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _check_tenants(cfg: Config) -> None:
    seen: dict[str, str] = {}
    for name, tenant in cfg.tenants.items():
        if not _NAME.match(name):
            raise ConfigError(f"tenants.{name}: tenant names use letters, digits, '-' and '_' only")
        if not _DIGITS.match(tenant.phone_number_id):
            raise ConfigError(f"tenants.{name}.phone_number_id: must be Meta's numeric phone number id")
        if tenant.phone_number_id in seen:
            raise ConfigError(f"tenants.{name}.phone_number_id: already used by tenants.{seen[tenant.phone_number_id]}")
        seen[tenant.phone_number_id] = name
        if tenant.waba_id is not None and not _DIGITS.match(tenant.waba_id):
            raise ConfigError(f"tenants.{name}.waba_id: must be Meta's numeric WhatsApp Business Account id")
        for key in ("access_token_env", "app_secret_env"):
            value = getattr(tenant, key)
            if value is not None and not _ENV_NAME.fullmatch(value):
                raise ConfigError(f"tenants.{name}.{key}: must be an environment variable name like BIZ_TOKEN")


def _check_schedule(cfg: Config) -> None:
    """Scheduled sends and reminders: the promoter's interval, each tenant's time zone and template."""
    if not 0 < cfg.schedule.interval_seconds <= 60:
        raise ConfigError("schedule.interval_seconds: must be > 0 and at most 60")
    for name, tenant in cfg.tenants.items():
        try:
            zoneinfo.ZoneInfo(tenant.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"tenants.{name}.timezone: unknown time zone {tenant.timezone!r} (an IANA name like "
                              '"Europe/Madrid" or "UTC")') from None  # fmt: skip
        if tenant.reminder_template is not None and not _TEMPLATE_NAME.fullmatch(tenant.reminder_template):
            raise ConfigError(f"tenants.{name}.reminder_template: must be a template name (lower case, digits, _)")
        if not _LANGUAGE.fullmatch(tenant.reminder_template_language):
            raise ConfigError(f"tenants.{name}.reminder_template_language: must be a language code like en_US")


def _check_sections(cfg: Config) -> None:
    """Checks of the orchestrator, limits and media sections."""
    orch, limits = cfg.orchestrator, cfg.limits
    checks: list[tuple[bool, str]] = [
        (
            not orch.url or orch.url.startswith(("http://", "https://")),
            "orchestrator.url: must start with http:// or https://",
        ),
        (orch.timeout_seconds > 0, "orchestrator.timeout_seconds: must be > 0"),
        (0 <= orch.retries <= 5, "orchestrator.retries: must be between 0 and 5"),
        (
            not orch.url or (orch.retries + 1) * orch.timeout_seconds < cfg.dispatch.handler_timeout_seconds,
            "orchestrator.timeout_seconds: (retries + 1) x timeout must stay below dispatch.handler_timeout_seconds",
        ),
        (_ENV_NAME.fullmatch(orch.api_key_env) is not None, "orchestrator.api_key_env: must be a variable name"),
        (1024 <= orch.max_answer_bytes <= 16 * 1024 * 1024, "orchestrator.max_answer_bytes: must be 1024 to 16777216"),
        (1 <= orch.max_parts <= 100, "orchestrator.max_parts: must be between 1 and 100"),
        (limits.inbound_per_user >= 0, "limits.inbound_per_user: must be >= 0 (0 = no limit)"),
        (limits.inbound_window_seconds > 0, "limits.inbound_window_seconds: must be > 0"),
        (all(k.strip() for k in limits.opt_out_keywords), "limits.opt_out_keywords: must not contain empty words"),
        (cfg.media.retention_days > 0, "media.retention_days: must be > 0"),
        (cfg.media.max_download_bytes >= 1024, "media.max_download_bytes: must be at least 1024"),
        (cfg.media.max_upload_bytes >= 1024, "media.max_upload_bytes: must be at least 1024"),
        (
            all(_HOST_PATTERN.fullmatch(h) for h in cfg.media.download_hosts),
            "media.download_hosts: each entry must be a host name like lookaside.fbsbx.com or *.fbsbx.com",
        ),
        (cfg.retention.hot_days >= 1, "retention.hot_days: must be at least 1"),
        (
            cfg.retention.delete_days >= max(8.0, cfg.retention.hot_days),
            "retention.delete_days: must be at least 8 (Meta redelivers for 7 days) and at least hot_days",
        ),
        (cfg.retention.interval_seconds > 0, "retention.interval_seconds: must be > 0"),
        *_redis_checks(cfg.redis),
        *_campaign_checks(cfg),
        (
            not cfg.retention.archive_url or _ARCHIVE_URL.fullmatch(cfg.retention.archive_url) is not None,
            "retention.archive_url: must look like s3://bucket or s3://bucket/prefix (letters, digits, /._-!*'())",
        ),
        (
            not cfg.retention.archive_endpoint or cfg.retention.archive_endpoint.startswith(("http://", "https://")),
            "retention.archive_endpoint: must start with http:// or https:// (empty: AWS S3)",
        ),
        (
            re.fullmatch(r"[a-z0-9-]{1,32}", cfg.retention.archive_region) is not None,
            "retention.archive_region: must be a region name like us-east-1 (auto for R2)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


_STREAM = re.compile(r"[A-Za-z0-9_.:{}-]{1,200}")


def _redis_checks(r: RedisConfig) -> list[tuple[bool, str]]:
    """The `[redis]` section's checks (the event bus)."""
    streams = {"ingest_stream": r.ingest_stream, "outbox_stream": r.outbox_stream, "dead_stream": r.dead_stream}
    streams["events_stream"] = r.events_stream
    checks = [(_STREAM.fullmatch(v) is not None, f"redis.{k}: must be a stream name (letters, digits, _.:{{}}-)")
              for k, v in streams.items()]
    return [
        *checks,
        (not r.url or r.url.startswith(("redis://", "rediss://", "unix://")), "redis.url: must start with redis://"),
        (len(set(streams.values())) == len(streams), "redis: the four stream names must differ"),
        (_STREAM.fullmatch(r.group) is not None, "redis.group: must be a consumer group name (letters, digits, _.:-)"),
        (r.maxlen >= 1000, "redis.maxlen: must be at least 1000"),
        (r.claim_idle_seconds >= 0.5, "redis.claim_idle_seconds: must be at least 0.5"),
    ]


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a decoded TOML document into a `Config`, or raise `ConfigError` naming the key."""
    data = dict(data)  # never change the caller's document
    tenants_raw = data.pop("tenants", {})
    cfg: Config = _convert(data, Config, "")
    if not isinstance(tenants_raw, dict):
        raise ConfigError("tenants: must be a table of [tenants.NAME] sections")
    tenants = {name: _convert(body, TenantConfig, f"tenants.{name}") for name, body in tenants_raw.items()}
    cfg = msgspec.structs.replace(cfg, tenants=tenants)
    _check(cfg)
    return cfg


def load_config(path: Path) -> Config:
    """Read and validate the TOML file at `path`; relative storage paths are anchored to it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    cfg = parse_config(data)
    base = path.resolve().parent
    storage = msgspec.structs.replace(cfg.storage, path=str(base / cfg.storage.path))  # absolute stays as is
    media = msgspec.structs.replace(cfg.media, path=str(base / cfg.media.path) if cfg.media.path else "")
    return msgspec.structs.replace(cfg, storage=storage, media=media)
