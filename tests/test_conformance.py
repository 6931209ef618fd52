"""The official MCP conformance suite against server-everything, directly and through the gateway.

The suite's scenarios mostly expect its own fixture server's tools, so many fail against
server-everything even directly; the contract here is relative: the gateway must not
break any scenario that passes without it, and it must add what server-everything lacks
(DNS-rebinding protection: bad Host/Origin refused, the public host accepted).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.components import Everything, Gateway, start_everything, start_gateway
from tests.support.conformance import SuiteRun, list_server_scenarios, run_server_suite

MOUNT = "everything"
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


@pytest.fixture(scope="module")
def direct_run(workdir: Path) -> Iterator[SuiteRun]:
    server = start_everything(workdir / "direct")
    try:
        yield run_server_suite(server.url, workdir / "direct" / "results")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway_stack(workdir: Path) -> Iterator[tuple[Everything, Gateway]]:
    server = start_everything(workdir / "via-gateway")
    policies = workdir / "via-gateway" / "policies"
    policies.mkdir()
    (policies / f"{MOUNT}.yaml").write_text(ALLOW_ALL_POLICY)
    try:
        gw = start_gateway(workdir / "via-gateway", {"servers": {MOUNT: server}, "policies": str(policies)})
    except BaseException:
        server.stop()
        raise
    try:
        yield server, gw
    finally:
        gw.stop()
        server.stop()


@pytest.fixture(scope="module")
def gateway_run(workdir: Path, gateway_stack: tuple[Everything, Gateway]) -> SuiteRun:
    _, gw = gateway_stack
    return run_server_suite(gw.url(MOUNT), workdir / "via-gateway" / "results")


def _report(direct: SuiteRun, via: SuiteRun, names: list[str], gw: Gateway | None = None) -> str:
    parts = []
    for name in names:
        parts.append("direct:      " + (direct.scenarios[name].describe() if name in direct.scenarios else f"{name}: missing"))
        parts.append("via gateway: " + (via.scenarios[name].describe() if name in via.scenarios else f"{name}: missing"))
    if gw is not None:
        parts.append("--- gateway log tail ---\n" + gw.proc.tail(30))
    return "\n".join(parts)


def test_every_listed_server_scenario_ran_in_both_runs(direct_run: SuiteRun, gateway_run: SuiteRun):
    listed = set(list_server_scenarios())
    assert listed <= set(direct_run.scenarios), f"missing direct results: {sorted(listed - set(direct_run.scenarios))}"
    assert listed <= set(gateway_run.scenarios), \
        f"missing gateway results: {sorted(listed - set(gateway_run.scenarios))}\n{gateway_run.stdout[-3000:]}"


def test_every_scenario_that_passes_directly_passes_through_the_gateway(
        direct_run: SuiteRun, gateway_run: SuiteRun, gateway_stack: tuple[Everything, Gateway]):
    assert direct_run.passing(), "nothing passes directly: the harness is broken\n" + direct_run.stdout[-3000:]
    regressed = sorted(direct_run.passing() - gateway_run.passing())
    assert not regressed, "scenarios that pass directly but fail through the gateway:\n" + \
        _report(direct_run, gateway_run, regressed, gateway_stack[1])


def test_no_check_that_succeeds_directly_fails_through_the_gateway(
        direct_run: SuiteRun, gateway_run: SuiteRun, gateway_stack: tuple[Everything, Gateway]):
    """Finer than the scenario verdict: a scenario failing both ways may still lose a passing check."""
    lost = []
    for name, scenario in direct_run.scenarios.items():
        via = gateway_run.scenarios.get(name)
        succeeded_via = {c.get("id") for c in via.with_status("SUCCESS")} if via else set()
        lost += [(name, c.get("id")) for c in scenario.with_status("SUCCESS") if c.get("id") not in succeeded_via]
    assert not lost, f"checks lost through the gateway: {lost}\n" + \
        _report(direct_run, gateway_run, sorted({n for n, _ in lost}), gateway_stack[1])


def test_dns_rebinding_protection_fails_directly_and_passes_through_the_gateway(
        direct_run: SuiteRun, gateway_run: SuiteRun, gateway_stack: tuple[Everything, Gateway]):
    name = "dns-rebinding-protection"
    assert not direct_run.scenarios[name].passed, "server-everything now protects itself; revisit this test"
    assert gateway_run.scenarios[name].passed, _report(direct_run, gateway_run, [name], gateway_stack[1])
