"""The official MCP conformance suite, directly and through the gateway, for both revisions.

- 2025-11-25: the release suite (``--suite all``) against server-everything, and against an
  SDK server with the suite's fixtures (``support/conformance_upstream.py``, dual-era).
- 2026-07-28: the prerelease suite's frozen requirement set (``--requirements 2026-07-28``)
  against the fixtures server, which speaks 2026-07-28 (server-everything does not yet).

The suite's scenarios expect its own fixture server's tools, so some fail even directly
(many against server-everything); the contract here is relative: the gateway must not
break any scenario or check that passes without it, and it must add what server-everything
lacks (DNS-rebinding protection: bad Host/Origin refused, the public host accepted).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.components import Gateway, start_everything, start_gateway
from tests.support.conformance import SuiteRun, list_server_scenarios, run_server_suite, start_conformance_upstream

# Each case: the revision, its upstream (a function of a work directory returning a
# handle with .url and .stop()), and whether the suite runs through the upstream's mount or
# through a virtual server whose only origin is that mount (published with no prefix, so
# the suite's fixture names are the published names).
CASES: dict[str, tuple[str, Callable[[Path], Any], bool]] = {
    "2025-11-25-everything": ("2025-11-25", start_everything, False),
    "2025-11-25-fixtures": ("2025-11-25", start_conformance_upstream, False),
    "2026-07-28-fixtures": ("2026-07-28", start_conformance_upstream, False),
    "2025-11-25-everything-virtual": ("2025-11-25", start_everything, True),
    "2025-11-25-fixtures-virtual": ("2025-11-25", start_conformance_upstream, True),
}
MOUNT = "upstream"
VIRTUAL = "conformance"
# Conformance measures protocol transparency, not policy, so the mount gets an allow-all
# policy: every tool/resource/prompt (including unknown and possibly destructive tools, which
# the suite calls by its own fixture names) and every method.  Everything else (Origin/Host
# checks, sessions, inspection) keeps its defaults.
ALLOW_ALL_POLICY = f"""\
servers:
  {MOUNT}:
    default: allow
    destructive: allow
    methods:
      - id: conformance-any-method
        match: ["**"]
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conformance")


@dataclass(frozen=True)
class Runs:
    case: str
    revision: str
    direct: SuiteRun
    via: SuiteRun
    gateway: Gateway


@pytest.fixture(scope="module", params=list(CASES))
def runs(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Runs]:
    """One suite run straight at the upstream, one through the gateway (each its own upstream)."""
    case: str = request.param
    revision, start_server, virtual = CASES[case]
    base = workdir / case
    server = start_server(base / "direct")
    try:
        direct = run_server_suite(server.url, base / "direct" / "results", revision=revision)
    finally:
        server.stop()
    server = start_server(base / "via-gateway")
    policies = base / "via-gateway" / "policies"
    policies.mkdir()
    (policies / f"{MOUNT}.yaml").write_text(ALLOW_ALL_POLICY)
    config: dict[str, Any] = {"servers": {MOUNT: server}, "policies": str(policies)}
    if virtual:
        config["virtual_servers"] = {VIRTUAL: {"include": [{"server": MOUNT, "prefix": ""}]}}
    try:
        gw = start_gateway(base / "via-gateway", config)
    except BaseException:
        server.stop()
        raise
    try:
        yield Runs(case, revision, direct, run_server_suite(gw.url(VIRTUAL if virtual else MOUNT),
                                                            base / "via-gateway" / "results", revision=revision), gw)
    finally:
        gw.stop()
        server.stop()


def _report(direct: SuiteRun, via: SuiteRun, names: list[str], gw: Gateway | None = None) -> str:
    parts = []
    for name in names:
        parts.append("direct:      " + (direct.scenarios[name].describe() if name in direct.scenarios else f"{name}: missing"))
        parts.append("via gateway: " + (via.scenarios[name].describe() if name in via.scenarios else f"{name}: missing"))
    if gw is not None:
        parts.append("--- gateway log tail ---\n" + gw.proc.tail(30))
    return "\n".join(parts)


def test_every_listed_server_scenario_ran_in_both_runs(runs: Runs):
    listed = set(list_server_scenarios(runs.revision))
    assert listed <= set(runs.direct.scenarios), f"missing direct results: {sorted(listed - set(runs.direct.scenarios))}"
    assert listed <= set(runs.via.scenarios), \
        f"missing gateway results: {sorted(listed - set(runs.via.scenarios))}\n{runs.via.stdout[-3000:]}"


def test_every_scenario_that_passes_directly_passes_through_the_gateway(runs: Runs):
    direct, via = runs.direct, runs.via
    assert direct.passing(), "nothing passes directly: the harness is broken\n" + direct.stdout[-3000:]
    regressed = sorted(direct.passing() - via.passing())
    assert not regressed, "scenarios that pass directly but fail through the gateway:\n" + \
        _report(direct, via, regressed, runs.gateway)


def test_no_check_that_succeeds_directly_fails_through_the_gateway(runs: Runs):
    """Finer than the scenario verdict: a scenario failing both ways may still lose a passing check."""
    direct, via = runs.direct, runs.via
    lost = []
    for name, scenario in direct.scenarios.items():
        through = via.scenarios.get(name)
        succeeded_via = {c.get("id") for c in through.with_status("SUCCESS")} if through else set()
        lost += [(name, c.get("id")) for c in scenario.with_status("SUCCESS") if c.get("id") not in succeeded_via]
    assert not lost, f"checks lost through the gateway: {lost}\n" + \
        _report(direct, via, sorted({n for n, _ in lost}), runs.gateway)


def test_dns_rebinding_protection_passes_through_the_gateway_even_where_it_fails_directly(runs: Runs):
    name = "dns-rebinding-protection"
    if runs.case.startswith("2025-11-25-everything"):
        assert not runs.direct.scenarios[name].passed, "server-everything now protects itself; revisit this test"
    assert runs.via.scenarios[name].passed, _report(runs.direct, runs.via, [name], runs.gateway)
