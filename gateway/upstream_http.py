"""The forwarder's HTTP/1.1 client: one keep-alive pool per upstream, parsed by llhttp.

Every proxied request crosses this twice (request out, response back), so it is
the part of the hot path a gateway cannot skip.  aiohttp's ``ClientSession``
does far more per request than a proxy to a fixed origin needs (URL building,
cookie jar, redirect and auth logic, trace hooks, a payload object for the
body, a timer re-armed on every read); this client does only what forwarding
needs:

* the request line and headers are written with the body in one
  ``transport.write``; header values are refused if they hold CR or LF
  (header injection from a misconfigured credential);
* the response is parsed by ``httptools`` (llhttp, the parser aiohttp and
  uvicorn use): status and headers resolve the request, the body is handed out
  with ``readany()`` as it arrives (SSE events are never held back), with
  ``pause_reading`` above a high-water mark so a slow client bounds memory;
* a connection returns to its pool as soon as the upstream's message is
  complete and keep-alive allows it; idle connections the upstream closes are
  dropped when it closes them, and the pool itself never reuses a connection
  idle for ``idle_timeout`` (4 s: below the 5 s keep-alive timeout of Node's
  http server and of uvicorn, so the gateway closes first and a request never
  races the upstream's close);
* ``read_timeout`` bounds each wait for the upstream (headers, then between
  body reads), as aiohttp's ``sock_read`` does; ``connect_timeout`` bounds the
  TCP (+TLS) connect.  Both raise ``asyncio.TimeoutError``;
* a request sent on a reused connection that the upstream closed before
  answering is retried once on a new connection when the method is idempotent
  (GET, DELETE) or the caller says the request is ``replayable`` (a POST that
  only carries a client's JSON-RPC answer: a receiver drops an answer to an id
  it no longer waits for, so a second copy is harmless, while a lost one leaves
  the server's elicitation or sampling request waiting until it times out);
  any other POST is never sent twice.

Errors are ``aiohttp.ClientError`` subclasses so callers handle the gateway's
other HTTP calls and this one alike.  No cookies are kept (one pool serves all
principals), redirects are not followed, and nothing is decompressed.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

MAX_HEADER_BYTES = 64 * 1024      # status line + response headers (aiohttp: 8190 per line)
HIGH_WATER = 256 * 1024           # buffered body bytes before the upstream socket is paused
IDEMPOTENT = frozenset({"GET", "DELETE", "HEAD", "OPTIONS"})


class UnsafeHeader(ValueError):
    """A header to send holds CR or LF: writing it would split the request (header injection)."""


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """The TCP (or TLS) connection to the upstream could not be made."""


class UpstreamProtocolError(aiohttp.ClientPayloadError):
    """The upstream's bytes are not valid HTTP/1.1 (or exceed the header limit)."""


class UpstreamDisconnected(aiohttp.ServerDisconnectedError):
    """The upstream closed the connection before its response was complete."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class UpstreamPayloadError(aiohttp.ClientPayloadError):
    """The upstream closed the connection in the middle of the response body."""


class PoolExhausted(Exception):
    """Every connection to the upstream stayed busy for ``pool_timeout``: the request was not sent."""


def _exhaust(fut: "asyncio.Future[Any]") -> None:
    if not fut.done():
        fut.set_exception(PoolExhausted())


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class Response:
    """One upstream response: ``status`` and ``headers`` at once, the body as it arrives.

    ``content`` is the response itself (``resp.content.readany()`` reads as with
    aiohttp).  ``release()`` gives a finished connection back (a no-op: finished
    connections return to the pool by themselves) and closes an unfinished one;
    ``close()`` closes the connection unless the message is already complete.
    """

    __slots__ = ("status", "headers", "_conn", "_chunks", "_size", "_eof", "_exc", "_waiter",
                 "_timeout", "_paused", "_started")

    def __init__(self, conn: "_Connection", timeout: float) -> None:
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _EMPTY
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = timeout
        self._paused = False
        self._started = False

    @property
    def content(self) -> "Response":
        return self

    # -- the consumer's side --------------------------------------------------------

    async def readany(self) -> bytes:
        """What has arrived since the last read (waiting for some); ``b""`` at the end."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._paused:
            self._paused = False
            conn = self._conn
            if conn is not None and not conn.closed:
                conn.transport.resume_reading()
        return data

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def set_timeout(self, seconds: float) -> None:
        """The longest each later wait for data may take (a stream's keep-alive tick, its idle limit)."""
        self._timeout = seconds

    def release(self) -> None:
        if not self._eof:
            self.close()

    def close(self) -> None:
        conn = self._conn
        if conn is not None and not self._eof:
            self._conn = None
            conn.abandon()

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        fut = self._waiter = loop.create_future()
        timer = loop.call_later(self._timeout, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    async def _start(self) -> None:
        while not self._started:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    # -- the connection's side ------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._eof = True
        self._conn = None
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._conn = None
            self._wake()


_EMPTY: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls the ``on_*`` methods while parsing."""

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._raw: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._informational = False
        self._framed = False          # Content-Length or chunked: the end is not the close
        self._got_bytes = False
        self._unparsed = 0            # bytes received before the response's headers completed
        self._head = False            # the request was HEAD: no body follows whatever the headers say

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.resp is None:
            self.abandon()       # bytes nobody asked for: the connection is out of step
            return
        self._got_bytes = True
        resp = self.resp
        if not resp._started:
            self._unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error(UpstreamProtocolError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            # A callback's own exception (the header limit) arrives as the error's context.
            cause = exc.__context__
            self._error(cause if isinstance(cause, UpstreamProtocolError)
                        else UpstreamProtocolError(f"invalid HTTP from the upstream: {exc}"))
            return
        if not resp._started and self._unparsed > MAX_HEADER_BYTES and self.resp is resp:
            # on_header sees only complete lines: an endless status line or header would
            # otherwise be buffered by the parser until read_timeout.
            self._error(UpstreamProtocolError("the upstream's response headers exceed 64 KiB"))

    def eof_received(self) -> bool:
        return False             # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        by_us = self.closed       # abandon() ran first: the gateway cut it, not the upstream
        self.closed = True
        self.pool._forget(self)
        resp = self.resp
        if resp is None:
            return
        self.resp = None
        if resp._started and not self._framed and not self._informational and exc is None and not by_us:
            resp._finish()       # a body delimited by the upstream's close (no length, not chunked)
        elif resp._started:
            resp._fail(UpstreamPayloadError("the upstream closed the connection mid-response"))
        else:
            resp._fail(UpstreamDisconnected("the upstream closed the connection before answering",
                                            before_response=not self._got_bytes))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.resp is None:
            # A second message in the read that completed the first: nobody asked for it.
            raise UpstreamProtocolError("the upstream sent a response nobody asked for")
        self._raw = []
        self._header_bytes = 0
        self._framed = False
        self._informational = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UpstreamProtocolError("the upstream's response headers exceed 64 KiB")
        key = name.decode("utf-8", "surrogateescape")
        lower = key.lower()
        if lower == "content-length" or lower == "transfer-encoding":
            self._framed = True
        self._raw.append((key, value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True       # 100 Continue and friends: the answer follows
            return
        self._informational = False
        resp = self.resp
        if resp is not None:
            resp.status = status
            resp.headers = CIMultiDictProxy(CIMultiDict(self._raw))
            resp._started = True
            resp._wake()
            if self._head:
                # No body follows a HEAD answer, but the parser would wait for Content-Length
                # bytes: finish here and do not reuse the connection.
                self.resp = None
                resp._finish()
                self.abandon()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is not None:
            resp._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            return
        resp = self.resp
        if resp is None:
            self.abandon()       # a response nobody asked for: the connection is out of step
            return
        self.resp = None
        resp._finish()
        if resp._paused:
            resp._paused = False
            self.transport.resume_reading()
        if self.parser.should_keep_alive() and not self.closed:
            self.pool._release(self)
        else:
            self.abandon()

    # the pool's side

    def send(self, data: bytes, timeout: float, head: bool = False) -> Response:
        resp = self.resp = Response(self, timeout)
        self._got_bytes = False
        self._unparsed = 0
        self._head = head
        self.transport.write(data)
        return resp

    def abandon(self) -> None:
        """Close now (an unfinished exchange, a protocol error, shutdown)."""
        if not self.closed:
            self.closed = True
            self.transport.close()
            self.pool._forget(self)

    def _error(self, exc: BaseException) -> None:
        resp = self.resp
        self.resp = None
        if resp is not None:
            resp._fail(exc)
        self.abandon()


class Pool:
    """Keep-alive connections to one upstream origin, at most ``limit`` open at a time."""

    def __init__(self, url: str | URL, *, limit: int, connect_timeout: float, read_timeout: float,
                 idle_timeout: float = 4.0, ssl_context: ssl.SSLContext | None = None,
                 pool_timeout: float = 10.0) -> None:
        u = URL(url) if isinstance(url, str) else url
        if u.scheme not in ("http", "https") or not u.host:
            raise ValueError(f"not an http(s) URL: {u}")
        self._host = u.host
        self._port = u.port
        self._ssl: ssl.SSLContext | None = None
        if u.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        authority = f"[{u.raw_host}]" if ":" in (u.raw_host or "") else u.raw_host
        if u.explicit_port is not None and u.explicit_port != (443 if u.scheme == "https" else 80):
            authority = f"{authority}:{u.explicit_port}"
        self._prefix = f" {u.raw_path_qs or '/'} HTTP/1.1\r\nHost: {authority}\r\n"
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout
        self._pool_timeout = pool_timeout       # longest wait for a free slot (PoolExhausted past it)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def encode(self, method: str, headers: dict[str, str], body: bytes | None) -> bytes:
        """The request line and headers (and body): bytes ready for one write."""
        block = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        n = len(headers)
        if block.count("\n") != n or block.count("\r") != n:
            bad = next(k for k, v in headers.items() if "\r" in k or "\n" in k or "\r" in v or "\n" in v)
            raise UnsafeHeader(f"header {bad!r} holds CR or LF")
        if body is None:
            return (method + self._prefix + block + "\r\n").encode("utf-8", "surrogateescape")
        head = f"{method}{self._prefix}{block}Content-Length: {len(body)}\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + body

    async def request(self, method: str, headers: dict[str, str], body: bytes | None = None, *,
                      replayable: bool = False) -> Response:
        """Send one request; return once the upstream's status and headers are in."""
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        data = self.encode(method, headers, body)
        conn = (self._take_idle() if self._idle else None) or await self._acquire()
        head = method == "HEAD"
        resp = conn.send(data, self._read_timeout, head)
        try:
            try:
                await resp._start()
            except UpstreamDisconnected as exc:
                if not (conn.reused and exc.before_response and (replayable or method in IDEMPOTENT)):
                    raise
                # The upstream closed a kept-alive connection as the request went out.
                conn = await self._acquire(fresh=True)
                resp = conn.send(data, self._read_timeout, head)
                await resp._start()
        except BaseException:
            resp.close()
            raise
        return resp

    async def _acquire(self, fresh: bool = False) -> _Connection:
        while True:
            if self._closed:
                raise UpstreamConnectError("the upstream pool is closed")
            if not fresh and self._idle and (conn := self._take_idle()) is not None:
                return conn
            if len(self._open) + self._connecting < self._limit:
                return await self._connect()
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_later(self._pool_timeout, _exhaust, waiter)
            try:
                conn = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    handed = waiter.result()
                    if handed is not None:
                        self._release(handed)          # a connection handed over as we were cancelled
                    else:
                        self._wake_one()               # a free slot: pass the wake-up on
                raise
            finally:
                timer.cancel()
            if conn is not None and not conn.closed:
                return conn
            # None: a connection closed, so there is room to open one.

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self._host, self._port, ssl=self._ssl),
                self._connect_timeout)
        except BaseException as exc:
            # Failed, timed out or cancelled: the slot is free again for a queued request.
            self._connecting -= 1
            self._wake_one()
            if isinstance(exc, (OSError, ssl.SSLError)) and not isinstance(exc, asyncio.TimeoutError):
                raise UpstreamConnectError(
                    f"cannot connect to {self._host}:{self._port}: {exc.strerror or exc}") from exc
            raise
        self._connecting -= 1
        if self._closed:
            conn.abandon()
            raise UpstreamConnectError("the upstream pool is closed")
        self._open.add(conn)
        return conn

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection that is not past ``idle_timeout``."""
        fresh_after = time.monotonic() - self._idle_timeout
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_since > fresh_after:
                return conn
            conn.abandon()      # the upstream may be closing it right now
        return None

    def _release(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.reused = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_timeout, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            try:
                self._idle.remove(conn)
            except ValueError:
                pass
            self._wake_one()     # room for one more connection: a queued request may open it

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self._idle_timeout
        stale = [c for c in self._idle if c.idle_since <= cutoff]
        for conn in stale:
            conn.abandon()
        if self._idle and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_timeout, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("the upstream pool is closed"))
        for conn in list(self._open):
            conn.abandon()


__all__ = ["Pool", "Response", "UnsafeHeader", "UpstreamConnectError", "UpstreamDisconnected", "UpstreamPayloadError",
           "UpstreamProtocolError", "MAX_HEADER_BYTES", "HIGH_WATER"]
