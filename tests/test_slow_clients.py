"""Unauthenticated sockets that are slow or silent are cut off; nobody else waits for them.

A connection that sends nothing, or drips its header block a byte at a time
(slowloris), is closed after ``limits.header_timeout``; a body that stops
arriving gets ``408`` after ``limits.body_timeout``; a request body with a content
coding is refused (415) instead of a traceback or a mislabelled forward; repeated
or ``_``-spelled copies of checked headers are refused (400).  Meanwhile the
gateway keeps answering other clients.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.evil_upstream import EvilUpstream, http
from tests.support.gw_helpers import MODERN_VERSION, allow_all, http_client, modern_headers, modern_params, post, rpc

LIMITS = {"header_timeout": "1s", "body_timeout": "1s"}


@pytest.fixture
async def gw(gateway: Any, tmp_path: Path) -> Any:
    up = await EvilUpstream().start()

    async def ok(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": []}}).encode())
    up.scripts["tools/list"] = ok
    g = await gateway.astart({"servers": {"up": {"url": up.url, "pinning": {"mode": "off"}}},
                              "policies": allow_all(tmp_path), "limits": LIMITS})
    g.evil = up
    yield g
    await up.stop()


async def _open(gw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.base_url.split("//")[1].split(":")
    return await asyncio.open_connection(host, int(port))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    return await asyncio.wait_for(reader.read(), seconds)


async def _healthy(gw: Any) -> float:
    started = time.monotonic()
    async with http_client() as client:
        reply = await post(client, gw.url("up"), rpc("tools/list", modern_params()),
                           headers=modern_headers("tools/list"), version=MODERN_VERSION)
    assert reply.status == 200
    return time.monotonic() - started


async def test_a_silent_connection_is_closed_after_the_header_timeout(gw: Any) -> None:
    reader, writer = await _open(gw)
    started = time.monotonic()
    assert await _closed_within(reader, 5) == b""
    assert 0.8 < time.monotonic() - started < 4
    writer.close()


async def test_a_slowloris_header_drip_is_closed_and_others_are_served_meanwhile(gw: Any) -> None:
    reader, writer = await _open(gw)
    head = b"POST /mcp/up HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50
    started = time.monotonic()
    closed = asyncio.ensure_future(_closed_within(reader, 6))
    latencies = []
    for byte in head:
        if closed.done():
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        latencies.append(await _healthy(gw))      # each drip is one healthy round trip apart
    assert await closed == b""
    assert time.monotonic() - started < 5
    assert max(latencies) < 1.0
    gw.wait_for_log({"event": "listener.header_timeout"})


async def test_a_body_that_stops_arriving_gets_408(gw: Any) -> None:
    reader, writer = await _open(gw)
    host = gw.base_url.split("//")[1]
    writer.write((f"POST /mcp/up HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"MCP-Protocol-Version: {MODERN_VERSION}\r\nMcp-Method: tools/list\r\n"
                  "Content-Length: 100\r\n\r\n{\"jsonrpc\":").encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 6)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"reason":"request_timeout"' in answer
    writer.close()


@pytest.mark.parametrize("body", [b"\x1f\x8b corrupt gzip",
                                  gzip.compress(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', mtime=0)],
                         ids=["corrupt", "valid"])
async def test_an_encoded_request_body_is_refused_not_forwarded(gw: Any, body: bytes) -> None:
    async with http_client() as client:
        async with client.post(gw.url("up"), data=body, headers={
                **modern_headers("tools/list"), "Content-Type": "application/json", "Content-Encoding": "gzip",
                "MCP-Protocol-Version": MODERN_VERSION, "Accept": "application/json, text/event-stream"}) as resp:
            status, reply = resp.status, await resp.json()
    assert status == 415 and reply["error"]["data"]["reason"] == "unsupported_content_encoding"
    assert not gw.evil.requests


@pytest.mark.parametrize("headers,reason", [
    ([("Mcp-Method", "tools/list"), ("mcp-method", "tools/call")], "header_repeated"),
    ([("MCP-Protocol-Version", MODERN_VERSION), ("MCP-PROTOCOL-VERSION", "2025-11-25")], "header_repeated"),
    ([("Mcp-Name", "a"), ("Mcp-Name", "b")], "header_repeated"),
    ([("Mcp-Session-Id", "x"), ("Mcp_Session_Id", "y")], "header_ambiguous"),
    ([("Mcp_Method", "tools/call")], "header_ambiguous"),
    ([("X_Forwarded_For", "10.0.0.1")], "header_ambiguous"),
    ([("Mcp-Param-Region", "eu"), ("mcp-param-region", "us")], "header_repeated"),
])
async def test_repeated_or_underscored_checked_headers_are_refused(gw: Any, headers: list[tuple[str, str]],
                                                                   reason: str) -> None:
    # Raw bytes: HTTP client libraries fold repeated headers before they reach the wire.
    base = [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")]
    if not any(k.lower() == "mcp-method" for k, _ in headers):
        base.append(("Mcp-Method", "tools/list"))
    if not any(k.lower() == "mcp-protocol-version" for k, _ in headers):
        base.append(("MCP-Protocol-Version", MODERN_VERSION))
    body = json.dumps(rpc("tools/list", modern_params())).encode()
    host = gw.base_url.split("//")[1]
    lines = "".join(f"{k}: {v}\r\n" for k, v in base + headers)
    reader, writer = await _open(gw)
    writer.write(f"POST /mcp/up HTTP/1.1\r\nHost: {host}\r\n{lines}Content-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(payload)["error"]["data"]["reason"] == reason
    assert not gw.evil.requests
