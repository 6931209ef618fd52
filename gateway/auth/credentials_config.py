"""Per-server upstream credentials: what the gateway presents to an upstream.

The client's token is never forwarded (MCP authorization, "token
passthrough").  A server gets one of:

- a static header whose value comes from ``env:``/``file:``;
- ``client_credentials``: the gateway's own OAuth client at the upstream's AS;
- ``token_exchange``: RFC 8693, the caller's token as ``subject_token``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config.reader import Reader
from ..config.secrets import SecretRef
from .netpolicy import url_problem

TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
_TOKEN_CHARS = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")   # RFC 9110 token (header names)
# Never settable: framing and routing headers, and the gateway's own identity headers.
FORBIDDEN_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive",
    "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection", "cookie",
    "mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "last-event-id",
})


@dataclass(frozen=True, slots=True)
class StaticCredential:
    header: str
    value: SecretRef


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """How the gateway authenticates itself at an authorization server."""

    token_url: str | None          # None: discovered from ``issuer``
    issuer: str | None
    client_id: str
    client_secret: SecretRef | None
    auth_method: str = "client_secret_basic"


@dataclass(frozen=True, slots=True)
class ClientCredentialsGrant:
    client: OAuthClient
    scope: str | None = None
    resource: str | None = None     # RFC 8707; the upstream's canonical URL
    audience: str | None = None
    refresh_margin: float = 60.0    # renew this long before expiry


@dataclass(frozen=True, slots=True)
class TokenExchangeGrant:
    client: OAuthClient
    scope: str | None = None
    resource: str | None = None
    audience: str | None = None
    requested_token_type: str = TOKEN_TYPE_ACCESS
    cache_size: int = 10_000


def _oauth_client(r: Reader, ctx: dict[str, Any]) -> OAuthClient | None:
    token_url = r.str("token_url")
    issuer = r.str("issuer")
    for key, url in (("token_url", token_url), ("issuer", issuer)):
        if url and (why := url_problem(url)):
            r.error(key, f"{r.path}.{key}: {why}")
    if not token_url and not issuer:
        r.error(None, f"{r.path} needs token_url, or issuer to discover it")
    client_id = r.str("client_id", "", required=True) or ""
    secret = r.secret("client_secret")
    method = r.str("auth_method", "client_secret_basic",
                   choices=("client_secret_basic", "client_secret_post", "none"))
    if secret is None and method != "none":
        r.error(None, f"{r.path}.client_secret is required (or auth_method: none for a public client)")
    if secret is not None and ctx.get("check_secrets") and (why := secret.check()):
        r.error("client_secret", f"{r.path}.client_secret ({secret}): {why}")
    return OAuthClient(token_url, issuer, client_id, secret, method)


def _client_credentials(r: Reader, ctx: dict[str, Any]) -> ClientCredentialsGrant | None:
    client = _oauth_client(r, ctx)
    grant = ClientCredentialsGrant(
        client=client, scope=r.str("scope"), resource=r.str("resource"), audience=r.str("audience"),
        refresh_margin=r.duration("refresh_margin", 60.0),
    ) if client else None
    r.done()
    return grant


def _token_exchange(r: Reader, ctx: dict[str, Any]) -> TokenExchangeGrant | None:
    client = _oauth_client(r, ctx)
    grant = TokenExchangeGrant(
        client=client, scope=r.str("scope"), resource=r.str("resource"), audience=r.str("audience"),
        requested_token_type=r.str("requested_token_type", TOKEN_TYPE_ACCESS) or TOKEN_TYPE_ACCESS,
        cache_size=r.int("cache_size", 10_000, min=0, max=10_000_000),
    ) if client else None
    r.done()
    auth = ctx.get("auth")
    if auth is not None and auth.mode != "oauth":
        r.error(None, f"{r.path} exchanges the caller's token, so auth.mode must be 'oauth'")
    return grant


def parse_server_credentials(s: Reader, ctx: dict[str, Any]) -> Any:
    if not s.has("credentials"):
        s.seen.add("credentials")
        return None
    sub = s.mapping("credentials")
    kinds = [k for k in ("value", "client_credentials", "token_exchange") if sub.has(k)]
    if len(kinds) != 1:
        sub.error(None, f"{sub.path} needs exactly one of: value (with header), "
                        "client_credentials, token_exchange")
    result: Any = None
    if sub.has("client_credentials"):
        result = _client_credentials(sub.mapping("client_credentials"), ctx)
    if sub.has("token_exchange"):
        result = _token_exchange(sub.mapping("token_exchange"), ctx)
    if sub.has("value") or sub.has("header"):
        header = sub.str("header", "Authorization") or "Authorization"
        value = sub.secret("value", required=True)
        if not _TOKEN_CHARS.match(header) or header.lower() in FORBIDDEN_HEADERS \
                or header.lower().startswith("x-gateway-"):
            sub.error("header", f"{sub.path}.header: {header!r} cannot carry a credential")
        if value is not None and ctx.get("check_secrets") and (why := value.check()):
            sub.error("value", f"{sub.path}.value ({value}): {why}")
        if value is not None:
            result = StaticCredential(header, value)
    sub.done()
    return result
