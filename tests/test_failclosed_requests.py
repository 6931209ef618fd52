"""What reaches an upstream is what the gateway checked: the request side, over raw sockets.

* A message that is both a request and a response (``method`` with ``result``) is refused,
  never taken for a response that skips authorization.
* A differential property over generated header sets: copies of ``Mcp-Method`` /
  ``Mcp-Name`` / ``MCP-Protocol-Version`` in any letter case, with ``_`` for ``-``,
  repeated or not, with values that agree with the body or not.  Either the gateway
  refuses, or the upstream receives exactly one copy of each, equal to what the body
  (the thing the policy decided on) says.
* The upstream pool's wait is bounded: with every connection busy a request gets 503
  ``upstream_pool_exhausted`` after ``pool_timeout``, not a hang.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.evil_upstream import EvilUpstream, http
from tests.support.gw_helpers import MODERN_VERSION, allow_all, http_client, modern_headers, modern_params, post, rpc


def ok_result(rid: Any) -> bytes:
    return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": []}}).encode())


async def raw_post(gw: Any, headers: list[tuple[str, str]], body: bytes) -> tuple[int, bytes]:
    host, port = gw.base_url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    writer.write(f"POST /mcp/up HTTP/1.1\r\nHost: {host}:{port}\r\n{lines}Content-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


@pytest.fixture
async def gw(gateway: Any, evil: EvilUpstream, tmp_path: Path) -> Any:
    async def call(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return ok_result(rid)
    evil.scripts["tools/call"] = call
    g = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                              "policies": allow_all(tmp_path)})
    g.evil = evil
    return g


@pytest.mark.parametrize("extra", [{"result": {}}, {"error": {"code": 1, "message": "m"}}, {"extra": 1}])
async def test_a_request_that_is_also_a_response_is_refused(gw: Any, extra: dict[str, Any]) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                       "params": modern_params({"name": "x", "arguments": {}}), **extra}).encode()
    headers = [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"),
               *modern_headers("tools/call", "x").items()]
    status, payload = await raw_post(gw, headers, body)
    assert status == 400 and json.loads(payload)["error"]["data"]["reason"] == "invalid_jsonrpc"
    assert not gw.evil.requests


SPELLINGS = st.sampled_from(["Mcp-Method", "mcp-method", "MCP-METHOD", "Mcp_Method", "Mcp-Name", "mcp-name",
                             "MCP_NAME", "MCP-Protocol-Version", "mcp-protocol-version", "Mcp_Protocol_Version"])
VALUES = st.sampled_from(["tools/call", "tools/list", "echo", "other", MODERN_VERSION, "2025-11-25"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.lists(st.tuples(SPELLINGS, VALUES), max_size=4))
async def test_generated_header_sets_are_refused_or_forwarded_exactly_as_checked(gw: Any, extra: list) -> None:
    body = json.dumps(rpc("tools/call", modern_params({"name": "echo", "arguments": {}}))).encode()
    base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    present = {k.lower().replace("_", "-") for k, _ in extra}
    for name, value in modern_headers("tools/call", "echo").items():
        if name.lower() not in present:
            base[name] = value
    before = len(gw.evil.requests)
    status, _ = await raw_post(gw, [*base.items(), *extra], body)
    forwarded = gw.evil.requests[before:]
    if status != 200:
        assert status == 400 and not forwarded
        return
    ((_, _, sent),) = forwarded
    seen = gw.evil.header_lines[before]
    decided = json.loads(body)
    assert json.loads(sent)["method"] == decided["method"] and json.loads(sent)["params"]["name"] == "echo"
    # The evil upstream folds names like a lenient server would ("_" -> "-", any case): exactly
    # the values the body says, nothing a client smuggled in another spelling.
    folded: dict[str, list[str]] = {}
    for name, value in seen:
        folded.setdefault(name.lower().replace("_", "-"), []).append(value)
    assert folded.get("mcp-method") == ["tools/call"]
    assert folded.get("mcp-name") == ["echo"]
    assert folded.get("mcp-protocol-version") == [MODERN_VERSION]


async def test_a_full_upstream_pool_answers_503_after_pool_timeout(gateway: Any, evil: EvilUpstream,
                                                                   tmp_path: Path) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        arrived.set()
        await asyncio.wait_for(release.wait(), 20)
        return ok_result(rid)

    evil.scripts["tools/call"] = slow
    gw = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"},
                                                  "max_connections": 1, "pool_timeout": "300ms"}},
                               "policies": allow_all(tmp_path)})
    async with http_client() as client:
        call = rpc("tools/call", modern_params({"name": "slow", "arguments": {}}))
        holding = asyncio.ensure_future(post(client, gw.url("up"), call, headers=modern_headers("tools/call", "slow"),
                                             version=MODERN_VERSION))
        await asyncio.wait_for(arrived.wait(), 10)        # the only connection is now busy
        started = time.monotonic()
        second = await post(client, gw.url("up"), rpc("tools/call", modern_params({"name": "slow", "arguments": {}})),
                            headers=modern_headers("tools/call", "slow"), version=MODERN_VERSION)
        waited = time.monotonic() - started
        release.set()
        assert (await holding).status == 200
    assert second.status == 503 and second.json["error"]["data"]["reason"] == "upstream_pool_exhausted"
    assert 0.25 < waited < 3.0
    gw.wait_for_log({"event": "upstream.pool_exhausted"})
