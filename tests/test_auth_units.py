"""The resource server's parts in-process: config, JWKS fetching, verification, cache, challenges.

Keys are real (RSA, EC, Ed25519), tokens are signed with them, and the JWKS / metadata
documents are served by a real aiohttp server on a loopback port, so every fetch goes
through the same code path as in production.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth.cache import TokenCache
from gateway.auth.challenge import www_authenticate
from gateway.auth.config import IssuerConfig
from gateway.auth.keys import KeySet
from gateway.auth.verify import AuthFailure, JwtVerifier
from gateway.config.model import parse_config
from gateway.config.yamlloc import load_text

AUD = "http://127.0.0.1:8080/mcp/demo"


def public_jwk(key: Any, kid: str | None, alg: str) -> dict[str, Any]:
    algo = jwt.get_algorithm_by_name(alg)
    jwk = algo.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"use": "sig"})
    if kid:
        jwk["kid"] = kid
    return jwk


class AS:
    """A minimal issuer on loopback: RFC 8414 or OIDC metadata plus a JWKS, with a fetch counter."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.issuer = ""
        self.metadata_path = "/.well-known/oauth-authorization-server"
        self.metadata_issuer: str | None = None
        self.jwks_redirect = False
        self.jwks_status = 200
        self.served: asyncio.Queue[int] = asyncio.Queue()     # the fetch count, after each JWKS fetch

    def app(self) -> web.Application:
        async def metadata(request: web.Request) -> web.Response:
            if request.path != self.metadata_path:
                return web.Response(status=404)
            return web.json_response({"issuer": self.metadata_issuer or self.issuer,
                                      "jwks_uri": f"{self.issuer}/jwks"})

        async def jwks(_request: web.Request) -> web.Response:
            self.fetches += 1
            if self.jwks_redirect:
                raise web.HTTPFound("http://127.0.0.1:9/evil-jwks")
            self.served.put_nowait(self.fetches)
            return web.json_response({"keys": self.keys}, status=self.jwks_status)

        app = web.Application()
        app.router.add_get("/.well-known/{tail:.*}", metadata)
        app.router.add_get("/jwks", jwks)
        return app


@pytest.fixture
async def issuer() -> AsyncIterator[AS]:
    as_ = AS()
    runner = web.AppRunner(as_.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    as_.issuer = f"http://127.0.0.1:{port}"
    try:
        yield as_
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def sign(key: Any, alg: str, *, kid: str | None = "k1", typ: str = "at+jwt", iss: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": iss, "sub": "alice", "aud": AUD, "iat": now, "exp": now + 300, "scope": "a b"}
    payload.update(claims)
    headers = {"typ": typ}
    if kid:
        headers["kid"] = kid
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg, headers=headers)


async def verifier(as_: AS, session: aiohttp.ClientSession, **cfg: Any) -> tuple[JwtVerifier, KeySet]:
    keys = KeySet(IssuerConfig(issuer=as_.issuer, **cfg), timeout=2.0)
    await keys.start(session)
    return JwtVerifier({as_.issuer: keys}), keys


async def refused(v: JwtVerifier, token: str, issuer: str) -> str:
    with pytest.raises(AuthFailure) as info:
        await v.verify(token, frozenset({issuer}))
    return info.value.reason


@pytest.mark.parametrize("alg,make", [
    ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ("PS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ("EdDSA", lambda: ed25519.Ed25519PrivateKey.generate()),
])
async def test_each_default_algorithm_verifies_and_yields_the_principal(issuer, session, alg, make) -> None:
    key = make()
    issuer.keys = [public_jwk(key, "k1", alg)]
    v, keys = await verifier(issuer, session)
    try:
        result = await v.verify(sign(key, alg, iss=issuer.issuer, client_id="cli"), frozenset({issuer.issuer}))
    finally:
        await keys.close()
    assert result.principal.subject == "alice" and result.principal.client_id == "cli"
    assert result.principal.scopes == {"a", "b"} and AUD in result.audiences


async def test_ec_key_on_the_wrong_curve_is_not_used(issuer, session) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    issuer.keys = [public_jwk(p384, "k1", "ES384")]
    v, keys = await verifier(issuer, session, algorithms=("ES256", "ES384"))
    token = sign(p384, "ES384", iss=issuer.issuer)
    forged = token.replace(token.split(".")[0], jwt.utils.base64url_encode(
        b'{"alg":"ES256","typ":"at+jwt","kid":"k1"}').decode())
    try:
        assert await refused(v, forged, issuer.issuer) == "token_unknown_kid"
    finally:
        await keys.close()


async def test_unknown_kid_refetches_once_per_cooldown(issuer, session) -> None:
    old = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.keys = [public_jwk(old, "old", "RS256")]
    v, keys = await verifier(issuer, session, jwks_cooldown=0.0)
    try:
        issuer.keys.insert(0, public_jwk(new, "new", "RS256"))       # the AS rotates
        ok = await v.verify(sign(new, "RS256", kid="new", iss=issuer.issuer), frozenset({issuer.issuer}))
        assert ok.principal.subject == "alice" and issuer.fetches == 2
        keys.cfg = IssuerConfig(issuer=issuer.issuer, jwks_cooldown=3600)   # now: a long cool-down
        for i in range(20):
            token = sign(new, "RS256", kid=f"random-{i}", iss=issuer.issuer)
            assert await refused(v, token, issuer.issuer) == "token_unknown_kid"
        assert issuer.fetches == 2, "a flood of unknown kids must not hammer the IdP"
    finally:
        await keys.close()


async def test_unknown_kids_inside_the_cooldown_schedule_one_fetch_when_it_ends(issuer, session) -> None:
    old = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.keys = [public_jwk(old, "old", "RS256")]
    v, keys = await verifier(issuer, session, jwks_cooldown=0.3)
    try:
        assert await issuer.served.get() == 1                            # the start-up fetch
        # The first unknown kid fetches at once (the start-up fetch starts no cool-down) ...
        assert await refused(v, sign(new, "RS256", kid="x-first", iss=issuer.issuer),
                             issuer.issuer) == "token_unknown_kid"
        assert await issuer.served.get() == 2
        issuer.keys.insert(0, public_jwk(new, "new", "RS256"))           # the AS rotates
        token = sign(new, "RS256", kid="new", iss=issuer.issuer)
        for i in range(20):                                              # ... the next ones cool down
            assert await refused(v, sign(new, "RS256", kid=f"x-{i}", iss=issuer.issuer),
                                 issuer.issuer) == "token_unknown_kid"
        assert await refused(v, token, issuer.issuer) == "token_unknown_kid"
        assert issuer.fetches == 2
        assert await asyncio.wait_for(issuer.served.get(), 5.0) == 3    # one fetch as the cool-down ends
        await asyncio.wait_for(keys._inflight, 5.0)
        ok = await v.verify(token, frozenset({issuer.issuer}))
        assert ok.principal.subject == "alice" and issuer.fetches == 3
    finally:
        await keys.close()


async def test_jwks_redirect_is_not_followed_and_fails_closed(issuer, session) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.jwks_redirect = True
    v, keys = await verifier(issuer, session)
    try:
        assert not keys.loaded
        with pytest.raises(AuthFailure) as info:
            await v.verify(sign(key, "RS256", iss=issuer.issuer), frozenset({issuer.issuer}))
        assert info.value.reason == "issuer_unavailable" and info.value.status == 503
    finally:
        await keys.close()


async def test_metadata_naming_another_issuer_is_rejected(issuer, session) -> None:
    issuer.metadata_issuer = "http://127.0.0.1:1"
    _, keys = await verifier(issuer, session)
    try:
        assert not keys.loaded and issuer.fetches == 0
    finally:
        await keys.close()


async def test_oidc_discovery_is_the_fallback(issuer, session) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.metadata_path = "/.well-known/openid-configuration"
    issuer.keys = [public_jwk(key, None, "RS256")]          # one key, no kid: unambiguous
    v, keys = await verifier(issuer, session)
    try:
        ok = await v.verify(sign(key, "RS256", kid=None, iss=issuer.issuer), frozenset({issuer.issuer}))
        assert ok.principal.subject == "alice"
    finally:
        await keys.close()


async def test_typ_jwt_is_accepted_only_when_configured(issuer, session) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.keys = [public_jwk(key, "k1", "RS256")]
    strict, k1 = await verifier(issuer, session)
    loose, k2 = await verifier(issuer, session, typ=("at+jwt", "jwt"))
    token = sign(key, "RS256", typ="JWT", iss=issuer.issuer)
    try:
        with pytest.raises(AuthFailure) as info:
            await strict.verify(token, frozenset({issuer.issuer}))
        assert info.value.reason == "token_typ_not_allowed" and "typ: [at+jwt, JWT]" in info.value.detail
        assert (await loose.verify(token, frozenset({issuer.issuer}))).principal.subject == "alice"
    finally:
        await k1.close()
        await k2.close()


def test_cache_never_serves_an_entry_past_its_expiry_and_stays_bounded() -> None:
    cache: TokenCache[str] = TokenCache(3)
    now = time.time()
    cache.put("t1", "v1", now + 10)
    assert cache.get("t1", now + 9.9) == "v1"
    assert cache.get("t1", now + 10) is None and len(cache) == 0
    for i in range(5):
        cache.put(f"k{i}", str(i), now + 60)
    assert len(cache) == 3 and cache.get("k0", now) is None and cache.get("k4", now) == "4"


CONFIG = """
listen: {{host: 127.0.0.1, port: 8080}}
admin: {{host: 127.0.0.1, port: 9464}}
public_url: http://127.0.0.1:8080
auth:
{auth}
servers:
  demo:
    url: http://127.0.0.1:3001/mcp
{server}
"""


def problems_of(auth: str, server: str = "") -> list[str]:
    node, problems = load_text(CONFIG.format(auth=auth, server=server), "gw.yaml")
    assert not problems
    parse_config(node, "gw.yaml", problems, check_secrets=False)
    return [str(p) for p in problems]


@pytest.mark.parametrize("auth,server,fragment", [
    ("  issuers:\n    - issuer: https://idp.example.com/realms/acme", "", None),
    ("  issuers:\n    - issuer: http://idp.example.com", "", "must use https"),
    ("  issuers:\n    - issuer: https://idp.example.com\n      algorithms: [HS256]", "", "symmetric"),
    ("  issuers:\n    - issuer: https://idp.example.com\n      colour: red", "", "unknown key 'colour'"),
    ("  mode: oauth", "", "at least one trusted issuer"),
    ("  issuers:\n    - issuer: https://a.example.com",
     "    auth: {issuers: [https://b.example.com]}", "not one of auth.issuers"),
    ("  issuers:\n    - {issuer: https://a.example.com, introspection: {client_id: x, client_secret: 'env:S'}}\n"
     "    - {issuer: https://b.example.com, introspection: {client_id: x, client_secret: 'env:S'}}",
     "", "several trusted issuers introspect"),
    ("  issuers:\n    - issuer: https://a.example.com",
     "    credentials: {token_exchange: {issuer: https://a.example.com, client_id: gw, client_secret: 'env:S'}}",
     None),
    ("  mode: none",
     "    credentials: {token_exchange: {issuer: https://a.example.com, client_id: gw, client_secret: 'env:S'}}",
     "auth.mode must be 'oauth'"),
    ("  issuers:\n    - issuer: https://a.example.com",
     "    credentials: {header: Host, value: 'env:S'}", "cannot carry a credential"),
    ("  issuers:\n    - issuer: https://a.example.com",
     "    auth: {scopes: ['has space']}", "not a valid OAuth scope"),
])
def test_auth_config_is_strict_and_located(auth: str, server: str, fragment: str | None) -> None:
    found = problems_of(auth, server)
    if fragment is None:
        assert found == []
    else:
        assert any(fragment in p for p in found), found
        assert all(p.startswith("gw.yaml:") for p in found)


def test_challenge_names_the_mount_metadata_and_scopes() -> None:
    node, problems = load_text(CONFIG.format(
        auth="  issuers:\n    - issuer: https://idp.example.com",
        server="    auth: {scopes: [mcp:read]}"), "gw.yaml")
    config = parse_config(node, "gw.yaml", problems, check_secrets=False)
    assert config is not None and not problems
    server = config.servers["demo"]
    assert www_authenticate(config, server) == (
        'Bearer resource_metadata="http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp/demo", '
        'scope="mcp:read"')
    step_up = www_authenticate(config, server, error="insufficient_scope", scopes=("mcp:read", "mcp:admin"),
                               description='needs "more"')
    assert 'scope="mcp:read mcp:admin"' in step_up and 'error="insufficient_scope"' in step_up
    assert 'error_description="needs more"' in step_up
    assert server.auth.published_scopes() == ("mcp:read",)
