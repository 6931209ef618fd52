"""The public listener: aiohttp's server with a deadline on every request's header block.

aiohttp closes a connection that sends nothing at all (its keep-alive timer),
but the first byte cancels that timer: a client sending one byte every few
seconds (slowloris) would hold a connection, and its buffers, forever.  Here a
connection must deliver a complete header block within ``header_timeout`` of
its first byte (or of connecting); the body then has ``body_timeout``, which the
parse stage enforces.  A connection past its deadline is closed, logged and
counted; no request was started, so there is nothing to answer.

Between requests, a kept-alive connection that sends nothing is closed after
``keepalive_timeout`` (aiohttp's keep-alive timer, set from config; above the
60 s idle timeout of the usual load balancers, so the gateway is not the side
that closes a connection a balancer is about to reuse).

A connection past ``max_client_connections`` (per process) is answered ``503``
with ``Connection: close`` before anything is read: a flood of idle sockets
costs the gateway a file descriptor each, never the ability to serve the
connections it already has.
"""
from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .errors import BadRequest
from .response import error_body
from .telemetry.metrics import LIMIT_HITS, count_rejection, security_event

log = structlog.get_logger("gateway.listener")


class GuardedRequestHandler(RequestHandler):
    """``RequestHandler`` plus the header deadline (see the module docstring)."""

    __slots__ = ("_header_timeout", "_header_deadline", "_max_connections")

    def __init__(self, manager: Server, *, header_timeout: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._max_connections = max_connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # ``_connections``: ``Server.connections`` copies it into a list on every call.
        if len(self._manager._connections) > self._max_connections:
            LIMIT_HITS.labels("client_connections").inc()
            log.warning("listener.connection_limit", limit=self._max_connections)
            transport.write(_BUSY)       # type: ignore[attr-defined]
            self.force_close()
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._header_deadline = self._loop.call_later(self._header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._current_request is not None:
            if self._header_deadline is not None:       # a whole header block arrived
                self._header_deadline.cancel()
                self._header_deadline = None
        elif self._header_deadline is None:             # the next request on a kept-alive connection
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._messages or self._current_request is not None or self.transport is None:
            return
        security_event("header_timeout")
        log.warning("listener.header_timeout", timeout_seconds=self._header_timeout)
        self.force_close()
        self.transport.close()


    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request its HTTP parser refused (or a handler crash), as JSON-RPC.

        aiohttp answers ``text/plain`` quoting the offending bytes, and logs at error level
        with a traceback; malformed HTTP is client input like any other: a 400 JSON-RPC
        error with a closed-set reason, one structured info line, a rejection counted.
        """
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        err = BadRequest("malformed HTTP request", reason="malformed_http", status=status)
        count_rejection("_unknown", err.reason)
        log.info("listener.malformed_http", status=status, detail=type(exc).__name__ if exc else None)
        resp = web.Response(status=status, body=error_body(err, None), content_type="application/json")
        resp.force_close()
        return resp

_BUSY_BODY = (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"too many connections",'
              b'"data":{"reason":"too_many_connections"}}}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _GuardedServer(Server):
    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections get ``GuardedRequestHandler``."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        return server
