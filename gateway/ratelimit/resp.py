"""A pipelined Redis connection for the limit checks: RESP written by hand, read by hiredis.

Why not redis-py here: a limit check is one ``EVALSHA`` per event-loop turn on
the request path, and redis-py spends 40-130 µs of client CPU on each
(connection-pool checkout, argument packing in Python, a lock, reply parsing
through several layers) — as much as the gateway's whole request path.  This
connection does only what the limiter needs: commands are encoded into one
buffer and written with one ``transport.write``, replies are parsed by
``hiredis`` (C) in ``data_received`` and matched to their commands in order,
so several calls may be out at once on the one socket (pipelining).

Connection settings come from the same URL as the store's (``redis://``,
``rediss://``, ``unix://``; user, password and db), parsed by redis-py's own
``parse_url`` so both clients read a URL alike.  A call that gets no reply
within ``timeout`` fails, and so does the connection: replies after a lost one
could no longer be matched, so it is closed and every call on it fails; the
next call opens a new one.

With Sentinel (``store.sentinel``) there is no URL: each new connection asks all
sentinels at once for the master (``SENTINEL get-master-addr-by-name``), takes
the first answer and checks with ``ROLE`` that the address is still a master.
A ``READONLY`` reply means the master was demoted by a failover: the connection
is dropped, so the next call asks the sentinels again.
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis


class RespError(Exception):
    """The connection failed, timed out or Redis answered with an error reply."""


class RespReplyError(RespError):
    """Redis answered with an error reply (``-ERR ...``); the connection is still good."""


def encode(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport    # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader, waiters = self.reader, self.waiters
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if not waiters:
                    raise RespError("a reply nobody asked for")
                fut = waiters.popleft()
                if fut.done():
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(RespReplyError(str(reply)))
                else:
                    fut.set_result(reply)
        except Exception as exc:      # hiredis.ProtocolError or an unmatched reply: unusable
            self.fail(RespError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.fail(RespError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class RespClient:
    """One lazily (re)opened, pipelined connection to Redis."""

    def __init__(self, url: str, timeout: float, sentinel: Any = None) -> None:
        from redis.asyncio.connection import SSLConnection, parse_url

        self._sentinel = sentinel          # config.model.SentinelConfig, or None: a plain URL
        if sentinel is not None:
            opts: dict[str, Any] = {"db": sentinel.db}
            if sentinel.password is not None:
                opts["password"] = sentinel.password.resolve()
            self._sentinel_auth = ("AUTH", sentinel.sentinel_password.resolve()) \
                if sentinel.sentinel_password is not None else None
        else:
            opts = parse_url(url)
        self._path: str | None = opts.get("path")
        self._host = opts.get("host", "127.0.0.1")
        self._port = int(opts.get("port", 6379))
        self._ssl = ssl.create_default_context() if opts.get("connection_class") is SSLConnection else None
        self._auth: tuple[Any, ...] | None = None
        if opts.get("password") is not None:
            self._auth = ("AUTH", opts["username"], opts["password"]) if opts.get("username") \
                else ("AUTH", opts["password"])
        self._db = int(opts.get("db") or 0)
        self._timeout = timeout
        self._proto: _Protocol | None = None
        self._opening: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._sentinel is not None:
            self._host, self._port = await self._discover()
        if self._path:
            _, proto = await asyncio.wait_for(loop.create_unix_connection(_Protocol, self._path), self._timeout)
        else:
            _, proto = await asyncio.wait_for(
                loop.create_connection(_Protocol, self._host, self._port, ssl=self._ssl), self._timeout)
        hello = [c for c in (self._auth, ("SELECT", self._db) if self._db else None,
                             ("ROLE",) if self._sentinel is not None else None) if c]
        if hello:
            futs = self._send(proto, hello)
            try:
                replies = await asyncio.wait_for(asyncio.gather(*futs), self._timeout)
            except BaseException:
                proto.fail(RespError("Redis refused the connection's AUTH/SELECT"))
                raise
            if self._sentinel is not None and replies[-1][0] != b"master":
                # The sentinels' answer is stale (a failover under way): try again later.
                proto.fail(RespError("not the master"))
                raise RespError(f"{self._host}:{self._port}, named by the sentinels, is not a master")
        return proto

    async def _discover(self) -> tuple[str, int]:
        """The master's address: every sentinel is asked at once, the first to know it answers."""
        name = self._sentinel.master
        asks = [asyncio.ensure_future(self._ask(host, port, name)) for host, port in self._sentinel.nodes]
        try:
            for answer in asyncio.as_completed(asks, timeout=self._timeout):
                try:
                    address = await answer
                except (RespError, OSError, asyncio.TimeoutError):
                    continue
                if address is not None:
                    return address
        finally:
            for ask in asks:
                ask.cancel()
        raise RespError(f"no sentinel named the master {name!r}")

    async def _ask(self, host: str, port: int, name: str) -> tuple[str, int] | None:
        _, proto = await asyncio.get_running_loop().create_connection(_Protocol, host, port)
        try:
            commands = [c for c in (self._sentinel_auth, ("SENTINEL", "get-master-addr-by-name", name)) if c]
            reply = (await asyncio.gather(*self._send(proto, commands)))[-1]
        finally:
            proto.fail(RespError("closed"))
        return (reply[0].decode(), int(reply[1])) if reply else None

    async def _open(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
        try:
            proto = await asyncio.shield(self._opening)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RespError(f"cannot connect to Redis: {type(exc).__name__}") from exc
        finally:
            if self._opening is not None and self._opening.done():
                self._opening = None
        self._proto = proto
        return proto

    @staticmethod
    def _send(proto: _Protocol, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in commands]
        proto.waiters.extend(futs)
        assert proto.transport is not None
        proto.transport.write(b"".join([encode(c) for c in commands]))
        return futs

    async def call(self, *args: Any) -> Any:
        """One command's reply; ``RespReplyError`` for an error reply, ``RespError`` otherwise."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._open()
        fut = self._send(proto, [args])[0]
        timer = asyncio.get_running_loop().call_later(self._timeout, _expire, proto, fut)
        try:
            return await fut
        except RespReplyError as exc:
            if str(exc).startswith("READONLY"):
                # A replica now (a failover demoted it): reconnect, to the master the sentinels name.
                proto.fail(RespError("Redis answered READONLY"))
                raise RespError("Redis answered READONLY: no longer the master") from exc
            raise
        finally:
            timer.cancel()

    def submit(self, *args: Any) -> "asyncio.Future[Any] | None":
        """Send one command now if the connection is open: a future of its reply (failed after
        ``timeout``, like ``call``), or None when the connection must be opened first (use
        ``call``).  No coroutine or task: for the limiter's per-batch fast path."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            return None
        fut = self._send(proto, [args])[0]
        timer = asyncio.get_running_loop().call_later(self._timeout, _expire, proto, fut)
        fut.add_done_callback(lambda _f: timer.cancel())
        return fut

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail(RespError("closed"))
        if self._opening is not None:
            self._opening.cancel()


def _expire(proto: _Protocol, fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        proto.fail(RespError("Redis did not answer in time"))


__all__ = ["RespClient", "RespError", "RespReplyError", "encode"]
