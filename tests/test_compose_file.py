"""The shipped compose stack can start as written (#15 item 1), checked without a Docker engine.

No engine runs here, so the file is checked for the conditions that broke it: every upstream
the gateway config names is a service; with ``read_only: true`` the metrics directory given to
``--workers`` is on a tmpfs (tests/test_workers_metrics.py runs the process with only that
directory writable); an unset or empty ``UPSTREAM_TOKEN`` is refused by compose itself (``:?``);
Redis persists (TOFU pins and approvals are security state).
"""
from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.support.components import REPO, node_binary

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
GATEWAY_CONFIG = yaml.safe_load((REPO / "deploy" / "compose" / "gateway.yaml").read_text())
GATEWAYS = [name for name, svc in COMPOSE["services"].items() if name.startswith("gateway")]


def test_every_upstream_the_config_names_is_a_service() -> None:
    services = set(COMPOSE["services"])
    for server in GATEWAY_CONFIG["servers"].values():
        assert urlsplit(server["url"]).hostname in services, server["url"]
    assert urlsplit(GATEWAY_CONFIG["store"]).hostname in services


def test_a_read_only_gateway_has_its_metrics_directory_on_a_tmpfs() -> None:
    assert len(GATEWAYS) >= 2
    for name in GATEWAYS:
        svc = COMPOSE["services"][name]
        assert svc["read_only"] is True
        command = svc["command"]
        metrics_dir = command[command.index("--metrics-dir") + 1]
        mounts = [t.split(":", 1)[0] for t in svc["tmpfs"]]
        assert metrics_dir in mounts and "/tmp" in mounts


def test_an_empty_upstream_token_is_refused_and_redis_persists() -> None:
    for name in GATEWAYS:
        value = COMPOSE["services"][name]["environment"]["UPSTREAM_TOKEN"]
        assert value.startswith("${UPSTREAM_TOKEN:?"), value          # unset or empty: compose refuses
    redis = COMPOSE["services"]["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"


# --------------------------------------------------------------------------- the evaluation stack (#13 item 2)

SCHEMA = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
SERVICES = COMPOSE["services"]


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repo path of a service's ``./`` bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (REPO / source).resolve()
    return mounts


def _on_host(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside ``service``'s container comes from in the repo (via its bind mounts)."""
    for target, source in sorted(_bind_mounts(service).items(), key=lambda m: -len(m[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is not bind-mounted from the repo")


def test_the_compose_file_follows_the_compose_specification() -> None:
    errors = [f"{e.json_path}: {e.message}" for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(COMPOSE)]
    assert errors == []


def test_the_schema_check_does_catch_a_broken_compose_file() -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["redis"]["restart_policy"] = "always"          # a misspelt key
    broken["services"]["gateway-a"]["ports"] = 8080                  # not a list
    paths = {tuple(e.absolute_path) for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(broken)}
    assert {("services", "redis"), ("services", "gateway-a", "ports")} <= paths


def test_every_service_a_service_refers_to_exists() -> None:
    referenced: set[str] = set()
    for svc in SERVICES.values():
        depends = svc.get("depends_on", [])
        referenced |= set(depends)                      # a list, or a mapping of name -> condition
        for key in ("network_mode", "pid", "ipc"):
            if str(svc.get(key, "")).startswith("service:"):
                referenced.add(svc[key].split(":", 1)[1])
        referenced |= {link.split(":")[0] for link in svc.get("links", [])}
    assert referenced and referenced <= set(SERVICES), referenced - set(SERVICES)
    # Host names the configs dial inside the compose network are services too.
    prometheus = yaml.safe_load(_on_host(SERVICES["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    datasources = yaml.safe_load(_on_host(SERVICES["grafana"],
                                          "/etc/grafana/provisioning/datasources/prometheus.yaml").read_text())
    hosts = {t.rsplit(":", 1)[0] for t in targets}
    hosts |= {urlsplit(d["url"]).hostname for d in datasources["datasources"]}
    hosts |= {urlsplit(i["issuer"]).hostname for i in GATEWAY_CONFIG["auth"]["issuers"]}
    assert hosts <= set(SERVICES), hosts - set(SERVICES)


def test_every_bind_mounted_path_exists_in_the_repo() -> None:
    checked = 0
    for name, svc in SERVICES.items():
        for target, source in _bind_mounts(svc).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert REPO.resolve() in source.parents, f"{name}: {source} is outside the repo"
            checked += 1
    assert checked >= 8


def test_prometheus_scrapes_every_replica_admin_port_and_loads_the_shipped_rules(tmp_path: Path) -> None:
    svc = SERVICES["prometheus"]
    config = yaml.safe_load(_on_host(svc, "/etc/prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    admin_port = GATEWAY_CONFIG["admin"]["port"]
    assert targets == {f"{name}:{admin_port}" for name in GATEWAYS}
    assert GATEWAY_CONFIG["listen"]["port"] != admin_port           # never the public port
    loaded = {_on_host(svc, rule) for rule in config["rule_files"]}
    shipped = {p.resolve() for p in (REPO / "deploy/observability/prometheus").glob("*.yml")
               if "groups" in (yaml.safe_load(p.read_text()) or {})}
    assert loaded == shipped and all(p.exists() for p in loaded)
    # promtool reads the config as Prometheus would, rule files included (paths made local).
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make prometheus` (Debian package prometheus)")
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump({**config, "rule_files": [str(p) for p in loaded]}))
    done = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisions_the_prometheus_datasource_and_the_shipped_dashboard() -> None:
    svc = SERVICES["grafana"]
    provisioning = [t for t in _bind_mounts(svc) if t.startswith("/etc/grafana/provisioning/")]
    assert {t.split("/")[4] for t in provisioning} == {"datasources", "dashboards"}
    (datasource,) = yaml.safe_load(_on_host(svc, "/etc/grafana/provisioning/datasources/prometheus.yaml")
                                   .read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    (provider,) = yaml.safe_load(_on_host(svc, "/etc/grafana/provisioning/dashboards/mcp-gateway.yaml")
                                 .read_text())["providers"]
    shown = {p.name for p in _on_host(svc, provider["options"]["path"]).glob("*.json")}
    assert shown == {p.name for p in (REPO / "deploy/observability/grafana").glob("*.json")} and shown
    # File provisioning does not resolve an export's __inputs: every ${VAR} the dashboard
    # uses must be one of its own template variables.
    dashboard = json.loads((REPO / "deploy/observability/grafana/mcp-gateway.json").read_text())
    used = set(re.findall(r"\$\{(\w+)\}", json.dumps(dashboard)))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert used and used <= variables, used - variables
    assert {v["name"]: v["type"] for v in dashboard["templating"]["list"]}["DS_PROMETHEUS"] == "datasource"


def test_the_gateway_config_passes_the_gateways_own_check(tmp_path: Path) -> None:
    """``mcp-gateway check`` on deploy/compose/gateway.yaml, with its container paths mapped to the
    repo files the compose file mounts there."""
    svc = SERVICES["gateway-a"]
    config = copy.deepcopy(GATEWAY_CONFIG)
    # The policies directory as the container sees it: the files mounted into it, nothing else.
    policies = tmp_path / "policies"
    policies.mkdir()
    for target, source in _bind_mounts(svc).items():
        if target.startswith(config["policies"].rstrip("/") + "/"):
            (policies / target.rsplit("/", 1)[1]).symlink_to(source)
    assert list(policies.iterdir()), "no policy is mounted where the config looks for them"
    config["policies"] = str(policies)
    local = tmp_path / "gateway.yaml"
    local.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(local)], cwd=REPO,
                          env={**os.environ, "UPSTREAM_TOKEN": "compose-check"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"OK ({len(config['servers'])} server(s))" in done.stdout


def test_the_demo_authorization_server_issues_what_the_gateways_accept() -> None:
    idp = SERVICES["idp"]["environment"]
    (issuer,) = GATEWAY_CONFIG["auth"]["issuers"]
    assert idp["IDP_ISSUER"] == issuer["issuer"]
    assert urlsplit(issuer["issuer"]).scheme == "https"     # not loopback: the gateway fetches JWKS over TLS
    resources = json.loads(idp["IDP_RESOURCES"])
    public_url = GATEWAY_CONFIG["public_url"].rstrip("/")
    assert set(resources) == {f"{public_url}/mcp/{name}" for name in GATEWAY_CONFIG["servers"]}
    port = urlsplit(issuer["issuer"]).port
    assert idp["IDP_PORT"] == str(port) and f"127.0.0.1:{port}:{port}" in SERVICES["idp"]["ports"]
    for name in GATEWAYS:
        svc = SERVICES[name]
        cert = svc["environment"]["SSL_CERT_FILE"]
        assert any(v.startswith("idp-tls:") and cert.startswith(v.split(":")[1] + "/") for v in svc["volumes"])
        assert svc["depends_on"]["idp"] == {"condition": "service_healthy"}
    probe = SERVICES["idp"]["healthcheck"]["test"]
    assert probe[0] == "CMD" and f"https://localhost:{port}/.well-known/oauth-authorization-server" in probe[-1]
    assert SERVICES["idp"]["environment"]["NODE_EXTRA_CA_CERTS"] == SERVICES["idp"]["environment"]["IDP_TLS_CERT"]


def test_the_tls_certificate_lets_the_gateway_fetch_from_the_demo_as(tmp_path: Path) -> None:
    """deploy/compose/idp_tls.py's certificate and tests/idp/server.mjs over TLS, as compose runs them:
    the metadata and a client-credentials token verify against that certificate alone, for the
    names the AS is reached by (``idp`` in the network, ``localhost`` from the host)."""
    import jwt

    from tests.idp.fixture import start_idp

    env = SERVICES["idp"]["environment"]
    subprocess.run([sys.executable, str(REPO / "deploy/compose/idp_tls.py"), str(tmp_path)], check=True, timeout=60)
    cert = tmp_path / "idp.crt"
    as_ = start_idp(tmp_path / "as", env={
        "IDP_ISSUER": env["IDP_ISSUER"], "IDP_RESOURCES": env["IDP_RESOURCES"], "IDP_CONTROL": "0",
        "IDP_TLS_CERT": str(cert), "IDP_TLS_KEY": str(tmp_path / "idp.key")})
    try:
        assert as_.issuer == env["IDP_ISSUER"]
        trust = ssl.create_default_context(cafile=str(cert))
        for name in ("idp", "localhost"):
            with socket.create_connection(("127.0.0.1", as_.port), timeout=10) as raw:
                with trust.wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
        base = f"https://localhost:{as_.port}"
        with urllib.request.urlopen(f"{base}/.well-known/oauth-authorization-server", context=trust,
                                    timeout=10) as resp:
            assert json.loads(resp.read())["issuer"] == env["IDP_ISSUER"]
        (resource,) = json.loads(env["IDP_RESOURCES"])
        body = urllib.parse.urlencode({"grant_type": "client_credentials", "resource": resource,
                                       "scope": "mcp:read"}).encode()
        request = urllib.request.Request(f"{base}/token", data=body, headers={
            "Authorization": "Basic " + base64.b64encode(b"m2m-client:m2m-secret").decode()})
        with urllib.request.urlopen(request, context=trust, timeout=10) as resp:
            token = json.loads(resp.read())["access_token"]
        with urllib.request.urlopen(f"{base}/jwks", context=trust, timeout=10) as resp:
            jwks = jwt.PyJWKSet.from_dict(json.loads(resp.read()))
        kid = jwt.get_unverified_header(token)["kid"]
        claims = jwt.decode(token, jwks[kid].key, algorithms=["RS256"], audience=resource,
                            issuer=env["IDP_ISSUER"])
        assert claims["scope"] == "mcp:read"
        # The compose healthcheck, as written, trusting the certificate the way compose sets it up.
        probe = [a.replace(":9400/", f":{as_.port}/") for a in SERVICES["idp"]["healthcheck"]["test"][1:]]
        node_env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(cert)}
        assert subprocess.run([node_binary(), *probe[1:]], env=node_env, timeout=30).returncode == 0
    finally:
        as_.stop()
