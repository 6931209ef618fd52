"""A virtual server in the 2025-11-25 era: one client session over lazily opened origin sessions.

- ``initialize`` is answered by the gateway (the virtual server's own
  serverInfo, a fixed capability set) and creates the virtual session
  (``sessions.py``); every later request must name it (none: 400
  ``session_required``; unknown, or another principal's: 404, as on a mount).
- An origin's upstream session is opened the first time the client's session
  needs it (a list, a call routed to it, the GET stream): ``initialize`` with
  the client's own params, then ``notifications/initialized``, each a
  sub-exchange through the origin's stages like any call.  The upstream id is
  mapped by the session stage (a mount session record) and the virtual session
  maps the origin to it.  One opening per (session, origin) per replica; across
  replicas the first stored mapping wins and the loser's upstream session is
  ended.  An origin that cannot be opened is left out of lists (as a late
  origin) and a call to it fails; the others work.
- Server-to-client requests (sampling, elicitation, roots) relayed from an
  origin get an id of the gateway's (``ids.py``); the client's answer is routed
  back to that origin with the original id.  An id the gateway did not issue
  for this session is 400 (``answer_id_invalid``), never forwarded.
- The client's ``notifications/cancelled`` goes to the origin running that
  request when it runs on this replica, else (another replica runs it, or it
  ended) to every origin with an open session, which ignore an id they do not
  know; ``notifications/roots/list_changed`` goes to every origin with an open
  session; other client notifications end here.
- Notifications are relayed as the origin sent them (progress tokens and
  resource URIs are the client's own), logging messages tagged with their
  origin in ``_meta``.
- ``GET`` (``merged.py``) merges every origin's stream, with event ids that
  resume every origin; or resumes one origin's call stream.
- ``DELETE`` ends every origin session, then the virtual session.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from .. import __version__
from ..errors import BadRequest, MethodNotAllowed, UpstreamError
from ..telemetry.metrics import BOUND, SESSIONS, security_event
from ..store.sessions import SessionRecord
from .ids import VirtualIds
from .merged import Streams
from .sessions import SESSIONLESS

if TYPE_CHECKING:
    from ..config.virtual import VirtualServerConfig
    from ..pipeline import Exchange
    from ..stages.stream import EventIds
    from .router import VirtualRouter
    from .sessions import VirtualSessions

log = structlog.get_logger("gateway.virtual")
security = structlog.get_logger("gateway.security")

LEGACY_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
META_ORIGIN = "io.mcpgw/origin"
_INIT_ID = "mcpgw-virtual-init"
_ROUTES_MAX = 100_000        # one per (virtual session, origin) this replica served; the oldest go first
_CAPABILITIES = {"tools": {"listChanged": True}, "prompts": {"listChanged": True},
                 "resources": {"listChanged": True, "subscribe": True}, "completions": {}, "logging": {}}


class LegacyVirtual:
    """The 2025-11-25 half of ``VirtualRouter`` (which it calls back for lists and routed calls)."""

    def __init__(self, router: "VirtualRouter", *, sessions: "VirtualSessions", session: Callable[["Exchange"], Any],
                 event_ids: "EventIds", open_stream: Any, path: Any, event_limit: int) -> None:
        self._router = router
        self._ids = VirtualIds(event_ids)
        self._sessions = sessions
        self._session = session              # the session stage's check: binds ex.session
        self._opening: dict[tuple[str, str], asyncio.Future[Any]] = {}
        # (virtual session, origin) -> what bind gives each of its calls (``OriginRoute``)
        self._routes: dict[tuple[str, str], OriginRoute] = {}
        # (virtual session, the client's request id) -> the sub-exchange running it.  Request ids
        # are strings or integers (codec.py; never bools), and no string equals an integer, so the
        # id itself is the key: equal keys are the same id in JSON.
        self._running: dict[tuple[str, str | int], "Exchange"] = {}
        self._streams = Streams(self, router, self._ids, event_ids, open_stream, path, event_limit)

    def run(self, ex: "Exchange", vs: "VirtualServerConfig") -> Awaitable[web.StreamResponse]:
        """The awaitable answering ``ex`` (a routed call's is the router's: one coroutine frame
        less on every resume)."""
        req = ex.request
        if ex.method == "initialize" and req.method == "POST":
            if "Mcp-Session-Id" in req.headers:
                raise BadRequest("this session is already initialized", reason="session_exists")
            return self._initialize(ex, vs)
        if "Mcp-Session-Id" not in req.headers:
            raise BadRequest("Mcp-Session-Id is required: initialize a session first", reason="session_required")
        pending = self._session(ex)
        if pending is not None:
            return self._in_session(ex, vs, pending)
        return self._dispatch(ex, vs)

    async def _in_session(self, ex: "Exchange", vs: "VirtualServerConfig",
                          pending: Awaitable[None]) -> web.StreamResponse:
        """``run`` when the session had to be read from the store."""
        await pending
        return await self._dispatch(ex, vs)

    def _dispatch(self, ex: "Exchange", vs: "VirtualServerConfig") -> Awaitable[web.StreamResponse]:
        """The awaitable answering ``ex`` in its (bound) session."""
        method = ex.request.method
        if method == "POST" and ex.is_request:      # the common case first (a request has a method)
            if ex.method == "logging/setLevel":
                return self._set_level(ex, vs)
            return self._router.request(ex, vs)
        if method == "DELETE":
            return self._delete(ex, vs)
        if method == "GET":
            return self._streams.get(ex, vs)
        if method != "POST":
            raise MethodNotAllowed("use GET, POST or DELETE", headers={"Allow": "GET, POST, DELETE"})
        if ex.method is None:
            return self._client_answer(ex, vs)
        return self._notification(ex, vs)

    async def _notification(self, ex: "Exchange", vs: "VirtualServerConfig") -> web.Response:
        if ex.method == "notifications/roots/list_changed":
            await self._to_open_origins(ex, vs)
        elif ex.method == "notifications/cancelled":
            await self._cancel(ex, vs)
        ex.status = 202                   # other client notifications: nothing to route
        return web.Response(status=202)

    def running(self, sub: "Exchange") -> tuple[str, str | int]:
        """``sub`` (bound: ``attach``) runs the client's request: until ``done``, a
        ``notifications/cancelled`` naming the client's request id goes straight to its origin
        (one that reaches another replica goes to every open origin: ``_cancel``)."""
        assert sub.client_session_id is not None
        key = (sub.client_session_id, sub.rpc_id)
        self._running[key] = sub
        return key

    def done(self, key: tuple[str, str | int], sub: "Exchange") -> None:
        if self._running.get(key) is sub:
            del self._running[key]

    async def _cancel(self, ex: "Exchange", vs: "VirtualServerConfig") -> None:
        assert ex.session is not None
        params = ex.message.get("params") if isinstance(ex.message, dict) else None
        request_id = params.get("requestId") if isinstance(params, dict) else None
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            return
        running = self._running.get((ex.session.id, request_id))
        if running is not None:
            sub = self._router.sub(ex, vs, running.server.name, "notifications/cancelled", dict(params), rpc_id=None)
            sub.session, sub.upstream_session_id = running.session, running.upstream_session_id
            await self._router.call_origin(sub, self._post)
            return
        # Not running here: it may run on another replica (its registry is its own), or have
        # ended.  Every origin with an open session hears it: a client's request ids are unique
        # in its session, so only the origin running that id acts on it, and the others ignore
        # an id they do not know (as the protocol lets a receiver of an unknown id).
        await self._to_open_origins(ex, vs, dict(params))

    async def _to_open_origins(self, ex: "Exchange", vs: "VirtualServerConfig",
                               params: dict[str, Any] | None = None) -> None:
        """A client notification every origin with an open session hears (the client's roots
        changed; a cancellation of a request this replica is not running)."""
        async def one(rec: "SessionRecord") -> None:
            sub = self._router.sub(ex, vs, rec.server, ex.method, params, rpc_id=None)
            self.attach(ex, sub, rec)
            await self._router.call_origin(sub, self._post)

        recs = await asyncio.gather(*(self.existing(ex, inc.server) for inc in vs.includes))
        await asyncio.gather(*(one(rec) for rec in recs if rec is not None), return_exceptions=True)

    async def _set_level(self, ex: "Exchange", vs: "VirtualServerConfig") -> web.Response:
        """The level is the session's: every origin gets it (an origin without logging refuses it, which
        the client need not know); the answer fails only when every origin refused."""
        params = ex.message.get("params") if isinstance(ex.message, dict) else None

        async def one(origin: str) -> int:
            sub = self._router.sub(ex, vs, origin, "logging/setLevel", params if isinstance(params, dict) else {})
            pending = self.bind(ex, vs, sub, hook=False)
            if pending is not None:
                await pending
            resp = await self._router.call_origin(sub, self._post)
            body = resp.body if isinstance(resp, web.Response) else None
            return resp.status if isinstance(body, bytes) and b'"result"' in body else 0

        done = await asyncio.gather(*(one(inc.server) for inc in vs.includes), return_exceptions=True)
        if not any(status == 200 for status in done):
            raise BadRequest("no origin accepted the logging level", reason="invalid_params")
        return self._router.answer(ex, {})

    async def _initialize(self, ex: "Exchange", vs: "VirtualServerConfig") -> web.Response:
        params = ex.message.get("params") if isinstance(ex.message, dict) else None
        params = params if isinstance(params, dict) else {}
        requested = params.get("protocolVersion")
        version = requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
        rec = await self._sessions.create(vs.name, ex.principal.key, version, params)
        ex.session = rec
        BOUND.get(SESSIONS, vs.name, "created").inc()
        result: dict[str, Any] = {"protocolVersion": version, "capabilities": _CAPABILITIES,
                                  "serverInfo": {"name": vs.name, "version": __version__}}
        if vs.description:
            result["instructions"] = vs.description
        resp = self._router.answer(ex, result)
        resp.headers["Mcp-Session-Id"] = rec.id
        return resp

    # -- origin sessions ------------------------------------------------------------

    def bind(self, ex: "Exchange", vs: "VirtualServerConfig", sub: "Exchange", *,
             hook: bool = True) -> Awaitable[None] | None:
        """Give ``sub`` its origin's upstream session and the id-rewriting hook: at once (None)
        when this replica's caches still hold the session its route was made for (every call
        but a session's first to an origin), else an awaitable that finds or opens it first.

        The hook is registered before the origin's stages register theirs: it runs last on the
        way back, after the origin's hooks saw the origin's own message.  ``sub`` may be ``ex``
        (a call routed in place): ``ex.session`` is the client's until ``attach``."""
        assert ex.session is not None
        key = (ex.session.id, sub.server.name)
        route = self._routes.get(key)
        # The same record object (or a sessionless origin's mapping): still cached and fresh,
        # and checked when the route was made.
        if route is None or self._sessions.cached_record(key) is not route.mark:
            return self._bind_found(ex, vs, sub, key, hook)
        self.attach(ex, sub, route.rec)
        if hook:
            sub.response_hooks.append(route.relay)
        return None

    async def _bind_found(self, ex: "Exchange", vs: "VirtualServerConfig", sub: "Exchange",
                          key: tuple[str, str], hook: bool) -> None:
        rec = await self.origin_session(ex, vs, sub.server.name)
        # A sessionless origin's record is made per call: its route stands for the mapping.
        mark = rec if rec.id else SESSIONLESS
        route = self._routes.get(key)
        if route is None or route.mark is not mark:
            route = self._routes[key] = OriginRoute(rec, self.hook(ex, rec.server), mark)
            if len(self._routes) > _ROUTES_MAX:
                del self._routes[next(iter(self._routes))]      # the oldest
        self.attach(ex, sub, rec)
        if hook:
            sub.response_hooks.append(route.relay)

    @staticmethod
    def attach(ex: "Exchange", sub: "Exchange", rec: "SessionRecord") -> None:
        """``sub`` goes out in ``rec`` (none for a sessionless origin) and answers in the client's
        session.  ``sub`` may be ``ex`` itself (a call routed in place: router.py), so everything
        read from ``ex`` is read before ``sub`` changes."""
        assert ex.session is not None
        sub.client_session_id = ex.session.id
        # ex.protocol_version is the client's MCP-Protocol-Version (the parse stage's), which
        # ``sub`` carries until now.
        client_version = ex.protocol_version
        if not rec.id:
            sub.session = sub.upstream_session_id = None
            return
        sub.session, sub.upstream_session_id = rec, rec.upstream_id
        version = rec.protocol_version      # the version this origin negotiated (MCP-Protocol-Version)
        if version:
            sub.protocol_version = version
            # When the client's header names this version already, it says it.
            if client_version != version:
                sub.extra_upstream_headers["MCP-Protocol-Version"] = version

    def hook(self, ex: "Exchange", origin: str) -> "Relay":
        """The hook relaying ``origin``'s messages to the client's session (``Relay``)."""
        assert ex.session is not None
        return Relay(self._ids, ex.session.id, ex.principal.key, origin)

    async def existing(self, ex: "Exchange", origin: str) -> "SessionRecord | None":
        """``origin``'s session for the client's virtual session, if one is open."""
        assert ex.session is not None
        mount_sid = await self._sessions.origin(ex.session.id, origin)
        if mount_sid is None:
            return None
        if mount_sid == SESSIONLESS:
            return SessionRecord("", origin, "", ex.principal.key, "", 0.0)
        rec = await self._sessions.sessions.get(mount_sid)
        if rec is not None and rec.server == origin and rec.principal == ex.principal.key:
            return rec
        await self._sessions.forget(ex.session.id, origin)     # expired, or ended upstream
        return None

    async def origin_session(self, ex: "Exchange", vs: "VirtualServerConfig", origin: str) -> "SessionRecord":
        rec = await self.existing(ex, origin)
        if rec is not None:
            return rec
        assert ex.session is not None
        key = (ex.session.id, origin)
        task = self._opening.get(key)
        if task is None:
            # One opening per (session, origin) on this replica; a waiter that gives up
            # (a list's origin_timeout) does not cancel it for the others.
            task = self._opening[key] = asyncio.ensure_future(self._open(ex, vs, origin))
            task.add_done_callback(lambda t, key=key: (self._opening.pop(key, None),
                                                       t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _open(self, ex: "Exchange", vs: "VirtualServerConfig", origin: str) -> "SessionRecord":
        assert ex.session is not None
        router = self._router
        params = await self._sessions.init_params(ex.session.id)
        init = router.sub(ex, vs, origin, "initialize", params, rpc_id=_INIT_ID)
        init.extra_upstream_headers.update(_POST_HEADERS)
        init.extra_upstream_headers["MCP-Protocol-Version"] = None
        resp = await router.call_origin(init, self._post)
        rec = init.session
        if resp.status == 200 and rec is None:
            # The origin keeps no sessions (a stateless server): nothing to map or end.
            await self._sessions.claim(ex.session.id, origin, SESSIONLESS)
            return SessionRecord("", origin, "", ex.principal.key, "", 0.0)
        if resp.status != 200 or rec is None:
            log.warning("virtual.origin_session_failed", virtual=vs.name, server=origin,
                        reason=init.reason or "no_session", status=resp.status)
            raise UpstreamError(f"could not open a session with {origin}",
                                reason=init.reason or "origin_session_missing")
        negotiated = _negotiated(resp)
        if negotiated is not None and negotiated != rec.protocol_version:
            # Every later request to this origin names the version it chose, not the client's.
            rec = await self._sessions.sessions.set_version(rec, negotiated)
        note = router.sub(ex, vs, origin, "notifications/initialized", {}, rpc_id=None)
        self.attach(ex, note, rec)
        note.extra_upstream_headers.update(_POST_HEADERS)
        await router.call_origin(note, self._post)
        winner = await self._sessions.claim(ex.session.id, origin, rec.id)
        if winner == rec.id:
            log.info("virtual.origin_session_opened", virtual=vs.name, server=origin, session=ex.session.short)
            return rec
        # Another replica opened this origin first: end ours, use theirs.
        await self._end_origin(ex, vs, rec)
        theirs = await self.existing(ex, origin)
        if theirs is None:
            raise UpstreamError(f"could not open a session with {origin}", reason="origin_session_missing")
        return theirs

    async def _post(self, sub: "Exchange") -> web.StreamResponse:
        return await self._router.collect(sub, "POST")

    async def _end_origin(self, ex: "Exchange", vs: "VirtualServerConfig", rec: "SessionRecord") -> None:
        sub = self._router.sub(ex, vs, rec.server, None)
        self.attach(ex, sub, rec)
        sub.extra_upstream_headers["Accept"] = "application/json, text/event-stream"

        async def delete(sub: "Exchange") -> web.StreamResponse:
            return await self._router.collect(sub, "DELETE")

        await self._router.call_origin(sub, delete)
        await self._sessions.sessions.delete(rec.id)      # (the session stage drops it on a client's DELETE)

    async def _delete(self, ex: "Exchange", vs: "VirtualServerConfig") -> web.Response:
        assert ex.session is not None
        recs = await asyncio.gather(*(self.existing(ex, inc.server) for inc in vs.includes))
        ended = await asyncio.gather(*(self._end_origin(ex, vs, rec) for rec in recs if rec is not None and rec.id),
                                     return_exceptions=True)
        for failure in ended:
            if isinstance(failure, BaseException):   # best effort: the upstream's idle expiry is the backstop
                log.warning("virtual.origin_end_failed", virtual=vs.name, error=type(failure).__name__)
        await self._sessions.end(ex.session.id, tuple(inc.server for inc in vs.includes))
        for inc in vs.includes:
            self._routes.pop((ex.session.id, inc.server), None)
        BOUND.get(SESSIONS, vs.name, "deleted").inc()
        ex.status = 200
        return web.Response(status=200)

    # -- the client's answers to server-to-client requests ---------------------------

    async def _client_answer(self, ex: "Exchange", vs: "VirtualServerConfig") -> web.StreamResponse:
        assert ex.session is not None and isinstance(ex.message, dict)
        found = self._ids.original(ex.session.id, ex.principal.key, ex.rpc_id)
        rec = None
        if found is not None and vs.include_for(found[0]) is not None:
            rec = await self.existing(ex, found[0])
        if found is None or rec is None:
            security_event("virtual_answer_refused")
            security.warning("security.virtual_answer_refused", server=vs.name, session=ex.session.short,
                             forged=found is None)
            raise BadRequest("this answer does not match a request the gateway relayed in this session",
                             reason="answer_id_invalid")
        message = {**ex.message, "id": found[1]}
        sub = self._router.sub(ex, vs, rec.server, None, message=message)
        self.attach(ex, sub, rec)
        sub.extra_upstream_headers["Mcp-Method"] = None
        return await self._router.call_origin(sub, self._router.forward)


class Relay:
    """A sub-exchange's response hook for messages relayed from ``origin`` to one client session:
    a server-to-client request gets an id of the gateway's (the client answers that id), a
    logging message its origin in ``_meta``.  One per (virtual session, origin), shared by every
    call of that session to that origin: it keeps nothing per call.

    Never changes a message in place (``readonly``): a changed message is a new value, so an
    answer relayed unchanged (the common case) is not serialised again (response.py)."""

    __slots__ = ("_ids", "_sid", "_principal", "_origin")
    readonly = True

    def __init__(self, ids: VirtualIds, sid: str, principal: str, origin: str) -> None:
        self._ids, self._sid, self._principal, self._origin = ids, sid, principal, origin

    def __call__(self, _sub: "Exchange", msg: dict[str, Any]) -> dict[str, Any]:
        method = msg.get("method")
        if method is None:
            return msg
        if "id" in msg:
            return {**msg, "id": self._ids.request_id(self._sid, self._principal, self._origin, msg["id"])}
        params = msg.get("params")
        if method == "notifications/message" and isinstance(params, dict):
            meta = params.get("_meta")
            return {**msg, "params": {**params, "_meta": {**(meta if isinstance(meta, dict) else {}),
                                                           META_ORIGIN: self._origin}}}
        return msg


@dataclass(frozen=True, slots=True)
class OriginRoute:
    """One virtual session's calls to one origin on this replica: the origin's session record
    (checked to be that origin's and the client's when the route was made) and the relay hook,
    made once instead of per call.  ``bind`` uses it while this replica's caches return the
    same record object (for an origin that keeps no sessions: its cached mapping)."""

    rec: "SessionRecord"
    relay: Relay
    mark: "SessionRecord | str"   # what ``cached_record`` returns while the route holds: ``rec``, or SESSIONLESS


_POST_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def _negotiated(resp: web.StreamResponse) -> str | None:
    """The protocol version an origin's initialize answer chose, when it is one this gateway speaks."""
    body = resp.body if isinstance(resp, web.Response) else None
    try:
        msg = orjson.loads(body) if isinstance(body, (bytes, bytearray)) and body else None
    except orjson.JSONDecodeError:
        return None
    result = msg.get("result") if isinstance(msg, dict) else None
    version = result.get("protocolVersion") if isinstance(result, dict) else None
    return version if version in LEGACY_VERSIONS else None
