"""Two gateway processes sharing one real Redis: any replica serves any session."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Factory
from tests.support.components import Gateway, Upstream
from tests.support.gw_helpers import http_client, initialize, post, request, rpc, with_policy


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with http_client() as client:
        yield client


@pytest.fixture
async def replicas(upstream: Factory[Upstream], gateway: Factory[Gateway], redis_store: dict[str, str],
                   tmp_path: Path) -> tuple[Upstream, Gateway, Gateway]:
    up = await upstream.astart()
    config = with_policy({"servers": {"up": up}, "store": redis_store}, tmp_path)
    a, b = await asyncio.gather(gateway.astart(config), gateway.astart(config))
    return up, a, b


async def test_a_session_initialized_through_one_replica_continues_through_the_other(
        http: Any, replicas: tuple[Upstream, Gateway, Gateway]) -> None:
    up, a, b = replicas
    sid, _ = await initialize(http, a.url("up"))
    call = rpc("tools/call", {"name": "add", "arguments": {"a": 40, "b": 2}})
    reply = await post(http, b.url("up"), call, session_id=sid)
    assert reply.status == 200
    assert reply.response_to(call["id"])["result"]["structuredContent"] == {"result": 42}
    # Both replicas sent the upstream the same upstream session.
    upstream_sids = {r["headers"].get("mcp-session-id") for r in up.records() if r["jsonrpc_method"] != "initialize"}
    assert len(upstream_sids) == 1 and sid not in upstream_sids


async def test_delete_through_one_replica_ends_the_session_on_the_other(
        http: Any, replicas: tuple[Upstream, Gateway, Gateway]) -> None:
    _, a, b = replicas
    sid, _ = await initialize(http, a.url("up"))
    warm = await post(http, a.url("up"), rpc("tools/list"), session_id=sid)   # now cached on A
    assert warm.status == 200
    deleted = await request(http, "DELETE", b.url("up"), headers={"Mcp-Session-Id": sid})
    assert deleted.status == 200
    after = await post(http, a.url("up"), rpc("tools/list", id="after"), session_id=sid)
    assert after.status == 404
    assert (after.json["id"], after.json["error"]["code"], after.error_reason) == ("after", -32001, "session_not_found")
