"""An HTTP 200 that carries a JSON-RPC error or a failed tool call is audited and counted as such.

Operators need the MCP-level outcome: ``outcome`` in the audit record is ``rpc_error``
or ``tool_error`` (not ``ok``), and ``mcpgw_mcp_errors_total{server,method,kind}``
counts it, for JSON and SSE answers alike.
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.evil_upstream import EvilUpstream, http, sse_head
from tests.support.gw_helpers import MODERN_VERSION, allow_all, http_client, modern_headers, modern_params, post, rpc


def tool_failed(rid: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
        "content": [{"type": "text", "text": "disk full"}], "isError": True}}).encode()


def rpc_failed(rid: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "bad params"}}).encode()




def scrape(gw: Any) -> str:
    with urllib.request.urlopen(f"{gw.admin_url}/metrics", timeout=5) as resp:
        return resp.read().decode()


@pytest.mark.parametrize("framing", ["json", "sse"])
@pytest.mark.parametrize("answer,kind", [(tool_failed, "tool_error"), (rpc_failed, "rpc_error")])
async def test_a_failure_inside_a_200_is_audited_and_counted_with_its_mcp_outcome(
        framing: str, answer: Any, kind: str, evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    async def script(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        if framing == "json":
            return http(200, answer(rid))
        return sse_head() + b"data: " + answer(rid) + b"\n\n"

    evil.scripts["tools/call"] = script
    gw = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                               "policies": allow_all(tmp_path)})
    async with http_client() as client:
        reply = await post(client, gw.url("up"), rpc("tools/call", modern_params({"name": "write", "arguments": {}})),
                           headers=modern_headers("tools/call", "write"), version=MODERN_VERSION)
    assert reply.status == 200
    audit = gw.wait_for_log({"event": "mcp.request", "method": "tools/call"})
    assert audit["outcome"] == kind and audit["status"] == 200
    line = f'mcpgw_mcp_errors_total{{kind="{kind}",method="tools/call",server="up"}} 1.0'
    assert line in scrape(gw)


async def test_a_successful_call_stays_ok(evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    async def ok(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": []}}).encode())

    evil.scripts["tools/call"] = ok
    gw = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                               "policies": allow_all(tmp_path)})
    async with http_client() as client:
        await post(client, gw.url("up"), rpc("tools/call", modern_params({"name": "x", "arguments": {}})),
                   headers=modern_headers("tools/call", "x"), version=MODERN_VERSION)
    assert gw.wait_for_log({"event": "mcp.request", "method": "tools/call"})["outcome"] == "ok"
    assert "mcpgw_mcp_errors_total{" not in scrape(gw)
