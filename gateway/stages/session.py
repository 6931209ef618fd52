"""Session resolution: gateway session id -> upstream session, bound to its principal.

Request phase (after authn: the principal must be known to check the
binding).  An unknown or terminated session is 404 so clients re-initialize;
a session presented by a different principal is also 404 (it does not exist
*for them*) and is logged and counted as a security event.

Response head phase: the upstream's ``Mcp-Session-Id`` is replaced by one the
gateway mints and maps in the store; a ``DELETE`` ends the mapping; an
upstream 404 inside a session drops ours too.  If the mapping cannot be
stored, the new upstream session is ended at once (never orphaned) and the
client gets 503.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

import structlog
from aiohttp import web

from ..errors import SessionNotFound, Unavailable
from ..telemetry.metrics import BOUND, SESSIONS, UPSTREAM_ERRORS, security_event

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from ..config.model import ServerConfig
    from ..pipeline import Exchange
    from ..store.sessions import SessionRecord, SessionStore

log = structlog.get_logger("gateway.security")
# terminate(ex, upstream session id): end an upstream session the gateway could not map.
Terminate = Callable[["Exchange", str], Awaitable[None]]


class Session:
    name = "session"

    def __init__(self, sessions: "SessionStore", terminate: Terminate | None = None) -> None:
        self._sessions = sessions
        self._terminate = terminate

    def check(self, ex: "Exchange") -> Awaitable[None] | None:
        """``on_request`` without a coroutine when the session is in this replica's cache."""
        sid = ex.request.headers.get("Mcp-Session-Id")
        if sid is None:
            return None
        rec = self._sessions.cached(sid)
        if rec is None:
            return self.on_request(ex)      # ask the store
        self._bind(ex, rec)
        return None

    async def on_request(self, ex: "Exchange") -> None:
        sid = ex.request.headers.get("Mcp-Session-Id")
        if sid is None:
            return
        self._bind(ex, await self._sessions.get(sid))

    def _bind(self, ex: "Exchange", rec: "SessionRecord | None") -> None:
        if rec is None or rec.server != ex.server.name:
            raise SessionNotFound("session not found or terminated; initialize a new session")
        if rec.principal != ex.principal.key:
            security_event("session_principal_mismatch")
            log.warning("security.session_hijack_attempt", server=ex.server.name, session=rec.short,
                        principal=ex.principal.name or ex.principal.subject, issuer=ex.principal.issuer)
            raise SessionNotFound("session not found or terminated; initialize a new session",
                                  reason="session_principal_mismatch")
        ex.session = rec
        ex.upstream_session_id = rec.upstream_id

    # -- response head --------------------------------------------------------------------

    def on_head(self, ex: "Exchange", status: int, headers: Any, out: "CIMultiDict[str]") -> Awaitable[None] | None:
        """Map the upstream's session id to the gateway's; DELETE and upstream 404 end ours."""
        upstream_sid = headers.get("Mcp-Session-Id")
        session = ex.session
        if session is None:
            if upstream_sid is None or status >= 300:
                return None
            return self._create(ex, upstream_sid, out)
        if status == 404 or (ex.request.method == "DELETE" and (status < 300 or status == 405)):
            return self._end(ex, status, out)
        if upstream_sid is not None:
            if upstream_sid != session.upstream_id:
                if ex.method == "initialize":
                    return self._create(ex, upstream_sid, out)   # the upstream started a new session
                # Only an initialize result may name a session: an id on any other answer
                # (another session's, say) would bind this client to it.  Dropped.
                BOUND.get(UPSTREAM_ERRORS, ex.server.name, "session_id_changed").inc()
                log.warning("upstream.session_id_changed", server=ex.server.name, session=session.short,
                            method=ex.method)
                return None
            # A virtual server's call answers with the client's virtual session id, not the
            # origin's mount session.
            out["Mcp-Session-Id"] = ex.client_session_id or session.id
        return None

    async def _create(self, ex: "Exchange", upstream_sid: str, out: "CIMultiDict[str]") -> None:
        try:
            rec = await self._sessions.create(ex.server.name, upstream_sid, ex.principal.key,
                                              ex.protocol_version or "")
        except Unavailable:
            # The client will never learn an id for this upstream session: end it now.
            log.error("session.store_failed", server=ex.server.name, detail="upstream session terminated")
            if self._terminate is not None:
                await self._terminate(ex, upstream_sid)
            raise
        BOUND.get(SESSIONS, ex.server.name, "created").inc()
        ex.session = rec
        out["Mcp-Session-Id"] = rec.id

    async def _end(self, ex: "Exchange", status: int, out: "CIMultiDict[str]") -> None:
        assert ex.session is not None
        await self._sessions.delete(ex.session.id)
        if status != 404:
            BOUND.get(SESSIONS, ex.server.name, "deleted").inc()
            ex.status = 200 if status >= 300 else status
            ex.final = web.Response(status=ex.status, headers=out)
            return
        # The upstream forgot the session: drop ours too so the client re-initializes.
        raise SessionNotFound("session expired upstream; initialize a new session", reason="upstream_session_gone")


