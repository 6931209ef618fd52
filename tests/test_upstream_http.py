"""The forwarder's upstream HTTP/1.1 client (gateway/upstream_http.py) over real sockets.

The peer is a raw asyncio server on 127.0.0.1 that answers with scripted bytes, so
every framing the client must handle (Content-Length, chunked, close-delimited,
1xx, keep-alive, Connection: close, early close, garbage) is sent exactly as
written.  Every wait is on an event with a timeout; nothing sleeps.
"""
from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.upstream_http import (
    HIGH_WATER,
    Pool,
    UnsafeHeader,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamPayloadError,
    UpstreamProtocolError,
)

WAIT = 5.0
Handler = Callable[["Peer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Peer:
    """A scripted HTTP server: ``handler`` runs once per accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Queue[int]()     # connection numbers, as their client side closes
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> "Peer":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp?x=1"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.put_nowait(number)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def ok(body: bytes = b'{"ok":true}', *extra: str) -> bytes:
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + "".join(f"{h}\r\n" for h in extra)
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def answer_each(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      answer: bytes) -> None:
    """Answer every request on this connection with ``answer``, until the client closes it."""
    while True:
        await peer.read_request(reader)
        writer.write(answer)
        await writer.drain()


def serve_forever(answer: bytes) -> Handler:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_each(peer, reader, writer, answer)
    return handler


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        await p.stop()


async def start(peers: list[Peer], handler: Handler, ssl_context: ssl.SSLContext | None = None) -> Peer:
    peer = await Peer(handler).start(ssl_context)
    peers.append(peer)
    return peer


def pool_for(url: str, **kw: Any) -> Pool:
    opts: dict[str, Any] = {"limit": 8, "connect_timeout": 2.0, "read_timeout": 2.0}
    opts.update(kw)
    return Pool(url, **opts)


async def read_all(resp: Any) -> bytes:
    chunks = []
    while chunk := await resp.content.readany():
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- the request

async def test_the_request_is_one_http11_message_with_host_path_query_and_length(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(ok()))
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {"Content-Type": "application/json", "X-Ünïcode": "ü"}, b'{"a":1}')
        assert resp.status == 200 and await read_all(resp) == b'{"ok":true}'
        resp = await pool.request("GET", {"Accept": "text/event-stream"})
        await read_all(resp)
    finally:
        await pool.close()
    post, get = peer.requests
    assert post.startswith(b"POST /mcp?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % peer.port)
    assert b"\r\nContent-Length: 7\r\n\r\n{\"a\":1}" in post and "X-Ünïcode: ü".encode() in post
    assert get.startswith(b"GET /mcp?x=1 HTTP/1.1\r\n") and b"content-length" not in get.lower()
    assert peer.accepted == 1                  # the second request reused the connection


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
async def test_a_header_value_with_cr_or_lf_is_never_sent(peers: list[Peer], value: str) -> None:
    peer = await start(peers, serve_forever(ok()))
    pool = pool_for(peer.url)
    try:
        with pytest.raises(UnsafeHeader, match="X-Api-Key"):
            await pool.request("POST", {"X-Api-Key": value}, b"{}")
        assert peer.accepted == 0 and pool.open_connections == 0
    finally:
        await pool.close()


def test_the_host_header_names_the_port_only_when_it_is_not_the_default() -> None:
    assert Pool("http://example.test/mcp", limit=1, connect_timeout=1, read_timeout=1).encode(
        "GET", {}, None) == b"GET /mcp HTTP/1.1\r\nHost: example.test\r\n\r\n"
    assert Pool("https://example.test:8443", limit=1, connect_timeout=1, read_timeout=1).encode(
        "GET", {}, None) == b"GET / HTTP/1.1\r\nHost: example.test:8443\r\n\r\n"
    assert Pool("http://[::1]:9000/a%20b", limit=1, connect_timeout=1, read_timeout=1).encode(
        "GET", {}, None) == b"GET /a%20b HTTP/1.1\r\nHost: [::1]:9000\r\n\r\n"
    with pytest.raises(ValueError):
        Pool("ftp://example.test/", limit=1, connect_timeout=1, read_timeout=1)


# --------------------------------------------------------------------------- response framing

async def test_chunked_bodies_arrive_decoded_chunk_by_chunk_as_the_upstream_sends_them(peers: list[Peer]) -> None:
    go_on = asyncio.Event()

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunk(b"data: first\r\n\r\n"))
        await writer.drain()
        await go_on.wait()
        writer.write(chunk(b"data: second\r\n\r\n") + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {}, b"{}")
        assert resp.headers["content-type"] == "text/event-stream"
        assert await asyncio.wait_for(resp.content.readany(), WAIT) == b"data: first\r\n\r\n"   # before the rest exists
        go_on.set()
        assert await read_all(resp) == b"data: second\r\n\r\n"
        assert resp.content.at_eof() and pool.idle_connections == 1
    finally:
        await pool.close()


async def test_a_close_delimited_body_ends_at_the_close(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"x\":")
        await writer.drain()
        writer.write(b"1}")

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {}, b"{}")
        assert await asyncio.wait_for(read_all(resp), WAIT) == b'{"x":1}'
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_informational_responses_are_skipped(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(b"HTTP/1.1 100 Continue\r\n\r\n" + ok()))
    pool = pool_for(peer.url)
    try:
        for _ in range(2):
            resp = await pool.request("POST", {}, b"{}")
            assert resp.status == 200 and await read_all(resp) == b'{"ok":true}'
        assert peer.accepted == 1
    finally:
        await pool.close()


async def test_headers_keep_order_and_repeats_and_are_case_insensitive(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(ok(b"{}", "Set-Cookie: a=1", "set-cookie: b=2",
                                                   "Mcp-Session-Id: s-1", "Connection: keep-alive, X-Hop")))
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {}, b"{}")
        assert resp.headers.getall("SET-COOKIE") == ["a=1", "b=2"]
        assert resp.headers.get("mcp-session-id") == "s-1" and "Connection" in resp.headers
        await read_all(resp)
    finally:
        await pool.close()


async def test_a_response_with_oversized_headers_is_a_protocol_error(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(ok(b"{}", *[f"X-Pad-{i}: {'p' * 1000}" for i in range(80)])))
    pool = pool_for(peer.url)
    try:
        with pytest.raises(UpstreamProtocolError, match="64 KiB"):
            await pool.request("POST", {}, b"{}")
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_garbage_instead_of_http_is_a_protocol_error(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(b"SSH-2.0-OpenSSH_9.6\r\n"))
    pool = pool_for(peer.url)
    try:
        with pytest.raises(UpstreamProtocolError):
            await pool.request("POST", {}, b"{}")
        assert pool.open_connections == 0
    finally:
        await pool.close()


# --------------------------------------------------------------------------- the connection ends

async def test_a_close_before_any_answer_is_a_disconnect_and_a_post_is_never_sent_twice(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer.accepted == 1:          # the first connection answers once, then closes on the next request
            await peer.read_request(reader)
            writer.write(ok())
            await writer.drain()
        await peer.read_request(reader)

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        await read_all(await pool.request("POST", {}, b"{}"))
        with pytest.raises(UpstreamDisconnected):
            await pool.request("POST", {}, b'{"n":2}')
        assert peer.requests.count(peer.requests[-1]) == 1 and len(peer.requests) == 2
    finally:
        await pool.close()


async def test_a_get_on_a_connection_closed_as_it_was_reused_is_retried_once_on_a_new_one(
        peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer.accepted == 1:
            await peer.read_request(reader)
            writer.write(ok())
            await writer.drain()
            await peer.read_request(reader)   # the reused connection: read it, close without answering
            return
        await answer_each(peer, reader, writer, ok(b'{"fresh":true}'))

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        await read_all(await pool.request("GET", {}))
        resp = await pool.request("GET", {})
        assert await read_all(resp) == b'{"fresh":true}' and peer.accepted == 2
    finally:
        await pool.close()


async def test_a_close_mid_body_is_a_payload_error(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"half\":")
        await writer.drain()

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {}, b"{}")
        with pytest.raises(UpstreamPayloadError):
            await asyncio.wait_for(read_all(resp), WAIT)
    finally:
        await pool.close()


async def test_an_idle_connection_the_upstream_closed_is_not_used_again(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(ok())
        await writer.drain()
        # ...then close the kept-alive connection while it is idle (keep-alive timeout).

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        await read_all(await pool.request("GET", {}))
        assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1
        # Whether the FIN has reached the pool yet or the request meets the closed
        # connection (then a GET is retried once), the answer comes from a new connection.
        resp = await pool.request("GET", {})
        assert resp.status == 200 and peer.accepted == 2
        await read_all(resp)
        assert pool.open_connections <= 1
    finally:
        await pool.close()


async def test_idle_connections_are_closed_after_the_idle_timeout(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(ok()))
    pool = pool_for(peer.url, idle_timeout=0.2)
    try:
        await read_all(await pool.request("POST", {}, b"{}"))
        assert pool.idle_connections == 1
        assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1     # the pool closed it
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_a_connection_idle_past_the_idle_timeout_is_closed_not_reused(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(ok()))
    pool = pool_for(peer.url, idle_timeout=4.0)
    try:
        await read_all(await pool.request("POST", {}, b"{}"))
        pool._idle[0].idle_since -= 4.0       # as if it had been idle 4 s (the sweep has not run)
        # A POST is never retried, so it must not meet a connection the upstream may be closing.
        resp = await pool.request("POST", {}, b"{}")
        assert resp.status == 200 and peer.accepted == 2
        await read_all(resp)
        assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1
        assert pool.open_connections == 1
    finally:
        await pool.close()


async def test_close_on_an_unfinished_response_closes_the_upstream_connection(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"6\r\ndata:1\r\n")
        await writer.drain()
        assert await reader.read() == b""       # the client went away: EOF here

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {}, b"{}")
        assert await resp.content.readany() == b"data:1"
        resp.close()
        assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1
        assert pool.open_connections == 0
    finally:
        await pool.close()


# --------------------------------------------------------------------------- timeouts, limits, flow control

async def test_read_timeout_bounds_the_wait_for_headers_and_between_body_reads(peers: list[Peer]) -> None:
    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        if peer.accepted == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
            await writer.drain()
        await reader.read()

    peer = await start(peers, handler)
    pool = pool_for(peer.url, read_timeout=0.2)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await pool.request("POST", {}, b"{}")          # silent: no status line
        resp = await pool.request("POST", {}, b"{}")
        assert await resp.content.readany() == b"hi"
        with pytest.raises(asyncio.TimeoutError):
            await resp.content.readany()                   # silent after the first chunk
        resp.release()
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_a_refused_connection_is_a_connect_error(peers: list[Peer]) -> None:
    peer = await start(peers, serve_forever(ok()))
    url = peer.url
    await peer.stop()                                     # nothing listens on that port now
    pool = pool_for(url)
    try:
        with pytest.raises(UpstreamConnectError):
            await pool.request("POST", {}, b"{}")
    finally:
        await pool.close()


async def test_connect_timeout_bounds_a_tls_handshake_that_never_completes(peers: list[Peer]) -> None:
    async def silent(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()                               # accepts TCP, never speaks TLS

    peer = await start(peers, silent)
    pool = pool_for(f"https://127.0.0.1:{peer.port}/mcp", connect_timeout=0.2)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await pool.request("POST", {}, b"{}")
        assert pool.open_connections == 0
    finally:
        await pool.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_upstreams_are_verified_against_the_trust_store(peers: list[Peer], tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    peer = await start(peers, serve_forever(ok()), ssl_context=server_ctx)
    url = f"https://127.0.0.1:{peer.port}/mcp"
    untrusting = pool_for(url)                            # the system store does not know this CA
    trusting = pool_for(url, ssl_context=ssl.create_default_context(cafile=str(cert)))
    try:
        with pytest.raises(UpstreamConnectError):
            await untrusting.request("POST", {}, b"{}")
        resp = await trusting.request("POST", {}, b"{}")
        assert resp.status == 200 and await read_all(resp) == b'{"ok":true}'
    finally:
        await untrusting.close()
        await trusting.close()


class Concurrency:
    """A keep-alive handler answering ``ok()`` that records the most connections open at once."""

    def __init__(self) -> None:
        self.open_now = 0
        self.most = 0

    async def __call__(self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1
        self.most = max(self.most, self.open_now)
        try:
            await answer_each(peer, reader, writer, ok())
        finally:
            self.open_now -= 1


async def test_the_pool_never_opens_more_than_its_limit_and_queued_requests_all_complete(
        peers: list[Peer]) -> None:
    seen = Concurrency()
    peer = await start(peers, seen)
    pool = pool_for(peer.url, limit=2)

    async def one() -> bytes:
        return await read_all(await pool.request("POST", {}, b"{}"))

    try:
        bodies = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), WAIT)
        assert bodies == [b'{"ok":true}'] * 20
        assert peer.accepted == 2 and seen.most == 2 and pool.open_connections == 2
    finally:
        await pool.close()


async def test_a_large_body_read_slowly_pauses_the_upstream_and_arrives_intact(peers: list[Peer]) -> None:
    body = bytes(range(256)) * (32 * 1024 * 1024 // 256)      # more than loopback socket buffers hold
    sent = asyncio.Event()

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        sent.set()
        await reader.read()

    peer = await start(peers, handler)
    pool = pool_for(peer.url)
    try:
        resp = await pool.request("POST", {}, b"{}")
        # Nobody reads: the client stops reading at the high-water mark, so the upstream's
        # write cannot finish (without flow control it would, in a few milliseconds).
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sent.wait(), 0.5)
        first = await resp.content.readany()
        assert len(first) <= HIGH_WATER + 256 * 1024     # at most one read past the mark
        rest = await asyncio.wait_for(read_all(resp), WAIT)
        assert first + rest == body
        assert await asyncio.wait_for(sent.wait(), WAIT) is True
        assert pool.idle_connections == 1                 # finished: back in the pool
    finally:
        await pool.close()


async def test_closing_the_pool_fails_waiting_requests_and_closes_every_connection(peers: list[Peer]) -> None:
    arrived = asyncio.Event()

    async def handler(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        arrived.set()
        await reader.read()

    peer = await start(peers, handler)
    pool = pool_for(peer.url, limit=1)
    first = asyncio.ensure_future(pool.request("POST", {}, b"{}"))
    await asyncio.wait_for(arrived.wait(), WAIT)          # the first request is at the upstream
    second = asyncio.ensure_future(pool.request("POST", {}, b"{}"))
    stepped = asyncio.Event()
    asyncio.get_running_loop().call_soon(stepped.set)     # runs after the new task's first step
    await asyncio.wait_for(stepped.wait(), WAIT)
    assert len(pool._waiters) == 1                        # queued behind the limit
    await pool.close()
    for fut in (first, second):
        with pytest.raises((UpstreamConnectError, UpstreamDisconnected)):
            await asyncio.wait_for(fut, WAIT)
    assert await asyncio.wait_for(peer.closed.get(), WAIT) == 1
    assert peer.accepted == 1
