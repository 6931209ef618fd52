"""The attack battery: every forged, misdirected or malformed token is refused before the upstream.

One stack per module: two real authorization servers the gateway trusts (``as1`` for
mounts ``a``/``b``, ``as2`` for mount ``c`` only), a third it has never heard of, a
recording SDK upstream behind three mounts, and the gateway.  Each case sends one request
and checks the status, the JSON-RPC error body, the ``WWW-Authenticate`` challenge, and that
the upstream received nothing at all.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.idp.fixture import Idp, start_idp
from tests.support.components import Gateway, Upstream, start_gateway, start_upstream
from tests.support.gw_helpers import LEGACY_VERSION, http_client, initialize, post, rpc, with_policy



def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


@dataclass
class Stack:
    as1: Idp
    as2: Idp
    rogue: Idp
    upstream: Upstream
    gw: Gateway
    attacker_key: rsa.RSAPrivateKey
    tokens: list[str] = field(default_factory=list)

    def url(self, mount: str) -> str:
        return self.gw.url(mount)

    def remember(self, token: str) -> str:
        self.tokens.append(token)
        return token

    def good(self, mount: str = "a", scope: str = "mcp:read") -> str:
        return self.remember(self.as1.client_credentials(self.url(mount), scope))

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        base = {"iss": self.as1.issuer, "sub": "mallory", "aud": self.url("a"), "iat": now, "exp": now + 300,
                "scope": "mcp:read", "client_id": "m2m-client", "jti": uuid.uuid4().hex}
        base.update(over)
        return {k: v for k, v in base.items() if v is not None}

    def minted(self, header: dict[str, Any] | None = None, **claims: Any) -> str:
        """Signed by as1's real current key: only the claims/header are wrong."""
        return self.remember(self.as1.mint(self.claims(**claims), header))

    def attacker_signed(self, header: dict[str, Any], **claims: Any) -> str:
        hdr = {"typ": "at+jwt", **header}
        return self.remember(jwt.encode(self.claims(**claims), self.attacker_key, algorithm="RS256", headers=hdr))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("auth-attacks")
    started: list[Any] = []
    try:
        as1 = start_idp(work / "as1"); started.append(as1)
        as2 = start_idp(work / "as2"); started.append(as2)
        rogue = start_idp(work / "rogue"); started.append(rogue)
        up = start_upstream(work / "up"); started.append(up)
        config = {
            "auth": {"issuers": [{"issuer": as1.issuer, "jwks_cooldown": "60s"}, {"issuer": as2.issuer}]},
            "servers": {
                "a": {"url": up.url, "auth": {"issuers": [as1.issuer], "scopes": ["mcp:read"]}},
                "b": {"url": up.url, "auth": {"issuers": [as1.issuer]}},
                "c": {"url": up.url, "auth": {"issuers": [as2.issuer]}},
            },
        }
        gw = start_gateway(work / "gw", with_policy(config, work)); started.append(gw)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        yield Stack(as1, as2, rogue, up, gw, key)
    finally:
        for handle in reversed(started):
            handle.stop()


def _hs256_with_public_key(s: Stack) -> str:
    """The classic confusion: HMAC keyed with the RSA public key the gateway trusts."""
    jwks = json.loads(aiohttp_get(f"{s.as1.issuer}/jwks"))
    pub = jwt.PyJWK(jwks["keys"][0]).key
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64json({"alg": "HS256", "typ": "at+jwt", "kid": s.as1.kids[0]})
    body = b64json(s.claims())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return s.remember(f"{head}.{body}.{b64(sig)}")


def aiohttp_get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _alg_none(s: Stack) -> str:
    return s.remember(f"{b64json({'alg': 'none', 'typ': 'at+jwt'})}.{b64json(s.claims())}.")


def _forged_signature(s: Stack) -> str:
    good = s.good()
    head, body, _ = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scope"] = "mcp:read mcp:admin"
    return s.remember(f"{head}.{b64json(claims)}.{good.split('.')[2]}")


# (case id, token builder, mount, expected status, expected reason)
CASES: list[tuple[str, Callable[[Stack], str | None], str, int, str]] = [
    ("no token", lambda s: None, "a", 401, "no_token"),
    ("garbage", lambda s: "not-a-token", "a", 401, "token_malformed"),
    ("three garbage segments", lambda s: "aaaa.bbbb.cccc", "a", 401, "token_malformed"),
    ("alg none", _alg_none, "a", 401, "token_alg_not_allowed"),
    ("HS256 keyed with the RSA public key", _hs256_with_public_key, "a", 401, "token_alg_not_allowed"),
    ("forged signature on a real token", _forged_signature, "a", 401, "token_bad_signature"),
    ("wrong issuer (not configured)", lambda s: s.remember(s.rogue.client_credentials(s.url("a"))),
     "a", 401, "token_unknown_issuer"),
    ("iss claims as1 but rogue signed", lambda s: s.remember(s.rogue.mint(s.claims())), "a", 401,
     "token_unknown_kid"),
    ("second trusted issuer, not trusted by this mount",
     lambda s: s.remember(s.as2.client_credentials(s.url("a"))), "a", 401, "token_issuer_not_allowed"),
    ("expired", lambda s: s.minted(exp=int(time.time()) - 120, iat=int(time.time()) - 600), "a", 401,
     "token_expired"),
    ("not yet valid", lambda s: s.minted(nbf=int(time.time()) + 600), "a", 401, "token_not_yet_valid"),
    ("issued in the future", lambda s: s.minted(iat=int(time.time()) + 600), "a", 401, "token_not_yet_valid"),
    ("missing exp", lambda s: s.minted(exp=None), "a", 401, "token_missing_claim"),
    ("missing sub", lambda s: s.minted(sub=None), "a", 401, "token_missing_claim"),
    ("audience of another mount", lambda s: s.good("b"), "a", 401, "token_wrong_audience"),
    ("audience of another service", lambda s: s.remember(s.as1.client_credentials("http://127.0.0.1:9/mcp")),
     "a", 401, "token_wrong_audience"),
    ("audience is a prefix of the mount", lambda s: s.minted(aud=s.gw.base_url), "a", 401,
     "token_wrong_audience"),
    ("no resource: opaque token", lambda s: s.remember(s.as1.client_credentials(None)), "a", 401,
     "token_malformed"),
    ("typ JWT (not at+jwt)", lambda s: s.minted({"typ": "JWT"}), "a", 401, "token_typ_not_allowed"),
    ("unknown kid", lambda s: s.attacker_signed({"kid": "attacker-kid"}), "a", 401, "token_unknown_kid"),
    ("real kid, attacker key", lambda s: s.attacker_signed({"kid": s.as1.kids[0]}), "a", 401,
     "token_bad_signature"),
    ("jku to attacker keys", lambda s: s.attacker_signed({"kid": "k1", "jku": "http://127.0.0.1:9/jwks"}),
     "a", 401, "token_embedded_key"),
    ("x5u to attacker keys", lambda s: s.attacker_signed({"kid": "k1", "x5u": "http://127.0.0.1:9/cert"}),
     "a", 401, "token_embedded_key"),
    ("embedded jwk", lambda s: s.attacker_signed({"kid": "k1", "jwk": jwt.algorithms.RSAAlgorithm.to_jwk(
        s.attacker_key.public_key(), as_dict=True)}), "a", 401, "token_embedded_key"),
    ("embedded x5c, real key signs", lambda s: s.minted({"x5c": ["MIIB"]}), "a", 401, "token_embedded_key"),
    ("unknown crit", lambda s: s.minted({"crit": ["exp-ext"], "exp-ext": 1}), "a", 401,
     "token_crit_unsupported"),
    ("oversized token", lambda s: "A" * 8001, "a", 401, "token_too_large"),
]


@pytest.mark.parametrize("case,build,mount,status,reason", CASES, ids=[c[0] for c in CASES])
async def test_forged_or_misdirected_tokens_are_refused_before_the_upstream(
        stack: Stack, case: str, build: Callable[[Stack], str | None], mount: str, status: int,
        reason: str) -> None:
    token = build(stack)
    stack.upstream.clear_records()
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http_client() as http:
        reply = await post(http, stack.url(mount), rpc("tools/list"), headers)
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.error_reason == reason
    body = reply.json
    assert body["jsonrpc"] == "2.0" and body["error"]["code"] == -32003
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{stack.gw.base_url}/.well-known/oauth-protected-resource/mcp/{mount}"' in challenge
    assert ('error="invalid_token"' in challenge) == (token is not None)
    if token:
        assert token not in reply.body.decode() and token not in challenge
    assert stack.upstream.records() == []


async def test_token_in_the_query_string_is_refused_with_400(stack: Stack) -> None:
    token = stack.good()
    stack.upstream.clear_records()
    async with http_client() as http:
        reply = await post(http, f"{stack.url('a')}?access_token={token}", rpc("tools/list"))
    assert reply.status == 400 and reply.error_reason == "token_in_query"
    assert stack.upstream.records() == []


async def test_two_authorization_headers_are_refused_with_400(stack: Stack) -> None:
    good = stack.good()
    stack.upstream.clear_records()
    headers = [("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {good}"),
               ("Accept", "application/json, text/event-stream"), ("Content-Type", "application/json"),
               ("MCP-Protocol-Version", LEGACY_VERSION)]
    async with http_client() as http:
        async with http.post(stack.url("a"), data=json.dumps(rpc("tools/list")), headers=headers) as resp:
            status, body = resp.status, await resp.json()
            challenge = resp.headers["WWW-Authenticate"]
    assert status == 400 and body["error"]["data"]["reason"] == "duplicate_authorization"
    assert 'error="invalid_request"' in challenge
    assert stack.upstream.records() == []


async def test_session_id_replayed_with_another_users_token_is_404(stack: Stack) -> None:
    alice = stack.remember(stack.as1.client_credentials(stack.url("b"), "mcp:read"))
    mallory = stack.remember(stack.as1.client_credentials(stack.url("b"), "mcp:read",
                                                           client=("exchange-client", "exchange-secret")))
    async with http_client() as http:
        sid, _ = await initialize(http, stack.url("b"), {"Authorization": f"Bearer {alice}"})
        stack.upstream.clear_records()
        start = len(stack.gw.log_lines())
        reply = await post(http, stack.url("b"), rpc("tools/list"), {"Authorization": f"Bearer {mallory}"},
                           session_id=sid)
        assert reply.status == 404 and reply.error_reason == "session_principal_mismatch"
        stack.gw.wait_for_log({"event": "security.session_hijack_attempt"}, start=start)
        assert stack.upstream.records() == []
        ok = await post(http, stack.url("b"), rpc("tools/list"), {"Authorization": f"Bearer {alice}"},
                        session_id=sid)
        assert ok.status == 200


async def test_valid_token_reaches_the_upstream_without_the_clients_authorization(stack: Stack) -> None:
    token = stack.good()
    stack.upstream.clear_records()
    spoofed = {"Authorization": f"Bearer {token}", "X-Gateway-Subject": "admin", "Cookie": "session=steal"}
    async with http_client() as http:
        sid, _ = await initialize(http, stack.url("a"), spoofed)
        reply = await post(http, stack.url("a"), rpc("tools/list"), spoofed, session_id=sid)
    assert reply.status == 200
    records = stack.upstream.records()
    assert records, "the upstream should have been called"
    for rec in records:
        assert "authorization" not in rec["headers"] and "x-gateway-subject" not in rec["headers"]
        assert "cookie" not in rec["headers"]
        assert token not in json.dumps(rec)


async def test_prm_document_names_the_mount_and_only_its_issuers(stack: Stack) -> None:
    async with http_client() as http:
        for mount, issuers in (("a", [stack.as1.issuer]), ("c", [stack.as2.issuer])):
            async with http.get(f"{stack.gw.base_url}/.well-known/oauth-protected-resource/mcp/{mount}") as r:
                assert r.status == 200
                doc = await r.json()
            assert doc["resource"] == stack.url(mount)
            assert doc["authorization_servers"] == issuers
            assert doc["bearer_methods_supported"] == ["header"]
        async with http.get(f"{stack.gw.base_url}/.well-known/oauth-protected-resource") as r:
            assert r.status == 404      # several mounts: one root document cannot name them all


async def test_no_token_ever_reaches_logs_or_metrics(stack: Stack) -> None:
    """Every token this worker's stack has seen is checked. Under ``pytest -n`` the battery
    above may have run on another worker, so this test first sends one token of each kind
    it looks for itself, whichever worker it lands on."""
    wanted = {"token_expired", "token_embedded_key", "token_bad_signature"}
    async with http_client() as http:
        for _, build, mount, status, reason in [c for c in CASES if c[4] in wanted]:
            token = build(stack)
            if token is not None:
                reply = await post(http, stack.url(mount), rpc("tools/list"), {"Authorization": f"Bearer {token}"})
                assert reply.status == status
        async with http.get(f"{stack.gw.admin_url}/metrics") as r:
            metrics = await r.text()
    logs = "\n".join(stack.gw.log_lines())
    assert stack.tokens, "the battery should have used tokens"
    assert "mcpgw_auth_verifications_total" in metrics
    for token in stack.tokens:
        for part in {token, *[p for p in token.split(".") if len(p) > 16]}:
            assert part not in logs
            assert part not in metrics
    refused = [e for e in stack.gw.json_logs() if e.get("event") == "auth.token_refused"]
    assert {e["reason"] for e in refused} >= wanted
