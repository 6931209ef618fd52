"""Relaying a streamed answer: SSE events or NDJSON lines, one checked message at a time.

The forwarder (``upstream.py``) hands a response here once it knows the answer streams.
Each message is framed whole, checked by the response path (``response.py``) and written
to the client before the next is read: never buffered beyond one message, and a client
that stops reading holds at most ``limits.max_stream_buffer_bytes`` in the gateway
before the relay (and so the upstream) waits, for ``limits.stream_write_timeout`` at
most.  Once the response has started, errors go in band (an SSE error event, or an
NDJSON error line).  Upstream silence ends a GET stream cleanly after
``limits.stream_idle_timeout`` (the client resumes with Last-Event-ID) and is a fault on
a POST's stream after ``read_timeout``; silent SSE streams carry ``: keepalive``
comments every ``limits.stream_keepalive_interval``.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from .errors import GatewayError, UpstreamInvalid, UpstreamTimeout
from .inspect.ndjson import LineFramer, LineTooLarge
from .inspect.sse import SSEFramer, SSETooLarge
from .response import ResponsePath, StreamAbort, error_body, error_event
from .telemetry.metrics import LIMIT_HITS, SSE_EVENTS_TALLY, STREAMS_LEVEL
from .upstream_http import Response

if TYPE_CHECKING:
    from .config.model import ServerConfig
    from .pipeline import Exchange

_STREAMS = STREAMS_LEVEL.levels
log = structlog.get_logger("gateway.upstream")


class StreamRelay:
    """The streaming half of ``upstream.Forwarder`` (its base class), which sets these:"""

    _path: ResponsePath
    _event_limit: int           # bytes of one SSE event or NDJSON line
    _stream_buffer: int         # transport high-water mark for one client
    _room: int                  # what a write may add before it may wait for the client
    _write_timeout: float       # limits.stream_write_timeout
    _idle_timeout: float        # limits.stream_idle_timeout (GET streams)
    _keepalive: float           # limits.stream_keepalive_interval

    def _count(self, server: "ServerConfig", reason: str) -> None:
        raise NotImplementedError

    async def _relay_sse(self, ex: "Exchange", resp: Response,
                         headers: CIMultiDict[str]) -> tuple[web.StreamResponse, bool]:
        headers["Content-Type"] = "text/event-stream"
        framing = _Framing(SSEFramer(self._event_limit), self._path.event, error_event, counted=True)
        return await self._relay_stream(ex, resp, headers, framing, b"")

    async def _relay_lines(self, ex: "Exchange", resp: Response, headers: CIMultiDict[str],
                           buffered: bytes) -> tuple[web.StreamResponse, bool]:
        """A line stream keeps its framing: the client gets NDJSON under the upstream's media type."""
        framer = LineFramer(self._event_limit)
        framing = _Framing(framer, self._path.line, _error_line, counted=False, finish=framer.finish)
        return await self._relay_stream(ex, resp, headers, framing, buffered)

    async def _relay_stream(self, ex: "Exchange", resp: Response, headers: CIMultiDict[str],
                            framing: "_Framing", buffered: bytes) -> tuple[web.StreamResponse, bool]:
        key = (ex.server.name,)
        _STREAMS[key] = _STREAMS.get(key, 0) + 1
        try:
            return await self._relay_stream_open(ex, resp, headers, framing, buffered)
        finally:
            _STREAMS[key] -= 1

    async def _relay_stream_open(self, ex: "Exchange", resp: Response, headers: CIMultiDict[str],
                                 framing: "_Framing", chunk: bytes) -> tuple[web.StreamResponse, bool]:
        """Frame, check and write one message at a time; once started, errors go in band."""
        headers["X-Accel-Buffering"] = "no"
        headers.setdefault("Cache-Control", "no-cache")
        out = web.StreamResponse(status=resp.status, headers=headers)
        ex.status = resp.status
        await out.prepare(ex.request)
        # A client that stops reading holds at most this much of the stream in the gateway;
        # past it the relay waits (and so does the upstream), for stream_write_timeout at most.
        transport = ex.request.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=self._stream_buffer)
        framer = framing.framer
        relay = framing.relay
        fail = framing.error
        tally = SSE_EVENTS_TALLY.pending if framing.counted else None
        tally_key = (ex.server.name,)
        relayed = 0
        content = resp.content
        eof = False
        # Upstream silence.  On a GET stream (notifications: quiet is normal) it ends the
        # stream cleanly after stream_idle_timeout, and the client reconnects (resuming with
        # Last-Event-ID); on a POST's stream it is a fault after read_timeout (in-band error).
        # A silent SSE stream gets a keep-alive comment every stream_keepalive_interval so
        # that proxies in between do not cut it; comments carry no id, so resumption is
        # unaffected, and they do not count as activity.
        get = ex.request.method == "GET"
        silence = self._idle_timeout if get else ex.server.read_timeout
        tick = self._keepalive if framing.counted and self._keepalive < silence else 0.0
        watch = get or tick > 0          # else the upstream's read timer alone bounds silence
        if watch:
            loop = asyncio.get_running_loop()
            wait = min(tick, silence) if tick else silence
            resp.set_timeout(wait)
            deadline = loop.time() + silence
        while not eof:
            if not chunk:
                try:
                    chunk = await content.readany()
                except asyncio.TimeoutError:
                    if watch:
                        left = deadline - loop.time()
                        if left > 0.001:              # a keep-alive tick, not the silence limit
                            if await self._write(ex, resp, out, transport, _KEEPALIVE):
                                return out, True
                            resp.set_timeout(min(tick, left))
                            continue
                        if get:
                            LIMIT_HITS.labels("stream_idle_timeout").inc()
                            log.info("stream.idle_timeout", server=ex.server.name, timeout_seconds=silence)
                            ex.reason = "stream_idle_timeout"
                            try:
                                await out.write_eof()
                            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                                pass
                            return out, False
                    self._count(ex.server, "timeout")
                    log.warning("upstream.stream_silent", server=ex.server.name)
                    await self._end_with_error(ex, out, UpstreamTimeout("the upstream MCP server went silent"), fail)
                    return out, False
                except aiohttp.ClientError as exc:
                    self._count(ex.server, "stream_broken")
                    await self._end_with_error(ex, out, UpstreamInvalid(
                        "the upstream MCP server broke off the stream", reason="upstream_stream_broken"), fail)
                    log.warning("upstream.stream_broken", server=ex.server.name, error=type(exc).__name__)
                    return out, False
                eof = not chunk
                if watch:
                    deadline = loop.time() + silence
                    resp.set_timeout(wait)
            too_large = None
            try:
                items = framer.feed(chunk) if chunk else framing.finish()
            except SSETooLarge as exc:
                items, too_large = [], exc
            except LineTooLarge as exc:
                items, too_large = exc.before, exc        # the whole lines before it still go
            chunk = b""
            for item in items:
                try:
                    data = relay(ex, item)
                except StreamAbort as abort:
                    await self._end_with_error(ex, out, abort.error, fail)
                    return out, False
                if not data:
                    continue
                if await self._write(ex, resp, out, transport, data):
                    return out, True
                if tally is not None:
                    tally[tally_key] = tally.get(tally_key, 0) + 1
                if ex.method == "tools/call":
                    ex.result_bytes = relayed = relayed + len(data)   # messages relayed so far
            if too_large is not None:
                if isinstance(too_large, SSETooLarge):
                    self._count(ex.server, "sse_event_too_large")
                    log.warning("upstream.sse_event_too_large", server=ex.server.name, limit=self._event_limit)
                else:
                    self._count(ex.server, "response_too_large")
                    log.warning("upstream.message_too_large", server=ex.server.name, limit=self._event_limit)
                await self._end_with_error(ex, out, UpstreamInvalid(
                    "a streamed message from the upstream exceeded the size limit", reason="upstream_too_large"), fail)
                return out, False
        if framer.pending:
            # Closed mid-message: the half message is dropped, never forwarded.
            self._count(ex.server, "stream_broken")
            await self._end_with_error(ex, out, UpstreamInvalid(
                "the upstream MCP server broke off the stream", reason="upstream_stream_broken"), fail)
            return out, False
        if ex.is_request and not ex.answered and not ex.resumable and ex.request.method == "POST":
            # Ended cleanly, the request unanswered and no event id to resume from (SEP-1699
            # polling gives one): the client would wait for ever.  Answer it in band.
            self._count(ex.server, "stream_broken")
            log.warning("upstream.stream_unanswered", server=ex.server.name)
            await self._end_with_error(ex, out, UpstreamInvalid(
                "the upstream MCP server ended the stream without an answer", reason="upstream_stream_broken"), fail)
            return out, False
        try:
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return out, False

    async def _write(self, ex: "Exchange", resp: Response, out: web.StreamResponse, transport: Any,
                     data: bytes) -> bool:
        """Write ``data`` to the client; True when the client is gone (left, or cut as a slow reader).

        Only a write that may pause the transport (its buffer would pass the high-water
        mark) can wait for the client, so only such a write arms ``stream_write_timeout``:
        a client that keeps up costs no timer (measured on the reference box, 2026-12-05:
        0.4-0.5 µs per write here against 7.5-8.4 µs with ``asyncio.timeout`` on every write).
        """
        try:
            if transport is not None and transport.get_write_buffer_size() + len(data) < self._room:
                await out.write(data)
            else:
                async with asyncio.timeout(self._write_timeout):
                    await out.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return self._client_gone(ex, resp)
        except asyncio.TimeoutError:
            LIMIT_HITS.labels("stream_write_timeout").inc()
            log.warning("stream.slow_reader", server=ex.server.name, timeout_seconds=self._write_timeout,
                        buffered_bytes=transport.get_write_buffer_size() if transport else None)
            if transport is not None:
                transport.abort()
            return self._client_gone(ex, resp)
        return False

    async def _end_with_error(self, ex: "Exchange", out: web.StreamResponse, err: GatewayError,
                              frame: Callable[[GatewayError, Any], bytes] = error_event) -> None:
        ex.outcome = "error"
        ex.reason = err.reason
        if ex.is_request and not ex.answered:
            try:
                await out.write(frame(err, ex.rpc_id))
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                return
        try:
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass

    def _client_gone(self, ex: "Exchange", resp: Response) -> bool:
        """The client disconnected mid-stream: mirror the disconnect upstream.

        The upstream then applies its own era's rule, exactly as if the client
        had been connected to it directly: in 2025-11-25 a disconnect is not a
        cancellation (the call runs on and the client resumes with
        ``Last-Event-ID``, which needs the old stream to be detached first); in
        2026-07-28 closing the stream is the cancellation.
        """
        ex.outcome = "client_gone"
        resp.close()
        return True


_KEEPALIVE = b": keepalive\n\n"     # an SSE comment: no event, no id (EventSource keeps its last id)


def _error_line(err: GatewayError, rpc_id: Any) -> bytes:
    return error_body(err, rpc_id) + b"\n"


class _Framing:
    """How one kind of stream is cut, checked and answered in band."""

    __slots__ = ("framer", "relay", "error", "finish", "counted")

    def __init__(self, framer: Any, relay: Callable[["Exchange", Any], bytes | None],
                 error: Callable[[GatewayError, Any], bytes], *, counted: bool,
                 finish: Callable[[], list[Any]] = list) -> None:
        self.framer = framer
        self.relay = relay
        self.error = error
        # At the body's end: what the unterminated tail still holds.  Nothing for SSE (an
        # event ends with a blank line, so a tail is half an event); the last line for NDJSON.
        self.finish = finish
        self.counted = counted        # mcpgw_sse_events_total counts SSE events only
