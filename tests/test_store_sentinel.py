"""The shared store behind Redis Sentinel: a failover is followed without restarting the gateway.

A real master, one replica and three sentinels on 127.0.0.1 (``tests/support/sentinel.py``),
all with a password; the gateway names only the sentinels (``store.sentinel``).  After
``SENTINEL FAILOVER`` the old master replicates from the new one, so every key the
gateway changes afterwards can only have been written on the new master.
"""
from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import model
from gateway.config.yamlloc import load_text
from gateway.ratelimit.resp import RespClient, RespError, RespReplyError

from tests.conftest import Factory
from tests.support.components import Gateway, Upstream
from tests.support.gw_helpers import http_client, initialize, post, request, rpc, run_cli
from tests.support.sentinel import MASTER_NAME, SentinelGroup, start_sentinel_group

PASSWORD = "sentinel-test-pw"
LIMIT = 4
RATE_POLICY = f"""\
servers:
  up:
    default: deny
    tools:
      - {{id: up-all, match: "*", destructive: allow}}
    limits:
      - {{id: four-per-hour, match: {{tools: [add]}}, key: [global], windows: [{{limit: {LIMIT}, per: 1h}}]}}
"""


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    g = start_sentinel_group(tmp_path / "redis", PASSWORD)
    yield g
    g.stop()


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with http_client() as client:
        yield client


def sentinel_store(group: SentinelGroup, prefix: str) -> dict[str, Any]:
    return {"prefix": prefix, "sentinel": {"master": MASTER_NAME, "nodes": group.nodes,
                                           "password": "env:MCPGW_TEST_REDIS_PASSWORD"}}


async def _limited_gateway(group: SentinelGroup, upstream: Factory[Upstream], gateway: Factory[Gateway],
                           redis_prefix: str, tmp_path: Path) -> tuple[Upstream, Gateway]:
    """An SDK upstream behind a gateway whose store is the Sentinel group, with RATE_POLICY's limit."""
    up = await upstream.astart()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "up.yaml").write_text(RATE_POLICY)
    gw = await gateway.astart({"servers": {"up": {"url": up.url, "pinning": {"mode": "off"}}},
                               "policies": str(tmp_path / "p"), "store": sentinel_store(group, redis_prefix)},
                              env={"MCPGW_TEST_REDIS_PASSWORD": PASSWORD})
    return up, gw


async def add(http: Any, gw: Gateway, sid: str, a: int) -> tuple[int, dict[str, Any]]:
    """(HTTP status, the JSON-RPC response) of ``add(a, 1)`` in session ``sid``."""
    call = rpc("tools/call", {"name": "add", "arguments": {"a": a, "b": 1}})
    reply = await post(http, gw.url("up"), call, session_id=sid)
    return reply.status, reply.response_to(call["id"])


async def test_sessions_and_a_rate_limit_carry_on_on_the_new_master_after_a_sentinel_failover(
        group: SentinelGroup, upstream: Factory[Upstream], gateway: Factory[Gateway], redis_prefix: str,
        http: Any, tmp_path: Path) -> None:
    up, gw = await _limited_gateway(group, upstream, gateway, redis_prefix, tmp_path)
    before_sid, _ = await initialize(http, gw.url("up"))
    for a in range(2):
        status, response = await add(http, gw, before_sid, a)
        assert (status, response["result"]["structuredContent"]) == (200, {"result": a + 1})
    first = group.master()
    window_keys = first.keys(f"{{{redis_prefix}rl}}:four-per-hour:*")
    assert len(window_keys) == 1                        # the limit's window lives on the master
    assert any(before_sid in k for k in first.keys(f"{redis_prefix}*"))   # and so does the session

    old, new = await asyncio.to_thread(group.failover)
    assert old != new
    master = group.master()
    assert master.connection_pool.connection_kwargs["port"] == new
    window_before = master.get(window_keys[0])          # replicated before the failover

    # The session made before the failover still works, through the same gateway process.
    status, response = await add(http, gw, before_sid, 10)
    assert (status, response["result"]["structuredContent"]) == (200, {"result": 11})
    # The window went on from where the old master left it: 3 calls so far, one more, then refused.
    status, response = await add(http, gw, before_sid, 20)
    assert (status, response["result"]["structuredContent"]) == (200, {"result": 21})
    status, refused = await add(http, gw, before_sid, 30)
    assert (status, refused["error"]["data"]["reason"]) == (429, "rate_limited"), refused
    assert master.get(window_keys[0]) != window_before   # written on the new master (the old is read-only)
    assert len(up.records("tools/call")) == LIMIT

    # New sessions are written to the new master, and a DELETE removes them there.
    after_sid, _ = await initialize(http, gw.url("up"))
    assert any(after_sid in k for k in master.keys(f"{redis_prefix}*"))
    deleted = await request(http, "DELETE", gw.url("up"), headers={"Mcp-Session-Id": after_sid})
    assert deleted.status == 200
    assert not any(after_sid in k for k in master.keys(f"{redis_prefix}*"))
    assert gw.proc.returncode is None and gw.proc.pid == gw.proc.popen.pid   # never restarted


async def test_a_killed_master_is_replaced_and_the_running_gateway_follows_the_promoted_replica(
        group: SentinelGroup, upstream: Factory[Upstream], gateway: Factory[Gateway], redis_prefix: str,
        http: Any, tmp_path: Path) -> None:
    up, gw = await _limited_gateway(group, upstream, gateway, redis_prefix, tmp_path)
    sid, _ = await initialize(http, gw.url("up"))
    for a in range(2):
        assert (await add(http, gw, sid, a))[0] == 200

    old, new = await asyncio.to_thread(group.kill_master)
    assert group.master_port() == new != old

    for a in (10, 20):
        status, response = await add(http, gw, sid, a)
        assert (status, response["result"]["structuredContent"]) == (200, {"result": a + 1})
    status, refused = await add(http, gw, sid, 30)
    assert (status, refused["error"]["data"]["reason"]) == (429, "rate_limited"), refused
    fresh, _ = await initialize(http, gw.url("up"))
    assert any(fresh in k for k in group.redis(new).keys(f"{redis_prefix}*"))
    assert (await add(http, gw, fresh, 0))[0] == 429           # one global window, on the new master


async def test_the_limiter_connection_finds_the_master_through_the_sentinels_and_drops_a_readonly_one(
        group: SentinelGroup) -> None:
    cfg = parse_store({"sentinel": {"master": MASTER_NAME, "nodes": ["127.0.0.1:1", *group.nodes],
                                    "password": "env:MCPGW_TEST_REDIS_PASSWORD"}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCPGW_TEST_REDIS_PASSWORD", PASSWORD)
        via_sentinel = RespClient("", 2.0, cfg.sentinel)
    replica_port = next(s.port for s in group.servers if s.port != group.master_port())
    direct = RespClient(f"redis://:{PASSWORD}@127.0.0.1:{replica_port}/0", 2.0)
    try:
        # A dead sentinel (port 1) is skipped: the others name the master.
        assert await via_sentinel.call("SET", "t:sentinel:k", "v") == b"OK"
        assert group.master().get("t:sentinel:k") == "v"
        # A replica answers writes with READONLY: the connection is dropped (the next call
        # reconnects, to whatever the sentinels then name), not kept as if the reply were an error.
        first = await direct.call("CLIENT", "ID")
        with pytest.raises(RespError) as raised:
            await direct.call("SET", "t:sentinel:k", "w")
        assert not isinstance(raised.value, RespReplyError) and "READONLY" in str(raised.value)
        assert await direct.call("CLIENT", "ID") != first
    finally:
        await via_sentinel.close()
        await direct.close()


def parse_store(store: dict[str, Any]) -> Any:
    """``store`` as the gateway parses it, in an otherwise minimal config (secrets not resolved)."""
    node, problems = load_text(CONFIG + textwrap.indent(yaml.safe_dump(store), "  "), "gateway.yaml")
    config = model.parse_config(node, "gateway.yaml", problems, check_secrets=False)
    assert problems == [] and config is not None
    return config.store


CONFIG = """\
listen: {port: 8080}
admin: {port: 9464}
public_url: http://127.0.0.1:8080
auth: {mode: none}
servers: {up: {url: "http://127.0.0.1:3001/mcp"}}
store:
"""
BAD_SENTINEL = [
    # (behaviour, the store section's body, the line the problem is reported at, a part of the message)
    ("a node without a port", "  sentinel:\n    master: m\n    nodes:\n      - 127.0.0.1\n", "- 127.0.0.1",
     "store.sentinel.nodes[0] must be 'host:port'"),
    ("url next to sentinel", "  url: redis://127.0.0.1:6379/0\n  sentinel: {master: m, nodes: ['h:1']}\n",
     "sentinel:", "store.url and store.sentinel are exclusive"),
    ("no master", "  sentinel:\n    nodes: ['h:1']\n", "nodes:", "store.sentinel.master is required"),
    ("an inline password", "  sentinel:\n    master: m\n    nodes: ['h:1']\n    password: hunter2\n",
     "password:", "store.sentinel.password: secrets are never written inline"),
    ("an unset password variable",
     "  sentinel:\n    master: m\n    nodes: ['h:1']\n    password: env:MCPGW_TEST_UNSET_VARIABLE\n",
     "password:", "environment variable MCPGW_TEST_UNSET_VARIABLE is not set"),
    ("an unknown key", "  sentinel:\n    master: m\n    nodes: ['h:1']\n    service_name: m\n",
     "service_name:", "unknown key 'service_name' in store.sentinel"),
]


@pytest.mark.parametrize("store,where,message", [c[1:] for c in BAD_SENTINEL], ids=[c[0] for c in BAD_SENTINEL])
def test_a_bad_sentinel_store_is_refused_with_its_file_and_line(
        store: str, where: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG + store)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if where in text)
    assert "MCPGW_TEST_UNSET_VARIABLE" not in os.environ
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    problems = [ln for ln in result.stderr.splitlines() if ln.startswith(f"{path}:")]
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith(f"{path}:{line}:") and message in problems[0], problems
