"""gateway/upstream_http.py under adversity: pool accounting when connects fail or requests
are cancelled, framing edge cases (leftover bytes, endless headers, resets, HEAD, trailers,
1xx), and what the Forwarder makes of each failure (through a real aiohttp front end).

Same style as tests/test_upstream_http.py (raw asyncio peers on 127.0.0.1, no sleeps).
"""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from gateway.upstream_http import HIGH_WATER, UpstreamConnectError, UpstreamPayloadError, UpstreamProtocolError
from tests.test_upstream_http import (
    WAIT,
    answer_each,
    Concurrency,
    Peer,
    chunk,
    ok,
    peers,  # noqa: F401  (the fixture)
    pool_for,
    read_all,
    serve_forever,
    start,
)


async def _until(pred, what: str) -> None:
    """Let the loop run (one callback at a time) until ``pred()`` holds."""
    async def spin() -> None:
        while not pred():
            step = asyncio.Event()
            asyncio.get_running_loop().call_soon(step.set)
            await step.wait()
    await asyncio.wait_for(spin(), WAIT)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------- pool accounting

async def test_a_failed_connect_wakes_the_requests_queued_behind_it(peers: list[Peer]) -> None:
    """The upstream is down and more requests than ``limit`` arrive: all must fail (502), none hang."""
    peer = await start(peers, serve_forever(ok()))
    url = peer.url
    await peer.stop()                                   # connection refused from now on
    pool = pool_for(url, limit=1)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.request("POST", {}, b"{}") for _ in range(3)), return_exceptions=True), WAIT)
        assert all(isinstance(r, UpstreamConnectError) for r in results), results
    finally:
        await pool.close()


async def test_a_request_cancelled_while_connecting_lets_a_queued_one_connect(peers: list[Peer]) -> None:
    """A client disconnects while its request is in the TLS handshake: the slot must go to the next in line."""
    accepted = asyncio.Queue[int]()

    async def silent(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(peer.accepted)
        await reader.read()                             # never speaks TLS

    peer = await start(peers, silent)
    pool = pool_for(f"https://127.0.0.1:{peer.port}/mcp", limit=1, connect_timeout=WAIT * 2)
    first = asyncio.ensure_future(pool.request("POST", {}, b"{}"))
    second = asyncio.ensure_future(pool.request("POST", {}, b"{}"))
    try:
        assert await asyncio.wait_for(accepted.get(), WAIT) == 1
        await _until(lambda: len(pool._waiters) == 1, "second queued")
        first.cancel()                                  # the client went away mid-handshake
        assert await asyncio.wait_for(accepted.get(), WAIT) == 2
    finally:
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        await pool.close()


async def test_a_waiter_cancelled_after_being_woken_for_a_free_slot_passes_the_wakeup_on(
        peers: list[Peer]) -> None:
    """A slot frees (a connection closes) and the waiter woken for it is cancelled before it runs:
    the next waiter must get the slot, not wait until some other request happens to finish."""
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer.accepted == 1:                          # an open-ended stream
            await peer.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
            await writer.drain()
            await reader.read()
            return
        await answer_each(peer, reader, writer, ok())

    peer = await start(peers, handler)
    pool = pool_for(peer.url, limit=1)
    stream = await pool.request("GET", {})
    b = asyncio.ensure_future(pool.request("POST", {}, b"{}"))
    c = asyncio.ensure_future(pool.request("POST", {}, b"{}"))
    try:
        await _until(lambda: len(pool._waiters) == 2, "b and c queued")
        stream.close()          # the slot frees: b is woken (None: "open one")...
        b.cancel()              # ...and its client disconnects before b runs
        resp = await asyncio.wait_for(c, WAIT)
        assert await read_all(resp) == b'{"ok":true}'
    finally:
        c.cancel()
        await asyncio.gather(b, c, return_exceptions=True)
        await pool.close()


# --------------------------------------------------------------------------- framing

async def test_bytes_after_a_complete_response_never_reach_the_next_request(peers: list[Peer]) -> None:
    """The upstream writes a response plus the start of another; the connection must not be
    reused with that stale half message in the parser (the next request would read it)."""
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer.accepted == 1:
            await peer.read_request(reader)
            writer.write(ok(b'{"n":1}') + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                          b"Content-Length: 9\r\n\r\n")
            await writer.drain()
        await answer_each(peer, reader, writer, ok(b'{"n":2}'))

    peer = await start(peers, handler)
    pool = pool_for(peer.url, read_timeout=1.0)
    try:
        assert await read_all(await pool.request("POST", {}, b"{}")) == b'{"n":1}'
        resp = await pool.request("POST", {}, b"{}")    # was: TimeoutError (the stale message ate the answer)
        assert resp.status == 200 and await read_all(resp) == b'{"n":2}'
    finally:
        await pool.close()


async def test_an_endless_response_header_is_a_protocol_error_not_buffered_until_timeout(
        peers: list[Peer]) -> None:
    """MAX_HEADER_BYTES is checked per completed header only: a header line that never ends is
    buffered by httptools without bound until read_timeout fires."""
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (4 * 64 * 1024))
        await writer.drain()
        await reader.read()

    peer = await start(peers, handler)
    pool = pool_for(peer.url, read_timeout=1.0)
    try:
        with pytest.raises(UpstreamProtocolError):      # was: TimeoutError after read_timeout
            await pool.request("POST", {}, b"{}")
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_a_reset_in_a_close_delimited_body_is_an_error_not_the_end_of_the_body(
        peers: list[Peer]) -> None:
    """No Content-Length, not chunked: the body ends at the close.  A RST is not an orderly
    close: the body (here an SSE stream) was cut off and must not look complete."""
    cut = asyncio.Event()

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        await writer.drain()
        await cut.wait()
        _rst(writer)

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("GET", {})
        assert await asyncio.wait_for(resp.content.readany(), WAIT) == b"data: 1\n\n"
        cut.set()
        with pytest.raises(UpstreamPayloadError):       # was: b"" (a clean end)
            await asyncio.wait_for(resp.content.readany(), WAIT)
    finally:
        await pool.close()


async def test_a_head_response_has_no_body_even_with_a_content_length(peers: list[Peer]) -> None:
    """The parser must be told the request was HEAD, or it waits for Content-Length bytes."""
    peer = await start(peers, serve_forever(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"))
    pool = pool_for(peer.url, read_timeout=1.0)
    try:
        for _ in range(2):
            resp = await pool.request("HEAD", {})
            assert resp.status == 200
            assert await read_all(resp) == b""          # was: TimeoutError
    finally:
        await pool.close()


# --------------------------------------------------------------------------- behaviour that holds

async def test_a_timed_out_request_never_leaves_its_connection_for_the_next_request(peers: list[Peer]) -> None:
    late = asyncio.Event()

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer.accepted == 1:
            await peer.read_request(reader)
            await late.wait()
            writer.write(ok(b'{"late":true}'))          # the answer to the request that timed out
            await writer.drain()
        await answer_each(peer, reader, writer, ok(b'{"fresh":true}'))

    peer = await start(peers, handler)
    pool = pool_for(peer.url, read_timeout=0.2)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await pool.request("GET", {})
        assert pool.open_connections == 0
        late.set()
        resp = await pool.request("GET", {})
        assert await read_all(resp) == b'{"fresh":true}' and peer.accepted == 2
        assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1
    finally:
        await pool.close()


async def test_a_request_cancelled_while_awaiting_headers_closes_its_connection(peers: list[Peer]) -> None:
    arrived = asyncio.Event()

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer.accepted == 1:
            await peer.read_request(reader)
            arrived.set()
            await reader.read()
            return
        await answer_each(peer, reader, writer, ok())

    peer = await start(peers, handler)
    pool = pool_for(peer.url, limit=1)
    try:
        task = asyncio.ensure_future(pool.request("POST", {}, b"{}"))
        await asyncio.wait_for(arrived.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_connections == 0 and pool.idle_connections == 0
        assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1
        assert await read_all(await asyncio.wait_for(pool.request("POST", {}, b"{}"), WAIT)) == b'{"ok":true}'
        assert peer.accepted == 2
    finally:
        await pool.close()


async def test_cancelled_waiters_do_not_hold_slots_and_the_limit_holds(peers: list[Peer]) -> None:
    seen = Concurrency()
    peer = await start(peers, seen)
    pool = pool_for(peer.url, limit=2)

    async def one() -> bytes:
        return await read_all(await pool.request("POST", {}, b"{}"))

    try:
        tasks = [asyncio.ensure_future(one()) for _ in range(12)]
        await _until(lambda: len(pool._waiters) == 10, "ten queued")
        for t in tasks[2::2]:
            t.cancel()                                  # five queued clients go away
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        assert [d for d in done if not isinstance(d, asyncio.CancelledError)] == [b'{"ok":true}'] * 7
        assert seen.most <= 2 and pool.open_connections <= 2 and pool._connecting == 0
        assert not [w for w in pool._waiters if not w.done()]
    finally:
        await pool.close()


async def test_chunked_trailers_are_consumed_and_the_connection_is_reused(peers: list[Peer]) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
              b"Trailer: X-Checksum\r\n\r\n" + chunk(b'{"a":') + chunk(b"1}") + b"0\r\nX-Checksum: abc\r\n\r\n")
    peer = await start(peers, serve_forever(answer))
    pool = pool_for(peer.url)
    try:
        for _ in range(2):
            resp = await pool.request("POST", {}, b"{}")
            assert await read_all(resp) == b'{"a":1}'
            assert "X-Checksum" not in resp.headers
        assert peer.accepted == 1 and pool.idle_connections == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_complete_at_the_headers_and_keep_the_connection(
        peers: list[Peer], status: int) -> None:
    peer = await start(peers, serve_forever(f"HTTP/1.1 {status} X\r\nX-A: 1\r\n\r\n".encode()))
    pool = pool_for(peer.url, read_timeout=1.0)
    try:
        for _ in range(2):
            resp = await pool.request("GET", {})
            assert resp.status == status and await read_all(resp) == b""
        assert peer.accepted == 1
    finally:
        await pool.close()


async def test_connection_close_on_a_framed_response_is_honoured(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(ok(b"{}", "Connection: close")))
    pool = pool_for(peer.url)
    try:
        for _ in range(2):
            assert await read_all(await pool.request("POST", {}, b"{}")) == b"{}"
        assert peer.accepted == 2 and pool.idle_connections == 0
    finally:
        await pool.close()


async def test_one_read_holding_an_interim_the_final_answer_and_nothing_else(peers: list[Peer]) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b'{"x":1}')
    peer = await start(peers, serve_forever(answer))
    pool = pool_for(peer.url)
    try:
        for _ in range(3):
            resp = await pool.request("POST", {}, b"{}")
            assert resp.status == 200 and "Link" not in resp.headers
            assert await read_all(resp) == b'{"x":1}'
        assert peer.accepted == 1
    finally:
        await pool.close()


async def test_a_connection_paused_for_a_large_body_reads_again_when_reused(peers: list[Peer]) -> None:
    big = b"x" * (4 * HIGH_WATER)

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(big)}\r\n\r\n".encode() + big)
        await writer.drain()
        await answer_each(peer, reader, writer, ok())

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {}, b"{}")
        # Let the buffer pass the high-water mark before reading anything.
        await _until(lambda: resp._paused or resp._eof, "paused")
        assert await asyncio.wait_for(read_all(resp), WAIT) == big
        again = await asyncio.wait_for(pool.request("POST", {}, b"{}"), WAIT)
        assert await asyncio.wait_for(read_all(again), WAIT) == b'{"ok":true}' and peer.accepted == 1
    finally:
        await pool.close()


# --------------------------------------------------------------------------- the Forwarder over both sockets

from types import SimpleNamespace  # noqa: E402

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from gateway.config.model import Limits  # noqa: E402
from gateway.errors import GatewayError  # noqa: E402
from gateway.pipeline import Exchange  # noqa: E402
from gateway.response import ResponsePath  # noqa: E402
from gateway.stages.stream import EventIds, Origin, Stream  # noqa: E402
from gateway.store.memory import MemoryStore  # noqa: E402
from gateway.upstream import Forwarder, Upstreams  # noqa: E402


def _path() -> ResponsePath:
    """The real response path with no head stages (no session store: these tests are about transport)."""
    return ResponsePath(head=(), stream=Stream(EventIds(MemoryStore())))


class Front:
    """A real aiohttp server (handler_cancellation on, as in app.py) whose handler is Forwarder.forward."""

    def __init__(self, upstream_url: str, **pool_kw: object) -> None:
        config = SimpleNamespace(servers={"s": SimpleNamespace(forward_headers=frozenset())},
                                 limits=Limits(max_sse_event_bytes=64 * 1024, max_response_bytes=1024 * 1024))
        self.upstreams = Upstreams(config)  # type: ignore[arg-type]
        self.pool = pool_for(upstream_url, **pool_kw)
        self.upstreams.pools["s"] = self.pool
        self.forwarder = Forwarder(config, self.upstreams, _path(), {})  # type: ignore[arg-type]
        self.server_cfg = SimpleNamespace(name="s", read_timeout=pool_kw.get("read_timeout", 2.0))
        self.done = asyncio.Queue[str]()                 # how each handler ended
        app = web.Application()
        app.router.add_route("*", "/mcp", self._handle)
        self.server = TestServer(app, host="127.0.0.1", handler_cancellation=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ex = Exchange(request, self.server_cfg)  # type: ignore[arg-type]
        ex.body = (await request.read()) or None
        ex.is_request, ex.rpc_id = True, 7
        ex.origin = Origin("p", "tools/call", 7)
        try:
            resp = await self.forwarder.forward(ex)
            self.done.put_nowait(ex.outcome)
            return resp
        except GatewayError as err:
            self.done.put_nowait(err.reason)
            return web.json_response({"reason": err.reason}, status=err.status)
        except asyncio.CancelledError:
            self.done.put_nowait("cancelled:" + ex.outcome)
            raise

    async def __aenter__(self) -> "Front":
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()
        await self.pool.close()

    async def post(self, body: bytes = b'{"jsonrpc":"2.0","id":7,"method":"x"}') -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        raw = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), rest


async def test_forwarder_ends_an_sse_stream_cut_by_a_reset_without_an_in_band_error(
        peers: list[Peer]) -> None:
    """The client must learn the stream broke (a JSON-RPC error event), not see a clean end."""
    cut = asyncio.Event()

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"n\":1}}\n\n")
        await writer.drain()
        await cut.wait()
        _rst(writer)

    peer = await start(peers, handler)
    async with Front(peer.url) as front:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.server.port)
        body = b'{"jsonrpc":"2.0","id":7,"method":"x"}'
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await asyncio.wait_for(reader.readuntil(b'"params":{"n":1}'), WAIT)     # the first event reached the client
        cut.set()
        rest = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        assert b"upstream_stream_broken" in rest        # was: the stream just ended


async def test_forwarder_maps_pool_failures_to_502_and_504(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        if peer.accepted == 1:
            await reader.read()                         # silent: a read timeout
        elif peer.accepted == 2:
            writer.write(b"NOT HTTP\r\n\r\n")           # garbage: a protocol error
            await writer.drain()
        else:                                           # a close mid-body of a JSON reply
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
            await writer.drain()

    peer = await start(peers, handler)
    async with Front(peer.url, read_timeout=0.3) as front:
        assert await front.post() == (504, b'{"reason": "upstream_timeout"}')
        status, body = await front.post()
        assert status == 502 and b"upstream_unavailable" in body
        status, body = await front.post()
        assert status == 502 and b"upstream_invalid" in body
    url = peer.url
    await peer.stop()
    async with Front(url) as front:                     # refused
        status, body = await front.post()
        assert status == 502 and b"upstream_unavailable" in body


async def test_forwarder_reports_sse_breaks_and_silence_in_band(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunk(b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{"n":1}}\n\n'))
        await writer.drain()
        if peer.accepted == 1:
            return                                      # FIN before the last chunk: broken
        await reader.read()                             # silent: the read timeout

    peer = await start(peers, handler)
    async with Front(peer.url, read_timeout=0.3) as front:
        status, body = await front.post()
        assert status == 200 and b'"params":{"n":1}' in body and b"upstream_stream_broken" in body
        status, body = await front.post()
        assert status == 200 and b'"params":{"n":1}' in body and b'"code":-32000' in body and b"upstream_timeout" in body
        assert front.pool.open_connections == 0         # neither connection is kept


async def test_a_client_disconnect_mid_stream_closes_the_upstream_connection(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunk(b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{"n":1}}\n\n'))
        await writer.drain()
        assert await reader.read() == b""               # the gateway closes: EOF

    peer = await start(peers, handler)
    async with Front(peer.url, read_timeout=WAIT * 2) as front:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.server.port)
        body = b'{"jsonrpc":"2.0","id":7,"method":"x"}'
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await asyncio.wait_for(reader.readuntil(b'"params":{"n":1}'), WAIT)
        writer.transport.abort()                        # the client goes away while the stream is idle
        assert await asyncio.wait_for(front.done.get(), WAIT) == "cancelled:client_gone"
        assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1
        assert front.pool.open_connections == 0
