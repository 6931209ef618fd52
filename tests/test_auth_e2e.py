"""End to end with a real authorization server (oidc-provider) and the official MCP SDK.

The SDK client knows only the mount URL; everything else it discovers through the gateway:
401 -> protected-resource metadata -> AS metadata -> dynamic registration -> PKCE with
``resource`` -> token -> tools listed and called.  Also: client credentials, refresh,
step-up after 403 ``insufficient_scope``, key rotation within the cool-down, and the
upstream credentials (client credentials, token exchange, introspection).
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client

from tests.idp.fixture import HeadlessBrowser, MemoryTokenStorage, oauth_provider
from tests.support.gw_helpers import LEGACY_VERSION, http_client, post, rpc, with_policy



def claims_of(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


async def call(url: str, auth: Any, *calls: tuple[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Connect with ``auth``, list tools, run ``calls``; returns (tool names, text results)."""
    async with httpx2.AsyncClient(auth=auth, timeout=20) as http:
        async with Client(streamable_http_client(url, http_client=http), cache=None) as client:
            tools = [t.name for t in (await client.list_tools()).tools]
            results = []
            for name, args in calls:
                result = await client.call_tool(name, args)
                assert not result.is_error, result
                results.append(result.content[0].text)
    return tools, results


def oauth_config(idp: Any, upstream: Any, workdir: Path, **server_auth: Any) -> dict[str, Any]:
    return with_policy({"auth": {"issuers": [{"issuer": idp.issuer, "jwks_cooldown": "1s"}]},
                        "servers": {"demo": {"url": upstream.url, "auth": server_auth}}}, workdir)


def initialize_msg() -> dict[str, Any]:
    """A request every upstream answers without a session (used as an authenticated probe)."""
    return rpc("initialize", {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                              "clientInfo": {"name": "auth-tests", "version": "0"}})


async def test_sdk_discovers_everything_from_the_mount_url_and_calls_tools(idp, upstream, gateway, tmp_path) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    gw = await gateway.astart(oauth_config(as_, up, tmp_path, scopes=["mcp:read"]))
    browser = HeadlessBrowser()
    storage = MemoryTokenStorage()
    tools, results = await call(gw.url("demo"), oauth_provider(gw.url("demo"), browser, storage),
                                ("add", {"a": 2, "b": 3}))
    assert "add" in tools and results == ["5"]
    assert browser.authorizations == 1
    asked = browser.requested[0]
    assert asked["resource"] == gw.url("demo") and asked["code_challenge_method"] == "S256"
    assert asked["scope"].split() == ["mcp:read", "offline_access"] or "mcp:read" in asked["scope"].split()
    token = storage.tokens.access_token
    assert claims_of(token)["aud"] == gw.url("demo") and claims_of(token)["iss"] == as_.issuer
    assert storage.client_info is not None and storage.client_info.client_id   # registered via DCR
    for rec in up.records():
        assert "authorization" not in rec["headers"]


async def test_client_credentials_provider_gets_a_token_for_the_mount(idp, upstream, gateway, tmp_path) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    gw = await gateway.astart(oauth_config(as_, up, tmp_path))
    storage = MemoryTokenStorage()
    auth = ClientCredentialsOAuthProvider(server_url=gw.url("demo"), storage=storage, client_id="m2m-client",
                                          client_secret="m2m-secret", scope="mcp:read", issuer=as_.issuer)
    tools, results = await call(gw.url("demo"), auth, ("echo", {"text": "hi"}))
    assert results == ["hi"]
    claims = claims_of(storage.tokens.access_token)
    assert claims["aud"] == gw.url("demo") and claims["sub"] == "m2m-client"


async def test_expired_access_token_is_refreshed_without_a_second_login(idp, upstream, gateway, tmp_path) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    gw = await gateway.astart(oauth_config(as_, up, tmp_path, scopes=["mcp:read"]))
    browser, storage = HeadlessBrowser(), MemoryTokenStorage()
    auth = oauth_provider(gw.url("demo"), browser, storage)
    await call(gw.url("demo"), auth, ("echo", {"text": "one"}))
    first = storage.tokens
    assert first.refresh_token, "offline_access should have produced a refresh token"
    auth.context.token_expiry_time = time.time() - 1      # as if the access token had expired
    _, results = await call(gw.url("demo"), auth, ("echo", {"text": "two"}))
    assert results == ["two"]
    assert browser.authorizations == 1
    assert storage.tokens.access_token != first.access_token
    assert claims_of(storage.tokens.access_token)["aud"] == gw.url("demo")


async def test_step_up_after_insufficient_scope_reauthorizes_with_the_union(idp, upstream, gateway, tmp_path) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    policies = tmp_path / "step-up-policies"
    policies.mkdir()
    # Which scopes a tool needs is the policy's call (one decision for list and call).
    (policies / "demo.yaml").write_text(
        "servers:\n"
        "  demo:\n"
        "    destructive: allow\n"
        "    tools:\n"
        "      - {id: echo-reads, match: echo, scopes: [mcp:read]}\n"
        "      - {id: add-writes, match: add, scopes: [mcp:read, mcp:write]}\n"
        "    methods:\n"
        "      - {id: all-methods, match: ['**']}\n")
    config = oauth_config(as_, up, tmp_path, scopes=["mcp:read"])
    config["policies"] = str(policies)
    gw = await gateway.astart(config)
    async with http_client() as http:    # the raw 403 first: status, challenge, body
        token = as_.client_credentials(gw.url("demo"), "mcp:read")
        reply = await post(http, gw.url("demo"), rpc("tools/call", {"name": "add", "arguments": {"a": 1, "b": 1}}),
                           {"Authorization": f"Bearer {token}"})
        assert reply.status == 403 and reply.error_reason == "insufficient_scope"
        challenge = reply.headers["WWW-Authenticate"]
        assert 'error="insufficient_scope"' in challenge and 'scope="mcp:read mcp:write"' in challenge
        assert "resource_metadata=" in challenge
    browser, storage = HeadlessBrowser(), MemoryTokenStorage()
    _, results = await call(gw.url("demo"), oauth_provider(gw.url("demo"), browser, storage),
                            ("echo", {"text": "read is enough"}), ("add", {"a": 20, "b": 22}))
    assert results == ["read is enough", "42"]
    assert browser.authorizations == 2
    assert {"mcp:read", "mcp:write"} <= set(browser.requested[1]["scope"].split())
    assert {"mcp:read", "mcp:write"} <= set(claims_of(storage.tokens.access_token)["scope"].split())


async def test_rotated_signing_key_is_accepted_within_the_cooldown(idp, upstream, gateway, tmp_path) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    cooldown = 1.0
    gw = await gateway.astart(oauth_config(as_, up, tmp_path))
    old = as_.client_credentials(gw.url("demo"))
    async with http_client() as http:
        assert (await post(http, gw.url("demo"), initialize_msg(), {"Authorization": f"Bearer {old}"})).status == 200
        as_.rotate()
        new = as_.client_credentials(gw.url("demo"))
        assert json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))["kid"] == as_.kids[0] != \
            json.loads(base64.urlsafe_b64decode(old.split(".")[0] + "=="))["kid"]
        rotated_at = time.monotonic()
        start = len(gw.log_lines())
        reply = await post(http, gw.url("demo"), initialize_msg(), {"Authorization": f"Bearer {new}"})
        if reply.status != 200:
            # Inside the cool-down since the last fetch: refused now, fetched when it ends.
            assert reply.status == 401 and reply.error_reason == "token_unknown_kid"
            loaded = await asyncio.to_thread(gw.wait_for_log, {"event": "auth.jwks_loaded", "keys": len(as_.kids)},
                                             cooldown + 2.0, start=start)
            assert loaded["issuer"] == as_.issuer
            reply = await post(http, gw.url("demo"), initialize_msg(), {"Authorization": f"Bearer {new}"})
        assert reply.status == 200, reply.body
        assert time.monotonic() - rotated_at <= cooldown + 1.0
        # the previous key is still published, so tokens signed with it stay valid
        assert (await post(http, gw.url("demo"), initialize_msg(), {"Authorization": f"Bearer {old}"})).status == 200


async def test_upstream_gets_a_client_credentials_token_of_its_own(idp, upstream, gateway, tmp_path) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    config = oauth_config(as_, up, tmp_path)
    config["servers"]["demo"]["credentials"] = {"client_credentials": {
        "issuer": as_.issuer, "client_id": "m2m-client", "client_secret": "env:UPSTREAM_SECRET",
        "resource": up.url, "scope": "mcp:read"}}
    gw = await gateway.astart(config, env={"UPSTREAM_SECRET": "m2m-secret"})
    caller = as_.client_credentials(gw.url("demo"), client=("exchange-client", "exchange-secret"))
    async with http_client() as http:
        for _ in range(2):
            reply = await post(http, gw.url("demo"), initialize_msg(), {"Authorization": f"Bearer {caller}"})
            assert reply.status == 200
    seen = [r["headers"].get("authorization") for r in up.records()]
    assert len(seen) == 2 and seen[0] == seen[1], "the upstream token is cached"
    upstream_token = seen[0].removeprefix("Bearer ")
    assert upstream_token != caller
    assert claims_of(upstream_token)["aud"] == up.url and claims_of(upstream_token)["sub"] == "m2m-client"


async def test_token_exchange_gives_the_upstream_an_on_behalf_of_token(idp, upstream, gateway, tmp_path) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    config = oauth_config(as_, up, tmp_path)
    config["servers"]["demo"]["credentials"] = {"token_exchange": {
        "token_url": f"{as_.issuer}/token", "client_id": "exchange-client",
        "client_secret": "env:EXCHANGE_SECRET", "resource": up.url}}
    gw = await gateway.astart(config, env={"EXCHANGE_SECRET": "exchange-secret"})
    caller = as_.client_credentials(gw.url("demo"), "mcp:read")
    async with http_client() as http:
        for _ in range(2):
            reply = await post(http, gw.url("demo"), initialize_msg(), {"Authorization": f"Bearer {caller}"})
            assert reply.status == 200, reply.body
    seen = [r["headers"]["authorization"].removeprefix("Bearer ") for r in up.records()]
    assert len(seen) == 2 and seen[0] == seen[1] != caller
    claims = claims_of(seen[0])
    assert claims["aud"] == up.url and claims["sub"] == "m2m-client" and claims["act"] == {"sub": "exchange-client"}
    exchanges = as_.exchanges()
    assert len(exchanges) == 1 and exchanges[0]["subject_aud"] == gw.url("demo")


@pytest.mark.parametrize("require_audience,status", [(True, 401), (False, 200)])
async def test_opaque_tokens_are_introspected(idp, upstream, gateway, tmp_path, require_audience, status) -> None:
    as_, up = await idp.astart(), await upstream.astart()
    config = oauth_config(as_, up, tmp_path)
    config["auth"]["issuers"][0]["introspection"] = {
        "client_id": "m2m-client", "client_secret": "env:INTROSPECTION_SECRET",
        "require_audience": require_audience}
    gw = await gateway.astart(config, env={"INTROSPECTION_SECRET": "m2m-secret"})
    opaque = as_.client_credentials(None)          # no resource: oidc-provider issues an opaque token
    assert opaque.count(".") == 0
    async with http_client() as http:
        reply = await post(http, gw.url("demo"), initialize_msg(), {"Authorization": f"Bearer {opaque}"})
        assert reply.status == status, reply.body
        if status == 401:
            assert reply.error_reason == "token_wrong_audience"
        junk = await post(http, gw.url("demo"), initialize_msg(), {"Authorization": "Bearer notatokenatall"})
        assert junk.status == 401 and junk.error_reason == "token_inactive"
