"""Credentials the gateway presents to upstreams (never the client's token).

``make_credentials(server, config)`` returns a provider or ``None``.  The
forwarder calls ``await provider.headers(ex)`` for every upstream request and
adds the result after dropping the client's ``Authorization``, ``Cookie``,
hop-by-hop headers and any client-supplied copy of ``IDENTITY_HEADERS``.
Providers are started with an aiohttp session and closed once.

- static: a header from ``env:``/``file:``, resolved at start;
- client credentials: one token per server, renewed in the background before
  it expires (requests keep using the current one meanwhile);
- token exchange (RFC 8693): one token per caller token, cached until the
  earlier of both expiries;
- identity headers (``auth.forward_identity``): who the verified caller is.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import structlog

from ..config.secrets import SecretUnavailable
from ..errors import Forbidden, UpstreamAuthRefused, UpstreamUnavailable
from ..telemetry.metrics import BOUND, UPSTREAM_CREDENTIALS
from .cache import TokenCache
from .credentials_config import (TOKEN_TYPE_ACCESS, ClientCredentialsGrant, OAuthClient, StaticCredential,
                                 TokenExchangeGrant)
from .fetch import FetchError, discover, request_json

if TYPE_CHECKING:
    from ..config.model import Config, ServerConfig
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.auth")

# Identity headers the gateway may set upstream; client-supplied copies are stripped.
IDENTITY_HEADERS: frozenset[str] = frozenset({
    "x-gateway-issuer", "x-gateway-subject", "x-gateway-client-id", "x-gateway-scopes",
})
_TIMEOUT = 10.0
_MIN_LIFETIME = 5.0       # never hand out a token that expires sooner than this


def _header_safe(value: str) -> str:
    """Percent-encode anything that is not visible ASCII (claims are caller-controlled text)."""
    return quote(value, safe="".join(chr(c) for c in range(0x21, 0x7f) if chr(c) != "%"))


class StaticCredentials:
    """A fixed header value from ``env:``/``file:``, resolved once at start."""

    def __init__(self, header: str, ref: Any) -> None:
        self.header = header
        self._ref = ref
        self._value: dict[str, str] = {}

    async def start(self, http_session: Any) -> None:
        self._value = {self.header: self._ref.resolve()}

    async def close(self) -> None:
        self._value = {}

    async def headers(self, ex: "Exchange") -> dict[str, str]:
        return self._value


class IdentityHeaders:
    """``X-Gateway-*`` headers naming the verified caller (the upstream must trust the gateway's network)."""

    async def start(self, http_session: Any) -> None:
        return None

    async def close(self) -> None:
        return None

    async def headers(self, ex: "Exchange") -> dict[str, str]:
        p = ex.principal
        return {"X-Gateway-Issuer": _header_safe(p.issuer), "X-Gateway-Subject": _header_safe(p.subject),
                "X-Gateway-Client-Id": _header_safe(p.client_id),
                "X-Gateway-Scopes": _header_safe(" ".join(sorted(p.scopes)))}


class _TokenEndpoint:
    """The gateway as an OAuth client of one authorization server."""

    def __init__(self, server: str, kind: str, client: OAuthClient) -> None:
        self.server, self.kind, self.client = server, kind, client
        self.session: aiohttp.ClientSession | None = None
        self._url = client.token_url
        self._secret: str | None = None

    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        if self.client.client_secret is not None:
            try:
                self._secret = self.client.client_secret.resolve()
            except SecretUnavailable as exc:    # checked at load; gone since: 502 per request, logged
                log.error("auth.upstream_secret_unavailable", server=self.server, detail=str(exc))

    async def request(self, form: dict[str, str]) -> dict[str, Any]:
        """POST the grant; returns the token answer, raises a GatewayError when there is none."""
        assert self.session is not None
        if self._secret is None and self.client.auth_method != "none":
            raise UpstreamUnavailable("the gateway's client secret for this upstream is unavailable",
                                      reason="upstream_credentials_unavailable")
        form = dict(form)
        headers: dict[str, str] = {}
        c = self.client
        if c.auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: form-urlencode id and secret before Basic-encoding them.
            headers["Authorization"] = aiohttp.BasicAuth(quote(c.client_id, safe=""),
                                                         quote(self._secret or "", safe="")).encode()
        else:
            form["client_id"] = c.client_id
            if c.auth_method == "client_secret_post":
                form["client_secret"] = self._secret or ""
        try:
            if self._url is None:
                assert c.issuer is not None
                meta = await discover(self.session, c.issuer, timeout=_TIMEOUT)
                if not isinstance(meta.get("token_endpoint"), str):
                    raise FetchError("invalid_metadata", f"{c.issuer}: metadata has no token_endpoint")
                self._url = meta["token_endpoint"]
            doc = await request_json(self.session, "POST", self._url, data=form, headers=headers,
                                     timeout=_TIMEOUT, accept_error_json=True)
        except FetchError as exc:
            self._count(exc.reason)
            log.warning("auth.upstream_token_failed", server=self.server, kind=self.kind, reason=exc.reason,
                        detail=str(exc))
            raise UpstreamUnavailable("the gateway could not obtain credentials for the upstream",
                                      reason="upstream_credentials_unavailable") from exc
        if "_status" in doc or not isinstance(doc.get("access_token"), str):
            error = str(doc.get("error", "no access_token"))[:60]
            self._count("refused")
            log.warning("auth.upstream_token_refused", server=self.server, kind=self.kind, error=error,
                        status=doc.get("_status", 200))
            if self.kind == "token_exchange":
                raise Forbidden("the authorization server refused to exchange the caller's token for "
                                "this upstream", reason="token_exchange_refused")
            raise UpstreamAuthRefused("the authorization server refused the gateway's client credentials",
                                      reason="upstream_credentials_refused")
        self._count("ok")
        return doc

    def _count(self, outcome: str) -> None:
        BOUND.get(UPSTREAM_CREDENTIALS, self.server, self.kind, outcome).inc()


def _lifetime(doc: dict[str, Any], default: float = 300.0) -> float:
    value = doc.get("expires_in")
    try:
        return max(float(value), 0.0) if value is not None else default
    except (TypeError, ValueError):
        return default


class ClientCredentials:
    """``client_credentials`` grant; the token is renewed ``refresh_margin`` before expiry."""

    def __init__(self, server: str, grant: ClientCredentialsGrant) -> None:
        self.grant = grant
        self._endpoint = _TokenEndpoint(server, "client_credentials", grant.client)
        self._value: dict[str, str] | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._inflight: asyncio.Task[None] | None = None

    async def start(self, http_session: aiohttp.ClientSession) -> None:
        self._endpoint.start(http_session)

    async def close(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        self._value = None

    def invalidate(self) -> None:
        """The upstream refused the current token: fetch a new one on the next request."""
        self._value, self._refresh_at, self._expires_at = None, 0.0, 0.0

    async def headers(self, ex: "Exchange") -> dict[str, str]:
        now = time.monotonic()
        value = self._value
        if value is not None and now < self._refresh_at:
            return value
        if value is not None and now < self._expires_at - _MIN_LIFETIME:
            self._renew()               # in the background; the current token is still good
            return value
        await asyncio.shield(self._renew())
        assert self._value is not None
        return self._value

    def _renew(self) -> asyncio.Task[None]:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(_consume)
        return self._inflight

    async def _fetch(self) -> None:
        g = self.grant
        form = {"grant_type": "client_credentials"}
        for key, val in (("scope", g.scope), ("resource", g.resource), ("audience", g.audience)):
            if val:
                form[key] = val
        doc = await self._endpoint.request(form)
        lifetime = _lifetime(doc)
        now = time.monotonic()
        self._value = {"Authorization": f"Bearer {doc['access_token']}"}
        self._expires_at = now + lifetime
        self._refresh_at = now + max(0.0, min(lifetime - g.refresh_margin, lifetime * 0.8))


class TokenExchange:
    """RFC 8693: the caller's verified token becomes ``subject_token``; one answer cached per caller token."""

    def __init__(self, server: str, grant: TokenExchangeGrant) -> None:
        self.grant = grant
        self._endpoint = _TokenEndpoint(server, "token_exchange", grant.client)
        self._cache: TokenCache[dict[str, str]] = TokenCache(grant.cache_size)
        self._inflight: dict[str, asyncio.Task[tuple[dict[str, str], float]]] = {}

    async def start(self, http_session: aiohttp.ClientSession) -> None:
        self._endpoint.start(http_session)

    async def close(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        self._cache.clear()

    async def headers(self, ex: "Exchange") -> dict[str, str]:
        token = ex.token
        if token is None:
            raise Forbidden("this upstream needs the caller's token for token exchange",
                            reason="token_exchange_refused")
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        task = self._inflight.get(token)
        if task is None:
            task = self._inflight[token] = asyncio.create_task(self._fetch(token))
            task.add_done_callback(lambda _t, k=token: self._inflight.pop(k, None))
            task.add_done_callback(_consume)
        value, expires = await asyncio.shield(task)
        caller_exp = ex.principal.expires_at
        self._cache.put(token, value, min(expires, caller_exp) if caller_exp else expires)
        return value

    async def _fetch(self, subject_token: str) -> tuple[dict[str, str], float]:
        g = self.grant
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": subject_token, "subject_token_type": TOKEN_TYPE_ACCESS,
                "requested_token_type": g.requested_token_type}
        for key, val in (("scope", g.scope), ("resource", g.resource), ("audience", g.audience)):
            if val:
                form[key] = val
        doc = await self._endpoint.request(form)
        expires = time.time() + max(_lifetime(doc) - _MIN_LIFETIME, 1.0)
        return {"Authorization": f"Bearer {doc['access_token']}"}, expires


class _Combined:
    def __init__(self, providers: list[Any]) -> None:
        self.providers = providers

    async def start(self, http_session: Any) -> None:
        for p in self.providers:
            await p.start(http_session)

    async def close(self) -> None:
        for p in self.providers:
            await p.close()

    async def headers(self, ex: "Exchange") -> dict[str, str]:
        out: dict[str, str] = {}
        for p in self.providers:
            out.update(await p.headers(ex))
        return out

    def invalidate(self) -> None:
        for p in self.providers:
            if hasattr(p, "invalidate"):
                p.invalidate()


def _consume(task: asyncio.Task[Any]) -> None:
    # A background renewal that failed was logged by _TokenEndpoint; the next request retries.
    if not task.cancelled():
        task.exception()


def make_credentials(server: "ServerConfig", config: "Config") -> Any:
    providers: list[Any] = []
    cred = server.credentials
    if isinstance(cred, StaticCredential):
        providers.append(StaticCredentials(cred.header, cred.value))
    elif isinstance(cred, ClientCredentialsGrant):
        providers.append(ClientCredentials(server.name, cred))
    elif isinstance(cred, TokenExchangeGrant):
        providers.append(TokenExchange(server.name, cred))
    if server.auth is not None and server.auth.forward_identity:
        providers.append(IdentityHeaders())
    if not providers:
        return None
    return providers[0] if len(providers) == 1 else _Combined(providers)
