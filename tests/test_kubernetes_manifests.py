"""deploy/kubernetes: what `kubectl kustomize` builds is what the gateway and a careful operator need (#13, part).

Each overlay builds; the Deployment runs non-root with a read-only root filesystem, no
capabilities, the RuntimeDefault seccomp profile and no service-account token; its probes
hit the admin listener's real endpoints on the config's admin port; its grace period
covers ``shutdown_delay`` + ``shutdown_grace``; ``--metrics-dir`` points at a writable
emptyDir.  The generated config and policies pass the gateway's own checks, no Secret
value is committed, the NetworkPolicy opens only the public port (and the admin port to
monitoring), and the PrometheusRule holds exactly the alert rules of
deploy/observability.  Every resource validates offline against the Kubernetes schemas
bundled in kubernetes-validate; the Prometheus operator's CRDs, absent from them, are checked
structurally.  Finally the gateway runs the base config with the Deployment's arguments
(ports moved to loopback) and answers both probes.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.components import REPO
from tests.support.procs import free_port, http_probe, start

K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/dev", "overlays/production"]


def _build(which: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: run `make kubectl` (Debian package kubectl)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / which)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = _one(docs, "ConfigMap", "mcp-gateway-config")
    return yaml.safe_load(cm["data"]["gateway.yaml"])


def _duration(text: Any) -> float:
    s = str(text)
    return float(s[:-2]) / 1000 if s.endswith("ms") else float(s.rstrip("s"))


@pytest.mark.parametrize("which", OVERLAYS)
def test_the_deployment_is_locked_down_and_probes_the_admin_listener(which: str) -> None:
    docs = _build(which)
    dep = _one(docs, "Deployment", "mcp-gateway")
    pod = dep["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    cfg = _config(docs)
    admin_port = {p["name"]: p["containerPort"] for p in c["ports"]}["admin"]
    assert admin_port == cfg["admin"]["port"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == cfg["listen"]["port"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["terminationGracePeriodSeconds"] >= _duration(cfg["shutdown_delay"]) + _duration(cfg["shutdown_grace"])
    args = c["args"]
    metrics_dir = args[args.index("--metrics-dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[metrics_dir]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["topologySpreadConstraints"]
    if which != "overlays/dev":
        assert dep["spec"]["replicas"] >= 3
        assert _one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 3
        assert _one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] >= 2
    assert not [d for d in docs if d["kind"] == "Secret"]                     # references only
    (env,) = [e for e in c["env"] if e["name"] == "UPSTREAM_TOKEN"]
    assert set(env["valueFrom"]) == {"secretKeyRef"}


@pytest.mark.parametrize("which", OVERLAYS)
def test_the_generated_config_and_policies_pass_the_gateways_own_check(which: str, tmp_path: Path) -> None:
    docs = _build(which)
    cfg = _config(docs)
    policies = _one(docs, "ConfigMap", "mcp-gateway-policies")
    assert not policies["metadata"]["name"].startswith("mcp-gateway-policies-")   # stable name: hot reload
    pdir = tmp_path / "policies"
    pdir.mkdir()
    for name, text in policies["data"].items():
        (pdir / name).write_text(text)
    cfg["policies"] = str(pdir)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "UPSTREAM_TOKEN": "t0ken-for-check"})
    assert out.returncode == 0, out.stdout + out.stderr


# The Prometheus operator's CRDs are not in the Kubernetes schemas kubernetes-validate ships:
# checked structurally instead, for what the operator's CRD (monitoring.coreos.com/v1) requires
# and for what makes them work here.  Not a full schema validation.
_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
_DURATION = re.compile(r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")
_GROUP_KEYS = {"name", "rules", "interval", "labels", "limit", "partial_response_strategy", "query_offset"}
_RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def _check_service_monitor(sm: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """Its selector picks exactly one Service of the build, in its namespace, exposing each
    endpoint's named port, and that Service reaches the gateway pods' admin port."""
    spec = sm["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                         "podTargetLabels", "sampleLimit"}, set(spec)
    assert "namespaceSelector" not in spec                     # its own namespace only
    wanted = spec["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"
                and d["metadata"].get("namespace") == sm["metadata"].get("namespace")
                and wanted.items() <= d["metadata"].get("labels", {}).items()]
    assert len(services) == 1, [s["metadata"]["name"] for s in services]
    (svc,) = services
    pod = _one(docs, "Deployment", "mcp-gateway")["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = [c for c in pod["spec"]["containers"] if c["name"] == "gateway"]
    assert spec["endpoints"]
    for ep in spec["endpoints"]:
        (port,) = [p for p in svc["spec"]["ports"] if p["name"] == ep["port"]]
        assert port["targetPort"] == "admin" and "admin" in {p["name"] for p in c["ports"]}
        assert ep.get("path", "/metrics") == "/metrics"
        assert _DURATION.match(ep.get("interval", "0")), ep


def _check_prometheus_rule(rule: dict[str, Any], tmp_path: Path) -> None:
    """Group and rule keys the CRD knows, unique group names, durations in its pattern, and
    the groups load in Prometheus (promtool check rules)."""
    groups = rule["spec"]["groups"]
    names = [g["name"] for g in groups]
    assert names and all(names) and len(set(names)) == len(names), names
    for group in groups:
        assert set(group) <= _GROUP_KEYS, set(group)
        for r in group["rules"]:
            assert set(r) <= _RULE_KEYS and ("alert" in r) != ("record" in r) and r["expr"], r
            assert _DURATION.match(r.get("for", "0")), r
            assert all(isinstance(v, str) for v in {**r.get("labels", {}), **r.get("annotations", {})}.values())
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make prometheus` (Debian package prometheus)")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("which", OVERLAYS)
def test_every_manifest_validates_against_the_kubernetes_schemas_offline(which: str, tmp_path: Path) -> None:
    """Strict validation (unknown fields refused) against the schemas bundled in PyPI
    kubernetes-validate for the three newest Kubernetes minors it knows (those upstream still
    supports), no cluster and no network; the operator's CRDs structurally."""
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    docs = _build(which)
    minors = {tuple(int(x) for x in v.split(".")[:2]): v for v in sorted(
        set(all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))}
    versions = [minors[m] for m in sorted(minors)[-3:]]
    assert kubernetes_validate.latest_version() in versions
    checked = 0
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in _OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and set(doc) == {
                "apiVersion", "kind", "metadata", "spec"}, name
            if doc["kind"] == "ServiceMonitor":
                _check_service_monitor(doc, docs)
            else:
                _check_prometheus_rule(doc, tmp_path)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{which}: {name} on Kubernetes {version}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 6
    assert {d["kind"] for d in docs} >= _OPERATOR_KINDS


def test_the_network_policy_opens_only_the_public_port_and_the_admin_port_to_monitoring() -> None:
    np = _one(_build("base"), "NetworkPolicy")
    rules = np["spec"]["ingress"]
    assert {tuple(p["port"] for p in r["ports"]) for r in rules} == {(8080,), (9464,)}
    (admin,) = [r for r in rules if r["ports"][0]["port"] == 9464]
    assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}
    assert egress_ports == {53, 6379, 26379, 3001, 443}


def test_the_prometheus_rule_holds_exactly_the_alert_rules() -> None:
    rule = _one(_build("base"), "PrometheusRule")
    alerts = yaml.safe_load((REPO / "deploy" / "observability" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "regenerate: python deploy/kubernetes/gen_prometheusrule.py"
    monitor = _one(_build("base"), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"


def test_the_gateway_runs_the_base_config_with_the_deployments_arguments(
        upstream: Any, redis_store: dict[str, str], tmp_path: Path) -> None:
    """As the pod would run it, on loopback: both probes answer 200."""
    docs = _build("base")
    cfg = _config(docs)
    (c,) = _one(docs, "Deployment", "mcp-gateway")["spec"]["template"]["spec"]["containers"]
    up = upstream()
    port, admin = free_port(), free_port()
    cfg["listen"] = {"host": "127.0.0.1", "port": port}
    cfg["admin"] = {"host": "127.0.0.1", "port": admin}
    cfg["store"] = redis_store
    cfg["servers"]["everything"]["url"] = up.url
    pdir = tmp_path / "policies"
    pdir.mkdir()
    for name, text in _one(docs, "ConfigMap", "mcp-gateway-policies")["data"].items():
        (pdir / name).write_text(text)
    cfg["policies"] = str(pdir)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = list(c["args"])
    args[args.index("-c") + 1] = str(path)
    metrics = tmp_path / "run-mcpgw"
    metrics.mkdir()
    args[args.index("--metrics-dir") + 1] = str(metrics)
    proc, _ = start([sys.executable, "-m", "gateway", *args], name=f"k8s-gateway-{port}",
                    log_path=tmp_path / "gateway.log", cwd=REPO, env={"UPSTREAM_TOKEN": "t0ken-for-test"},
                    ready_probe=http_probe(f"http://127.0.0.1:{admin}/readyz"), ready_timeout=60)
    try:
        for probe in (c["readinessProbe"], c["livenessProbe"]):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}{probe['httpGet']['path']}", timeout=5) as resp:
                assert resp.status == 200
    finally:
        proc.stop()
