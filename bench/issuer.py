"""A local RS256 token issuer for authenticated gateway targets.

It serves RFC 8414 metadata and a JWKS on loopback from inside the harness process
(the gateway fetches them rarely, so this costs nothing while wrk runs) and mints
RFC 9068 access tokens (``typ: at+jwt``) for a given audience.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa


class LocalIssuer:
    """Start with ``await LocalIssuer.start()``; ``issuer`` and ``jwks_uri`` are then set."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwks = {"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}
        self.issuer = ""
        self.jwks_uri = ""
        self._runner: web.AppRunner | None = None

    @classmethod
    async def start(cls, host: str = "127.0.0.1") -> "LocalIssuer":
        self = cls()
        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server", self._metadata)
        app.router.add_get("/.well-known/openid-configuration", self._metadata)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.issuer = f"http://{host}:{port}"
        self.jwks_uri = f"{self.issuer}/jwks"
        return self

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.issuer, "jwks_uri": self.jwks_uri,
                                  "token_endpoint": f"{self.issuer}/token",
                                  "response_types_supported": ["code"]})

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks)

    def mint(self, audience: str, *, ttl: int = 3600, scope: str = "mcp:read mcp:write",
             subject: str = "bench-user") -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": audience, "sub": subject,
                                  "client_id": "bench", "scope": scope, "iat": now,
                                  "nbf": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self.key, algorithm="RS256",
                          headers={"typ": "at+jwt", "kid": self.kid})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
