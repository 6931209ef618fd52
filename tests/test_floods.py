"""Floods and slow clients: the limits bite with their declared outcome and others are served meanwhile.

* a flood of idle connections past ``limits.max_client_connections`` is answered
  ``503`` (``too_many_connections``) and closed, counted and logged;
* many idle SSE streams held open cost a well-behaved client nothing;
* a client that never reads its stream holds at most ``max_stream_buffer_bytes``
  and is cut after ``stream_write_timeout`` (upstream stream closed too).

Throughout, a well-behaved client on its own kept-alive connection makes calls
and their latency is measured and bounded.  127.0.0.1 only, bounded counts.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.evil_upstream import EvilUpstream, http, sse_head
from tests.support.gw_helpers import allow_all, http_client, initialize, post, rpc

MAX_CONNECTIONS = 40
LATENCY_BOUND = 2.0      # seconds: generous, the machine is shared; an unprotected gateway hangs instead
LIMITS = {"max_client_connections": MAX_CONNECTIONS, "header_timeout": "30s",
          "max_stream_buffer_bytes": "64KiB", "stream_write_timeout": "1s"}


async def _endless_notes(writer: asyncio.StreamWriter, evil: EvilUpstream) -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x" * 4000}}
    event = b"data: " + json.dumps(note).encode() + b"\n\n"
    writer.write(sse_head())
    try:
        for _ in range(100_000):          # bounded: 400 MB, far past any buffer on the way
            writer.write(event)
            await writer.drain()
    except ConnectionError:
        evil.upstream_cut.set()           # type: ignore[attr-defined]


async def call_script(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> Any:
    if msg["params"]["name"] == "firehose":
        return lambda w: _endless_notes(w, evil)
    return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": []}}).encode())


@pytest.fixture
async def gw(gateway: Any, evil: EvilUpstream, tmp_path: Path) -> Any:
    evil.scripts["tools/call"] = call_script
    evil.upstream_cut = asyncio.Event()     # type: ignore[attr-defined]
    g = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                              "policies": allow_all(tmp_path), "limits": LIMITS})
    g.evil = evil
    return g


class WellBehaved:
    """One client on one kept-alive connection, opened before any flood; records call latencies."""

    def __init__(self, client: Any, gw: Any, sid: str) -> None:
        self.client, self.gw, self.sid = client, gw, sid
        self.latencies: list[float] = []

    async def call(self) -> None:
        started = time.monotonic()
        reply = await post(self.client, self.gw.url("up"), rpc("tools/call", {"name": "fine", "arguments": {}}),
                           session_id=self.sid)
        self.latencies.append(time.monotonic() - started)
        assert reply.status == 200 and "result" in reply.messages[-1], reply


async def _well_behaved(client: Any, gw: Any) -> WellBehaved:
    sid, _ = await initialize(client, gw.url("up"))
    good = WellBehaved(client, gw, sid)
    await good.call()
    return good


def _addr(gw: Any) -> tuple[str, int]:
    host, port = gw.base_url.split("//")[1].split(":")
    return host, int(port)


async def _metric(client: Any, gw: Any, limit: str) -> float:
    text = await (await client.get(gw.admin_url + "/metrics")).text()
    m = re.search(rf'^mcpgw_client_limit_hits_total\{{limit="{limit}"\}} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_a_connection_flood_past_the_limit_is_refused_503_while_a_kept_alive_client_is_served(
        gw: Any) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:   # one connection
        good = await _well_behaved(client, gw)
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(MAX_CONNECTIONS + 20):
                held.append(await asyncio.open_connection(*_addr(gw)))
                await good.call()
            # The good client's connection is one of the MAX_CONNECTIONS: the idle ones after
            # the first MAX_CONNECTIONS - 1 were each answered 503 and closed at once.
            accepted, past = held[:MAX_CONNECTIONS - 1], held[MAX_CONNECTIONS - 1:]
            for reader, _ in past:
                answer = await asyncio.wait_for(reader.read(), 5)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503") and b"Connection: close" in head, answer
                assert json.loads(body)["error"]["data"]["reason"] == "too_many_connections"
            assert not any(reader.at_eof() for reader, _ in accepted)
        finally:
            for _, writer in held:
                writer.close()
        assert await _metric(client, gw, "client_connections") == 21
        gw.wait_for_log({"event": "listener.connection_limit", "limit": MAX_CONNECTIONS})
        print(f"well-behaved latency during the flood: max {max(good.latencies) * 1000:.1f} ms "
              f"over {len(good.latencies)} calls")
        assert max(good.latencies) < LATENCY_BOUND, good.latencies


async def test_many_idle_sse_streams_cost_a_well_behaved_client_nothing(gw: Any) -> None:
    async with http_client() as client:
        good = await _well_behaved(client, gw)
        streams = []
        try:
            async with http_client() as idle:
                for _ in range(MAX_CONNECTIONS // 2):
                    resp = await idle.get(gw.url("up"), headers={
                        "Accept": "text/event-stream", "MCP-Protocol-Version": "2025-11-25",
                        "Mcp-Session-Id": good.sid})
                    assert resp.status == 200 and resp.content_type == "text/event-stream"
                    streams.append(resp)
                    await good.call()
                assert len(gw.evil.get_streams) == MAX_CONNECTIONS // 2
                for _ in range(10):
                    await good.call()
                for resp in streams:
                    resp.close()
        finally:
            for resp in streams:
                resp.close()
    print(f"well-behaved latency with {len(streams)} idle streams: max {max(good.latencies) * 1000:.1f} ms")
    assert max(good.latencies) < LATENCY_BOUND, good.latencies


async def test_a_reader_that_never_drains_is_cut_after_the_write_timeout_and_others_are_served(gw: Any) -> None:
    async with http_client() as client:
        good = await _well_behaved(client, gw)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # a small window: the gateway fills it fast
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, _addr(gw))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        body = json.dumps(rpc("tools/call", {"name": "firehose", "arguments": {}})).encode()
        writer.write(b"POST /mcp/up HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n"
                     b"Mcp-Session-Id: %s\r\nContent-Length: %d\r\n\r\n%s"
                     % (gw.base_url.split("//")[1].encode(), good.sid.encode(), len(body), body))
        await writer.drain()
        started = time.monotonic()
        try:
            # Never read.  Meanwhile the well-behaved client is served.
            while not gw.evil.upstream_cut.is_set() and time.monotonic() - started < 15:
                await good.call()
            assert gw.evil.upstream_cut.is_set(), "the slow reader's upstream stream was never closed"
            cut_after = time.monotonic() - started
            entry = gw.wait_for_log({"event": "stream.slow_reader"})
            assert entry["timeout_seconds"] == 1.0
            assert entry["buffered_bytes"] <= 64 * 1024 + 64 * 1024 + 8192, entry   # limit + one write batch
            assert await _metric(client, gw, "stream_write_timeout") == 1
            # The slow reader's connection is gone: what it buffered, then EOF or a reset.
            try:
                while await asyncio.wait_for(reader.read(65536), 5):
                    pass
            except ConnectionError:
                pass
        finally:
            writer.close()
        await good.call()
    print(f"slow reader cut after {cut_after:.2f} s; well-behaved latency meanwhile: "
          f"max {max(good.latencies) * 1000:.1f} ms over {len(good.latencies)} calls")
    assert cut_after < 10
    assert max(good.latencies) < LATENCY_BOUND, good.latencies
