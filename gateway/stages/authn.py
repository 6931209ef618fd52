"""Authentication stage: the gateway as an OAuth 2.1 resource server for every mount.

Fires after hygiene (Origin/Host checked, no token in the query string) and
before the body is read.  Knows only the request headers.  Leaves
``ex.principal`` (who is calling) and ``ex.token`` (kept for RFC 8693 token
exchange only; never logged, never forwarded), or answers locally:

- 401 + ``WWW-Authenticate: Bearer resource_metadata=…`` when the token is
  missing, invalid, expired, or not issued for exactly this mount;
- 400 ``invalid_request`` for two Authorization headers;
- 503 when an issuer's keys cannot be fetched (fail closed).

The hot path (a token seen before) is one dict lookup plus the per-mount
audience/issuer check: the verified-token cache holds mount-independent
results, so a token for ``/mcp/a`` is still refused at ``/mcp/b``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable

import aiohttp
import structlog
from aiohttp import hdrs

from ..auth.cache import ANY_AUDIENCE, TokenCache, Verified
from ..auth.challenge import describe, www_authenticate
from ..auth.introspect import Introspector
from ..auth.keys import KeySet
from ..auth.verify import AuthFailure, JwtVerifier, looks_like_jwt
from ..errors import BadRequest, GatewayError, Unauthorized, Unavailable
from ..pipeline import ANONYMOUS, Exchange
from ..telemetry.metrics import AUTH_VERIFICATIONS, BOUND

log = structlog.get_logger("gateway.auth")
_AUTHORIZATION = hdrs.AUTHORIZATION


@dataclass(frozen=True, slots=True)
class _Mount:
    name: str
    resource: str
    trusted: frozenset[str]
    introspector: Introspector | None
    challenge: str             # the first-contact 401 challenge, built once

    def no_token(self) -> Unauthorized:
        # A fresh exception each time: re-raising one instance would grow its traceback.
        return Unauthorized(describe("no_token"), reason="no_token",
                            headers={"WWW-Authenticate": self.challenge})


class Authn:
    name = "authn"

    def __init__(self, config: Any) -> None:
        self._config = config
        auth = config.auth
        self._none = auth.mode == "none"
        self.idle = self._none          # the gateway skips on_request: Exchange starts ANONYMOUS
        self._max = auth.max_token_bytes
        self._cache: TokenCache[Verified] = TokenCache(auth.cache_size)
        self._entries = self._cache.entries
        self._keysets = {i.issuer: KeySet(i, auth.fetch_timeout, self._keys_removed) for i in auth.issuers}
        self._verifier = JwtVerifier(self._keysets)
        self._own_session: aiohttp.ClientSession | None = None
        introspectors = {iss: Introspector(ks, auth.fetch_timeout)
                         for iss, ks in self._keysets.items() if ks.cfg.introspection}
        self._introspectors = introspectors
        self._mounts: dict[str, _Mount] = {}
        mounts = {**config.servers, **{n: v.mount for n, v in config.virtual_servers.items()}}
        for name, server in mounts.items():
            allowed = server.auth.issuers if server.auth is not None else ()
            trusted = frozenset(allowed or self._keysets)
            intro = next((i for iss, i in introspectors.items() if iss in trusted), None)
            self._mounts[name] = _Mount(name, server.resource_url, trusted, intro,
                                        www_authenticate(config, server))

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, http_session: aiohttp.ClientSession | None = None) -> None:
        """Fetch every issuer's keys (failures are logged, retried, and answered 503 meanwhile)."""
        if self._none:
            return
        if http_session is None:
            self._own_session = http_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, ttl_dns_cache=300))
        for intro in self._introspectors.values():
            intro.start(http_session)
        for keys in self._keysets.values():
            await keys.start(http_session)

    async def close(self) -> None:
        for keys in self._keysets.values():
            await keys.close()
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None
        self._cache.clear()

    def _keys_removed(self, issuer: str, kids: frozenset[str]) -> None:
        """Keys left an issuer's JWKS: tokens they verified are verified again (and refused)."""
        dropped = self._cache.drop_where(lambda v: v.kid in kids and v.issuer == issuer)
        log.info("auth.keys_removed", issuer=issuer, kids=sorted(kids), cached_tokens_dropped=dropped)

    def status(self) -> dict[str, Any]:
        """For /readyz details: which issuers have keys loaded."""
        return {iss: ("keys loaded" if ks.loaded else "keys unavailable") for iss, ks in self._keysets.items()}

    # -- request path ---------------------------------------------------------------
    async def on_request(self, ex: Exchange) -> None:
        pending = self.check(ex)
        if pending is not None:
            await pending

    def check(self, ex: Exchange) -> Awaitable[None] | None:
        """``on_request`` without a coroutine for a token in the verified-token cache (pipeline.py)."""
        if self._none:
            ex.principal = ANONYMOUS
            return None
        mount = self._mounts[ex.server.name]
        values = ex.request.headers.getall(_AUTHORIZATION, ())
        if len(values) != 1:
            if not values:
                raise mount.no_token()
            raise self._refuse(ex, "duplicate_authorization", "two Authorization headers", status=400)
        value = values[0]
        # Hot path: the whole header value is the cache key, so a hit costs no parsing at all;
        # only values that passed every check below were ever stored.  A live entry is read
        # directly (TokenCache.get, inlined); anything else goes through get() (expiry, LRU).
        item = self._entries.get(value)
        if item is not None and item[0] > time.time():
            self._entries.move_to_end(value)
            verified = item[1]
        else:
            verified = self._cache.get(value)
            if verified is None:
                return self._verify_then_accept(ex, mount, value)
        audiences = verified.audiences
        if (verified.refusal is None and verified.issuer in mount.trusted
                and (mount.resource in audiences or ANY_AUDIENCE in audiences)):
            ex.principal = verified.principal       # _accept's success path, inlined
            ex.token = value[7:].strip()
            return None
        self._accept(ex, mount, value, verified)    # raises the refusal
        return None

    async def _verify_then_accept(self, ex: Exchange, mount: _Mount, value: str) -> None:
        self._accept(ex, mount, value, await self._verify(ex, mount, value))

    def _accept(self, ex: Exchange, mount: _Mount, value: str, verified: Verified) -> None:
        if verified.refusal is not None:
            raise self._refuse(ex, verified.refusal, "refused by introspection (cached answer)")
        if verified.issuer not in mount.trusted:
            raise self._refuse(ex, "token_issuer_not_allowed", f"issuer {verified.issuer} is not trusted here")
        audiences = verified.audiences
        if mount.resource not in audiences and ANY_AUDIENCE not in audiences:
            raise self._refuse(ex, "token_wrong_audience", "aud does not contain this mount's resource URL")
        ex.principal = verified.principal
        ex.token = value[7:].strip()

    async def _verify(self, ex: Exchange, mount: _Mount, value: str) -> Verified:
        """Cold path: parse the header, verify (or introspect) the token, cache the result."""
        if value[:7].lower() != "bearer ":
            raise self._refuse(ex, "auth_scheme_not_bearer", "Authorization is not a Bearer token", error=None)
        token = value[7:].strip()
        if not token:
            raise mount.no_token()
        if len(token) > self._max:
            raise self._refuse(ex, "token_too_large", f"token longer than {self._max} bytes")
        issuer = "unknown"
        try:
            if looks_like_jwt(token) or mount.introspector is None:
                verified = await self._verifier.verify(token, mount.trusted)
            else:
                verified = await mount.introspector.introspect(token)
            issuer = verified.issuer
        except AuthFailure as exc:
            BOUND.get(AUTH_VERIFICATIONS, issuer, exc.reason).inc()
            raise self._refuse(ex, exc.reason, exc.detail, status=exc.status) from None
        BOUND.get(AUTH_VERIFICATIONS, issuer, verified.refusal or "ok").inc()
        self._cache.put(value, verified, verified.expires)
        return verified

    def _refuse(self, ex: Exchange, reason: str, detail: str, *, status: int = 401,
                error: str | None = "invalid_token") -> GatewayError:
        """The local answer for a refused token; the detail goes to the log, never to the client."""
        log.info("auth.token_refused", server=ex.server.name, reason=reason, detail=detail)
        if status == 503:
            return Unavailable("the authorization server's keys are unavailable; try again later",
                               reason=reason)
        description = describe(reason)
        if status == 400:
            error = "invalid_request"
            description = "Send exactly one Authorization header"
        challenge = www_authenticate(self._config, ex.server, error=error, description=description)
        cls = BadRequest if status == 400 else Unauthorized
        return cls(description, reason=reason, headers={"WWW-Authenticate": challenge})
