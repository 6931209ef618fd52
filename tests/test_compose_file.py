"""The shipped compose stack can start as written (#15 item 1), checked without a Docker engine.

No engine runs here, so the file is checked for the conditions that broke it: every upstream
the gateway config names is a service; with ``read_only: true`` the metrics directory given to
``--workers`` is on a tmpfs (tests/test_workers_metrics.py runs the process with only that
directory writable); an unset or empty ``UPSTREAM_TOKEN`` is refused by compose itself (``:?``);
Redis persists (TOFU pins and approvals are security state).
"""
from __future__ import annotations

from urllib.parse import urlsplit

import yaml

from tests.support.components import REPO

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
