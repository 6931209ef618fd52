"""``WWW-Authenticate: Bearer`` challenges (RFC 6750 §3, RFC 9728 §5.1).

Every challenge names the mount's protected-resource metadata, so a client
that knows only the URL can discover the authorization server.  Descriptions
come from a fixed table: they say what kind of problem it was, never what the
token contained or which key or check inside the gateway failed.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..config.model import Config, ServerConfig

WELL_KNOWN = "/.well-known/oauth-protected-resource"

# reason -> error_description (and the JSON-RPC message) sent to the client.
DESCRIPTIONS = {
    "no_token": "An access token is required",
    "auth_scheme_not_bearer": "An access token is required (Authorization: Bearer)",
    "token_expired": "The access token expired",
    "token_not_yet_valid": "The access token is not valid yet",
    "token_wrong_audience": "The access token was not issued for this resource",
    "token_issuer_not_allowed": "The access token was not issued for this resource",
    "token_too_large": "The access token is too large",
    "token_inactive": "The access token is not active",
    "token_typ_not_allowed": ("The access token type is not accepted: tokens must be typed at+jwt "
                              "(RFC 9068); an operator can also accept JWT with 'typ: [at+jwt, JWT]' "
                              "on the issuer"),
}
GENERIC = "The access token is invalid"
_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')   # quoted-string without '"' and '\'


def describe(reason: str) -> str:
    return DESCRIPTIONS.get(reason, GENERIC)


def metadata_path(public_url: str, server_name: str) -> str:
    """RFC 9728 §3.1: the well-known suffix goes between the host and the resource's path."""
    base_path = urlsplit(public_url).path.rstrip("/")
    return f"{WELL_KNOWN}{base_path}/mcp/{server_name}"


def metadata_url(config: "Config", server: "ServerConfig") -> str:
    parts = urlsplit(config.public_url)
    return f"{parts.scheme}://{parts.netloc}{metadata_path(config.public_url, server.name)}"


def challenge_scopes(server: "ServerConfig") -> tuple[str, ...]:
    """Scopes named on a 401: what every request needs, else the mount's published minimum."""
    auth = server.auth
    if auth is None:
        return ()
    return auth.scopes or auth.published_scopes()


def _quoted(value: str) -> str:
    return _UNSAFE.sub("", value)


def www_authenticate(config: "Config", server: "ServerConfig", *, error: str | None = None,
                     scopes: Iterable[str] = (), description: str | None = None) -> str:
    """The ``Bearer`` challenge for ``server``: ``error`` is ``invalid_token``,
    ``invalid_request`` or ``insufficient_scope``; ``scopes`` defaults to the 401 scopes."""
    scope_list = tuple(scopes) or (challenge_scopes(server) if error != "insufficient_scope" else ())
    parts = [f'resource_metadata="{metadata_url(config, server)}"']
    if scope_list:
        parts.append(f'scope="{_quoted(" ".join(dict.fromkeys(scope_list)))}"')
    if error:
        parts.append(f'error="{_quoted(error)}"')
        if description:
            parts.append(f'error_description="{_quoted(description)}"')
    return "Bearer " + ", ".join(parts)
