"""RFC 9728 protected-resource metadata, one document per mount.

``/.well-known/oauth-protected-resource/mcp/<name>`` describes the resource
``<public_url>/mcp/<name>``: its ``resource`` is byte-identical to the
audience the gateway demands, built from ``public_url`` (never from ``Host``
or forwarded headers).  The root form ``/.well-known/oauth-protected-resource``
describes the gateway origin's only mount when there is exactly one; with
several mounts one document cannot name them all, and a client following it
would obtain a token no mount accepts, so it answers 404 instead.  Documents
are built once at start; with ``auth: {mode: none}`` there are none (nothing
is protected).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .challenge import WELL_KNOWN, metadata_path

if TYPE_CHECKING:
    from ..config.model import Config, ServerConfig

# Public, cacheable, and readable by browser-based MCP clients (MCP Inspector).
_HEADERS = {"Content-Type": "application/json", "Cache-Control": "public, max-age=300",
            "Access-Control-Allow-Origin": "*"}


def document(config: "Config", server: "ServerConfig") -> dict[str, Any]:
    auth = server.auth
    trusted = [i.issuer for i in config.auth.issuers if not auth.issuers or i.issuer in auth.issuers]
    doc: dict[str, Any] = {
        "resource": server.resource_url,
        "authorization_servers": trusted,
        "bearer_methods_supported": ["header"],
        "resource_name": f"MCP server '{server.name}' via mcp-gateway",
    }
    # MCP: the minimal set, and never offline_access (that is the client's business).
    scopes = [s for s in auth.published_scopes() if s != "offline_access"]
    if scopes:
        doc["scopes_supported"] = scopes
    return doc


def _handler(body: bytes) -> Any:
    async def handle(request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            return web.Response(status=204, headers={**_HEADERS, "Access-Control-Allow-Methods": "GET",
                                                     "Access-Control-Allow-Headers": "MCP-Protocol-Version"})
        return web.Response(body=body, headers=_HEADERS)
    return handle


def routes(config: "Config") -> list[web.RouteDef]:
    if config.auth.mode == "none":
        return []
    out: list[web.RouteDef] = []
    mounts = {**config.servers, **{n: v.mount for n, v in config.virtual_servers.items()}}
    docs = {name: orjson.dumps(document(config, s)) for name, s in mounts.items()}
    for name, body in docs.items():
        path = metadata_path(config.public_url, name)
        paths = {path, f"{WELL_KNOWN}/mcp/{name}"}    # the latter when a proxy strips a path prefix
        for p in sorted(paths):
            out.append(web.get(p, _handler(body), allow_head=True))
            out.append(web.options(p, _handler(body)))
    if len(docs) == 1:
        body = next(iter(docs.values()))
        out.append(web.get(WELL_KNOWN, _handler(body), allow_head=True))
        out.append(web.options(WELL_KNOWN, _handler(body)))
    return out
