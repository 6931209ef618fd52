"""Stream limits: GET streams per principal, the idle timeout of a GET stream, keep-alives.

* a principal holding ``limits.max_streams_per_principal`` GET streams gets ``429``
  (``too_many_streams``, ``Retry-After``) for one more, while another principal opens
  its own; closing a stream frees its slot;
* a GET stream on which the upstream sends nothing is ended cleanly after
  ``stream_idle_timeout`` (keep-alive comments meanwhile), a busy one is not, and
  the ended one resumes with the ``Last-Event-ID`` it was given;
* a kept-alive client connection that sends nothing is closed after ``keepalive_timeout``;
* keep-alive comments between events leave a real SDK client, and its resumption, intact;
* with Redis down a stream slot cannot be counted: ``503``, fail closed.

Real sockets throughout: a socket-level upstream (``evil_upstream``), the gateway as a
process, and (for principals) a real authorization server.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.clients import ProgressLog, mcp_client
from tests.support.components import start_redis
from tests.support.evil_upstream import EvilUpstream
from tests.support.gw_helpers import LEGACY_VERSION, allow_all, http_client, initialize

MAX_STREAMS = 3
IDLE = 0.5            # stream_idle_timeout in these tests, seconds
TICK = 0.1            # stream_keepalive_interval


def _get_headers(sid: str, token: str | None = None, last_event_id: str | None = None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream", "MCP-Protocol-Version": LEGACY_VERSION, "Mcp-Session-Id": sid}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


async def _metric(client: Any, gw: Any, limit: str) -> float:
    text = await (await client.get(gw.admin_url + "/metrics")).text()
    m = re.search(rf'^mcpgw_client_limit_hits_total\{{limit="{limit}"\}} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


async def _wait_streams(evil: EvilUpstream, count: int) -> None:
    """The upstream holds ``count`` GET streams (each one relayed by the gateway)."""
    async def held() -> None:
        while len(evil.get_streams) < count:
            evil.get_stream_open.clear()
            if len(evil.get_streams) >= count:
                return
            await evil.get_stream_open.wait()
    await asyncio.wait_for(held(), 10)


# -- streams per principal ----------------------------------------------------------------

async def test_a_principal_past_its_stream_limit_gets_429_while_another_principal_opens_streams(
        idp: Any, gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    as_ = await idp.astart()
    gw = await gateway.astart({
        "auth": {"issuers": [{"issuer": as_.issuer}]},
        "servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
        "policies": allow_all(tmp_path), "limits": {"max_streams_per_principal": MAX_STREAMS}})
    url = gw.url("up")

    def token(sub: str) -> str:
        now = int(time.time())
        return as_.mint({"iss": as_.issuer, "sub": sub, "aud": url, "iat": now, "exp": now + 600,
                         "scope": "mcp:read", "client_id": "m2m-client", "jti": uuid.uuid4().hex})

    alice, bob = token("alice"), token("bob")
    opened: list[aiohttp.ClientResponse] = []
    async with http_client() as client, http_client() as streams:
        sid_a, _ = await initialize(client, url, {"Authorization": f"Bearer {alice}"})
        sid_b, _ = await initialize(client, url, {"Authorization": f"Bearer {bob}"})
        try:
            for _ in range(MAX_STREAMS):
                resp = await streams.get(url, headers=_get_headers(sid_a, alice))
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                opened.append(resp)
            await _wait_streams(evil, MAX_STREAMS)

            refused = await streams.get(url, headers=_get_headers(sid_a, alice))
            body = await refused.json()
            assert refused.status == 429 and refused.headers["Retry-After"] == "5"
            assert body["error"]["code"] == -32004
            assert body["error"]["data"]["reason"] == "too_many_streams"
            assert body["error"]["data"]["max"] == MAX_STREAMS
            assert len(evil.get_streams) == MAX_STREAMS, "a refused stream never reaches the upstream"
            entry = gw.wait_for_log({"event": "stream.principal_limit", "limit": MAX_STREAMS})
            assert entry["principal"] == "alice"
            assert await _metric(client, gw, "streams_per_principal") == 1

            # Another principal's streams are its own.
            for _ in range(MAX_STREAMS):
                resp = await streams.get(url, headers=_get_headers(sid_b, bob))
                assert resp.status == 200
                opened.append(resp)
            await _wait_streams(evil, 2 * MAX_STREAMS)

            # Alice leaves one stream: once the gateway has seen it end, the slot is free.
            start = len(gw.log_lines())
            opened.pop(0).close()
            await asyncio.to_thread(gw.wait_for_log, {"event": "mcp.request", "http_method": "GET",
                                                      "outcome": "client_gone"}, 10.0, start=start)
            again = await streams.get(url, headers=_get_headers(sid_a, alice))
            assert again.status == 200
            opened.append(again)
            assert (await streams.get(url, headers=_get_headers(sid_a, alice))).status == 429
            assert await _metric(client, gw, "streams_per_principal") == 2

            # The upstream ends one of Alice's streams: its slot is free too.
            start = len(gw.log_lines())
            evil.get_streams[1].close()
            await asyncio.to_thread(gw.wait_for_log, {"event": "mcp.request", "http_method": "GET",
                                                      "outcome": "ok"}, 10.0, start=start)
            again = await streams.get(url, headers=_get_headers(sid_a, alice))
            assert again.status == 200
            opened.append(again)
        finally:
            for resp in opened:
                resp.close()


async def test_the_stream_limit_holds_across_replicas_sharing_redis(
        gateway: Any, evil: EvilUpstream, tmp_path: Path, redis_store: dict[str, str]) -> None:
    config = {"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}}, "policies": allow_all(tmp_path),
              "store": redis_store, "limits": {"max_streams_per_principal": MAX_STREAMS}}
    gw1 = await gateway.astart(config)
    gw2 = await gateway.astart(config)
    opened: list[aiohttp.ClientResponse] = []
    async with http_client() as client, http_client() as streams:
        sid, _ = await initialize(client, gw1.url("up"))       # auth mode none: one principal
        try:
            for gw in (gw1, gw2, gw1):
                resp = await streams.get(gw.url("up"), headers=_get_headers(sid))
                assert resp.status == 200
                opened.append(resp)
            await _wait_streams(evil, MAX_STREAMS)
            for gw in (gw2, gw1):
                refused = await streams.get(gw.url("up"), headers=_get_headers(sid))
                assert refused.status == 429
                assert (await refused.json())["error"]["data"]["reason"] == "too_many_streams"
            start = len(gw1.log_lines())
            opened.pop(0).close()                                  # a stream held by gw1
            await asyncio.to_thread(gw1.wait_for_log, {"event": "mcp.request", "http_method": "GET",
                                                       "outcome": "client_gone"}, 10.0, start=start)
            resp = await streams.get(gw2.url("up"), headers=_get_headers(sid))
            assert resp.status == 200                              # freed on gw1, taken on gw2
            opened.append(resp)
        finally:
            for resp in opened:
                resp.close()


# -- idle GET streams ---------------------------------------------------------------------

async def test_a_silent_get_stream_ends_cleanly_after_the_idle_timeout_a_busy_one_does_not_and_it_resumes(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    gw = await gateway.astart({
        "servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}}, "policies": allow_all(tmp_path),
        "limits": {"stream_idle_timeout": IDLE, "stream_keepalive_interval": TICK}})
    url = gw.url("up")
    note = b'id: up-1\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}}\n\n'
    evil.replays["up-1"] = (b'id: up-2\ndata: {"jsonrpc":"2.0","method":"notifications/message",'
                            b'"params":{"level":"info","data":"replayed"}}\n\n')
    async with http_client() as client, http_client() as streams:
        sid, _ = await initialize(client, url)
        quiet = await streams.get(url, headers=_get_headers(sid))
        assert quiet.status == 200
        await _wait_streams(evil, 1)
        busy = await streams.get(url, headers=_get_headers(sid))
        assert busy.status == 200
        await _wait_streams(evil, 2)
        quiet_up, busy_up = evil.get_streams

        # The quiet stream: one event, then silence until the gateway ends it.
        quiet_up.write(note)
        await quiet_up.drain()
        quiet_bytes = bytearray()
        quiet_ended = asyncio.Event()
        last_event_at = ended_at = 0.0

        async def drain_quiet() -> None:
            nonlocal last_event_at, ended_at
            while chunk := await quiet.content.readany():     # a clean end: no payload error
                if b"data:" in chunk:
                    last_event_at = time.monotonic()
                quiet_bytes.extend(chunk)
            ended_at = time.monotonic()
            quiet_ended.set()

        reader = asyncio.create_task(drain_quiet())
        # The busy stream: an event, then the keep-alive comment the gateway sends TICK after
        # it (so events are TICK apart, a fifth of the idle timeout), until the quiet stream
        # has ended and twice the idle timeout has passed.
        started = time.monotonic()
        busy_events = 0
        while not quiet_ended.is_set() or time.monotonic() - started < 2 * IDLE:
            busy_up.write(note)
            await busy_up.drain()
            for wanted in (b"data:", b": keepalive"):
                chunk = b""
                while wanted not in chunk:
                    chunk = await asyncio.wait_for(busy.content.readany(), 5)
                    assert chunk, "the busy stream was closed"
            busy_events += 1
            assert time.monotonic() - started < 10, "the quiet stream was never ended"
        await reader
        ended_after = ended_at - last_event_at
        assert IDLE * 0.9 <= ended_after < IDLE + 3, ended_after
        assert not busy.content.at_eof()
        text = quiet_bytes.decode()
        assert text.count(": keepalive\n\n") >= 2, text       # proxies see traffic on a silent stream
        minted = re.findall(r"^id: (\S+)$", text, re.M)
        assert len(minted) == 1 and minted[0] != "up-1", text  # keep-alives carry no id
        entry = gw.wait_for_log({"event": "stream.idle_timeout"})
        assert entry["timeout_seconds"] == IDLE
        assert await _metric(client, gw, "stream_idle_timeout") == 1
        gw.wait_for_log({"event": "mcp.request", "http_method": "GET", "reason": "stream_idle_timeout"})

        # Resumable: the id the ended stream gave is accepted, the upstream gets its own id back.
        resumed = await streams.get(url, headers=_get_headers(sid, last_event_id=minted[0]))
        assert resumed.status == 200
        replay = (await asyncio.wait_for(resumed.read(), 5)).decode()
        assert '"replayed"' in replay
        assert evil.requests[-1][1]["last-event-id"] == "up-1"
        busy.close()
        quiet.close()
    print(f"quiet stream ended {ended_after:.2f} s after its last event (idle timeout {IDLE} s); "
          f"busy stream carried {busy_events} events meanwhile and stayed open")


async def test_a_kept_alive_connection_that_sends_nothing_is_closed_after_the_keepalive_timeout(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    gw = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                               "policies": allow_all(tmp_path), "limits": {"keepalive_timeout": IDLE}})
    host, port = gw.base_url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /nothing HTTP/1.1\r\nHost: %s:%s\r\n\r\n" % (host.encode(), port.encode()))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 404")
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
        await reader.readexactly(length)
        answered = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""      # closed by the gateway
        closed_after = time.monotonic() - answered
    finally:
        writer.close()
    print(f"idle kept-alive connection closed after {closed_after:.2f} s (keepalive_timeout {IDLE} s)")
    assert IDLE * 0.9 <= closed_after < IDLE + 3


async def test_keepalive_comments_between_events_leave_the_sdk_client_and_its_resumption_intact(
        gateway: Any, upstream: Any, tmp_path: Path) -> None:
    # A keep-alive every 20 ms, events 150 ms apart: comments land between every two events on
    # the POST stream and on the GET stream the client resumes with Last-Event-ID.
    up = await upstream.astart(retry_interval_ms=50)
    gw = await gateway.astart({"servers": {"up": {"url": up.url, "pinning": {"mode": "off"}}},
                               "policies": allow_all(tmp_path), "limits": {"stream_keepalive_interval": "20ms"}})
    async with mcp_client(gw.url("up"), era="legacy") as client:
        log = ProgressLog()
        result = await client.call_tool("reconnecting_progress", {"steps": 3, "interval_ms": 150},
                                        progress_callback=log.callback)
        assert result.content[0].text == "resumed and done after 3 steps"
        assert [p for _, p, _, _ in log.events] == [1.0, 2.0, 3.0]
        plain = await client.call_tool("slow_progress", {"steps": 3, "interval_ms": 150})
        assert plain.content[0].text == "done after 3 steps"
    resumed = [r for r in up.records() if r["method"] == "GET" and "last-event-id" in r["headers"]]
    assert len(resumed) == 1          # resumed once, from the upstream's own id


async def test_a_stream_whose_slot_cannot_be_counted_is_refused_503_when_redis_is_down(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    redis = await asyncio.to_thread(start_redis, tmp_path / "redis")
    try:
        gw = await gateway.astart({
            "servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}}, "policies": allow_all(tmp_path),
            "store": {"url": redis.url(0), "prefix": "sl:", "limit_timeout": "200ms"},
            "limits": {"max_streams_per_principal": MAX_STREAMS}})
        async with http_client() as client, http_client() as streams:
            sid, _ = await initialize(client, gw.url("up"))
            held = await streams.get(gw.url("up"), headers=_get_headers(sid))
            assert held.status == 200
            redis.stop()
            started = time.monotonic()
            refused = await streams.get(gw.url("up"), headers=_get_headers(sid))
            waited = time.monotonic() - started
            body = await refused.json()
            held.close()
            metrics = await (await client.get(gw.admin_url + "/metrics")).text()
        assert re.search(r'^mcpgw_store_errors_total\{operation="limit"\} [1-9]', metrics, re.M)
        assert refused.status == 503 and refused.headers["Retry-After"] == "1"
        # The session is still in the replica's cache (30 s): the stream slot is what cannot be had.
        assert body["error"]["data"]["reason"] == "limit_store_unavailable", body
        assert waited < 5, waited              # the store's timeouts, not a hang
        assert len(evil.get_streams) == 1      # fail closed: never reached the upstream
        gw.wait_for_log({"event": "stream.principal_limit_unavailable", "server": "up"})
        print(f"stream refused limit_store_unavailable after {waited:.2f} s with Redis down")
    finally:
        redis.stop()
