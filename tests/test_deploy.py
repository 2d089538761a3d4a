"""deploy/: the Prometheus alert rules, the Grafana dashboard, the Alertmanager routes, the Fly.io
configurations and the archive bucket's policy and lifecycle.

Both must parse, use only metrics Alfred exports (checked against the brief's list and against
the real app's GET /metrics), and the rules must pass `promtool check rules` and behave as their
names say under `promtool test rules` (series in, alerts out). The dashboard's queries are checked
by promtool too, as recording rules. Without promtool these tests skip locally and fail under CI,
where `.ci/run` installs it (Debian's `prometheus` package); the same goes for amtool (Debian's
`prometheus-alertmanager`), which checks `alertmanager.yml` and where each alert is routed.
The Fly.io files are checked against what the app really does: the port it listens on, the health
and metrics paths it serves, the signal it drains on, the roles its command line accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
ALERTMANAGER = DEPLOY / "alertmanager.yml"
REPO = DEPLOY.parent
FLY = DEPLOY / "fly.toml"
FLY_POSTGRES = DEPLOY / "fly.postgres.toml"
#: The alerts that page (the guide's on-call): ">= 10 % sends failing" and "quality dropped".
PAGING = {"AlfredSendFailureRateHigh", "AlfredQualityOrTierChanged"}

COUNTERS = {
    "alfred_webhook_requests_total",
    "alfred_inbound_messages_total",
    "alfred_outbound_sends_total",
    "alfred_graph_errors_total",
    "alfred_orchestrator_requests_total",
    "alfred_events_total",
}
GAUGES = {
    "alfred_outbox_messages",
    "alfred_dispatch_queue_depth",
    "alfred_send_queue_depth",
    "alfred_tenant_paused",
}
HISTOGRAMS = {
    "alfred_send_latency_seconds",
    "alfred_handler_latency_seconds",
    "alfred_e2e_latency_seconds",
    "alfred_ratelimit_wait_seconds",
}
METRICS = COUNTERS | GAUGES | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}


def _metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression reads (strings, matchers, ranges and groupings removed)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", stripped)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", stripped):
        word, call = match.group(1), match.group(2)
        if not call and word not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]|Inf|NaN", word):
            names.add(word)
    return names


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


def _promtool() -> str:
    return _tool(PROMTOOL, "promtool not installed: `apt-get install prometheus` (Debian) provides it")


def _tool(path: str | None, reason: str) -> str:
    """The tool's path; without it, skip locally and fail under CI (`.ci/run` installs it)."""
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs it")
        pytest.skip(f"{reason}; .ci/run installs it")
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False, encoding="utf-8"
    )


# ------------------------------------------------------------------------------ the parser


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (tenant) (rate(alfred_outbound_sends_total{result!="sent"}[5m])) >= 0.10',
            {"alfred_outbound_sends_total"},
        ),
        ("histogram_quantile(0.95, sum by (le) (rate(x_bucket[$__rate_interval])))", {"x_bucket"}),
        ('a{f=~"b|c"} > 0 unless a offset 15m or on(tenant) up', {"a", "up"}),
        ("max_over_time(foo[10m:1m]) > 1e3", {"foo"}),
    ],
)
def test_metric_name_parser(expr: str, names: set[str]) -> None:
    assert _metric_names(expr) == names


# ------------------------------------------------------------------------------ the rules


def test_rules_parse_and_cover_the_issue() -> None:
    rules = _rules()
    names = {r["alert"] for r in rules}
    assert {"AlfredSendFailureRateHigh", "AlfredTenantPaused", "AlfredOutboxGrowing", "AlfredWebhook5xx"} <= names
    assert {"AlfredQualityOrTierChanged", "AlfredAccountUpdate"} <= names
    assert len(names) == len(rules)  # no duplicate alert names
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r["alert"])
def test_rule_uses_only_alfred_metrics(rule: dict[str, Any]) -> None:
    used = _metric_names(rule["expr"])
    assert used, rule["expr"]
    assert used <= METRICS, used - METRICS


def test_failure_threshold_and_windows_match_the_issue() -> None:
    rules = {r["alert"]: r for r in _rules()}
    failure = rules["AlfredSendFailureRateHigh"]["expr"]
    assert ">= 0.10" in failure and "[5m]" in failure
    assert rules["AlfredOutboxGrowing"]["for"] == "10m"


async def test_every_metric_used_is_exported_by_the_app(client: Any) -> None:
    """The names must exist in the real app's /metrics, not only in the brief."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", await resp.text(), re.MULTILINE))
    types = {"counter": COUNTERS, "gauge": GAUGES, "histogram": HISTOGRAMS}
    for kind, names in types.items():
        for name in names:
            family = name.removesuffix("_total") if kind == "counter" else name
            assert (name, kind) in exported or (family, kind) in exported, f"{name} ({kind}) not in /metrics"


def test_promtool_check_rules() -> None:
    result = _run("check", "rules", str(RULES), cwd=DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


# Series in, alerts out: each case would fail if a threshold, window or `for` were off.
PROMTOOL_TESTS = """
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - name: send failures at 20 % fire, 5 % or low volume do not
    interval: 1m
    input_series:
      - {series: 'alfred_outbound_sends_total{tenant="home",result="sent"}', values: '0+8x20'}
      - {series: 'alfred_outbound_sends_total{tenant="home",result="failed"}', values: '0+2x20'}
      - {series: 'alfred_outbound_sends_total{tenant="biz",result="sent"}', values: '0+19x20'}
      - {series: 'alfred_outbound_sends_total{tenant="biz",result="retry"}', values: '0+1x20'}
      - {series: 'alfred_outbound_sends_total{tenant="tiny",result="failed"}', values: '0+1x20'}
    alert_rule_test:
      - eval_time: 10m
        alertname: AlfredSendFailureRateHigh
        exp_alerts: [{exp_labels: {severity: warning, tenant: home}}]

  - name: a pause fires after a minute
    interval: 1m
    input_series:
      - {series: 'alfred_tenant_paused{tenant="biz",instance="a"}', values: '0 0 1 1 1 1 1'}
      - {series: 'alfred_tenant_paused{tenant="home",instance="a"}', values: '0x6'}
    alert_rule_test:
      - {eval_time: 2m, alertname: AlfredTenantPaused, exp_alerts: []}
      - eval_time: 4m
        alertname: AlfredTenantPaused
        exp_alerts: [{exp_labels: {severity: critical, tenant: biz}}]

  - name: an outbox growing for 10 minutes fires, a stable backlog does not
    interval: 1m
    input_series:
      - {series: 'alfred_outbox_messages{tenant="home",state="queued"}', values: '0+1x40'}
      - {series: 'alfred_outbox_messages{tenant="home",state="sent"}', values: '0x40'}
      - {series: 'alfred_outbox_messages{tenant="biz",state="queued"}', values: '0+1x5 5x35'}
      - {series: 'alfred_outbox_messages{tenant="old",state="sent"}', values: '0+100x40'}
    alert_rule_test:
      - {eval_time: 15m, alertname: AlfredOutboxGrowing, exp_alerts: []}
      - eval_time: 25m
        alertname: AlfredOutboxGrowing
        exp_alerts: [{exp_labels: {severity: warning, tenant: home}}]

  - name: sustained webhook 5xx fire, a restart's blip does not
    interval: 1m
    input_series:
      - {series: 'alfred_webhook_requests_total{result="503",instance="a"}', values: '0+1x30'}
      - {series: 'alfred_webhook_requests_total{result="503",instance="b"}', values: '0 0 3x28'}
      - {series: 'alfred_webhook_requests_total{result="200",instance="b"}', values: '0+50x30'}
    alert_rule_test:
      - {eval_time: 6m, alertname: AlfredWebhook5xx, exp_alerts: []}
      - eval_time: 15m
        alertname: AlfredWebhook5xx
        exp_alerts: [{exp_labels: {severity: critical, instance: a}}]

  - name: quality, tier, account and template events fire, also on a counter's first appearance
    interval: 1m
    input_series:
      - {series: 'alfred_events_total{tenant="home",field="phone_number_quality_update"}', values: '_x5 1x30'}
      - {series: 'alfred_events_total{tenant="biz",field="business_capability_update"}', values: '0x5 1x30'}
      - {series: 'alfred_events_total{tenant="biz",field="account_update"}', values: '0x5 1x30'}
      - {series: 'alfred_events_total{tenant="home",field="message_template_status_update"}', values: '_x5 0x30'}
    alert_rule_test:
      - eval_time: 8m
        alertname: AlfredQualityOrTierChanged
        exp_alerts:
          - {exp_labels: {severity: warning, tenant: home, field: phone_number_quality_update}}
          - {exp_labels: {severity: warning, tenant: biz, field: business_capability_update}}
      - eval_time: 8m
        alertname: AlfredAccountUpdate
        exp_alerts: [{exp_labels: {severity: critical, tenant: biz, field: account_update}}]
      - {eval_time: 8m, alertname: AlfredTemplateStatusChanged, exp_alerts: []}
      - {eval_time: 30m, alertname: AlfredQualityOrTierChanged, exp_alerts: []}
"""


def test_promtool_unit_tests_of_the_rules(tmp_path: Path) -> None:
    """The rules as shipped, minus annotations (promtool compares those verbatim; check rules covers them)."""
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(data), encoding="utf-8")
    (tmp_path / "tests.yml").write_text(PROMTOOL_TESTS, encoding="utf-8")
    result = _run("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ------------------------------------------------------------------------------ the dashboard


def test_dashboard_parses_and_is_importable() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    assert "id" not in dash or dash["id"] is None  # an exported id would clash on import
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["tenant"]["includeAll"] is True
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_dashboard_shows_what_the_issue_asks() -> None:
    used = set().union(*map(_metric_names, _dashboard_exprs()))
    assert used <= METRICS, used - METRICS
    for metric in COUNTERS | GAUGES:
        assert metric in used, f"{metric} has no panel"
    for histogram in HISTOGRAMS:
        assert f"{histogram}_bucket" in used, f"{histogram} has no panel"


def test_dashboard_queries_follow_the_tenant_variable() -> None:
    tenant_metrics = {m for m in METRICS if m not in {"alfred_webhook_requests_total", "alfred_dispatch_queue_depth"}}
    tenant_metrics -= {"alfred_orchestrator_requests_total"}
    for expr in _dashboard_exprs():
        for metric in _metric_names(expr) & tenant_metrics:
            assert re.search(re.escape(metric) + r'\{[^}]*tenant=~"\$tenant"', expr), expr


def test_promtool_accepts_the_dashboard_queries(tmp_path: Path) -> None:
    """promtool has no dashboard check: each query becomes a recording rule, which it parses."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$tenant", ".*")}
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = _run("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------ Alertmanager


def _alertmanager() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    return data


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = _tool(AMTOOL, "amtool not installed: `apt-get install prometheus-alertmanager` (Debian) provides it")
    return subprocess.run(
        [tool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60, check=False, encoding="utf-8"
    )


def test_the_paging_alerts_exist_in_the_rules() -> None:
    """A renamed rule would silently stop paging: the names the routes match must be real."""
    assert {r["alert"] for r in _rules()} >= PAGING
    [paging] = [r for r in _alertmanager()["route"]["routes"] if r["receiver"] == "pagerduty-oncall"]
    [matcher] = paging["matchers"]
    assert matcher.startswith("alertname =~ ") and set(json.loads(matcher.split("=~ ", 1)[1]).split("|")) == PAGING


def test_alertmanager_keeps_secrets_out_of_the_file() -> None:
    data = _alertmanager()
    [pagerduty] = next(r for r in data["receivers"] if r["name"] == "pagerduty-oncall")["pagerduty_configs"]
    assert pagerduty["routing_key_file"].startswith("/etc/alertmanager/secrets/")
    assert not {"routing_key", "service_key", "service_key_file"} & set(pagerduty)
    assert "smtp_auth_password" not in data["global"] and data["global"]["smtp_auth_password_file"]
    text = ALERTMANAGER.read_text(encoding="utf-8")
    emails = re.findall(r"[\w.+-]+@([\w.-]+)", text)
    assert emails and set(emails) == {"example.com"}  # placeholders, never someone's real address


def test_amtool_check_config() -> None:
    result = _amtool("check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "2 receivers" in result.stdout


@pytest.mark.parametrize("alert", sorted({r["alert"] for r in _rules()}))
def test_each_alert_reaches_the_promised_receivers(alert: str) -> None:
    """Paging alerts go to PagerDuty (and the team's mail); every other alert to the mail only."""
    expected = "pagerduty-oncall,team-mail" if alert in PAGING else "team-mail"
    rule = next(r for r in _rules() if r["alert"] == alert)
    labels = [f"alertname={alert}", "tenant=home", f"severity={rule['labels']['severity']}"]
    result = _amtool(
        "config", "routes", "test", f"--config.file={ALERTMANAGER}", f"--verify.receivers={expected}", *labels
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == expected


# ------------------------------------------------------------------------------ Fly.io


def _fly(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    return data


#: Keys of Fly's app configuration reference (fly.io/docs/reference/configuration) these files may use.
FLY_KEYS = {"app", "primary_region", "kill_signal", "kill_timeout", "build", "deploy", "env", "mounts"}
FLY_KEYS |= {"http_service", "metrics", "vm", "processes", "checks"}


@pytest.mark.parametrize("path", [FLY, FLY_POSTGRES], ids=lambda p: p.name)
def test_fly_config_parses_and_matches_the_app(path: Path) -> None:
    from alfred_bot.config import DispatchConfig, ServerConfig  # noqa: PLC0415 (the app's own defaults)

    fly = _fly(path)
    assert set(fly) <= FLY_KEYS, set(fly) - FLY_KEYS
    service = fly["http_service"]
    config_port = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))["server"]["port"]
    assert service["internal_port"] == ServerConfig().port == config_port == fly["metrics"]["port"]
    assert re.search(rf"^EXPOSE {service['internal_port']}$", (REPO / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert service["force_https"] is True and service["auto_stop_machines"] == "off"  # webhooks find it running
    # Alfred drains on SIGTERM (STOPSIGNAL in the Dockerfile), in up to three grace periods
    assert fly["kill_signal"] == "SIGTERM"
    assert "STOPSIGNAL SIGTERM" in (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert fly["kill_timeout"] >= 3 * DispatchConfig().shutdown_grace_seconds + 10
    [check] = service["checks"]
    assert (check["method"], check["path"]) == ("GET", "/healthz") and fly["metrics"]["path"] == "/metrics"


async def test_the_fly_check_and_metrics_paths_are_served(client: Any) -> None:
    for path in {_fly(p)["http_service"]["checks"][0]["path"] for p in (FLY, FLY_POSTGRES)}:
        assert (await client.get(path)).status == 200, path
    for path in {_fly(p)["metrics"]["path"] for p in (FLY, FLY_POSTGRES)}:
        resp = await client.get(path)
        assert resp.status == 200 and "# TYPE alfred_" in await resp.text()


def test_the_single_machine_keeps_its_database_on_the_volume() -> None:
    fly = _fly(FLY)
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M)
    storage = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))["storage"]["path"]
    assert workdir and fly["mounts"]["destination"] == f"{workdir.group(1)}/data"
    assert f'VOLUME ["{fly["mounts"]["destination"]}"]' in dockerfile
    assert Path(workdir.group(1), storage).parent == Path(fly["mounts"]["destination"])  # the db is on it
    assert "processes" not in fly  # one machine running the image's CMD
    assert "--ha=false" in FLY.read_text(encoding="utf-8")


def test_the_postgres_variant_runs_roles_the_command_line_accepts() -> None:
    fly = _fly(FLY_POSTGRES)
    assert "mounts" not in fly  # nothing of value on a machine's disk
    assert fly["http_service"]["min_machines_running"] >= 2
    assert set(fly["http_service"]["processes"]) <= set(fly["processes"])
    assert set(fly["metrics"]["processes"]) <= set(fly["processes"])
    for command in fly["processes"].values():
        argv = shlex.split(command)
        assert argv[:3] == ["python", "main.py", "serve"] and argv[argv.index("--role") + 1] in {"all", "web", "worker"}
        parsed = subprocess.run(
            [sys.executable, *argv[1:], "--help"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        assert parsed.returncode == 0, parsed.stderr  # argparse checks --role's choice before --help


def _secret_names(path: Path) -> set[str]:
    """Variables the file tells to set as Fly secrets (or that `fly postgres attach` sets)."""
    text = path.read_text(encoding="utf-8")
    names = set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", " ".join(re.findall(r"fly secrets set (.*)", text))))
    return names | set(re.findall(r"fly postgres attach .*--variable-name ([A-Z][A-Z0-9_]+)", text))


@pytest.mark.parametrize("path", [FLY, FLY_POSTGRES], ids=lambda p: p.name)
def test_fly_secrets_are_the_variables_alfred_reads_and_never_in_the_file(path: Path) -> None:
    names = _secret_names(path)
    assert {"WHATSAPP_ACCESS_TOKEN", "WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN", "ALFRED_API_TOKEN"} <= names
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names
    sources = "".join(p.read_text(encoding="utf-8") for p in (REPO / "alfred_bot").rglob("*.py"))
    sources += (REPO / "config.toml").read_text(encoding="utf-8")  # tenants' own variables are named there
    for name in names:
        assert f'"{name}"' in sources, f"{path.name} tells to set {name}, which Alfred never reads"
    assert "env" not in _fly(path)  # nothing secret (nor anything else) as plain [env]
    for line in re.findall(r"fly secrets set .*", path.read_text(encoding="utf-8")):
        values = re.findall(r"=(\S+)", line.replace("$(openssl rand -hex 32)", "…"))
        assert values and all(v == "…" for v in values), line  # placeholders only, never a value


def test_the_postgres_variant_shares_the_database_url_and_privacy_key(tmp_path: Path) -> None:
    """Every node must pseudonymise a number alike: the key comes from one app-wide secret."""
    from alfred_bot.privacy import KEY_ENV, install_key  # noqa: PLC0415

    assert {"ALFRED_DATABASE_URL", KEY_ENV} <= _secret_names(FLY_POSTGRES)
    key = "ab" * 32
    first, second = install_key(tmp_path / "node-a", {KEY_ENV: key}), install_key(tmp_path / "node-b", {KEY_ENV: key})
    assert first == second == bytes.fromhex(key)


# ------------------------------------------------------------------------------ the archive bucket


def test_the_archive_bucket_policy_and_lifecycle_agree_with_the_retention_defaults() -> None:
    """Write-only for Alfred, under one prefix; objects expire when the rows they copy would have
    been deleted (delete_days - hot_days after archiving): 30 days hot, cold until day 90, then gone."""
    from alfred_bot.config import RetentionConfig  # noqa: PLC0415

    policy = json.loads((DEPLOY / "archive-iam-policy.json").read_text(encoding="utf-8"))
    [statement] = policy["Statement"]
    assert statement["Effect"] == "Allow" and statement["Action"] == ["s3:PutObject"]
    [resource] = statement["Resource"]
    [rule] = json.loads((DEPLOY / "archive-lifecycle.json").read_text(encoding="utf-8"))["Rules"]
    prefix = rule["Filter"]["Prefix"]
    assert resource == f"arn:aws:s3:::YOUR-BUCKET/{prefix}*" and rule["Status"] == "Enabled"
    defaults = RetentionConfig()
    assert rule["Expiration"]["Days"] == defaults.delete_days - defaults.hot_days
