"""The dashboard and the alert rules under deploy/observability, checked against the real tools (#11).

``promtool`` checks and unit-tests the alert rules.  Then a real Prometheus (Debian
package ``prometheus``, installed by ``make prometheus``) scrapes a real gateway that
served known traffic, and every dashboard and alert expression is evaluated through
its HTTP API: each parses, the rules load and evaluate without error, and the
expressions that must show the traffic return data.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.components import REPO
from tests.support.gw_helpers import start_gateway_argv
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
        "MCPGatewayUpstreamErrors", "MCPGatewayStoreErrors", "MCPGatewayReloadFailed", "MCPGatewayOverheadHigh"}
    for rule in rules:
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 40, rule["alert"]


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
        rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        for rule in rules:
            answer = api.query(rule["expr"])
            assert answer.get("status") == "success", (rule["alert"], answer.get("error"))
        # Loaded and evaluated by Prometheus itself, without errors.
        prom.wait_until(lambda: _rules_evaluated(api, len(rules)), 30, "every rule evaluated")
        firing = {a["labels"]["alertname"] for a in api.get("/api/v1/alerts")["data"]["alerts"]}
        assert not firing & {"MCPGatewayDown", "MCPGatewayStoreErrors", "MCPGatewayReloadFailed"}, firing
    finally:
        prom.stop()
        gw.stop()


def _samples(api: PromAPI, metric: str) -> int:
    answer = api.query(f"count_over_time(sum({metric})[1m:1s])")
    result = answer.get("data", {}).get("result", [])
    return int(float(result[0]["value"][1])) if result else 0


def _rules_evaluated(api: PromAPI, n: int) -> bool:
    rules = [r for g in api.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    bad = [r for r in rules if r.get("health") == "err"]
    assert not bad, [(r["name"], r.get("lastError")) for r in bad]
    return len(rules) == n and all(r.get("health") == "ok" for r in rules)
