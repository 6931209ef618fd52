"""Session resolution: gateway session id -> upstream session, bound to its principal.

Runs after authn (the principal must be known to check the binding).  An
unknown or terminated session is 404 so clients re-initialize; a session
presented by a different principal is also 404 (it does not exist *for
them*) and is logged and counted as a security event.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable

import structlog

from ..errors import SessionNotFound
from ..telemetry.metrics import security_event

if TYPE_CHECKING:
    from ..pipeline import Exchange
    from ..store.sessions import SessionRecord, SessionStore

log = structlog.get_logger("gateway.security")


class Session:
    name = "session"

    def __init__(self, sessions: "SessionStore") -> None:
        self._sessions = sessions

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
