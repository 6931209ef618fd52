"""A development token issuer for ``mcp-gateway demo``: never for production.

An RSA key generated at start (never written to disk), RFC 8414 metadata and
a JWKS served over plain HTTP on a loopback address only (binding anything
else is refused: a network-reachable issuer with throw-away keys would let
anyone who reaches it learn what tokens the gateway accepts), and RFC 9068
access tokens minted in-process for the personas the demo prints.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from ..config.model import is_loopback_host


class DevIssuer:
    """``issuer = await DevIssuer.start()``; then ``issuer.issuer`` and ``issuer.mint(...)``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        if not is_loopback_host(host):
            raise ValueError(f"the development issuer serves loopback only; refusing to bind {host!r}")
        self.host = host
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        self._jwks = {"keys": [{**public, "kid": self.kid, "alg": "RS256", "use": "sig"}]}
        self.issuer = ""
        self._runner: web.AppRunner | None = None

    @classmethod
    async def start(cls, host: str = "127.0.0.1", port: int = 0) -> "DevIssuer":
        self = cls(host)
        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server", self._metadata)
        app.router.add_get("/jwks", self._jwks_handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0]
        netloc = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        self.issuer = f"http://{netloc}"
        return self

    async def _metadata(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"], "grant_types_supported": [],
            "token_endpoint_auth_methods_supported": [], "scopes_supported": ["mcp:read", "mcp:admin"],
        })

    async def _jwks_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self._jwks)

    def mint(self, audience: str, subject: str, scope: str, *, ttl: int = 8 * 3600,
             client_id: str = "mcp-gateway-demo") -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": audience, "sub": subject, "client_id": client_id,
                                  "scope": scope, "iat": now, "nbf": now, "exp": now + ttl,
                                  "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"typ": "at+jwt", "kid": self.kid})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
