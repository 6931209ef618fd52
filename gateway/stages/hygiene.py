"""Transport hygiene: Origin, Host, and the request line itself.

Runs first: a DNS-rebinding page or a misdirected request is refused before
any token is looked at.  The spec requires 403 for a present, invalid
``Origin``; a ``Host`` that is not the gateway's public host is answered 421
(this is what catches DNS rebinding from clients that send no Origin).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BadRequest, HostRejected, MethodNotAllowed, OriginRejected

if TYPE_CHECKING:
    from ..config.model import Config
    from ..pipeline import Exchange

# Where OAuth 2.1 forbids a bearer token (§5.1.1): never in the URL.
_TOKEN_PARAMS = ("access_token", "token", "bearer")


class Hygiene:
    name = "hygiene"

    def __init__(self, config: "Config") -> None:
        hosts = {config.public_host.lower()}
        hosts.update(config.http.allowed_hosts)
        self._hosts = frozenset(hosts)
        # Same-origin requests (browser UIs served from public_url) are fine.
        origins = set(config.http.allowed_origins)
        origins.add(config.public_url.split("/", 3)[0] + "//" + config.public_host)
        self._origins = frozenset(o.lower() for o in origins)
        self._trust_forwarded = config.http.trust_forwarded_host

    async def on_request(self, ex: "Exchange") -> None:
        req = ex.request
        if req.method not in ("POST", "GET", "DELETE"):
            raise MethodNotAllowed(f"{req.method} is not supported on an MCP endpoint",
                                   headers={"Allow": "GET, POST, DELETE"})
        headers = req.headers
        origin = headers.get("Origin")
        if origin is not None and origin.lower() not in self._origins:
            raise OriginRejected("Origin not allowed")
        host = headers.get("X-Forwarded-Host") if self._trust_forwarded else None
        host = (host or headers.get("Host") or "").lower()
        if host not in self._hosts:
            raise HostRejected("Host not allowed")
        if req.query_string:
            query = req.query
            for name in _TOKEN_PARAMS:
                if name in query:
                    raise BadRequest("tokens are not accepted in the query string; "
                                     "send them in the Authorization header",
                                     reason="token_in_query")
