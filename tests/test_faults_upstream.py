"""Upstream faults not covered elsewhere, each with its declared outcome (docs/faults.md).

A raw-socket upstream (tests/support/evil_upstream.py) sends invalid SSE, an
endless body, an endless SSE event, or a session id it never gave this session.
Each ends within the configured limits with a JSON-RPC error carrying the
request id (HTTP status before the response started, in-band after), the
``mcpgw_upstream_errors_total`` series named in the table, and the gateway
keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.evil_upstream import EvilUpstream, http, sse_head
from tests.support.gw_helpers import allow_all, http_client, initialize, post, request, rpc

GATEWAY_ERROR = -32000
LIMITS = {"max_response_bytes": "64KiB", "max_sse_event_bytes": "64KiB", "read_timeout": "2s"}


def _tool_result(rid: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": []}}).encode()


async def _endless(writer: asyncio.StreamWriter, head: bytes, chunk: bytes) -> None:
    """``head``, then ``chunk`` again and again until the gateway hangs up."""
    writer.write(head)
    try:
        for _ in range(100_000):                  # bounded: ~ 1.6 GB at 16 KiB, far past any limit
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        return


async def call_script(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> Any:
    name = msg["params"]["name"]
    if name == "invalid_sse":
        return sse_head() + b"data: {this is not json\n\n"
    if name == "endless_event":
        return lambda w: _endless(w, sse_head() + b"data: ", b"a" * 16384)
    if name == "endless_chunked":
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x" * 4000}}
        event = b"data: " + json.dumps(note).encode() + b"\n\n"
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        return lambda w: _endless(w, head, chunk)
    if name in ("unanswered", "unanswered_resumable"):
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "working"}}
        event_id = b"id: up-7\n" if name == "unanswered_resumable" else b""
        return sse_head() + event_id + b"data: " + json.dumps(note).encode() + b"\n\n"
    if name == "empty_answer":
        return http(200, b"")
    if name == "status_999":
        return http(999, _tool_result(rid))
    return http(200, _tool_result(rid))


async def list_script(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> Any:
    if evil.list_mode == "endless":
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
        return lambda w: _endless(w, head + b'{"jsonrpc":"2.0","id":1,"result":{"tools":[', b" " * 16384)
    # Another session's id on an ordinary answer: it must never replace the client's session.
    body = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": []}}).encode()
    return http(200, body, "application/json", "Mcp-Session-Id: someone-elses-session")


@pytest.fixture
async def gw(gateway: Any, evil: EvilUpstream, tmp_path: Path) -> Any:
    evil.scripts["tools/call"] = call_script
    evil.scripts["tools/list"] = list_script
    evil.list_mode = "other-session"            # type: ignore[attr-defined]
    g = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                              "policies": allow_all(tmp_path), "limits": LIMITS})
    g.evil = evil
    return g


async def _metric(http_: Any, gw: Any, pattern: str) -> str:
    text = await (await http_.get(f"{gw.admin_url}/metrics")).text()
    assert re.search(pattern, text, re.M), f"{pattern} not in metrics:\n" + "\n".join(
        ln for ln in text.splitlines() if ln.startswith("mcpgw_upstream_errors"))
    return text


async def _still_serving(http_: Any, gw: Any, sid: str) -> None:
    reply = await post(http_, gw.url("up"), rpc("tools/call", {"name": "fine", "arguments": {}}), session_id=sid)
    assert reply.status == 200 and "result" in reply.messages[-1], reply


@pytest.mark.parametrize("tool,reason,metric_reason", [
    ("invalid_sse", "upstream_invalid_json", "upstream_invalid_json"),
    ("endless_event", "upstream_too_large", "sse_event_too_large"),
])
async def test_a_broken_sse_stream_ends_with_an_in_band_error_for_the_request(
        gw: Any, tool: str, reason: str, metric_reason: str) -> None:
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("up"))
        body = rpc("tools/call", {"name": tool, "arguments": {}})
        started = time.monotonic()
        reply = await post(client, gw.url("up"), body, session_id=sid)
        assert time.monotonic() - started < 10
        assert reply.status == 200 and reply.events, reply
        last = reply.messages[-1]
        assert last["id"] == body["id"] and last["error"]["code"] == GATEWAY_ERROR, last
        assert last["error"]["data"]["reason"] == reason, last
        assert not any("result" in m for m in reply.messages)
        await _metric(client, gw, rf'^mcpgw_upstream_errors_total\{{reason="{metric_reason}",server="up"\}} [1-9]')
        await _still_serving(client, gw, sid)


async def test_a_stream_that_ends_cleanly_without_the_answer_gets_one_in_band_unless_it_can_be_resumed(
        gw: Any) -> None:
    """An upstream that closes a call's stream after a notification has answered nothing: with
    no event id the client cannot resume and would wait for ever, so the gateway answers the
    request with an in-band error.  With an event id it is SEP-1699 polling: the stream ends
    cleanly and the client resumes with Last-Event-ID."""
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("up"))
        body = rpc("tools/call", {"name": "unanswered", "arguments": {}})
        reply = await post(client, gw.url("up"), body, session_id=sid)
        assert reply.status == 200 and reply.messages[0]["method"] == "notifications/message", reply
        last = reply.messages[-1]
        assert last["id"] == body["id"] and last["error"]["data"]["reason"] == "upstream_stream_broken", last
        assert "without an answer" in last["error"]["message"]
        await _metric(client, gw, r'^mcpgw_upstream_errors_total\{reason="stream_broken",server="up"\} [1-9]')

        body = rpc("tools/call", {"name": "unanswered_resumable", "arguments": {}})
        reply = await post(client, gw.url("up"), body, session_id=sid)
        assert reply.status == 200 and [m.get("method") for m in reply.messages] == ["notifications/message"], reply
        assert reply.events[-1].id, reply.events      # the point the client resumes from
        await _still_serving(client, gw, sid)


@pytest.mark.parametrize("tool,reason", [("empty_answer", "upstream_empty_answer"),
                                         ("status_999", "upstream_invalid_status")])
async def test_an_empty_answer_or_a_status_past_599_is_502_not_relayed(gw: Any, tool: str, reason: str) -> None:
    """An empty 200 answers nothing (the client would wait for ever); llhttp reads any three
    digits as a status, and one past 599 is not HTTP (found by the fuzzers)."""
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("up"))
        body = rpc("tools/call", {"name": tool, "arguments": {}})
        reply = await post(client, gw.url("up"), body, session_id=sid)
        assert reply.status == 502, reply
        assert reply.json["id"] == body["id"] and reply.error_reason == reason, reply.json
        await _still_serving(client, gw, sid)


async def test_an_endless_json_body_the_gateway_must_inspect_is_502_at_the_size_limit(gw: Any) -> None:
    gw.evil.list_mode = "endless"
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("up"))
        body = rpc("tools/list", {})
        started = time.monotonic()
        reply = await post(client, gw.url("up"), body, session_id=sid)
        assert time.monotonic() - started < 10
        assert reply.status == 502, reply
        assert reply.json["id"] == body["id"] and reply.error_reason == "upstream_too_large", reply.json
        await _metric(client, gw, r'^mcpgw_upstream_errors_total\{reason="response_too_large",server="up"\} [1-9]')
        await _still_serving(client, gw, sid)


async def test_an_endless_sse_body_is_relayed_only_as_fast_as_the_client_reads_and_ends_when_it_leaves(
        gw: Any) -> None:
    """An upstream that never stops sending is paced by the client (flow control), not buffered."""
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("up"))
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                   "MCP-Protocol-Version": "2025-11-25", "Mcp-Session-Id": sid}
        async with client.post(gw.url("up"), data=json.dumps(rpc("tools/call", {"name": "endless_chunked",
                                                                                 "arguments": {}})),
                               headers=headers) as resp:
            assert resp.status == 200
            got = 0
            while got < 256 * 1024:
                got += len(await asyncio.wait_for(resp.content.readany(), 10))
            resp.close()
        # The client left: the gateway hangs up on the upstream and keeps serving.
        await _still_serving(client, gw, sid)
        await _metric(client, gw, r'^mcpgw_active_streams\{server="up"\} 0')


async def test_another_sessions_id_from_the_upstream_never_reaches_the_client(gw: Any) -> None:
    async with http_client() as client:
        sid, init = await initialize(client, gw.url("up"))
        assert sid != "evil-session-1"
        reply = await post(client, gw.url("up"), rpc("tools/list", {}), session_id=sid)
        assert reply.status == 200, reply
        assert reply.headers.get("Mcp-Session-Id") in (None, sid), dict(reply.headers)
        gw.wait_for_log({"event": "upstream.session_id_changed", "server": "up", "method": "tools/list"})
        await _metric(client, gw, r'^mcpgw_upstream_errors_total\{reason="session_id_changed",server="up"\} 1')
        # The client's session still maps to the upstream's first id.
        await _still_serving(client, gw, sid)
        assert all(h.get("mcp-session-id") in (None, "evil-session-1") for _, h, _ in gw.evil.requests)
        assert (await request(client, "GET", gw.admin_url + "/healthz")).status == 200
