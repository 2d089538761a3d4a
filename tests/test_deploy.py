"""deploy/: the Prometheus alert rules and the Grafana dashboard.

Both must parse, use only metrics Alfred exports (checked against the brief's list and against
the real app's GET /metrics), and the rules must pass `promtool check rules` and behave as their
names say under `promtool test rules` (series in, alerts out). The dashboard's queries are checked
by promtool too, as recording rules. Without promtool these tests skip locally and fail under CI,
where `.ci/run` installs it (Debian's `prometheus` package).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")

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
    if PROMTOOL is None:
        reason = "promtool not installed: `apt-get install prometheus` (Debian) provides it; .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return PROMTOOL


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
