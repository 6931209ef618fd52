"""Transport to the upstream MCP server and back: nothing here decides anything.

One connection pool per server.  The client's ``Authorization`` and
``Cookie`` never leave the gateway; upstream credentials are injected from
config.  What comes back is handed to the response path (``response.py``,
ordered by ``app.py``) at two points: the head (status and headers, before
anything is sent) and each message.  SSE is framed into whole events and
written one event at a time (never buffered beyond one event); JSON bodies
are read whole (bounded) so an upstream failure can still be answered with a
proper JSON-RPC error.  Once a response has started, errors go in-band as a
JSON-RPC error event.  This module imports neither the store nor the policy.
"""
from __future__ import annotations

import asyncio
import time
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from .codec import SSE
from .errors import (
    GatewayError, Unavailable, UpstreamAuthRefused, UpstreamInvalid, UpstreamTimeout, UpstreamUnavailable,
)
from .inspect.sse import SSEFramer, SSETooLarge
from .response import EMPTY, ResponsePath, StreamAbort, error_body, error_event
from .telemetry.metrics import BOUND, SSE_EVENTS_TALLY, STREAMS_LEVEL, UPSTREAM_CONNECTIONS, UPSTREAM_ERRORS, Sampler
from .upstream_http import Pool, PoolExhausted, Response, UnsafeHeader

if TYPE_CHECKING:
    from .config.model import Config, ServerConfig
    from .pipeline import Exchange

_STREAMS = STREAMS_LEVEL.levels
log = structlog.get_logger("gateway.upstream")

# The client headers an upstream may see: an allow-list, decided on the lower-case name
# (a name with "_" never matches, so no upstream that folds "_" into "-" can be handed a
# header the gateway owns: hygiene refuses those names outright).  Everything else, the
# client's credentials and cookies, hop-by-hop headers, the session id and Last-Event-ID
# (the gateway sends its own translations), identity headers, is never forwarded.
# servers.<name>.forward_headers adds names per server.
# traceparent/tracestate are not relayed: telemetry.tracing checks them and sends the
# gateway's own (same trace, the gateway's span as parent).
FORWARDED = frozenset({
    "content-type", "accept", "mcp-protocol-version", "mcp-method", "mcp-name", "user-agent",
})
_PARAM_PREFIX = "mcp-param-"
# Never relayed to the client: hop-by-hop, the upstream's own session id (the
# client gets the gateway's), its auth challenges, and cookies (all mounts
# share the gateway's origin, so one upstream's cookie would reach the others).
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "mcp-session-id", "www-authenticate", "set-cookie", "server", "date", "trailer", "upgrade",
    "proxy-authenticate",
})


def _connection_tokens(headers: Any) -> frozenset[str]:
    """Header names listed in ``Connection``: hop-by-hop too (RFC 9110 §7.6.1)."""
    return frozenset(t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(","))


_NAME = itemgetter(0)
Pairs = Sequence[tuple[str, str]]


class _HeaderFilter:
    """The header lines whose names ``keep`` (lower-case name -> bool) accepts, in order.

    Clients and upstreams send the same header names request after request, so
    which positions survive is memoised per sequence of names; a hit copies the
    survivors with one C-level ``itemgetter`` instead of a Python loop over every
    header.  (A message with a ``Connection`` header has its own drop set: the
    caller filters it with ``filter_slow``.)
    """

    __slots__ = ("accept", "plans")

    def __init__(self, accept: Callable[[str], bool]) -> None:
        self.accept = accept
        self.plans: dict[tuple[str, ...], Callable[[list[tuple[str, str]]], Pairs]] = {}

    def keep(self, headers: Any) -> Pairs:
        items = list(headers.items())
        names = tuple(map(_NAME, items))
        pick = self.plans.get(names)
        if pick is None:
            if len(self.plans) >= 256:     # names are chosen by the sender: bounded
                self.plans.clear()
            kept = [i for i, name in enumerate(names) if self.accept(name.lower())]
            if len(kept) >= 2:
                pick = itemgetter(*kept)
            elif kept:
                pick = lambda items, i=kept[0]: (items[i],)  # noqa: E731
            else:
                pick = lambda items: ()  # noqa: E731
            self.plans[names] = pick
        return pick(items)

    def filter_slow(self, headers: Any, drop: frozenset[str]) -> Pairs:
        return [(k, v) for k, v in headers.items() if (n := k.lower()) not in drop and self.accept(n)]


def _request_filter(extra: frozenset[str]) -> _HeaderFilter:
    allowed = FORWARDED | extra
    return _HeaderFilter(lambda name: name in allowed or name[:10] == _PARAM_PREFIX)


_RESPONSE_FILTER = _HeaderFilter(lambda name: name not in _DROP_RESPONSE)


class Upstreams:
    """Per server: the forwarding pool, and a small client for the gateway's own calls.

    ``pools`` (``upstream_http.Pool``, up to ``max_connections``) carry every
    proxied request.  ``clients`` (aiohttp, at most ``_CONTROL_CONNECTIONS``)
    carry what the gateway itself asks an upstream (the tool listings pinning
    fetches); neither keeps cookies, follows redirects or decompresses.
    """

    _CONTROL_CONNECTIONS = 4

    def __init__(self, config: "Config") -> None:
        self._config = config
        self.pools: dict[str, Pool] = {}
        self.clients: dict[str, aiohttp.ClientSession] = {}
        self._sampler: Sampler | None = None

    async def start(self) -> None:
        for name, server in self._config.servers.items():
            self.pools[name] = Pool(server.url, limit=server.max_connections, pool_timeout=server.pool_timeout,
                                    connect_timeout=server.connect_timeout, read_timeout=server.read_timeout)
            connector = aiohttp.TCPConnector(limit=self._CONTROL_CONNECTIONS, ttl_dns_cache=60,
                                             enable_cleanup_closed=True)
            self.clients[name] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=server.connect_timeout,
                                              sock_read=server.read_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        self._sampler = Sampler(self._sample)

    def _sample(self) -> None:
        for name, pool in self.pools.items():
            BOUND.get(UPSTREAM_CONNECTIONS, name, "open").set(pool.open_connections)
            BOUND.get(UPSTREAM_CONNECTIONS, name, "idle").set(pool.idle_connections)

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
        await asyncio.gather(*(p.close() for p in self.pools.values()),
                             *(c.close() for c in self.clients.values()), return_exceptions=True)


class Forwarder:
    def __init__(self, config: "Config", upstreams: Upstreams, path: ResponsePath,
                 credentials: dict[str, Any], identity_headers: frozenset[str] = frozenset()) -> None:
        self._config = config
        self._upstreams = upstreams
        self._path = path
        self._creds = credentials
        self._request_filters = {name: _request_filter(s.forward_headers - {h.lower() for h in identity_headers})
                                 for name, s in config.servers.items()}
        self._response_filter = _RESPONSE_FILTER
        self._event_limit = config.limits.max_sse_event_bytes
        self._json_limit = config.limits.max_response_bytes

    def _base_headers(self, ex: "Exchange") -> dict[str, str]:
        """The client's allow-listed headers (less any that ``Connection`` names hop-by-hop)."""
        headers = ex.request.headers
        filt = self._request_filters[ex.server.name]
        if "Connection" in headers:
            out = dict(filt.filter_slow(headers, _connection_tokens(headers)))
        else:
            out = dict(filt.keep(headers))
        out["Accept-Encoding"] = "identity"
        if ex.upstream_session_id is not None:
            out["Mcp-Session-Id"] = ex.upstream_session_id
        if ex.upstream_last_event_id is not None:
            out["Last-Event-ID"] = ex.upstream_last_event_id
        return out

    async def _headers(self, ex: "Exchange") -> dict[str, str]:
        out = self._base_headers(ex)
        provider = self._creds.get(ex.server.name)
        if provider is not None:
            out.update(await provider.headers(ex))
        if ex.extra_upstream_headers:
            out.update(ex.extra_upstream_headers)
        return out

    async def forward(self, ex: "Exchange") -> web.StreamResponse:
        server = ex.server
        pool = self._upstreams.pools[server.name]
        if server.name in self._creds or ex.extra_upstream_headers:
            headers = await self._headers(ex)
        else:
            headers = self._base_headers(ex)      # no upstream credentials: nothing to await
        try:
            # A client's answer to a server request may go twice (see upstream_http.py).
            msg = ex.message
            answer = ex.method is None and isinstance(msg, dict) and ("result" in msg or "error" in msg)
            ex.upstream_sent = sent = time.perf_counter()
            resp = await pool.request(ex.request.method, headers, ex.body, replayable=answer)
            ex.upstream_wait = time.perf_counter() - sent
        except UnsafeHeader as exc:
            # Only gateway-made headers can hold CR/LF (client headers were parsed by llhttp):
            # a configured credential, or a token an authorization server issued.
            log.error("upstream.unsafe_header", server=server.name, detail=str(exc))
            self._count(server, "unsafe_header")
            raise GatewayError("the gateway could not build a valid request for the upstream",
                               reason="upstream_request_invalid") from None
        except PoolExhausted:
            self._count(server, "pool_exhausted")
            log.warning("upstream.pool_exhausted", server=server.name, limit=server.max_connections)
            raise Unavailable("every connection to the upstream MCP server is busy; retry later",
                              reason="upstream_pool_exhausted", headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError as exc:
            self._count(server, "timeout")
            raise UpstreamTimeout("the upstream MCP server did not answer in time") from exc
        except aiohttp.ClientError as exc:
            self._count(server, "unreachable")
            raise UpstreamUnavailable("the upstream MCP server is unreachable") from exc
        handed_off = False
        try:
            ex.upstream_status = resp.status
            response, handed_off = await self._relay(ex, resp)
            return response
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler): see _client_gone.
            handed_off = self._client_gone(ex, resp)
            raise
        finally:
            if not handed_off:
                resp.release()

    async def send(self, server: "ServerConfig", method: str, headers: dict[str, str]) -> int:
        """A request of the gateway's own (e.g. ending an orphaned upstream session): its status."""
        resp = await self._upstreams.pools[server.name].request(method, headers, None)
        try:
            return resp.status
        finally:
            resp.release()

    def _refuse_status(self, ex: "Exchange", status: int) -> None:
        server = ex.server
        if status in (401, 403):
            # The upstream's challenge names its own AS; relaying it would make
            # clients fetch upstream tokens and send them here (passthrough).
            self._count(server, "auth_refused")
            provider = self._creds.get(server.name)
            if provider is not None and hasattr(provider, "invalidate"):
                provider.invalidate()    # a cached client-credentials token is fetched anew
            raise UpstreamAuthRefused("the upstream MCP server refused the gateway's credentials")
        if 300 <= status < 400:
            # A redirect names the upstream's own URL: relaying it would leak it and send
            # the client around the gateway.  It means servers.<name>.url is not the endpoint.
            self._count(server, "redirect")
            raise UpstreamInvalid("the upstream MCP server answered with a redirect",
                                  reason="upstream_redirect")

    def _count(self, server: "ServerConfig", reason: str) -> None:
        BOUND.get(UPSTREAM_ERRORS, server.name, reason).inc()

    async def _relay(self, ex: "Exchange", resp: Response) -> tuple[web.StreamResponse, bool]:
        status = resp.status
        server = ex.server
        if status >= 300:
            self._refuse_status(ex, status)
        # Case-insensitive, so the gateway's own SSE headers replace the upstream's
        # instead of being sent twice.
        if "Connection" in resp.headers:
            out_headers = CIMultiDict(self._response_filter.filter_slow(resp.headers, _connection_tokens(resp.headers)))
        else:
            out_headers = CIMultiDict(self._response_filter.keep(resp.headers))
        if ex.response_headers:
            out_headers.update(ex.response_headers)
        framing = await self._path.head(ex, status, resp.headers, out_headers)
        if ex.final is not None:
            return ex.final, False
        if framing == SSE:
            return await self._relay_sse(ex, resp, out_headers)
        ex.status = status
        if framing == EMPTY:
            return web.Response(status=status, headers=out_headers), False
        try:
            body = await self._read_body(resp)
        except asyncio.TimeoutError as exc:
            self._count(server, "timeout")
            raise UpstreamTimeout("the upstream MCP server stopped answering") from exc
        except aiohttp.ClientError as exc:
            self._count(server, "broken_response")
            raise UpstreamInvalid("the upstream MCP server broke off its reply") from exc
        if len(body) > self._json_limit:
            self._count(server, "response_too_large")
            raise UpstreamInvalid("the upstream reply exceeds the gateway's response size limit",
                                  reason="upstream_too_large")
        body = self._path.json_body(ex, body)
        if ex.method == "tools/call":
            # The result is never logged; its size and hash are (the audit record).
            ex.result_bytes = len(body)
            ex.result_body = body
        return web.Response(status=status, body=body, headers=out_headers), False

    async def _read_body(self, resp: Response) -> bytes:
        """The whole body, or the first ``limit + 1`` bytes when it is larger.

        ``StreamReader.read(n)`` returns what is buffered *up to* n bytes, not n
        bytes: a reply arriving in several TCP reads must be read in a loop.
        """
        content = resp.content
        first = await content.readany()
        if content.at_eof() or not first:
            return first            # the common case: the whole body arrived in one read
        chunks: list[bytes] = [first]
        size = len(first)
        while size <= self._json_limit:
            chunk = await content.readany()
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    # -- SSE ----------------------------------------------------------------------

    async def _relay_sse(self, ex: "Exchange", resp: Response,
                         headers: CIMultiDict[str]) -> tuple[web.StreamResponse, bool]:
        key = (ex.server.name,)
        _STREAMS[key] = _STREAMS.get(key, 0) + 1
        try:
            return await self._relay_sse_open(ex, resp, headers)
        finally:
            _STREAMS[key] -= 1

    async def _relay_sse_open(self, ex: "Exchange", resp: Response,
                              headers: CIMultiDict[str]) -> tuple[web.StreamResponse, bool]:
        headers["Content-Type"] = "text/event-stream"
        headers["X-Accel-Buffering"] = "no"
        headers.setdefault("Cache-Control", "no-cache")
        out = web.StreamResponse(status=resp.status, headers=headers)
        ex.status = resp.status
        await out.prepare(ex.request)
        framer = SSEFramer(self._event_limit)
        relay = self._path.event
        sse_events = SSE_EVENTS_TALLY.pending
        sse_key = (ex.server.name,)
        relayed = 0
        content = resp.content
        while True:
            try:
                chunk = await content.readany()
            except asyncio.TimeoutError:
                await self._end_with_error(ex, out, UpstreamTimeout("the upstream MCP server went silent"))
                return out, False
            except (aiohttp.ClientError, SSETooLarge) as exc:
                self._count(ex.server, "stream_broken")
                await self._end_with_error(ex, out, UpstreamInvalid(
                    "the upstream MCP server broke off the stream", reason="upstream_stream_broken"))
                log.warning("upstream.stream_broken", server=ex.server.name, error=type(exc).__name__)
                return out, False
            if not chunk:
                break
            try:
                events = framer.feed(chunk)
            except SSETooLarge:
                await self._end_with_error(ex, out, UpstreamInvalid(
                    "an SSE event from the upstream exceeded the size limit", reason="upstream_too_large"))
                return out, False
            for ev in events:
                try:
                    data = relay(ex, ev)
                except StreamAbort as abort:
                    await self._end_with_error(ex, out, abort.error)
                    return out, False
                if not data:
                    continue
                try:
                    await out.write(data)
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    return out, self._client_gone(ex, resp)
                sse_events[sse_key] = sse_events.get(sse_key, 0) + 1
                if ex.method == "tools/call":
                    ex.result_bytes = relayed = relayed + len(data)   # events relayed so far
        if framer.pending:
            # Closed mid-event: the half event is dropped, never forwarded.
            self._count(ex.server, "stream_broken")
            await self._end_with_error(ex, out, UpstreamInvalid(
                "the upstream MCP server broke off the stream", reason="upstream_stream_broken"))
            return out, False
        try:
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return out, False

    async def _end_with_error(self, ex: "Exchange", out: web.StreamResponse, err: GatewayError) -> None:
        ex.outcome = "error"
        ex.reason = err.reason
        if ex.is_request and not ex.answered:
            try:
                await out.write(error_event(err, ex.rpc_id))
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
