"""Transport hygiene: Origin, Host, CORS and the request line itself.

Runs first: a DNS-rebinding page or a misdirected request is refused before
any token is looked at.  The spec requires 403 for a present, invalid
``Origin``; a ``Host`` that is not the gateway's public host is answered 421
(this is what catches DNS rebinding from clients that send no Origin).
Browsers on an allowed origin get CORS headers, and their preflight
``OPTIONS`` is answered here without reaching the upstream.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import BadRequest, HostRejected, MethodNotAllowed, OriginRejected
from ..response import error_body

if TYPE_CHECKING:
    from ..config.model import Config
    from ..pipeline import Exchange

# Where OAuth 2.1 forbids a bearer token (§5.1.1): never in the URL.
_TOKEN_PARAMS = frozenset({"access_token", "token", "bearer", "id_token", "authorization"})
# What an MCP browser client sends and must be able to read back.
_CORS_ALLOW_HEADERS = ("Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, "
                       "Mcp-Method, Mcp-Name, Last-Event-ID")
_CORS_EXPOSE_HEADERS = "Mcp-Session-Id, WWW-Authenticate, MCP-Protocol-Version"
_CORS_MAX_AGE = "600"
# Headers the gateway validates or owns: one copy only.  With two, the gateway would check
# one and an upstream (or a proxy between) might act on the other.  (Authorization is
# checked by authn, whose 400 carries the RFC 6750 challenge.)
_SINGLETONS = frozenset({
    b"mcp-name", b"mcp-method", b"mcp-protocol-version", b"mcp-session-id",
    b"content-type", b"content-length", b"content-encoding", b"host", b"origin", b"last-event-id",
    b"accept", b"x-forwarded-host", b"transfer-encoding",
})
_PARAM = b"mcp-param-"


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

    def _check_origin_host(self, request: web.Request) -> str | None:
        headers = request.headers
        origin = headers.get("Origin")
        if origin is not None and origin.lower() not in self._origins:
            raise OriginRejected("Origin not allowed")
        host = headers.get("X-Forwarded-Host") if self._trust_forwarded else None
        host = (host or headers.get("Host") or "").lower()
        if host not in self._hosts:
            raise HostRejected("Host not allowed")
        return origin

    async def on_request(self, ex: "Exchange") -> None:
        self.check(ex)

    def check(self, ex: "Exchange") -> None:
        """``on_request`` without a coroutine: nothing here awaits (see pipeline.py)."""
        req = ex.request
        if req.method not in ("POST", "GET", "DELETE"):
            raise MethodNotAllowed(f"{req.method} is not supported on an MCP endpoint",
                                   headers={"Allow": "GET, POST, DELETE, OPTIONS"})
        check_header_names(req.raw_headers)
        origin = self._check_origin_host(req)
        if origin is not None:
            ex.response_headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                                   "Access-Control-Expose-Headers": _CORS_EXPOSE_HEADERS}
        if req.query_string:
            for name in req.query:
                if name.lower() in _TOKEN_PARAMS:
                    raise BadRequest("tokens are not accepted in the query string; "
                                     "send them in the Authorization header",
                                     reason="token_in_query")

    async def preflight(self, request: web.Request) -> web.Response:
        """CORS preflight for allowed origins; nothing reaches the upstream."""
        try:
            origin = self._check_origin_host(request)
        except (OriginRejected, HostRejected) as err:
            return web.Response(status=err.status, body=error_body(err, None),
                                headers={"Content-Type": "application/json"})
        headers = {"Allow": "GET, POST, DELETE, OPTIONS"}
        if origin is not None:
            headers.update({
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, DELETE",
                "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
                "Access-Control-Expose-Headers": _CORS_EXPOSE_HEADERS,
                "Access-Control-Max-Age": _CORS_MAX_AGE,
                "Vary": "Origin",
            })
        return web.Response(status=204, headers=headers)


def check_header_names(raw: "tuple[tuple[bytes, bytes], ...]") -> None:
    """Refuse a repeated singleton header (in any letter case) and a ``_`` spelling of one.

    One pass over the raw header lines, as received (``request.headers`` would
    hide the repeats behind its first value).  A name with ``_`` whose ``-``
    form is a header the gateway checks would be the one an upstream that folds
    ``_`` into ``-`` acts on (Node, many WSGI servers): refused, never guessed at.
    """
    seen: set[bytes] = set()
    for name, _ in raw:
        n = name.lower()
        if n in _SINGLETONS or n[:10] == _PARAM:
            if n in seen:
                raise BadRequest(f"header {name.decode('latin-1')[:64]} is repeated; send one",
                                 reason="header_repeated")
            seen.add(n)
        elif b"_" in n:
            folded = n.replace(b"_", b"-")
            if folded in _SINGLETONS or folded[:10] == _PARAM or folded in (b"cookie", b"authorization") \
                    or folded[:10] == b"x-gateway-" or folded[:11] == b"x-forwarded":
                raise BadRequest(f"header {name.decode('latin-1')[:64]} is ambiguous: spell it with '-'",
                                 reason="header_ambiguous")
