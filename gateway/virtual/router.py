"""A virtual server's request path: answer the merged lists, route each call to its origin.

The virtual exchange (``ex.server`` is the virtual mount) runs the front of the
request path (hygiene, authn against the virtual audience, parse).  Then every
call to an origin is an exchange with the origin as ``ex.server`` and the
original name in the body and ``Mcp-Name`` (the client's own exchange turned
into it in place, or a sub-exchange when the request is traced): it enters the
origin's own stages (scopes, authz, pinning, rate limits) and is audited as a
call to the origin (``via`` names the virtual server), so an origin's rules
hold exactly as on its own mount.  Policies may also name the virtual server:
its section is decided on the published (prefixed) name after the origin's
rules, and a call must pass both (deny wins).

Lists fan out to every origin at once, each within ``origin_timeout``; an
origin that fails or is late is left out (log, metric, ``_meta``) and the
rest is still answered.  Resource URIs are published unchanged and routed to
the origin that listed them (``lists.py``).

Both eras are served.  2026-07-28 is sessionless: every call is one origin exchange.
A 2025-11-25 client gets a virtual session (``legacy.py``, stored by
``sessions.py``): the gateway answers ``initialize`` itself and opens each
origin's upstream session lazily, the first time the client's session needs
that origin, with the client's own capabilities; ``DELETE`` ends them all.
Server-to-client requests and the merged GET stream carry ids of the gateway's
own (``ids.py``, signed and bound to the session and principal).

The session and stream stages are the virtual server's, not the origin's: the
client's ``Mcp-Session-Id`` and ``Last-Event-ID`` name the virtual session and
stream.  The router sets each origin exchange's session (``sub.session``, with
the client's in ``sub.client_session_id``) and stream origin (``sub.origin``)
itself, so the head and message phases (the session mapping, event ids, answer
admission) work on the origin as on its mount.
"""
from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
from aiohttp import web

from ..errors import (
    METHOD_NOT_FOUND, BadRequest, GatewayError, MethodNotAllowed, PolicyDenied,
)
from ..pipeline import MODERN, Exchange
from ..stages.stream import Origin
from ..policy.decide import ALLOWED, ANY, UNKNOWN, decide
from ..policy.model import PROMPTS, RESOURCES, TOOLS
from ..stages.authz import refuse
from ..telemetry import audit
from ..telemetry.tracing import forward_recorded, run_recorded
from .legacy import LegacyVirtual
from .lists import LISTS, Lists, params_of

if TYPE_CHECKING:
    from ..config.virtual import Include, VirtualServerConfig

MODERN_VERSION = "2026-07-28"
_NAMED = {"tools/call": (TOOLS, "Unknown tool: {}"), "prompts/get": (PROMPTS, "Unknown prompt: {}")}
_NO_ANSWERS = Origin("n", None, None)     # a sub-exchange that is not a request: its stream answers nothing
_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_BY_URI = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})

Serve = Callable[[Exchange, Callable[[Exchange], Awaitable[web.StreamResponse]]], Awaitable[web.StreamResponse]]
Check = Callable[[Exchange], "Awaitable[None] | None"]
Named = tuple[str, Check]                 # (span name, check): a stage (telemetry.tracing)


class VirtualRouter:
    """Built once by ``app.py``: the stages to run at each level and how to reach the upstreams."""

    def __init__(self, config: Any, serve: Serve, front: tuple[Named, ...], origin: tuple[Named, ...],
                 limits: Named, forward: Callable[[Exchange], Awaitable[web.StreamResponse]],
                 collect: Callable[..., Awaitable[web.Response]], policies: Any, catalog: Any,
                 legacy: dict[str, Any]) -> None:
        self.virtual: dict[str, VirtualServerConfig] = config.virtual_servers
        self._servers = config.servers
        self._serve = serve
        # Plain checks for the common path; named ones (each a span) for a recorded trace.
        self._front_named, self._origin_named, self._limits_named = front, origin, (limits,)
        self._front = tuple(check for _, check in front)
        self._origin = tuple(check for _, check in origin)
        self._limits = limits[1]
        self.forward = forward
        self.collect = collect
        self._policies = policies
        self._catalog = catalog
        self.lists = Lists(self, self.virtual, policies)
        # The 2025-11-25 era: sessions, opened origin sessions, rewritten ids (legacy.py).
        self.legacy = LegacyVirtual(self, **legacy)

    # -- the virtual exchange -------------------------------------------------------

    async def run(self, ex: Exchange) -> web.StreamResponse:
        vs = self.virtual[ex.server.name]
        trace = ex.trace
        if trace is not None and trace.spans is not None:
            await run_recorded(ex, trace, self._front_named)
        else:
            for check in self._front:
                pending = check(ex)
                if pending is not None:
                    await pending
        if ex.method == "server/discover":
            # The 2026-07-28 probe ("auto" clients): what this virtual server speaks.
            result: dict[str, Any] = {"supportedVersions": [MODERN_VERSION], "resultType": "complete",
                                      "capabilities": {"tools": {}, "resources": {}, "prompts": {}},
                                      "cacheScope": "public", "ttlMs": 0}
            if vs.description:
                result["instructions"] = vs.description
            return self.answer(ex, result)
        if ex.era != MODERN:
            return await self.legacy.run(ex, vs)
        if ex.request.method != "POST":
            raise MethodNotAllowed("a 2026-07-28 virtual server takes POST only", headers={"Allow": "POST"})
        if ex.method is None or not ex.is_request:
            ex.status = 202                   # client notifications and answers: nothing to route
            return web.Response(status=202)
        return await self.request(ex, vs)

    def request(self, ex: Exchange, vs: "VirtualServerConfig") -> Awaitable[web.StreamResponse]:
        """A client request (either era, the session already bound): the awaitable answering it,
        routed or answered here (a tools/call's is the sub-exchange's: one coroutine frame less
        on every resume)."""
        method = ex.method
        if method in _NAMED:                  # tools/call and prompts/get
            inc, original = self._by_name(vs, method, ex.name or "")
            params = params_of(ex)
            params["name"] = original
            return self._route(ex, vs, inc, method, params, original)
        return self._request(ex, vs, method)

    async def _request(self, ex: Exchange, vs: "VirtualServerConfig", method: str | None) -> web.StreamResponse:
        """``request`` for every method but tools/call and prompts/get."""
        if method == "ping":
            return self.answer(ex, {"resultType": "complete"} if ex.era == MODERN else {})
        if method in LISTS:
            return self.answer(ex, await self.lists.merged(ex, vs, method))
        params = params_of(ex)
        if method == "completion/complete":
            ref = params.get("ref")
            if isinstance(ref, dict) and ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
                inc, original = self._by_name(vs, "prompts/get", ref["name"])
                params["ref"] = {**ref, "name": original}
                return await self._route(ex, vs, inc, method, params, original, (PROMPTS, ref["name"]))
            if isinstance(ref, dict) and ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
                inc = await self.lists.route_uri(ex, vs, ref["uri"])
                return await self._route(ex, vs, inc, method, params, ref["uri"], (RESOURCES, ref["uri"]))
            raise BadRequest("params.ref must name a prompt or a resource", reason="invalid_params")
        if method in _BY_URI:
            uri = params.get("uri")
            if not isinstance(uri, str):
                raise BadRequest("params.uri must be a string", reason="invalid_params")
            inc = await self.lists.route_uri(ex, vs, uri)
            return await self._route(ex, vs, inc, method, params, uri)
        raise _not_found(method)

    def answer(self, ex: Exchange, result: dict[str, Any]) -> web.Response:
        """The gateway's own answer.  A 2025-11-25 client that accepts SSE gets it as one event, as
        its origins answer (clients may expect a POST's answer to be a stream)."""
        ex.status = 200
        body = orjson.dumps({"jsonrpc": "2.0", "id": ex.rpc_id, "result": result})
        if ex.era != MODERN and "text/event-stream" in ex.request.headers.get("Accept", ""):
            return web.Response(status=200, body=b"event: message\ndata: " + body + b"\n\n", headers=_SSE)
        return web.Response(status=200, body=body, headers=_JSON)

    # -- calls ----------------------------------------------------------------------

    def _by_name(self, vs: "VirtualServerConfig", method: str, name: str) -> tuple["Include", str]:
        kind, unknown = _NAMED[method]
        found = vs.resolve(name, prompt=kind == PROMPTS)
        if found is None:
            raise PolicyDenied(unknown.format(name))
        return found

    def _route(self, ex: Exchange, vs: "VirtualServerConfig", inc: "Include", method: str,
               params: dict[str, Any], target: str, decided: tuple[str, str] | None = None
               ) -> Awaitable[web.StreamResponse]:
        """The call to the origin, to be awaited (one coroutine frame less on every resume).

        Untraced, ``ex`` becomes the origin's exchange in place (``_become``): a second exchange
        (its serve, its metrics, its copies) was a third of what a routed call added to a
        mount's (bench.instr, 2026-12-06, 2025-11-25: 577k instructions per call, 559k in place,
        the mount's 517k).  A traced one goes in a sub-exchange,
        whose span is a child of the client's.  Either way the origin's exchange is the
        request's one audit record, naming the virtual server in ``via``.

        ``decided``: the kind and published name the virtual server's section decides on, when
        the method does not say (a completion names a prompt or a resource)."""
        published = decided[1] if decided is not None else ex.name if method in _NAMED else target
        kind = decided[0] if decided is not None else None
        if ex.trace is None:
            sub = self._become(ex, vs, inc.server, method, params)
        else:
            sub = self.sub(ex, vs, inc.server, method, params)
            ex.routed = True                  # one audit record per client request: the origin's
        sub.name = target
        if method == "tools/call":
            sub.arguments = params.get("arguments")
        extra = sub.extra_upstream_headers
        if "Mcp-Method" in extra and (method in _NAMED or method in _BY_URI):
            extra["Mcp-Name"] = _header_value(target)
        if sub is ex:
            return self._call(ex, ex, vs, method, published, target, kind)

        def ended(sub: Exchange) -> None:
            # The decision and the per-tool count belong to the origin's record (which names
            # the virtual server in ``via``); the virtual exchange keeps only how it ended.
            ex.status, ex.outcome, ex.reason = sub.status, sub.outcome, sub.reason

        sub.finishers = [ended]
        return self._serve(sub, lambda sub: self._call(ex, sub, vs, method, published, target, kind))

    async def _call(self, ex: Exchange, sub: Exchange, vs: "VirtualServerConfig", method: str, published: str,
                    target: str, kind: str | None) -> web.StreamResponse:
        """``sub``, the origin's exchange for the client's ``ex`` (``ex`` itself when routed in
        place), bound to the origin's session, through the origin's stages, the virtual server's
        section and the origin's limits, then forwarded."""
        legacy = sub.era != MODERN
        if legacy:
            pending = self.legacy.bind(ex, vs, sub)
            if pending is not None:
                await pending
        trace = sub.trace
        if trace is not None and trace.spans is not None:
            return await self._recorded(vs, sub, trace, method, published, target, kind)
        try:
            for check in self._origin:            # run_origin, inlined
                pending = check(sub)
                if pending is not None:
                    await pending
        except PolicyDenied as err:
            _published(err, published, target)
            raise
        policies = self._policies.current
        if vs.name in policies.servers:
            self._decide_virtual(policies, sub, vs, method, published, sub.server.name, target, sub.arguments, kind)
        pending = self._limits(sub)
        if pending is not None:
            await pending
        if not legacy:
            return await self.forward(sub)
        key = self.legacy.running(sub)            # the client may cancel it meanwhile
        try:
            return await self.forward(sub)
        finally:
            self.legacy.done(key, sub)

    async def _recorded(self, vs: "VirtualServerConfig", sub: Exchange, trace: Any, method: str,
                        published: str, target: str, kind: str | None) -> web.StreamResponse:
        """``_call`` for a recorded trace: each of the origin's stages and its upstream call a span."""
        try:
            await run_recorded(sub, trace, self._origin_named)
        except PolicyDenied as err:
            _published(err, published, target)
            raise
        def virtual_section(sub: Exchange) -> None:
            policies = self._policies.current
            if vs.name in policies.servers:
                self._decide_virtual(policies, sub, vs, method, published, sub.server.name, target,
                                     sub.arguments, kind)

        await run_recorded(sub, trace, (("mcp.policy.virtual", virtual_section), *self._limits_named))
        if sub.era == MODERN:
            return await forward_recorded(sub, trace, self.forward)
        key = self.legacy.running(sub)
        try:
            return await forward_recorded(sub, trace, self.forward)
        finally:
            self.legacy.done(key, sub)

    async def run_origin(self, sub: Exchange) -> None:
        """The origin's request stages after session and stream (``sub.session`` and ``sub.origin``
        are the router's: the client's headers name the virtual session and stream, not the origin's)."""
        trace = sub.trace
        if trace is not None and trace.spans is not None:
            await run_recorded(sub, trace, self._origin_named)
            return
        for check in self._origin:
            pending = check(sub)
            if pending is not None:
                await pending

    def _decide_virtual(self, policies: Any, ex: Exchange, vs: "VirtualServerConfig", method: str,
                        published: str, origin: str, target: str, arguments: Any, kind: str | None = None) -> None:
        """The virtual server's own section of ``policies`` (the caller saw it has one): deny wins
        over the origin's allow."""
        if kind is None:
            kind = TOOLS if method == "tools/call" else PROMPTS if method == "prompts/get" else RESOURCES
        annotations = UNKNOWN
        if kind == TOOLS:
            tool = self._catalog.get(origin, target)
            annotations = (tool.get("annotations") or {}) if tool is not None else UNKNOWN
        d = decide(policies, vs.name, kind, published, ex.principal,
                   arguments if kind == TOOLS else ANY, annotations)
        if d.effect != ALLOWED:
            refuse(d, kind, published, ex.principal)

    # -- sub-exchanges --------------------------------------------------------------

    def sub(self, ex: Exchange, vs: "VirtualServerConfig", origin: str, method: str | None,
            params: dict[str, Any] | None = None, *, rpc_id: Any = ..., message: dict[str, Any] | None = None
            ) -> Exchange:
        """An exchange to ``origin`` for the same client request, as parse would have left it.

        ``method`` None: no JSON-RPC request (``message``, an answer or nothing: a GET or DELETE);
        ``rpc_id=None``: a notification; by default the client's request id."""
        sub = Exchange(ex.request, self._servers[origin])
        sub.era, sub.protocol_version = ex.era, ex.protocol_version
        sub.principal, sub.token, sub.via = ex.principal, ex.token, vs.name
        sub.origin = _NO_ANSWERS
        if method is not None:
            sub.method = method
            message = {"jsonrpc": "2.0", "method": method, "params": params or {}}
            if rpc_id is ...:
                rpc_id = ex.rpc_id
            if rpc_id is not None:
                message["id"] = sub.rpc_id = rpc_id
                sub.is_request = True
                sub.origin = Origin("p", method, rpc_id)
        elif message is not None:
            sub.rpc_id = message.get("id")
        sub.message = message
        sub.body = orjson.dumps(message) if message is not None else None
        sub.extra_upstream_headers = _origin_headers(sub, method)
        if ex.trace is not None:             # the same trace: the origin's call is a child of the client's
            child = sub.trace = ex.trace.child()
            sub.extra_upstream_headers.update(child.outgoing())
        if ex.response_headers:              # CORS for the client's origin: the sub's answer is the client's
            sub.response_headers = dict(ex.response_headers)
        return sub

    def _become(self, ex: Exchange, vs: "VirtualServerConfig", origin: str, method: str,
                params: dict[str, Any]) -> Exchange:
        """``ex`` (an untraced client request) turned in place into the exchange ``sub`` would
        make: the origin's server, message, body, stream origin and upstream headers (its method,
        request id and ``is_request`` are the client's, as parse left them).  What the front
        stages and the session left on it (principal, token, CORS headers, versions) is the
        client's as before; ``ex.session`` stays the client's (virtual) session until the
        origin's is bound (``LegacyVirtual.attach``)."""
        audit.rehome(ex, self._servers[origin])
        ex.via = vs.name
        rpc_id = ex.rpc_id
        message = {"jsonrpc": "2.0", "method": method, "params": params, "id": rpc_id}
        ex.message, ex.body = message, orjson.dumps(message)
        ex.origin = Origin("p", method, rpc_id)
        ex.extra_upstream_headers = _origin_headers(ex, method)
        return ex

    async def call_origin(self, sub: Exchange, finish: Callable[[Exchange], Awaitable[web.StreamResponse]],
                          before: Callable[[Exchange], Awaitable[None]] | None = None) -> web.StreamResponse:
        """``sub`` through the origin's stages and limits, then ``finish`` (audited as the origin's);
        ``before``: first (binding the origin's session: its failure is the sub-exchange's answer)."""
        async def body(sub: Exchange) -> web.StreamResponse:
            if before is not None:
                await before(sub)
            await self.run_origin(sub)
            trace = sub.trace
            if trace is not None and trace.spans is not None:
                await run_recorded(sub, trace, self._limits_named)
                return await forward_recorded(sub, trace, finish)
            pending = self._limits(sub)
            if pending is not None:
                await pending
            return await finish(sub)

        return await self._serve(sub, body)


def _origin_headers(sub: Exchange, method: str | None) -> dict[str, str | None]:
    """The upstream headers ``sub`` gets over the client's.  The client's Mcp-Method/Mcp-Name name
    the virtual request; the origin's are these.  A 2025-11-25 request without them (they are
    2026-07-28 headers) needs neither: its origin is sent what its mount would be, and nothing is
    applied over the client's headers."""
    headers = sub.request.headers
    if sub.era == MODERN or "Mcp-Method" in headers or "Mcp-Name" in headers:
        return {"Mcp-Method": method, "Mcp-Name": None}
    return {}


def _published(err: PolicyDenied, published: str, target: str) -> None:
    """The origin's refusal names the original; the client only knows the published name."""
    if published != target and err.message.endswith(target):
        err.message = err.message[:-len(target)] + published


def _header_value(value: str) -> str:
    """``Mcp-Name`` as a 2026-07-28 client would send it (base64 sentinel for non-ASCII)."""
    if value.isascii() and value.isprintable():
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


class VirtualMethodUnsupported(GatewayError):
    status = 200
    code = METHOD_NOT_FOUND
    reason = "virtual_method_unsupported"


def _not_found(method: str) -> GatewayError:
    return VirtualMethodUnsupported(f"Method not found: {method}")
