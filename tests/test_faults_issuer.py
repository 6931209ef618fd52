"""Issuer faults through the running gateway: JWKS unreachable, garbage metadata.

A token from an issuer whose keys cannot be had is neither accepted nor called
invalid: the gateway answers ``503`` (``issuer_unavailable``, fail closed, the
client may retry), logs ``auth.jwks_fetch_failed`` and counts the fetch in
``mcpgw_auth_jwks_fetches_total``; the upstream never sees the request.

Key rotation under load (a real oidc-provider): eight clients call a tool back to
back while the issuer publishes a new signing key, signs with it, then retires the
old one.  No 5xx; new-key tokens are refused only as an unknown kid inside the
refetch cool-down; old-key tokens are served while published and refused ``401``
``invalid_token`` once the gateway has seen the key go (``auth.keys_removed``).
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.gw_helpers import allow_all, http_client, initialize, post, rpc
from tests.support.procs import free_port


@pytest.fixture
async def garbage_issuer() -> AsyncIterator[str]:
    """An issuer whose metadata documents are not JSON."""
    async def garbage(_request: web.Request) -> web.Response:
        return web.Response(body=b"\x00<html>not metadata{", content_type="application/json")
    app = web.Application()
    app.router.add_get("/{tail:.*}", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("which", ["unreachable", "garbage_metadata"])
async def test_a_token_from_an_issuer_whose_keys_cannot_be_had_is_503_and_never_forwarded(
        gateway: Any, upstream: Any, garbage_issuer: str, tmp_path: Path, which: str) -> None:
    issuer = f"http://127.0.0.1:{free_port()}" if which == "unreachable" else garbage_issuer
    up = await upstream.astart()
    gw = await gateway.astart({"auth": {"issuers": [{"issuer": issuer}]},
                               "servers": {"up": {"url": up.url}}, "policies": allow_all(tmp_path)})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode({"iss": issuer, "sub": "alice", "aud": gw.url("up"), "iat": now, "exp": now + 300},
                       key, algorithm="RS256", headers={"kid": "k1", "typ": "at+jwt"})
    async with http_client() as client:
        init = rpc("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                  "clientInfo": {"name": "faults", "version": "0"}})
        started = time.monotonic()
        reply = await post(client, gw.url("up"), init, {"Authorization": f"Bearer {token}"}, version=None)
        assert time.monotonic() - started < 10
        assert reply.status == 503, reply
        assert reply.json["error"]["data"]["reason"] == "issuer_unavailable", reply.json
        gw.wait_for_log({"event": "auth.jwks_fetch_failed", "issuer": issuer})
        text = await (await client.get(gw.admin_url + "/metrics")).text()
        assert re.search(r'^mcpgw_auth_jwks_fetches_total\{issuer="%s",outcome="(?!ok")[^"]+"\} [1-9]'
                         % re.escape(issuer), text, re.M), [ln for ln in text.splitlines() if "jwks" in ln]
    assert up.records("initialize") == []


# -- key rotation under load ----------------------------------------------------------------

CLIENTS = 8
SWITCHED = range(CLIENTS // 2)              # these clients take a token signed with the new key


def _kid(token: str) -> str:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]


@dataclass
class Outcome:
    client: int
    kid: str
    sent: float
    status: int
    reason: str | None
    challenge: str


class Load:
    """``CLIENTS`` clients, each on its own session, calling a tool back to back with ``tokens[i]``."""

    def __init__(self, http: Any, url: str, tokens: list[str], sessions: list[str]) -> None:
        self.http, self.url, self.tokens, self.sessions = http, url, tokens, sessions
        self.outcomes: list[Outcome] = []
        self.progress = asyncio.Event()
        self.stop = asyncio.Event()

    async def run(self, i: int) -> None:
        call = rpc("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})
        while not self.stop.is_set():
            token = self.tokens[i]
            sent = time.monotonic()
            reply = await post(self.http, self.url, call, {"Authorization": f"Bearer {token}"},
                               session_id=self.sessions[i])
            if reply.status == 200:
                assert reply.messages[-1]["result"]["content"][0]["text"] == "5", reply
            self.outcomes.append(Outcome(i, _kid(token), sent, reply.status, reply.error_reason,
                                         reply.headers.get("WWW-Authenticate", "")))
            self.progress.set()

    def count(self, i: int, *, kid: str, after: float = 0.0, status: int | None = None) -> int:
        return sum(1 for o in self.outcomes if o.client == i and o.kid == kid and o.sent >= after
                   and (status is None or o.status == status))

    async def until(self, done: Any, what: str, timeout: float = 20.0) -> None:
        """Wait (on the clients' progress, no sleeping) until ``done()`` holds."""
        async def wait() -> None:
            while not done():
                self.progress.clear()
                await self.progress.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"under load, never: {what}") from None


async def test_a_signing_key_rotated_under_load_is_followed_with_no_5xx_and_the_old_key_refused_once_retired(
        idp: Any, upstream: Any, gateway: Any, tmp_path: Path) -> None:
    as_, up = await idp.astart(), await upstream.astart(json_response=True)
    gw = await gateway.astart({
        "auth": {"issuers": [{"issuer": as_.issuer, "jwks_cooldown": "1s", "jwks_refresh": "1s"}]},
        "servers": {"up": {"url": up.url, "pinning": {"mode": "off"}}}, "policies": allow_all(tmp_path)})
    url = gw.url("up")
    old = await asyncio.to_thread(as_.client_credentials, url)
    old_kid = _kid(old)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS * 2),
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        sessions = [(await initialize(http, url, {"Authorization": f"Bearer {old}"}))[0] for _ in range(CLIENTS)]
        load = Load(http, url, [old] * CLIENTS, sessions)
        clients = [asyncio.create_task(load.run(i)) for i in range(CLIENTS)]
        try:
            await load.until(lambda: all(load.count(i, kid=old_kid, status=200) >= 5 for i in range(CLIENTS)),
                             "every client served with the first key")

            # The issuer rotates: a new current key, the old one still published.
            await asyncio.to_thread(as_.rotate)
            new = await asyncio.to_thread(as_.client_credentials, url)
            new_kid = _kid(new)
            assert new_kid != old_kid and as_.kids == [new_kid, old_kid]
            switched_at = time.monotonic()
            for i in SWITCHED:
                load.tokens[i] = new
            await load.until(lambda: all(load.count(i, kid=new_kid, status=200) >= 5 for i in SWITCHED)
                             and all(load.count(i, kid=old_kid, after=switched_at, status=200) >= 5
                                     for i in range(CLIENTS) if i not in SWITCHED),
                             "new-key tokens accepted while old-key tokens still are")

            # The old key leaves the JWKS: once the gateway has refreshed, its tokens are refused.
            start = len(gw.log_lines())
            retired_at = time.monotonic()
            await asyncio.to_thread(as_.retire)
            removed = await asyncio.to_thread(gw.wait_for_log, {"event": "auth.keys_removed"}, 10.0, start=start)
            removed_seen = time.monotonic()
            assert removed["kids"] == [old_kid] and removed["issuer"] == as_.issuer
            await load.until(lambda: all(load.count(i, kid=old_kid, after=removed_seen) >= 5
                                         for i in range(CLIENTS) if i not in SWITCHED)
                             and all(load.count(i, kid=new_kid, after=removed_seen, status=200) >= 5
                                     for i in SWITCHED),
                             "old-key tokens refused, new-key tokens served")
        finally:
            load.stop.set()
            await asyncio.gather(*clients)

    outcomes = load.outcomes
    assert not [o for o in outcomes if o.status >= 500], "no 5xx during the rotation"
    # New-key tokens: the first one's unknown kid fetched the keys at once (no unknown kid was
    # seen within the cool-down before), the others waited for that fetch: none refused.
    new_refused = [o for o in outcomes if o.kid == new_kid and o.status != 200]
    assert new_refused == [], new_refused[:3]
    # Old-key tokens: every one accepted while the key was published, every one sent after the
    # gateway dropped the key refused 401 invalid_token; only those in between may go either way.
    old_outcomes = [o for o in outcomes if o.kid == old_kid]
    assert all(o.status == 200 for o in old_outcomes if o.sent < retired_at)
    late_old = [o for o in old_outcomes if o.sent >= removed_seen]
    assert late_old and all(o.status == 401 and o.reason == "token_unknown_kid"
                            and 'error="invalid_token"' in o.challenge for o in late_old), late_old[:3]
    between = [o for o in old_outcomes if retired_at <= o.sent < removed_seen]
    assert all(o.status == 200 or (o.status == 401 and o.reason == "token_unknown_kid") for o in between)
    ok = sum(1 for o in outcomes if o.status == 200)
    assert ok + len([o for o in old_outcomes if o.status == 401]) == len(outcomes)
    print(f"rotation under load: {len(outcomes)} calls by {CLIENTS} clients, {ok} served, 0 5xx, "
          f"0 new-kid refusals; old-kid: {sum(1 for o in old_outcomes if o.status == 200)} served, "
          f"{len(late_old)} refused after removal, {len(between)} in between; removal seen "
          f"{removed_seen - retired_at:.2f} s after the issuer retired the key (jwks_refresh 1 s)")
