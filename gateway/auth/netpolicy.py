"""Which URLs the gateway will fetch OAuth material from.

Issuer metadata, JWKS, introspection and token endpoints decide who may call
the gateway, so they are fetched over HTTPS only; plain HTTP is allowed for a
loopback host (development and tests), never for anything else.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from ..config.model import is_loopback_host


def url_problem(url: str, *, allow_path: bool = True, allow_query: bool = False) -> str | None:
    """None when ``url`` may be fetched, else why not (a sentence for the operator)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        return f"{url!r} is not a valid URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{url!r} must be an absolute https URL"
    if parts.username is not None or parts.password is not None:
        return f"{url!r} must not carry credentials"
    if parts.fragment or (parts.query and not allow_query):
        return f"{url!r} must not have a {'fragment' if parts.fragment else 'query'}"
    if not allow_path and parts.path not in ("", "/"):
        return f"{url!r} must not have a path"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return f"{url!r} must use https (plain http is accepted for loopback addresses only)"
    return None
