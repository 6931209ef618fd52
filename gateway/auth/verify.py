"""JWT access-token verification (RFC 9068 profile, RFC 8725 practices).

``JwtVerifier.verify(token, mount)`` runs once per token (then the cache
answers).  The order of checks is the point of this module:

1. shape: three base64url segments, nothing else (cheap, before any decoding);
2. header: ``alg`` on the allow-list, no embedded-key header (``jwk``, ``jku``,
   ``x5u``, ``x5c``), no ``crit``: all before any key is looked up, so a
   forged header can neither choose the algorithm nor bring its own key;
3. issuer: ``iss`` names a configured issuer this mount trusts, the issuer
   allows ``alg``, and ``typ`` is one the issuer accepts;
4. key: by ``kid`` from that issuer's JWKS (an unknown ``kid`` may trigger one
   refetch per cool-down), and the key type must fit ``alg``;
5. signature; then claims: ``exp``/``nbf``/``iat`` with leeway, required
   claims, and ``aud`` containing this mount's resource URL exactly.

Every refusal is an ``AuthFailure`` with a reason from a closed set; the
detail is for the operator's log and never contains the token.
"""
from __future__ import annotations

import base64
import binascii
import re
import time
from types import MappingProxyType
from typing import Any

import orjson
from jwt.algorithms import get_default_algorithms

from ..pipeline import Principal
from .cache import Verified
from .config import IssuerConfig
from .fetch import FetchError
from .keys import KeySet

# The signature may be empty so that alg "none" is refused by name, not as "malformed".
_JWS_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]++\.[A-Za-z0-9_-]++\.[A-Za-z0-9_-]*+")   # possessive: linear
_EMBEDDED_KEY_HEADERS = ("jwk", "jku", "x5u", "x5c")
_ALGORITHMS = get_default_algorithms()
_PRINTABLE = re.compile(r"[^A-Za-z0-9+/._:-]")


class AuthFailure(Exception):
    """A token was refused.  ``reason`` is a closed-set label (log field, metric label)."""

    def __init__(self, reason: str, detail: str, *, status: int = 401) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status


def shown(value: Any, limit: int = 40) -> str:
    """An attacker-supplied header value made safe for a log line."""
    return _PRINTABLE.sub("?", str(value))[:limit]


def b64json(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None


def looks_like_jwt(token: str) -> bool:
    return _JWS_SHAPE.fullmatch(token) is not None


def scopes_of(claims: dict[str, Any], names: tuple[str, ...]) -> frozenset[str]:
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list):
            return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def principal_from_claims(cfg: IssuerConfig, claims: dict[str, Any], exp: float | None) -> Principal:
    subject = claims.get(cfg.subject_claim)
    if not isinstance(subject, str) or not subject:
        raise AuthFailure("token_missing_claim", f"claim {cfg.subject_claim!r} is missing or not a string")
    client = next((v for c in cfg.client_claims if isinstance(v := claims.get(c), str)), "")
    name = claims.get(cfg.name_claim) if cfg.name_claim else None
    return Principal(
        issuer=cfg.issuer, subject=subject, client_id=client,
        scopes=scopes_of(claims, cfg.scope_claims), claims=MappingProxyType(claims),
        name=name if isinstance(name, str) and name else subject, expires_at=exp,
    )


def audiences_of(aud: Any) -> frozenset[str]:
    if isinstance(aud, str):
        return frozenset((aud,))
    if isinstance(aud, list):
        return frozenset(a for a in aud if isinstance(a, str))
    return frozenset()


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthFailure("token_malformed", f"claim {name!r} is not a number")
    return float(value)


class JwtVerifier:
    """Verifies JWTs for every configured issuer; one per gateway process."""

    def __init__(self, keysets: dict[str, KeySet]) -> None:
        self.keysets = keysets
        self.allowed_algs = frozenset(a for ks in keysets.values() for a in ks.cfg.algorithms)

    async def verify(self, token: str, trusted: frozenset[str]) -> Verified:
        """Verify ``token`` against the issuers in ``trusted`` (mount-independent checks only)."""
        if not looks_like_jwt(token):
            raise AuthFailure("token_malformed", "not a compact JWS (three base64url segments)")
        h_seg, p_seg, s_seg = token.split(".")
        header = b64json(h_seg)
        if not isinstance(header, dict):
            raise AuthFailure("token_malformed", "JOSE header is not a JSON object")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed_algs:
            raise AuthFailure("token_alg_not_allowed", f"alg {shown(alg)!r} is not on the allow-list")
        for name in _EMBEDDED_KEY_HEADERS:
            if name in header:
                raise AuthFailure("token_embedded_key", f"header {name!r} (embedded or remote key) is never trusted")
        if "crit" in header:
            raise AuthFailure("token_crit_unsupported", "header 'crit' names extensions this gateway does not "
                                                        "understand")
        claims = b64json(p_seg)
        if not isinstance(claims, dict):
            raise AuthFailure("token_malformed", "JWT claims are not a JSON object")
        iss = claims.get("iss")
        keys = self.keysets.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise AuthFailure("token_unknown_issuer", f"iss {shown(iss, 120)!r} is not a configured issuer")
        if iss not in trusted:
            raise AuthFailure("token_issuer_not_allowed", f"issuer {iss} is not trusted by this server")
        cfg = keys.cfg
        if alg not in cfg.algorithms:
            raise AuthFailure("token_alg_not_allowed", f"alg {alg} is not allowed for issuer {iss}")
        typ = header.get("typ")
        typ_norm = typ.lower() if isinstance(typ, str) else ("" if typ is None else None)
        if typ_norm not in cfg.typ:
            raise AuthFailure("token_typ_not_allowed",
                              f"token typ {shown(typ)!r} is not accepted for issuer {iss} (expected "
                              f"{' or '.join(repr(t) for t in cfg.typ if t)}, RFC 9068); if this issuer "
                              f"issues plain JWT access tokens, add 'typ: [at+jwt, JWT]' to its auth.issuers entry")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthFailure("token_malformed", "header 'kid' is not a string")
        key = keys.lookup(kid, alg)
        if key is None:
            key = await self._refetch(keys, kid, alg)
        try:
            signature = base64.urlsafe_b64decode(s_seg + "=" * (-len(s_seg) % 4))
            ok = _ALGORITHMS[alg].verify(f"{h_seg}.{p_seg}".encode("ascii"), key.key, signature)
        except (binascii.Error, ValueError, TypeError):
            ok = False
        if not ok:
            raise AuthFailure("token_bad_signature", f"signature does not verify (issuer {iss}, kid {shown(kid)})")
        return self.check_claims(cfg, claims, kid=key.kid)

    async def _refetch(self, keys: KeySet, kid: str | None, alg: str) -> Any:
        # Rotation: an unknown kid may be a new key. Refetch, but at most once per cool-down
        # (a token arriving while that fetch runs waits for it).
        if keys.may_refetch() or keys.kid_fetch_running() or not keys.loaded:
            try:
                await keys.refetch_for_kid()
            except FetchError as exc:
                if not keys.loaded:
                    raise AuthFailure("issuer_unavailable", f"keys of {keys.cfg.issuer} could not be fetched "
                                      f"({exc.reason})", status=503) from exc
            key = keys.lookup(kid, alg)
            if key is not None:
                return key
        if not keys.loaded:
            raise AuthFailure("issuer_unavailable", f"keys of {keys.cfg.issuer} are not available yet", status=503)
        keys.refetch_after_cooldown()
        raise AuthFailure("token_unknown_kid", f"no {alg} key with kid {shown(kid)!r} in the JWKS of "
                          f"{keys.cfg.issuer}" + ("" if keys.may_refetch() else " (refetch cooling down)"))

    @staticmethod
    def check_claims(cfg: IssuerConfig, claims: dict[str, Any], now: float | None = None, *,
                     kid: str | None = None) -> Verified:
        now = time.time() if now is None else now
        for name in cfg.required_claims:
            if name not in claims:
                raise AuthFailure("token_missing_claim", f"required claim {name!r} is missing")
        exp = _number(claims, "exp")
        assert exp is not None      # "exp" is always required
        leeway = cfg.leeway
        if now >= exp + leeway:
            raise AuthFailure("token_expired", "token expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise AuthFailure("token_not_yet_valid", "token is not valid yet (nbf)")
        iat = _number(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise AuthFailure("token_not_yet_valid", "token was issued in the future (iat)")
        audiences = audiences_of(claims.get("aud"))
        if not audiences:
            raise AuthFailure("token_missing_claim", "claim 'aud' is missing or empty")
        principal = principal_from_claims(cfg, claims, exp)
        # Cached until exp itself (the leeway only excuses clock skew on a fresh check).
        return Verified(principal, audiences, cfg.issuer, exp, kid=kid)
