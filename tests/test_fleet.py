"""Issue #13: a fleet of three gateway replicas on one Redis behaves as one gateway.

Three gateway processes share a real Redis; a real SDK upstream sits behind them and a
real SDK client in front, whose every HTTP request opens a new TCP connection through a
round-robin proxy (``tests/support/rr_proxy.py``), so one client session is spread over
all replicas.  The proxy's per-connection records say which replica served what.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from mcp.shared.exceptions import MCPError

from tests.conftest import Factory
from tests.support.clients import ProgressLog, find_mcp_error
from tests.support.components import Gateway, Upstream, gateway_config
from tests.support.fleet import REPLICAS, Fleet, fleet_client, is_tool_call, start_fleet
from tests.support.gw_helpers import with_policy
from tests.support.mutable_upstream import Mutable, default_tools, start_mutable
from tests.support.pin_cases import TOOL_HELD, list_all, pins_cli
from tests.support.procs import free_port
from tests.support.rr_proxy import Connection

ALL = set(range(REPLICAS))
RATE_LIMITED = -32004
UNKNOWN_TOOL = -32602          # a tool the policy denies looks like a tool that does not exist
RELOAD_BUDGET = 2.0            # seconds from the policy file write to the new decision on every replica


@pytest.fixture
async def proxies() -> AsyncIterator[list[Fleet]]:
    """Fleets started by a test; their proxies are closed at teardown (the replicas by the gateway factory)."""
    fleets: list[Fleet] = []
    yield fleets
    for fleet in fleets:
        await fleet.proxy.close()


async def fleet_of(gateway: Factory[Gateway], proxies: list[Fleet], config: dict[str, Any]) -> Fleet:
    fleet = await start_fleet(gateway, config)
    proxies.append(fleet)
    return fleet


def session_of(conn: Connection, sid: str) -> bool:
    return conn.header("mcp-session-id") == sid


def only_session_id(fleet: Fleet) -> str:
    sids = {c.header("mcp-session-id") for c in fleet.proxy.connections} - {None}
    assert len(sids) == 1, sids
    return sids.pop()  # type: ignore[return-value]


async def calls_until(deadline: float, call: Callable[[int], Any], done: Callable[[], bool]) -> int:
    """Make ``call(i)`` for i = 0, 1, ... until ``done()``; fail at ``deadline`` (monotonic). Returns the count."""
    i = 0
    while not done():
        assert time.monotonic() < deadline, "the fleet did not converge before the deadline"
        await call(i)
        i += 1
    return i


def backend_of(fleet: Fleet, tool: str, marker: str) -> int:
    (conn,) = [c for c in fleet.proxy.connections if is_tool_call(tool, marker)(c)]
    assert conn.backend is not None
    return conn.backend


# --------------------------------------------------------------------------- (a) sessions

async def test_one_sdk_session_is_served_by_all_three_replicas(
        upstream: Factory[Upstream], gateway: Factory[Gateway], redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    up = await upstream.astart()
    fleet = await fleet_of(gateway, proxies, with_policy({"servers": {"up": up}, "store": redis_store}, tmp_path))
    async with fleet_client(fleet.url("up")) as client:
        for i in range(4 * REPLICAS):
            result = await client.call_tool("add", {"a": i, "b": 1000})
            assert result.structured_content == {"result": i + 1000}
    sid = only_session_id(fleet)
    calls = fleet.proxy.served(lambda c: session_of(c, sid) and is_tool_call("add")(c))
    assert set(calls) == ALL and sum(calls.values()) == 4 * REPLICAS, calls
    # Every replica forwarded to the one upstream session the first replica opened.
    upstream_sids = {r["headers"].get("mcp-session-id") for r in up.records() if r["jsonrpc_method"] != "initialize"}
    assert len(upstream_sids) == 1 and sid not in upstream_sids


async def test_a_stream_closed_by_the_upstream_resumes_with_last_event_id_on_another_replica(
        upstream: Factory[Upstream], gateway: Factory[Gateway], redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    up = await upstream.astart(retry_interval_ms=50)
    fleet = await fleet_of(gateway, proxies, with_policy({"servers": {"up": up}, "store": redis_store}, tmp_path))
    opened: list[Connection] = []

    def drain_the_opener(conn: Connection) -> None:
        # The load balancer takes the replica that opened the stream out of rotation before it
        # sees a byte of the call, so the client's resume cannot come back to it.
        if is_tool_call("reconnecting_progress")(conn):
            opened.append(conn)
            fleet.proxy.drained.add(conn.backend)  # type: ignore[arg-type]

    fleet.proxy.on_connection = drain_the_opener
    log = ProgressLog()
    async with fleet_client(fleet.url("up")) as client:
        result = await client.call_tool("reconnecting_progress", {"steps": 3, "interval_ms": 100},
                                        progress_callback=log.callback)
    assert result.content[0].text == "resumed and done after 3 steps"
    assert [p for _, p, _, _ in log.events] == [1.0, 2.0, 3.0]
    (opener,) = opened
    resumes = [c for c in fleet.proxy.connections if c.method == "GET" and c.header("last-event-id")]
    assert resumes, [c.head for c in fleet.proxy.connections]
    assert all(c.backend != opener.backend for c in resumes)
    # The upstream was asked to resume its own stream, in the session the opener created.
    (get_record,) = [r for r in up.records() if r["method"] == "GET" and "last-event-id" in r["headers"]]
    (call_record,) = [r for r in up.records() if r["jsonrpc_method"] == "tools/call"]
    assert get_record["headers"]["mcp-session-id"] == call_record["headers"]["mcp-session-id"]


# --------------------------------------------------------------------------- (e) a replica dies

async def test_a_replica_killed_mid_session_loses_no_session(
        upstream: Factory[Upstream], gateway: Factory[Gateway], redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    up = await upstream.astart()
    fleet = await fleet_of(gateway, proxies, with_policy({"servers": {"up": up}, "store": redis_store}, tmp_path))
    async with fleet_client(fleet.url("up")) as client:
        for i in range(2 * REPLICAS):
            assert (await client.call_tool("add", {"a": i, "b": 1})).structured_content == {"result": i + 1}
        sid = only_session_id(fleet)
        assert set(fleet.proxy.served(lambda c: session_of(c, sid))) == ALL
        victim = 1
        fleet.kill(victim)
        killed_at = len(fleet.proxy.connections)
        for i in range(3 * REPLICAS):
            result = await client.call_tool("echo", {"text": f"after-kill-{i}"})
            assert result.content[0].text == f"after-kill-{i}"
    after = fleet.proxy.served(lambda c: c.number >= killed_at and session_of(c, sid) and is_tool_call("echo")(c))
    assert set(after) == ALL - {victim} and sum(after.values()) == 3 * REPLICAS, after
    assert fleet.proxy.refused[victim] >= REPLICAS            # its turn came and was skipped
    assert only_session_id(fleet) == sid                      # no new session was needed


# --------------------------------------------------------------------------- (b) rate limits

RATE_POLICY = """\
servers:
  up:
    default: deny
    tools:
      - {id: up-all, match: "*", destructive: allow}
    limits:
      - {id: n-per-hour, match: {tools: [add]}, key: [global], windows: [{limit: LIMIT, per: 1h}]}
"""


@pytest.mark.parametrize("n", [1, 7])
async def test_a_limit_of_n_admits_exactly_n_through_the_three_replicas(
        upstream: Factory[Upstream], gateway: Factory[Gateway], redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet], n: int) -> None:
    up = await upstream.astart()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "up.yaml").write_text(RATE_POLICY.replace("LIMIT", str(n)))
    fleet = await fleet_of(gateway, proxies, {"servers": {"up": {"url": up.url, "pinning": {"mode": "off"}}},
                                              "policies": str(tmp_path / "p"), "store": redis_store})

    async def one_client(k: int) -> tuple[int, int]:
        admitted = refused = 0
        async with fleet_client(fleet.url("up")) as client:
            for j in range(n + 1):            # every client alone would exceed the limit
                try:
                    result = await client.call_tool("add", {"a": k, "b": j})
                except BaseException as exc:  # noqa: BLE001 - the SDK raises refusals, often in a group
                    if (err := find_mcp_error(exc)) is None or err.code != RATE_LIMITED:
                        raise
                    refused += 1
                else:
                    assert result.structured_content == {"result": k + j}
                    admitted += 1
        return admitted, refused

    results = await asyncio.gather(*(one_client(k) for k in range(REPLICAS)))
    assert sum(a for a, _ in results) == n
    assert sum(r for _, r in results) == REPLICAS * (n + 1) - n
    assert len(up.records("tools/call")) == n                 # a refused call never reached the upstream
    assert set(fleet.proxy.served(is_tool_call("add"))) == ALL


# --------------------------------------------------------------------------- (c) pins

@pytest.fixture
def mutable(tmp_path: Path) -> Any:
    up = start_mutable(tmp_path / "mutable")
    try:
        yield up
    finally:
        up.stop()


def described_differently() -> list[dict[str, Any]]:
    tools = default_tools()
    tools[0]["description"] += " Results are cached for a minute."     # tools[0] is echo
    return tools


async def tofu_fleet(gateway: Factory[Gateway], proxies: list[Fleet], mutable: Mutable,
                     redis_store: dict[str, str], tmp_path: Path) -> Fleet:
    config = with_policy({"pins": str(tmp_path / "pins"), "store": redis_store,
                          "servers": {"t": {"url": mutable.url, "pinning": {"mode": "tofu"}}}}, tmp_path)
    return await fleet_of(gateway, proxies, config)


async def read_pin(redis_store: dict[str, str], server: str) -> bytes | None:
    client = aioredis.Redis.from_url(redis_store["url"])
    try:
        return await client.get(f"{redis_store['prefix']}pins:{server}")
    finally:
        await client.aclose()


async def test_a_tofu_pin_taken_through_one_replica_holds_at_the_other_two(
        gateway: Factory[Gateway], mutable: Mutable, redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    fleet = await tofu_fleet(gateway, proxies, mutable, redis_store, tmp_path)
    async with fleet_client(fleet.url("t")) as client:
        listed = await list_all(client)
    assert listed == [t["name"] for t in default_tools()]
    assert await read_pin(redis_store, "t") is not None
    pinner = next(c.backend for c in fleet.proxy.connections if b'"tools/list"' in c.body)

    mutable.set_tools(described_differently())
    before = mutable.calls("echo")
    async with fleet_client(fleet.url("t")) as client:
        for i in range(2 * REPLICAS):
            with pytest.raises(MCPError) as held:
                await client.call_tool("echo", {"text": f"held-{i}"})
            assert held.value.code == TOOL_HELD
    held_on = fleet.proxy.served(is_tool_call("echo"))
    assert pinner in ALL and set(held_on) == ALL, (pinner, held_on)     # the pinner and the other two
    assert mutable.calls("echo") == before                     # a held call never reaches the upstream


async def test_a_pin_reset_and_the_new_pin_taken_through_one_replica_hold_at_the_other_two(
        gateway: Factory[Gateway], mutable: Mutable, redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    fleet = await tofu_fleet(gateway, proxies, mutable, redis_store, tmp_path)
    async with fleet_client(fleet.url("t")) as client:
        assert "echo" in await list_all(client)
    old_pin = await read_pin(redis_store, "t")
    mutable.set_tools(described_differently())
    reset = await asyncio.to_thread(pins_cli, "reset", "t", config=fleet.gateways[0].config_path)
    assert reset.returncode == 0, reset.stderr

    listings: list[list[str]] = []
    allowed_on: set[int] = set()
    async with fleet_client(fleet.url("t")) as client:
        # The reset reaches each replica by pub/sub; the first listing after it pins the new state.
        async def list_once(_: int) -> None:
            listings.append(await list_all(client))
        await calls_until(time.monotonic() + 10, list_once, lambda: bool(listings) and "echo" in listings[-1])
        new_pin = await read_pin(redis_store, "t")
        assert new_pin is not None and new_pin != old_pin

        async def call_echo(i: int) -> None:
            try:
                result = await client.call_tool("echo", {"text": f"repinned-{i}"})
            except MCPError as exc:
                assert exc.code == TOOL_HELD            # a replica the reset has not reached yet
                return
            assert not result.is_error
            allowed_on.add(backend_of(fleet, "echo", f"repinned-{i}"))
        tried = await calls_until(time.monotonic() + 10, call_echo, lambda: ALL <= allowed_on)
        for i in range(tried, tried + 2 * REPLICAS):           # and it holds everywhere from then on
            assert (await client.call_tool("echo", {"text": f"repinned-{i}"})).content[0].text == "echo called"
    assert mutable.calls("echo") >= 2 * REPLICAS


async def test_a_pin_approval_holds_at_all_three_replicas(
        gateway: Factory[Gateway], mutable: Mutable, redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    """enforce mode: the lock file (a ConfigMap in production) is approved once, with the CLI."""
    config = with_policy({"pins": str(tmp_path / "pins"), "store": redis_store,
                          "servers": {"t": {"url": mutable.url, "pinning": {"mode": "enforce"}}}}, tmp_path)
    cli_config = tmp_path / "cli.yaml"
    cli_config.write_text(yaml.safe_dump(gateway_config(config, free_port(), free_port())))
    fetched = await asyncio.to_thread(pins_cli, "fetch", "t", config=cli_config)
    assert fetched.returncode == 0, fetched.stderr
    fleet = await fleet_of(gateway, proxies, config)
    mutable.set_tools(described_differently())
    async with fleet_client(fleet.url("t")) as client:
        for i in range(2 * REPLICAS):
            with pytest.raises(MCPError) as held:
                await client.call_tool("echo", {"text": f"held-{i}"})
            assert held.value.code == TOOL_HELD
        assert set(fleet.proxy.served(is_tool_call("echo"))) == ALL

        marks = [len(gw.log_lines()) for gw in fleet.gateways]
        approved = await asyncio.to_thread(pins_cli, "approve", "t", "echo", config=cli_config)
        assert approved.returncode == 0, approved.stderr
        allowed_on: set[int] = set()

        async def call_echo(i: int) -> None:
            try:
                result = await client.call_tool("echo", {"text": f"approved-{i}"})
            except MCPError as exc:
                assert exc.code == TOOL_HELD            # a replica that has not re-read the lock file yet
                return
            assert result.content[0].text == "echo called"
            allowed_on.add(backend_of(fleet, "echo", f"approved-{i}"))
        tried = await calls_until(time.monotonic() + 10, call_echo, lambda: ALL <= allowed_on)
        for i in range(tried, tried + 2 * REPLICAS):
            assert (await client.call_tool("echo", {"text": f"approved-{i}"})).content[0].text == "echo called"
    for gw, mark in zip(fleet.gateways, marks):
        await asyncio.to_thread(gw.wait_for_log, {"event": "pins.lock_loaded", "server": "t"}, start=mark)


# --------------------------------------------------------------------------- (d) policy hot reload

def reload_policy(allowed: list[str]) -> str:
    rules = "".join(f"      - {{id: allow-{name}, match: {name}, destructive: allow}}\n" for name in allowed)
    return f"servers:\n  up:\n    tools:\n{rules}"


async def test_a_policy_change_is_enforced_by_every_replica_within_two_seconds(
        upstream: Factory[Upstream], gateway: Factory[Gateway], redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    up = await upstream.astart()
    policies = tmp_path / "policies"
    policies.mkdir()
    policy_file = policies / "up.yaml"
    policy_file.write_text(reload_policy(["echo", "add"]))
    fleet = await fleet_of(gateway, proxies, {"policies": str(policies), "store": redis_store,
                                              "servers": {"up": {"url": up.url, "pinning": {"mode": "off"}}}})
    outcomes: list[tuple[float, int, str]] = []      # (answer time, replica, "allow" | "deny")

    async with fleet_client(fleet.url("up")) as client:
        async def call_echo(i: int) -> None:
            try:
                result = await client.call_tool("echo", {"text": f"probe-{i}"})
                outcome = "deny" if result.is_error else "allow"
            except BaseException as exc:  # noqa: BLE001 - the SDK raises the denial, often in a group
                if (err := find_mcp_error(exc)) is None or err.code != UNKNOWN_TOOL:
                    raise
                outcome = "deny"
            outcomes.append((time.monotonic(), backend_of(fleet, "echo", f"probe-{i}"), outcome))

        def denied_everywhere() -> bool:
            return {b for t, b, o in outcomes if t > changed_at and o == "deny"} == ALL

        changed_at = float("inf")
        first = await calls_until(time.monotonic() + 10, call_echo, lambda: len(outcomes) >= 2 * REPLICAS)
        assert all(o == "allow" for _, _, o in outcomes) and {b for _, b, _ in outcomes} == ALL
        tmp = policies / ".up.yaml.tmp"
        tmp.write_text(reload_policy(["add"]))
        changed_at = time.monotonic()
        tmp.replace(policy_file)
        await calls_until(changed_at + 10, lambda i: call_echo(first + i), denied_everywhere)
        last = len(outcomes)
        await calls_until(time.monotonic() + 10, lambda i: call_echo(last + i),
                          lambda: len(outcomes) >= last + 2 * REPLICAS)
        assert (await client.call_tool("add", {"a": 2, "b": 3})).structured_content == {"result": 5}

    reload_seconds = {}
    for replica in sorted(ALL):
        seen = [(t, o) for t, b, o in outcomes if b == replica and t > changed_at]
        switch = next(i for i, (_, o) in enumerate(seen) if o == "deny")
        assert all(o == "deny" for _, o in seen[switch:]), seen      # never back to the old rule
        reload_seconds[replica] = seen[switch][0] - changed_at
    print(f"new rule enforced after {', '.join(f'{s:.3f}s' for s in reload_seconds.values())} (replicas 0-2)")
    assert all(s < RELOAD_BUDGET for s in reload_seconds.values()), reload_seconds


async def test_a_replica_killed_while_relaying_a_call_stream_loses_neither_the_call_nor_the_session(
        upstream: Factory[Upstream], gateway: Factory[Gateway], redis_store: dict[str, str], tmp_path: Path,
        proxies: list[Fleet]) -> None:
    up = await upstream.astart()
    fleet = await fleet_of(gateway, proxies, with_policy({"servers": {"up": up}, "store": redis_store}, tmp_path))
    relays: list[Connection] = []
    fleet.proxy.on_connection = lambda c: relays.append(c) if is_tool_call("slow_progress")(c) else None
    first_progress = asyncio.Event()
    steps: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append(progress)
        first_progress.set()

    async with fleet_client(fleet.url("up"), timeout=20) as client:
        call = asyncio.create_task(client.call_tool("slow_progress", {"steps": 5, "interval_ms": 300},
                                                    progress_callback=on_progress))
        await asyncio.wait_for(first_progress.wait(), 10)
        (relay,) = relays
        assert relay.backend is not None
        fleet.kill(relay.backend)                      # mid-call: the replica relaying its stream dies
        result = await asyncio.wait_for(call, 20)
        assert result.content[0].text == "done after 5 steps"
        assert steps == [1.0, 2.0, 3.0, 4.0, 5.0]
        after = await client.call_tool("add", {"a": 1, "b": 2})
        assert after.structured_content == {"result": 3}
    resumes = [c for c in fleet.proxy.connections if c.method == "GET" and c.header("last-event-id")]
    assert resumes and all(c.backend != relay.backend for c in resumes)
