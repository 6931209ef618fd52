"""The ``auth`` section and the per-server ``auth`` restrictions.

With no ``auth`` key the gateway refuses to start: running without
authentication is a choice the operator writes down (``mode: none``), and on
a non-loopback listener it needs a second explicit flag.  Every default here
is the strict one (RFC 9068 ``typ``, asymmetric algorithms only, HTTPS
except on loopback); an operator loosens them by writing it down.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config.reader import Reader
from ..config.secrets import SecretRef
from .credentials_config import parse_server_credentials  # noqa: F401  (model.py imports it from here)
from .netpolicy import url_problem

# Asymmetric JWS algorithms only: a shared secret would let every holder mint tokens.
KNOWN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                    "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
DEFAULT_TYP = ("at+jwt", "application/at+jwt")          # RFC 9068 §2.1
ALWAYS_REQUIRED = ("iss", "aud", "exp")
# RFC 6749 §3.3 scope-token: printable ASCII without space, '"' and '\'.
SCOPE_TOKEN = r"[\x21\x23-\x5b\x5d-\x7e]+"
_SCOPE_RE = re.compile(SCOPE_TOKEN)


@dataclass(frozen=True, slots=True)
class IntrospectionConfig:
    """RFC 7662 introspection of opaque tokens for one issuer."""

    endpoint: str | None              # None: from the issuer's metadata
    client_id: str
    client_secret: SecretRef | None
    auth_method: str = "client_secret_basic"
    cache_ttl: float = 60.0           # an active answer is reused at most this long
    negative_ttl: float = 5.0         # an inactive answer too (bounds load on the AS)
    require_audience: bool = True     # refuse answers without an ``aud`` naming the mount


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str
    jwks_uri: str | None = None                     # None: discovered (RFC 8414, then OIDC)
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    typ: tuple[str, ...] = DEFAULT_TYP              # lower-cased; "" means "no typ header"
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ALWAYS_REQUIRED + ("sub",)
    scope_claims: tuple[str, ...] = ("scope", "scp")
    subject_claim: str = "sub"
    client_claims: tuple[str, ...] = ("client_id", "azp")
    name_claim: str | None = None
    groups_claim: str | None = None
    jwks_refresh: float = 300.0                     # periodic refetch
    jwks_cooldown: float = 5.0                      # min gap between unknown-kid refetches
    introspection: IntrospectionConfig | None = None
    loc: Any = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: str                                   # "none" | "oauth"
    allow_none_on_public_listener: bool = False
    issuers: tuple[IssuerConfig, ...] = ()
    max_token_bytes: int = 8000                 # under aiohttp's 8190-byte header line, so the refusal is ours
    cache_size: int = 10_000                    # verified tokens kept (LRU)
    fetch_timeout: float = 5.0                  # metadata, JWKS, introspection

    def issuer(self, iss: str) -> IssuerConfig | None:
        for cfg in self.issuers:
            if cfg.issuer == iss:
                return cfg
        return None


@dataclass(frozen=True, slots=True)
class ServerAuth:
    """Per-mount restrictions; ``issuers`` empty means every configured issuer."""

    issuers: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()                        # needed for every request; challenged on 401
    scopes_supported: tuple[str, ...] | None = None     # RFC 9728; None: the mount's scopes
    forward_identity: bool = False                      # X-Gateway-* identity headers upstream

    def published_scopes(self) -> tuple[str, ...]:
        if self.scopes_supported is not None:
            return self.scopes_supported
        return self.scopes


NO_SERVER_AUTH = ServerAuth()


def parse_auth(r: Reader, ctx: dict[str, Any], listen: Any) -> AuthConfig:
    if not r.has("auth"):
        r.error(None, "auth is required: configure auth.issuers, or write 'auth: {mode: none}' "
                      "to run without authentication (local use only)")
        r.seen.add("auth")
        cfg = AuthConfig(mode="none")
        ctx["auth"] = cfg
        return cfg
    sub = r.mapping("auth")
    mode = sub.str("mode", "oauth", choices=("none", "oauth"))
    allow_public = sub.bool("allow_none_on_public_listener", False)
    issuers = tuple(_issuers(sub, ctx))
    max_token = sub.size("max_token_bytes", 8000)
    cache_size = sub.int("cache_size", 10_000, min=0, max=10_000_000)
    timeout = sub.duration("fetch_timeout", 5.0, min=0.01)
    sub.done()
    if mode == "none" and not listen.is_loopback and not allow_public:
        sub.error("mode", "auth mode 'none' on a non-loopback listener needs "
                          "'allow_none_on_public_listener: true' as well")
    if mode == "none" and issuers:
        sub.error("issuers", "auth.issuers is set but auth.mode is 'none': remove one of them")
    if mode == "oauth" and not issuers and sub.ok:
        sub.error(None, "auth.issuers must list at least one trusted issuer "
                        "(or write 'mode: none' to run without authentication)")
    cfg = AuthConfig(mode=mode, allow_none_on_public_listener=allow_public, issuers=issuers,
                     max_token_bytes=max_token, cache_size=cache_size, fetch_timeout=timeout)
    ctx["auth"] = cfg
    return cfg


def _issuers(sub: Reader, ctx: dict[str, Any]) -> list[IssuerConfig]:
    items = sub.list("issuers")
    out: list[IssuerConfig] = []
    seen: set[str] = set()
    for i, node in enumerate(items):
        r = Reader(node, sub.problems, f"auth.issuers[{i}]", items.at(i))
        cfg = _issuer(r, ctx)
        r.done()
        if cfg is None:
            continue
        if cfg.issuer in seen:
            r.error("issuer", f"issuer {cfg.issuer!r} is listed twice")
        seen.add(cfg.issuer)
        out.append(cfg)
    return out


def _issuer(r: Reader, ctx: dict[str, Any]) -> IssuerConfig | None:
    issuer = r.str("issuer", required=True)
    if issuer and (why := url_problem(issuer, allow_path=True)):
        r.error("issuer", f"{r.path}.issuer: {why}")
    jwks_uri = r.str("jwks_uri")
    if jwks_uri and (why := url_problem(jwks_uri, allow_path=True, allow_query=True)):
        r.error("jwks_uri", f"{r.path}.jwks_uri: {why}")
    algorithms = r.str_list("algorithms", DEFAULT_ALGORITHMS)
    for alg in algorithms:
        if alg.upper().startswith("HS"):
            r.error("algorithms", f"{r.path}.algorithms: {alg} is symmetric and not supported: a shared "
                                  "secret would let every holder mint tokens; use an asymmetric algorithm")
        elif alg not in KNOWN_ALGORITHMS:
            r.error("algorithms", f"{r.path}.algorithms: unknown algorithm {alg!r} "
                                  f"(known: {', '.join(KNOWN_ALGORITHMS)})")
    if not algorithms:
        r.error("algorithms", f"{r.path}.algorithms must not be empty")
    typ_raw = r.raw("typ", None)
    if typ_raw is None:
        typ = DEFAULT_TYP
    elif isinstance(typ_raw, str):
        typ = (typ_raw.lower(),)
    else:
        typ = tuple(t.lower() for t in r.str_list("typ"))
    if "at+jwt" in typ and "application/at+jwt" not in typ:
        typ = typ + ("application/at+jwt",)
    extra_required = r.str_list("required_claims")
    scope_claim = r.str("scope_claim")
    subject_claim = r.str("subject_claim", "sub") or "sub"
    client_claim = r.str("client_claim")
    leeway = r.duration("leeway", 30.0)
    if leeway > 300:
        r.error("leeway", f"{r.path}.leeway must be at most 5m (it stretches every token's lifetime)")
    refresh = r.duration("jwks_refresh", 300.0, min=1.0)
    cooldown = r.duration("jwks_cooldown", 5.0)
    introspection = _introspection(r, ctx)
    name_claim, groups_claim = r.str("name_claim"), r.str("groups_claim")
    if not issuer:
        return None
    required = tuple(dict.fromkeys(ALWAYS_REQUIRED + (subject_claim,) + extra_required))
    return IssuerConfig(
        issuer=issuer, jwks_uri=jwks_uri, algorithms=tuple(algorithms) or DEFAULT_ALGORITHMS,
        typ=typ, leeway=leeway, required_claims=required,
        scope_claims=(scope_claim,) if scope_claim else ("scope", "scp"),
        subject_claim=subject_claim,
        client_claims=(client_claim,) if client_claim else ("client_id", "azp"),
        name_claim=name_claim, groups_claim=groups_claim,
        jwks_refresh=refresh, jwks_cooldown=cooldown, introspection=introspection, loc=r.loc,
    )


def _introspection(r: Reader, ctx: dict[str, Any]) -> IntrospectionConfig | None:
    if not r.has("introspection"):
        r.seen.add("introspection")
        return None
    sub = r.mapping("introspection")
    endpoint = sub.str("endpoint")
    if endpoint and (why := url_problem(endpoint, allow_path=True)):
        sub.error("endpoint", f"{sub.path}.endpoint: {why}")
    cfg = IntrospectionConfig(
        endpoint=endpoint,
        client_id=sub.str("client_id", "", required=True) or "",
        client_secret=sub.secret("client_secret", required=True),
        auth_method=sub.str("auth_method", "client_secret_basic",
                            choices=("client_secret_basic", "client_secret_post")),
        cache_ttl=sub.duration("cache_ttl", 60.0),
        negative_ttl=sub.duration("negative_ttl", 5.0),
        require_audience=sub.bool("require_audience", True),
    )
    sub.done()
    secret = cfg.client_secret
    if secret is not None and ctx.get("check_secrets") and (why := secret.check()):
        sub.error("client_secret", f"{sub.path}.client_secret ({secret}): {why}")
    return cfg


def _scope_list(r: Reader, key: str) -> tuple[str, ...]:
    scopes = r.str_list(key)
    for s in scopes:
        if not _SCOPE_RE.fullmatch(s):
            r.error(key, f"{r.path}.{key}: {s!r} is not a valid OAuth scope (no spaces or quotes)")
    return scopes


def parse_server_auth(s: Reader, ctx: dict[str, Any]) -> ServerAuth:
    if s.has("auth"):
        sub = s.mapping("auth")
        supported = _scope_list(sub, "scopes_supported") if sub.has("scopes_supported") else None
        sub.seen.add("scopes_supported")
        cfg = ServerAuth(
            issuers=sub.str_list("issuers"), scopes=_scope_list(sub, "scopes"), scopes_supported=supported,
            forward_identity=sub.bool("forward_identity", False),
        )
        sub.done()
    else:
        s.seen.add("auth")
        sub, cfg = s, NO_SERVER_AUTH
    auth: AuthConfig | None = ctx.get("auth")
    if auth is not None and auth.mode == "oauth":
        known = {i.issuer for i in auth.issuers}
        for iss in cfg.issuers:
            if iss not in known:
                sub.error("issuers", f"{sub.path}.issuers: {iss!r} is not one of auth.issuers")
        trusted = [i for i in auth.issuers if not cfg.issuers or i.issuer in cfg.issuers]
        if sum(1 for i in trusted if i.introspection) > 1:
            # An opaque token carries no issuer: sending it to several ASes leaks it to all but one.
            sub.error("issuers" if cfg.issuers else None,
                      f"{sub.path}: several trusted issuers introspect opaque tokens; restrict "
                      f"{s.path}.auth.issuers so that at most one of them does")
    elif auth is not None and (cfg.issuers or cfg.scopes):
        sub.error(None, f"{sub.path} restricts tokens but auth.mode is 'none'")
    return cfg
