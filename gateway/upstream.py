"""Transport to the upstream MCP server and back: nothing here decides anything.

One connection pool per server.  The client's ``Authorization`` and
``Cookie`` never leave the gateway; upstream credentials are injected from
config.  What comes back is handed to the response path (``response.py``,
ordered by ``app.py``) at two points: the head (status and headers, before
anything is sent) and each message.  SSE is framed into whole events and
written one event at a time (never buffered beyond one event: ``relay.py``); JSON bodies
are read whole (bounded) so an upstream failure can still be answered with a
proper JSON-RPC error, unless they turn out to be a line stream (NDJSON, one
message a line: ``inspect/ndjson.py``), which is relayed line by line in the
same framing.  Once a response has started, errors go in-band as a
JSON-RPC error event.  This module imports neither the store nor the policy.
"""
from __future__ import annotations

import asyncio
import time
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from .codec import SSE, CodecError
from .errors import (
    GatewayError, Unavailable, UpstreamAuthRefused, UpstreamInvalid, UpstreamTimeout, UpstreamUnavailable,
)
from .inspect.ndjson import LineProbe
from .inspect.sse import SSEFramer, SSETooLarge
from .response import EMPTY, LineStream, ResponsePath
from .telemetry.metrics import BOUND, UPSTREAM_CONNECTIONS, UPSTREAM_ERRORS, Sampler
from .relay import StreamRelay
from .upstream_http import Pool, PoolExhausted, Response, UnsafeHeader

if TYPE_CHECKING:
    from .config.model import Config, ServerConfig
    from .pipeline import Exchange

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
# (the client's header names, the gateway's extra names) -> the client's headers they replace
_CLASHES: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}


def _apply_extra(out: dict[str, str], extra: dict[str, str | None]) -> None:
    """The gateway's own headers over the client's, whatever the client's case (Mcp-Name);
    None: not sent at all.  Which client headers they replace is memoised per sequence of
    names (clients repeat theirs, and the gateway's are a few fixed sets)."""
    key = (tuple(out), tuple(extra))
    clashes = _CLASHES.get(key)
    if clashes is None:
        names = {k.lower(): k for k in key[0]}
        clashes = tuple(dict.fromkeys(names[n] for n in map(str.lower, key[1]) if n in names))
        # Names are client text (Mcp-Param-*): only short sets are kept, and at most 256 of them.
        if len(key[0]) <= 24 and max(map(len, key[0]), default=0) <= 64:
            if len(_CLASHES) >= 256:
                _CLASHES.clear()
            _CLASHES[key] = clashes
    for other in clashes:
        del out[other]
    out.update(extra)                 # after the client's, in the gateway's order
    if None in extra.values():
        for name, value in extra.items():
            if value is None:
                del out[name]
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


class Forwarder(StreamRelay):
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
        self._stream_buffer = config.limits.max_stream_buffer_bytes
        self._write_timeout = config.limits.stream_write_timeout
        # A write that leaves the transport's buffer under its high-water mark cannot pause
        # it, so it cannot wait for the client: only the others arm the write timer.  (64:
        # the chunked framing aiohttp adds to each write.)
        self._room = self._stream_buffer - 64
        self._idle_timeout = config.limits.stream_idle_timeout
        self._keepalive = config.limits.stream_keepalive_interval

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
            _apply_extra(out, ex.extra_upstream_headers)
        return out

    async def forward(self, ex: "Exchange") -> web.StreamResponse:
        server = ex.server
        pool = self._upstreams.pools[server.name]
        if server.name in self._creds:
            headers = await self._headers(ex)
        else:
            headers = self._base_headers(ex)      # no upstream credentials: nothing to await
            if ex.extra_upstream_headers:
                _apply_extra(headers, ex.extra_upstream_headers)
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

    async def _own_request(self, ex: "Exchange", method: str) -> Response:
        """``ex`` sent for the gateway itself (a virtual server): foreign errors translated."""
        server = ex.server
        headers = await self._headers(ex)
        try:
            ex.upstream_sent = sent = time.perf_counter()
            resp = await self._upstreams.pools[server.name].request(method, headers, ex.body)
            ex.upstream_wait = time.perf_counter() - sent
        except PoolExhausted:
            self._count(server, "pool_exhausted")
            raise Unavailable("every connection to the upstream MCP server is busy",
                              reason="upstream_pool_exhausted") from None
        except asyncio.TimeoutError as exc:
            self._count(server, "timeout")
            raise UpstreamTimeout("the upstream MCP server did not answer in time") from exc
        except (aiohttp.ClientError, UnsafeHeader) as exc:
            self._count(server, "unreachable")
            raise UpstreamUnavailable("the upstream MCP server is unreachable") from exc
        return resp

    async def open_stream(self, ex: "Exchange") -> Response | None:
        """The GET stream of ``ex``'s upstream session, for the gateway itself (a virtual server's
        merged stream): the response after the head path, or None when the upstream offers none."""
        resp = await self._own_request(ex, "GET")
        try:
            ex.upstream_status = status = resp.status
            if status in (400, 405):       # no stream offered (the spec's 405; some servers say 400)
                resp.release()
                return None
            if status >= 300:
                self._refuse_status(ex, status)
            if await self._path.head(ex, status, resp.headers, CIMultiDict()) != SSE:
                resp.release()
                return None
            return resp
        except BaseException:
            resp.release()
            raise

    async def collect(self, ex: "Exchange", method: str | None = None) -> web.Response:
        """``ex``'s answer read whole for the gateway itself (a virtual server's fan-out).

        The same head and message path as ``forward`` (so the origin's hooks, pinning
        and the policy filter, see every message); on an SSE answer only the message
        answering ``ex`` is kept: a list request has no progress to relay.  ``method``:
        the HTTP method when it is not the client's (a virtual session opening an origin
        session during a GET).
        """
        server = ex.server
        resp = await self._own_request(ex, method or ex.request.method)
        try:
            ex.upstream_status = status = resp.status
            if status >= 300:
                self._refuse_status(ex, status)
            framing = await self._path.head(ex, status, resp.headers, CIMultiDict())
            ex.status = status
            if framing != SSE:
                body, lines = await self._read_body(resp) if framing != EMPTY else (b"", False)
                if lines:   # a line stream where one answer is collected (a virtual server's list)
                    raise UpstreamInvalid("the upstream answered with a stream where one JSON answer was expected",
                                          reason="upstream_invalid_json")
                if len(body) > self._json_limit:
                    raise UpstreamInvalid("the upstream reply exceeds the gateway's response size limit",
                                          reason="upstream_too_large")
                return web.Response(status=status, body=self._path.json_body(ex, body))
            framer = SSEFramer(self._event_limit)
            while not ex.answered:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                for ev in framer.feed(chunk):
                    if not ev.data or ev.invalid:
                        continue
                    msg = self._path.message(ex, ev.data)
                    if msg is not None and msg.kind in ("result", "error") and ex.answered:
                        return web.Response(status=200, body=msg.raw)
            raise UpstreamInvalid("the upstream MCP server ended the stream without an answer",
                                  reason="upstream_stream_broken")
        except (aiohttp.ClientError, SSETooLarge) as exc:
            self._count(server, "stream_broken")
            raise UpstreamInvalid("the upstream MCP server broke off its reply",
                                  reason="upstream_stream_broken") from exc
        except CodecError:
            raise UpstreamInvalid("the upstream MCP server sent a message the gateway could not parse",
                                  reason="upstream_invalid_json") from None
        finally:
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
        if status > 599:
            # llhttp reads any three digits; RFC 9110 statuses end at 599 and clients choke on more.
            self._count(server, "invalid_status")
            raise UpstreamInvalid(f"the upstream MCP server answered HTTP {status}",
                                  reason="upstream_invalid_status")
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
            body, lines = await self._read_body(resp)
        except asyncio.TimeoutError as exc:
            self._count(server, "timeout")
            raise UpstreamTimeout("the upstream MCP server stopped answering") from exc
        except aiohttp.ClientError as exc:
            self._count(server, "broken_response")
            raise UpstreamInvalid("the upstream MCP server broke off its reply") from exc
        if lines:
            return await self._relay_lines(ex, resp, out_headers, body)
        if len(body) > self._json_limit:
            self._count(server, "response_too_large")
            raise UpstreamInvalid("the upstream reply exceeds the gateway's response size limit",
                                  reason="upstream_too_large")
        try:
            body = self._path.json_body(ex, body)
        except LineStream:
            return await self._relay_lines(ex, resp, out_headers, body)
        if ex.method == "tools/call":
            # The result is never logged; its size and hash are (the audit record).
            ex.result_bytes = len(body)
            ex.result_body = body
        return web.Response(status=status, body=body, headers=out_headers), False

    async def _read_body(self, resp: Response) -> tuple[bytes, bool]:
        """``(body, False)``: the whole body, or its first ``limit + 1`` bytes when larger;
        ``(prefix, True)``: what arrived so far of a line stream (see ``inspect/ndjson.py``).

        ``StreamReader.read(n)`` returns what is buffered *up to* n bytes, not n
        bytes: a reply arriving in several TCP reads must be read in a loop.
        """
        content = resp.content
        first = await content.readany()
        if content.at_eof() or not first:
            return first, False     # the common case: the whole body arrived in one read
        chunks: list[bytes] = [first]
        size = len(first)
        # A body still arriving may be a line stream that never ends: decided on its first line.
        probe: LineProbe | None = LineProbe(self._event_limit)
        while size <= self._json_limit:
            if probe is not None:
                found = probe.feed(chunks[-1])
                if found:
                    return b"".join(chunks), True
                if found is False:
                    probe = None
            chunk = await content.readany()
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), False

    # -- streams: SSE, and NDJSON line streams ---------------------------------------
