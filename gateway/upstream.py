"""Forwarding to the upstream MCP server, and relaying what comes back.

One connection pool per server.  The client's ``Authorization`` and
``Cookie`` never leave the gateway; upstream credentials are injected from
config.  Responses are relayed as they arrive: SSE is framed into whole
events and written one event at a time (never buffered beyond one event),
JSON bodies are read whole (bounded) so an upstream failure can still be
answered with a proper JSON-RPC error.  Once a response has started, errors
go in-band as a JSON-RPC error event.
"""
from __future__ import annotations

import asyncio
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from .errors import (
    GatewayError, SessionNotFound, UpstreamAuthRefused, UpstreamInvalid, UpstreamTimeout,
    UpstreamUnavailable,
)
from .inspect.sse import SSEFramer, SSETooLarge, encode_event
from .telemetry.metrics import BOUND, SESSIONS, SSE_EVENTS_TALLY, UPSTREAM_CONNECTIONS, UPSTREAM_ERRORS, Sampler
from .upstream_http import Pool, Response, UnsafeHeader

if TYPE_CHECKING:
    from .config.model import Config, ServerConfig
    from .pipeline import Exchange
    from .store.sessions import SessionStore

log = structlog.get_logger("gateway.upstream")

# Never forwarded upstream: hop-by-hop headers (RFC 9110 §7.6.1), the client's
# credentials (no token passthrough), headers the gateway validated or owns.
_DROP_REQUEST = frozenset({
    "host", "content-length", "connection", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "authorization", "cookie", "accept-encoding", "mcp-session-id", "origin", "referer", "expect",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
})
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
    """The header lines whose names are not in ``drop``, in order.

    Clients and upstreams send the same header names request after request, so
    which positions survive is memoised per sequence of names; a hit copies the
    survivors with one C-level ``itemgetter`` instead of a Python loop over every
    header.  (A message with a ``Connection`` header has its own drop set: the
    caller filters it with ``filter_slow``.)
    """

    __slots__ = ("drop", "plans")

    def __init__(self, drop: frozenset[str]) -> None:
        self.drop = drop
        self.plans: dict[tuple[str, ...], Callable[[list[tuple[str, str]]], Pairs]] = {}

    def keep(self, headers: Any) -> Pairs:
        items = list(headers.items())
        names = tuple(map(_NAME, items))
        pick = self.plans.get(names)
        if pick is None:
            if len(self.plans) >= 256:     # names are chosen by the sender: bounded
                self.plans.clear()
            kept = [i for i, name in enumerate(names) if name.lower() not in self.drop]
            if len(kept) >= 2:
                pick = itemgetter(*kept)
            elif kept:
                pick = lambda items, i=kept[0]: (items[i],)  # noqa: E731
            else:
                pick = lambda items: ()  # noqa: E731
            self.plans[names] = pick
        return pick(items)

    @staticmethod
    def filter_slow(headers: Any, drop: frozenset[str]) -> Pairs:
        return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def error_body(err: GatewayError, rpc_id: Any) -> bytes:
    error: dict[str, Any] = {"code": err.code, "message": err.message}
    data = {"reason": err.reason}
    if err.data:
        data.update(err.data)
    error["data"] = data
    body: dict[str, Any] = {"jsonrpc": "2.0", "error": error}
    # JSON-RPC: id is required on errors; null when the request id is unknown.
    body["id"] = rpc_id
    return orjson.dumps(body)


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
            self.pools[name] = Pool(server.url, limit=server.max_connections,
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
    def __init__(self, config: "Config", upstreams: Upstreams, sessions: "SessionStore",
                 credentials: dict[str, Any], identity_headers: frozenset[str] = frozenset()) -> None:
        self._config = config
        self._upstreams = upstreams
        self._sessions = sessions
        self._creds = credentials
        self._drop = _DROP_REQUEST | {h.lower() for h in identity_headers}
        self._request_filter = _HeaderFilter(self._drop)
        self._response_filter = _HeaderFilter(_DROP_RESPONSE)
        self._event_limit = config.limits.max_sse_event_bytes
        self._json_limit = config.limits.max_response_bytes

    def _base_headers(self, ex: "Exchange") -> dict[str, str]:
        """The client's headers minus everything in ``_DROP_REQUEST`` (and ``Connection``'s list)."""
        headers = ex.request.headers
        if "Connection" in headers:
            out = dict(_HeaderFilter.filter_slow(headers, self._drop | _connection_tokens(headers)))
        else:
            out = dict(self._request_filter.keep(headers))
        out["Accept-Encoding"] = "identity"
        if ex.upstream_session_id is not None:
            out["Mcp-Session-Id"] = ex.upstream_session_id
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
            resp = await pool.request(ex.request.method, headers, ex.body)
        except UnsafeHeader as exc:
            # Only gateway-made headers can hold CR/LF (client headers were parsed by llhttp):
            # a configured credential, or a token an authorization server issued.
            log.error("upstream.unsafe_header", server=server.name, detail=str(exc))
            self._count(server, "unsafe_header")
            raise GatewayError("the gateway could not build a valid request for the upstream",
                               reason="upstream_request_invalid") from None
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
            if status == 404 and ex.session is not None:
                # The upstream forgot the session: drop ours too so the client re-initializes.
                await self._sessions.delete(ex.session.id)
                raise SessionNotFound("session expired upstream; initialize a new session",
                                      reason="upstream_session_gone")
        # Case-insensitive, so the gateway's own SSE headers replace the upstream's
        # instead of being sent twice.
        if "Connection" in resp.headers:
            out_headers = CIMultiDict(_HeaderFilter.filter_slow(
                resp.headers, _DROP_RESPONSE | _connection_tokens(resp.headers)))
        else:
            out_headers = CIMultiDict(self._response_filter.keep(resp.headers))
        if ex.response_headers:
            out_headers.update(ex.response_headers)
        upstream_sid = resp.headers.get("Mcp-Session-Id")
        if ex.session is None or upstream_sid is not None and upstream_sid != ex.session.upstream_id:
            await self._map_session(ex, upstream_sid, out_headers)
        elif upstream_sid is not None:
            out_headers["Mcp-Session-Id"] = ex.session.id
        if ex.request.method == "DELETE" and ex.session is not None and (status < 300 or status in (404, 405)):
            await self._sessions.delete(ex.session.id)
            BOUND.get(SESSIONS, server.name, "deleted").inc()
            ex.status = 200 if status >= 300 else status
            return web.Response(status=ex.status, headers=out_headers), False
        ctype = resp.headers.get("Content-Type", "")
        if ctype[:17] == "text/event-stream":
            return await self._relay_sse(ex, resp, out_headers)
        ex.status = status
        if status == 202 or status == 204:
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
        is_json = ctype[:16] == "application/json"
        if status >= 400 and not is_json:
            self._count(server, f"http_{status // 100}xx")
            raise UpstreamInvalid(f"the upstream MCP server answered HTTP {status}")
        # Hooks marked sse_only (pinning's list_changed watcher) need no JSON body: skip the parse.
        if is_json and body:
            for hook in ex.response_hooks:
                if not getattr(hook, "sse_only", False):
                    body = self._inspect_json(ex, body)
                    break
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

    async def _map_session(self, ex: "Exchange", upstream_sid: str | None, out: CIMultiDict[str]) -> None:
        if ex.session is not None:
            if upstream_sid is None or upstream_sid == ex.session.upstream_id:
                if upstream_sid is not None:
                    out["Mcp-Session-Id"] = ex.session.id
                return
        if upstream_sid is None:
            return
        rec = await self._sessions.create(ex.server.name, upstream_sid, ex.principal.key,
                                          ex.protocol_version or "")
        BOUND.get(SESSIONS, ex.server.name, "created").inc()
        ex.session = rec
        out["Mcp-Session-Id"] = rec.id

    # -- inspection ---------------------------------------------------------------

    def _apply_hooks(self, ex: "Exchange", msg: Any) -> Any:
        # Envoy-style: response hooks run in reverse order of the stages that added them.
        for hook in reversed(ex.response_hooks):
            msg = hook(ex, msg)
            if msg is None:
                return None
        return msg

    def _inspect_json(self, ex: "Exchange", body: bytes) -> bytes:
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamInvalid("the upstream MCP server sent invalid JSON") from exc
        if not isinstance(msg, dict):
            raise UpstreamInvalid("the upstream MCP server sent a non-object JSON-RPC message")
        out = self._apply_hooks(ex, msg)
        return orjson.dumps(out) if out is not None else b""

    def _inspect_event(self, ex: "Exchange", ev: Any) -> bytes:
        try:
            msg = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            return ev.raw       # not JSON: not a message the gateway understands; relay as is
        if not isinstance(msg, dict):
            return ev.raw
        try:
            out = self._apply_hooks(ex, msg)
        except GatewayError as err:
            rid = msg.get("id", ex.rpc_id)
            return encode_event(error_body(err, rid).decode(), id=ev.id)
        if out is None:
            return b""
        return encode_event(orjson.dumps(out).decode(), event=ev.event or "message", id=ev.id)

    # -- SSE ----------------------------------------------------------------------

    async def _relay_sse(self, ex: "Exchange", resp: Response,
                         headers: CIMultiDict[str]) -> tuple[web.StreamResponse, bool]:
        headers["X-Accel-Buffering"] = "no"
        headers.setdefault("Cache-Control", "no-cache")
        out = web.StreamResponse(status=resp.status, headers=headers)
        ex.status = resp.status
        await out.prepare(ex.request)
        framer = SSEFramer(self._event_limit)
        hooks = bool(ex.response_hooks)
        sse_events = SSE_EVENTS_TALLY.pending
        sse_key = (ex.server.name,)
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
                data = self._inspect_event(ex, ev) if hooks and ev.data is not None else ev.raw
                if not data:
                    continue
                try:
                    await out.write(data)
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    return out, self._client_gone(ex, resp)
                sse_events[sse_key] = sse_events.get(sse_key, 0) + 1
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
        if ex.is_request:
            try:
                await out.write(encode_event(error_body(err, ex.rpc_id).decode()))
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
