"""RFC 7662 introspection for opaque (non-JWT) access tokens.

Only for issuers configured with ``introspection``; at most one such issuer
per mount (an opaque token names no issuer, and sending it to several
authorization servers would hand it to all but one).  Answers are cached:
active ones until ``min(exp, cache_ttl)``, inactive ones for ``negative_ttl``
so a stream of junk tokens costs the AS one call per token and period.
"""
from __future__ import annotations

import time
from typing import Any

import aiohttp
import structlog

from ..config.secrets import SecretUnavailable

from ..telemetry.metrics import AUTH_INTROSPECTIONS, BOUND
from .cache import ANY_AUDIENCE, Verified
from .config import IssuerConfig
from .fetch import FetchError, request_json
from .keys import KeySet
from .verify import AuthFailure, audiences_of, principal_from_claims

log = structlog.get_logger("gateway.auth")


class Introspector:
    def __init__(self, keys: KeySet, timeout: float) -> None:
        assert keys.cfg.introspection is not None
        self.cfg: IssuerConfig = keys.cfg
        self.icfg = keys.cfg.introspection
        self._keys = keys            # shares the issuer's discovered metadata
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._secret: str | None = None

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        if self.icfg.client_secret is not None:
            try:
                self._secret = self.icfg.client_secret.resolve()
            except SecretUnavailable as exc:     # checked at load; gone since: answer 503, say why
                log.error("auth.introspection_secret_unavailable", issuer=self.cfg.issuer, detail=str(exc))

    def _endpoint(self) -> str:
        if self.icfg.endpoint:
            return self.icfg.endpoint
        meta = self._keys.metadata or {}
        endpoint = meta.get("introspection_endpoint")
        if not isinstance(endpoint, str):
            raise AuthFailure("issuer_unavailable", f"{self.cfg.issuer}: no introspection_endpoint known",
                              status=503)
        return endpoint

    async def introspect(self, token: str) -> Verified:
        """The verified answer (active or not); raises only when the AS cannot be asked."""
        assert self._session is not None
        if self.icfg.endpoint is None and self._keys.metadata is None:
            try:
                await self._keys.refresh()
            except FetchError:
                pass
        if self._secret is None and self.icfg.client_secret is not None:
            raise AuthFailure("issuer_unavailable", "introspection client secret unavailable", status=503)
        data = {"token": token, "token_type_hint": "access_token"}
        headers: dict[str, str] = {}
        if self.icfg.auth_method == "client_secret_basic":
            headers["Authorization"] = aiohttp.BasicAuth(self.icfg.client_id, self._secret or "").encode()
        else:
            data.update(client_id=self.icfg.client_id, client_secret=self._secret or "")
        try:
            doc = await request_json(self._session, "POST", self._endpoint(), data=data, headers=headers,
                                     timeout=self._timeout)
        except FetchError as exc:
            BOUND.get(AUTH_INTROSPECTIONS, self.cfg.issuer, exc.reason).inc()
            log.warning("auth.introspection_failed", issuer=self.cfg.issuer, reason=exc.reason, detail=str(exc))
            raise AuthFailure("issuer_unavailable", f"introspection at {self.cfg.issuer} failed ({exc.reason})",
                              status=503) from exc
        now = time.time()
        verified = self._judge(doc, now)
        BOUND.get(AUTH_INTROSPECTIONS, self.cfg.issuer, verified.refusal or "active").inc()
        return verified

    def _judge(self, doc: dict[str, Any], now: float) -> Verified:
        """Turn an introspection answer into a cacheable (possibly negative) entry."""
        cfg, icfg = self.cfg, self.icfg

        def refuse(reason: str) -> Verified:
            from ..pipeline import ANONYMOUS
            return Verified(ANONYMOUS, frozenset(), cfg.issuer, now + icfg.negative_ttl, refusal=reason)

        if doc.get("active") is not True:
            return refuse("token_inactive")
        iss = doc.get("iss")
        if iss is not None and iss != cfg.issuer:
            return refuse("token_unknown_issuer")
        exp = doc.get("exp")
        exp_f = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
        if exp_f is not None and now >= exp_f + cfg.leeway:
            return refuse("token_expired")
        nbf = doc.get("nbf")
        if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and now + cfg.leeway < nbf:
            return refuse("token_not_yet_valid")
        audiences = audiences_of(doc.get("aud"))
        if not audiences:
            if icfg.require_audience:
                return refuse("token_wrong_audience")
            audiences = frozenset((ANY_AUDIENCE,))
        claims = dict(doc)
        if not isinstance(claims.get(cfg.subject_claim), str):
            # RFC 7662: "sub" is optional; a client-credentials token may only name its client.
            fallback = claims.get("username") or claims.get("client_id")
            if isinstance(fallback, str):
                claims[cfg.subject_claim] = fallback
        try:
            principal = principal_from_claims(cfg, claims, exp_f)
        except AuthFailure as exc:
            return refuse(exc.reason)
        until = now + icfg.cache_ttl
        if exp_f is not None:
            until = min(until, exp_f)
        return Verified(principal, audiences, cfg.issuer, until)
