"""The public listener: aiohttp's server with a deadline on every request's header block.

aiohttp closes a connection that sends nothing at all (its keep-alive timer),
but the first byte cancels that timer: a client sending one byte every few
seconds (slowloris) would hold a connection, and its buffers, forever.  Here a
connection must deliver a complete header block within ``header_timeout`` of
its first byte (or of connecting); the body then has ``body_timeout``, which the
parse stage enforces.  A connection past its deadline is closed, logged and
counted; no request was started, so there is nothing to answer.
"""
from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .telemetry.metrics import security_event

log = structlog.get_logger("gateway.listener")


class GuardedRequestHandler(RequestHandler):
    """``RequestHandler`` plus the header deadline (see the module docstring)."""

    __slots__ = ("_header_timeout", "_header_deadline")

    def __init__(self, manager: Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
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


class _GuardedServer(Server):
    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections get ``GuardedRequestHandler``."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        return server
