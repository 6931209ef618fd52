"""The dashboard and the alert rules under deploy/observability, checked against the real tools (#11).

``promtool`` checks and unit-tests the alert rules.  Then a real Prometheus (Debian
package ``prometheus``, installed by ``make prometheus``) scrapes a real gateway that
served known traffic, and every dashboard and alert expression is evaluated through
its HTTP API: each parses, the rules load and evaluate without error, and the
expressions that must show the traffic return data.  Then one forged Last-Event-ID, and
the security-event alert fires in that Prometheus.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.components import REPO
from tests.support.gw_helpers import LEGACY_VERSION, http_client, initialize, start_gateway_argv
from tests.support.procs import free_port, http_probe, start
from tests.test_metrics_values import POLICY as ECHO_ONLY, _call

OBS = REPO / "deploy" / "observability"
RULES = OBS / "prometheus" / "alerts.yml"
DASHBOARD = OBS / "grafana" / "mcp-gateway.json"
# The metric-values policy (echo allowed, the rest denied) plus a limit, so the limit panels have data.
POLICY = ECHO_ONLY + """\
    limits:
      - {id: roomy, match: {tools: ["*"]}, key: [principal], windows: [{limit: 1000, per: 1s}]}
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make prometheus` (Debian package prometheus)")
    return path


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = _tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=RULES.parent,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    config = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=RULES.parent,
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_rule_has_a_summary_and_a_runbook() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "MCPGatewayToolPinViolation", "MCPGatewayPoisoningFinding", "MCPGatewayAuthFailureSpike",
        "MCPGatewayUpstreamErrors", "MCPGatewayStoreErrors", "MCPGatewayReloadFailed", "MCPGatewayOverheadHigh",
        "MCPGatewayToolCallsHeld", "MCPGatewayPolicyDenialSpike", "MCPGatewaySecurityEvent"}
    for rule in rules:
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 40, rule["alert"]


# One series per event counter on the dashboard, born with its first event (value 1, no earlier sample).
FRESH_EVENTS = {
    "mcpgw_tool_pin_events_total": {"server": "files", "kind": "description_changed", "action": "blocked"},
    "mcpgw_tool_poisoning_findings_total": {"server": "files", "kind": "hidden_instructions", "severity": "high",
                                            "action": "blocked"},
    "mcpgw_tool_calls_held_total": {"server": "files", "kind": "description_changed"},
    "mcpgw_security_events_total": {"kind": "session_principal_mismatch"},
    "mcpgw_config_reloads_total": {"what": "policies", "result": "failed"},
}


def test_the_event_panels_show_an_event_that_creates_its_series(tmp_path: Path) -> None:
    """promtool evaluates each event panel's query (Grafana's $__rate_interval as 4m over 1m
    samples) on a series first seen at 1: it shows 1 event at once and nothing a range later
    (increase() alone shows nothing at all: one sample in the range)."""
    promtool = _tool("promtool")
    cases = []
    for _, expr in _dashboard_exprs():
        (metric,) = {m for m in FRESH_EVENTS if m in expr} or {None}
        if metric is None:
            continue
        labels = FRESH_EVENTS[metric]
        by = [x.strip() for x in re.search(r"by \(([^)]*)\)", expr).group(1).split(",")]
        shown = "{" + ", ".join(f'{k}="{labels[k]}"' for k in sorted(by)) + "}"
        query = expr.replace("$server", ".*").replace("$__rate_interval", "4m")
        cases += [{"expr": query, "eval_time": "2m", "exp_samples": [{"labels": shown, "value": 1}]},
                  {"expr": query, "eval_time": "6m", "exp_samples": []}]
    assert len(cases) == 2 * len(FRESH_EVENTS)
    series = [{"series": m + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
               "values": "_ _ " + " ".join(["1"] * 8)} for m, labels in FRESH_EVENTS.items()]
    (tmp_path / "panels_test.yml").write_text(yaml.safe_dump({
        "rule_files": [], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}]}))
    out = subprocess.run([promtool, "test", "rules", "panels_test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _exported() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every mcpgw_* family the gateway registers: name -> (type, label names)."""
    from prometheus_client.metrics import MetricWrapperBase

    import gateway.app  # noqa: F401  (imports every stage, so every metric is registered)

    found = {}
    for module in [m for name, m in sys.modules.items() if name.split(".")[0] == "gateway"]:
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                (family,) = obj.describe()
                # prometheus_client has no public accessor for a metric's label names.
                found[family.name] = (family.type, tuple(obj._labelnames))
    return {name: kind for name, kind in found.items() if name.startswith("mcpgw_")}


def _series_names(family: str, kind: str) -> set[str]:
    """The names a family's series carry in the exposition (counters get _total; no _created)."""
    if kind == "counter":
        return {f"{family}_total"}
    if kind == "histogram":
        return {family, *(f"{family}_{s}" for s in ("bucket", "sum", "count"))}
    return {family}


def _documented() -> dict[str, set[str]]:
    """The rows of docs/metrics.md's tables: series name -> the labels its row lists."""
    rows = {}
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`mcpgw_"):
            for name in re.findall(r"`(mcpgw_[a-z0-9_]+)`", cells[0]):
                rows[name] = set(re.findall(r"`([a-z_]+)`", cells[2]))
    return rows


def _used() -> list[tuple[str, str]]:
    """(where, PromQL expression) for every alert rule and dashboard query."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    variables = [v["query"]["query"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
                 if isinstance(v.get("query"), dict)]
    return ([(r["alert"], r["expr"]) for r in rules] + [(title, expr) for title, expr in _dashboard_exprs()]
            + [("variable", q) for q in variables])


def test_every_metric_the_dashboard_and_alerts_use_is_exported_and_documented() -> None:
    """A renamed or misspelled series would leave a panel empty or an alert silent forever."""
    exported = _exported()
    series = {s: family for family, (kind, _) in exported.items() for s in _series_names(family, kind)}
    documented = _documented()
    used = {name for _, expr in _used() for name in re.findall(r"mcpgw_[a-z0-9_]+", expr)}
    assert len(used) >= 15
    # Every name a query uses is a series the gateway exports (a histogram's _bucket/_sum/_count,
    # a counter's _total), and the family is documented under its series name.
    assert not used - set(series), sorted(used - set(series))
    assert not {series[u] for u in used} - {series[d] for d in documented if d in series}, "undocumented"
    # And the other way round: no exported family is missing from docs/metrics.md, and no row
    # documents a series the gateway does not export.
    assert set(exported) == {series.get(d) for d in documented}, (
        set(exported) ^ {series.get(d) for d in documented})


def test_every_label_the_dashboard_and_alerts_use_exists_on_the_metric() -> None:
    """Selectors and by() clauses name only labels the metric has, and the docs list exactly those."""
    exported = _exported()
    labels_of = {s: set(labels) | ({"le"} if s.endswith("_bucket") else set())
                 for family, (kind, labels) in exported.items() for s in _series_names(family, kind)}
    wrong = []
    for where, expr in _used():
        for name, selector in re.findall(r"(mcpgw_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
                if label not in labels_of[name]:
                    wrong.append((where, name, label))
        # sum by (a, b) (argument): each label is on every metric inside the argument.
        for match in re.finditer(r"\bby\s*\(([^)]*)\)\s*\(", expr):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(expr[end], 0)
                end += 1
            for name in re.findall(r"mcpgw_[a-z0-9_]+", expr[match.end():end]):
                wrong += [(where, name, label) for label in re.split(r"\s*,\s*", match.group(1).strip())
                          if label and label not in labels_of[name]]
        # Grafana's label_values(metric, label), the dashboard's server variable.
        for name, label in re.findall(r"label_values\((mcpgw_[a-z0-9_]+),\s*(\w+)\)", expr):
            if label not in labels_of[name]:
                wrong.append((where, name, label))
    assert not wrong, wrong
    documented = _documented()
    for family, (kind, labels) in exported.items():
        (row,) = [documented[s] for s in _series_names(family, kind) if s in documented]
        assert row == set(labels), (family, row, labels)


def test_the_security_event_kinds_the_alert_names_are_the_gateways() -> None:
    """The kinds counted in the code, the docs row and the alert's exclusions agree: a renamed
    header_timeout would page on every slow client."""
    counted = {k for path in (REPO / "gateway").rglob("*.py")
               for k in re.findall(r'security_event\("(\w+)"\)', path.read_text())}
    (row,) = [line for line in (REPO / "docs" / "metrics.md").read_text().splitlines()
              if line.startswith("| `mcpgw_security_events_total`")]
    documented = set(re.findall(r"`([a-z_]+)`", row.split("|")[4]))
    (rule,) = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
               if r["alert"] == "MCPGatewaySecurityEvent"]
    assert counted and counted == documented, counted ^ documented
    assert set(re.findall(r'kind!="(\w+)"', rule["expr"])) == {"header_timeout"} <= counted
    # The runbook says what to do for every kind that fires.
    assert not [k for k in counted - {"header_timeout"} if k not in rule["annotations"]["runbook"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def _grafana(expr: str) -> str:
    return expr.replace("$server", ".*").replace("$__rate_interval", "1m").replace("$__range", "5m")


class PromAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:       # 400 with a JSON error body: a bad expression
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)


# Panels with at least one expression that must return data after the traffic below (the
# rest may be empty: no pin change, no store error, no SSE stream ...).
MUST_HAVE_DATA = ("Requests per second", "Request duration p50 / p99", "Gateway overhead p50 / p99 (before the upstream)",
                  "Refusals by reason", "Rate limits", "Tool calls per tool (last range)", "In flight and active streams",
                  "Upstream response time p99 and connections")


def test_a_real_prometheus_evaluates_every_dashboard_and_alert_expression(upstream: Any, tmp_path: Path) -> None:
    prometheus = _tool("prometheus")
    up = upstream(json_response=True)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "up.yaml").write_text(POLICY)
    gw, cfg = start_gateway_argv(tmp_path, {"servers": {"up": {"url": up.url, "pinning": {"mode": "tofu"}}},
                                            "policies": str(tmp_path / "p"), "pins": str(tmp_path / "pins")}, [])
    port = cfg["listen"]["port"]
    prom_port = free_port()
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "mcp-gateway", "static_configs": [
            {"targets": [f"127.0.0.1:{cfg['admin']['port']}"]}]}],
    }))
    prom, _ = start([prometheus, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}"],
                    name=f"prometheus-{prom_port}", log_path=tmp_path / "prometheus.log",
                    ready_probe=http_probe(f"http://127.0.0.1:{prom_port}/-/ready"), ready_timeout=60)
    api = PromAPI(f"http://127.0.0.1:{prom_port}")
    try:
        # Known traffic, spread over a few scrapes so rate() has two samples.
        def traffic() -> None:
            assert "result" in _call(port, "echo", {"text": "hi"})
            assert "error" in _call(port, "add", {"a": 1, "b": 2})          # denied by the policy
            assert _call(port, "echo", {})["result"]["isError"] is True     # an MCP-level error

        traffic()
        prom.wait_until(lambda: _samples(api, "mcpgw_requests_total") >= 2, 30, "two scrapes with traffic")
        traffic()
        prom.wait_until(lambda: bool(api.query('increase(mcpgw_tool_calls_total[1m]) > 0')["data"]["result"]),
                        30, "the traffic in two scrapes")
        failures: list[Any] = []
        with_data: set[str] = set()
        for title, expr in _dashboard_exprs():
            answer = api.query(_grafana(expr))
            if answer.get("status") != "success":
                failures.append((title, expr, answer.get("error")))
            elif answer["data"]["result"]:
                with_data.add(title)
        assert not failures, failures
        assert set(MUST_HAVE_DATA) <= with_data, set(MUST_HAVE_DATA) - with_data
        # A ratio whose two sides both have data must have data too: otherwise its label
        # matching joins nothing (e.g. by (server, kind) over by (server) without group_left).
        unjoined = []
        for title, expr in _dashboard_exprs():
            sides = _top_level_division(_grafana(expr))
            if sides and all(api.query(side)["data"]["result"] for side in sides) \
                    and not api.query(_grafana(expr))["data"]["result"]:
                unjoined.append((title, expr))
        assert not unjoined, unjoined
        rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        for rule in rules:
            answer = api.query(rule["expr"])
            assert answer.get("status") == "success", (rule["alert"], answer.get("error"))
        # Loaded and evaluated by Prometheus itself, without errors.
        prom.wait_until(lambda: _rules_evaluated(api, len(rules)), 30, "every rule evaluated")
        firing = {a["labels"]["alertname"] for a in api.get("/api/v1/alerts")["data"]["alerts"]}
        assert not firing & {"MCPGatewayDown", "MCPGatewayStoreErrors", "MCPGatewayReloadFailed",
                             "MCPGatewaySecurityEvent"}, firing
        # One forged Last-Event-ID: the gateway counts it, and the alert fires on that one event.
        asyncio.run(_present_a_forged_event_id(f"http://127.0.0.1:{port}/mcp/up"))
        prom.wait_until(lambda: _firing(api, "MCPGatewaySecurityEvent") == [{"kind": "event_id_invalid"}],
                        30, "MCPGatewaySecurityEvent firing for the forged event id")
    finally:
        prom.stop()
        gw.stop()


def _top_level_division(expr: str) -> tuple[str, str] | None:
    """The two operands of a division outside any parentheses (with its matching clause dropped)."""
    depth = 0
    for i, ch in enumerate(expr):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "/" and depth == 0:
            rhs = re.sub(r"^\s*on\s*\([^)]*\)\s*(group_left|group_right)?\s*(\([^)]*\))?", "", expr[i + 1:])
            return expr[:i], rhs
    return None


async def _present_a_forged_event_id(url: str) -> None:
    async with http_client() as client:
        sid, _ = await initialize(client, url)
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "Last-Event-ID": "forged.event.id",
                   "MCP-Protocol-Version": LEGACY_VERSION}
        async with client.get(url, headers=headers) as get:
            assert get.status == 400
            assert (await get.json())["error"]["data"]["reason"] == "event_id_invalid"


def _firing(api: PromAPI, alertname: str) -> list[dict[str, str]]:
    """The firing instances of one alert, by the labels the rule's expression gives them."""
    alerts = api.get("/api/v1/alerts")["data"]["alerts"]
    return [{k: v for k, v in a["labels"].items() if k not in {"alertname", "severity"}}
            for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


def _samples(api: PromAPI, metric: str) -> int:
    answer = api.query(f"count_over_time(sum({metric})[1m:1s])")
    result = answer.get("data", {}).get("result", [])
    return int(float(result[0]["value"][1])) if result else 0


def _rules_evaluated(api: PromAPI, n: int) -> bool:
    rules = [r for g in api.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    bad = [r for r in rules if r.get("health") == "err"]
    assert not bad, [(r["name"], r.get("lastError")) for r in bad]
    return len(rules) == n and all(r.get("health") == "ok" for r in rules)
