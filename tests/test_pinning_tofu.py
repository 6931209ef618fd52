"""Trust on first use across two gateway replicas sharing one Redis.

Replica A sees a server's tools first and pins them in Redis; replica B, which
never listed them, enforces that pin: a changed tool is missing from B's
listing and a call to it is refused, even before B has listed anything.  One
server entry per case, so every case starts from a fresh pin.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from tests.support.components import start_gateway
from tests.support.gw_helpers import allow_all
from tests.support.mutable_upstream import Mutable, default_tools, start_mutable
from tests.support.pin_cases import BASE_NAMES, CASES, TOOL_HELD, Case, list_all, mcp_client, names
from mcp.shared.exceptions import MCPError


class Replicas:
    def __init__(self) -> None:
        self.up: Mutable | None = None
        self.a: Any = None
        self.b: Any = None
        self.prefix = ""
        self.redis_url = ""

    def stop(self) -> None:
        for proc in (self.a, self.b, self.up):
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Replicas]:
    import uuid

    r = Replicas()
    workdir = tmp_path_factory.mktemp("pinning-tofu")
    try:
        r.up = start_mutable(workdir / "up", json_response=False)
        r.prefix, r.redis_url = f"t:tofu:{uuid.uuid4().hex[:8]}:", redis_url
        servers = {f"t_{c.id}": {"url": r.up.url, "pinning": {"mode": "tofu"}} for c in CASES}
        servers["t_stale"] = {"url": r.up.url, "pinning": {"mode": "tofu"}}
        config = {"policies": allow_all(workdir), "pins": str(workdir / "pins"),
                  "store": {"url": redis_url, "prefix": r.prefix}, "servers": servers}
        r.a = start_gateway(workdir / "a", config)
        r.b = start_gateway(workdir / "b", config)
        yield r
    finally:
        r.stop()


@pytest.fixture(autouse=True)
def baseline(replicas: Replicas) -> None:
    assert replicas.up is not None
    replicas.up.set_tools(default_tools())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_first_state_is_pinned_on_one_replica_and_enforced_on_the_other(replicas: Replicas, case: Case) -> None:
    up, server = replicas.up, f"t_{case.id}"
    assert up is not None
    async with mcp_client(replicas.a.url(server), "sse") as on_a:
        assert await list_all(on_a) == BASE_NAMES
    pin = redis.Redis.from_url(replicas.redis_url).get(f"{replicas.prefix}pins:{server}")
    assert pin is not None, "replica A must have pinned the first state in the shared store"

    up.set_tools(case.tools())
    before = up.calls(case.tool)
    async with mcp_client(replicas.b.url(server), "json") as on_b:
        # B has never listed this server: the call alone makes it fetch and compare.
        with pytest.raises(MCPError) as refused:
            await on_b.call_tool(case.tool, case.args)
        assert refused.value.code == TOOL_HELD
        assert await list_all(on_b) == [n for n in names(case.tools()) if n != case.tool]
    async with mcp_client(replicas.a.url(server), "sse") as on_a:
        assert await list_all(on_a) == [n for n in names(case.tools()) if n != case.tool]
        with pytest.raises(MCPError):
            await on_a.call_tool(case.tool, case.args)
    assert up.calls(case.tool) == before
    replicas.b.wait_for_log({"event": "tool.pin_violation", "server": server, "tool": case.tool,
                             "kind": case.kind, "action": "blocked"})


async def test_list_changed_seen_on_one_replica_marks_the_other_stale(replicas: Replicas) -> None:
    """A's SSE stream carries the notification; B learns it through the store and re-checks."""
    import asyncio

    up, server = replicas.up, "t_stale"
    assert up is not None
    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        if type(message).__name__ == "ToolListChangedNotification":
            changed.set()

    async with mcp_client(replicas.a.url(server), "sse", message_handler=on_message) as on_a, \
            mcp_client(replicas.b.url(server), "json") as on_b:    # no GET stream: B hears it via Redis only
        assert await list_all(on_a) == BASE_NAMES
        assert await list_all(on_b) == BASE_NAMES          # B's catalog is fresh now
        start = len(replicas.b.log_lines())
        tools = default_tools()
        tools[1]["inputSchema"]["properties"]["c"] = {"type": "integer"}
        up.set_tools(tools, notify=True)
        await asyncio.wait_for(changed.wait(), 10)
        replicas.b.wait_for_log({"event": "pins.stale_remote", "server": server}, start=start)
        with pytest.raises(MCPError) as refused:
            await on_b.call_tool("add", {"a": 1, "b": 2})
        assert refused.value.code == TOOL_HELD
