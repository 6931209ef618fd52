"""Transport hygiene through the gateway: Origin/Host, tokens in the URL, what headers cross
to the upstream (and which never do), and the admin/public listener split.

What reached the upstream is read from its record file, never inferred from the reply.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.components import Gateway, Upstream
from tests.support.gw_helpers import with_policy  # noqa: E402
from tests.support.gw_helpers import (
    Stack, http_client, modern_headers, modern_params, post, request, rpc, stack,  # noqa: F401  (fixture)
)

UPSTREAM_KEY = "e2e-upstream-key-" + uuid.uuid4().hex
UPSTREAM_BEARER = "e2e-upstream-bearer-" + uuid.uuid4().hex
UPSTREAM_COOKIE = "e2e-upstream-cookie-" + uuid.uuid4().hex
APP_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def upstreams(stack: Stack) -> list[Upstream]:
    # The second answers 401 unless it gets its own bearer token; the third sets a cookie
    # on every response (reached by a host name: cookie jars refuse cookies from IPs).
    return stack.upstreams({}, {"require_bearer": UPSTREAM_BEARER},
                           {"set_cookie": f"upstream-session={UPSTREAM_COOKIE}", "dns_rebinding_protection": False})


@pytest.fixture(scope="module")
def up(upstreams: list[Upstream]) -> Upstream:
    return upstreams[0]


@pytest.fixture(scope="module")
def guarded(upstreams: list[Upstream]) -> Upstream:
    return upstreams[1]


@pytest.fixture(scope="module")
def cookie_setter(upstreams: list[Upstream]) -> Upstream:
    return upstreams[2]


@pytest.fixture(scope="module")
def gw(stack: Stack, up: Upstream, guarded: Upstream, cookie_setter: Upstream) -> Gateway:
    return stack.gateway(
        {"servers": {
            "up": {"url": up.url, "credentials": {"header": "X-Api-Key", "value": "env:E2E_UPSTREAM_KEY"},
                   "forward_headers": ["X-End-To-End"]},
            "guarded": {"url": guarded.url,
                        "credentials": {"header": "Authorization", "value": "env:E2E_UPSTREAM_BEARER"}},
            "guarded-nocreds": {"url": guarded.url},
            "cookies": {"url": cookie_setter.url.replace("127.0.0.1", "localhost")},
        },
         "http": {"allowed_origins": [APP_ORIGIN]}},
        env={"E2E_UPSTREAM_KEY": UPSTREAM_KEY, "E2E_UPSTREAM_BEARER": f"Bearer {UPSTREAM_BEARER}"},
    )


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with http_client() as client:
        yield client


def listed(rpc_id: Any) -> dict[str, Any]:
    return rpc("tools/list", modern_params(), id=rpc_id)


def record_of(up: Upstream, rpc_id: Any) -> dict[str, Any] | None:
    found = [r for r in up.records() if r["jsonrpc_id"] == rpc_id]
    assert len(found) <= 1
    return found[0] if found else None


def assert_refused(reply: Any, status: int, code: int, reason: str, rpc_id: Any) -> None:
    assert reply.status == status, (reply.status, reply.body)
    body = reply.json
    assert (body["jsonrpc"], body["id"], body["error"]["code"], reply.error_reason) == ("2.0", rpc_id, code, reason)


# --------------------------------------------------------------------------- Origin and Host

ORIGIN_CASES = [
    ("no Origin", None, None),
    ("same origin as public_url", "SELF", None),
    ("configured allowed origin", APP_ORIGIN, None),
    ("allowed origin, other scheme", "http://app.example.com", "origin_rejected"),
    ("foreign origin", "https://evil.example", "origin_rejected"),
    ("opaque origin", "null", "origin_rejected"),
]


@pytest.mark.parametrize(("origin", "refusal"), [c[1:] for c in ORIGIN_CASES], ids=[c[0] for c in ORIGIN_CASES])
async def test_a_present_origin_that_is_not_allowed_is_refused_with_403(
        http: Any, gw: Gateway, up: Upstream, origin: str | None, refusal: str | None) -> None:
    rpc_id = f"origin-{uuid.uuid4().hex[:8]}"
    headers = modern_headers("tools/list")
    if origin is not None:
        headers["Origin"] = gw.base_url if origin == "SELF" else origin
    reply = await post(http, gw.url("up"), listed(rpc_id), headers, version=None)
    if refusal is None:
        assert reply.status == 200 and record_of(up, rpc_id) is not None
    else:
        assert_refused(reply, 403, -32003, refusal, rpc_id=None)
        assert record_of(up, rpc_id) is None


HOST_CASES = [
    ("another host name", "evil.example", None),
    ("localhost instead of the public host", "localhost:{port}", None),
    ("public host without its port", "127.0.0.1", None),
    ("DNS rebinding: foreign Host and Origin", "evil.example", "http://evil.example"),
]


@pytest.mark.parametrize(("host", "origin"), [c[1:] for c in HOST_CASES], ids=[c[0] for c in HOST_CASES])
async def test_a_host_that_is_not_the_public_host_is_refused(http: Any, gw: Gateway, up: Upstream,
                                                             host: str, origin: str | None) -> None:
    rpc_id = f"host-{uuid.uuid4().hex[:8]}"
    headers = modern_headers("tools/list", Host=host.format(port=gw.config["listen"]["port"]))
    if origin:
        headers["Origin"] = origin
    reply = await post(http, gw.url("up"), listed(rpc_id), headers, version=None)
    assert 400 <= reply.status < 500
    assert reply.error_reason in ("host_rejected", "origin_rejected")
    assert record_of(up, rpc_id) is None


QUERY_CASES = [("access_token", "token_in_query"), ("token", "token_in_query"), ("bearer", "token_in_query"),
               ("unrelated", None)]


@pytest.mark.parametrize(("param", "refusal"), QUERY_CASES, ids=[c[0] for c in QUERY_CASES])
async def test_a_token_in_the_query_string_is_refused(http: Any, gw: Gateway, up: Upstream, param: str,
                                                      refusal: str | None) -> None:
    rpc_id = f"query-{uuid.uuid4().hex[:8]}"
    reply = await post(http, f"{gw.url('up')}?{param}=eyJhbGciOi.secret", listed(rpc_id),
                       modern_headers("tools/list"), version=None)
    if refusal is None:
        assert reply.status == 200
        assert record_of(up, rpc_id)["query"] == ""      # the client's query string stays here
    else:
        assert_refused(reply, 400, -32600, refusal, rpc_id=None)
        assert record_of(up, rpc_id) is None


async def test_methods_other_than_get_post_delete_are_refused_with_405(http: Any, gw: Gateway) -> None:
    reply = await request(http, "PUT", gw.url("up"), headers={"Content-Type": "application/json"}, data=b"{}")
    assert reply.status == 405 and reply.error_reason == "method_not_allowed"
    assert set(reply.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST", "DELETE", "OPTIONS"}


# --------------------------------------------------------------------------- headers to the upstream

CLIENT_SECRET_HEADERS = {
    "Authorization": "Bearer client-token-that-must-stay-here",
    "Cookie": "session=client-cookie",
    "Proxy-Authorization": "Basic Y2xpZW50OnNlY3JldA==",
}
HOP_BY_HOP = {
    "Connection": "keep-alive, X-Hop-Secret",
    "X-Hop-Secret": "listed in Connection, so hop-by-hop",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Proxy-Connection": "keep-alive",
    "Forwarded": "for=203.0.113.9",
    "X-Forwarded-For": "203.0.113.9",
    "X-Forwarded-Host": "evil.example",
}


async def test_client_credentials_and_hop_by_hop_headers_never_reach_the_upstream_and_configured_ones_do(
        http: Any, gw: Gateway, up: Upstream) -> None:
    rpc_id = f"hdr-{uuid.uuid4().hex[:8]}"
    headers = modern_headers("tools/list", **CLIENT_SECRET_HEADERS, **HOP_BY_HOP,
                             **{"X-Api-Key": "forged-by-the-client", "X-End-To-End": "kept",
                                "X-Not-Listed": "dropped"})
    reply = await post(http, gw.url("up"), listed(rpc_id), headers, version=None)
    assert reply.status == 200
    seen = record_of(up, rpc_id)["headers"]
    for name in [*CLIENT_SECRET_HEADERS, *HOP_BY_HOP]:
        if name == "Connection":
            assert "x-hop-secret" not in seen.get("connection", "").lower()
            continue
        assert name.lower() not in seen, name
    assert seen["x-api-key"] == UPSTREAM_KEY            # configured credential, not the client's copy
    assert seen["x-end-to-end"] == "kept"             # servers.up.forward_headers
    assert "x-not-listed" not in seen                  # not on the allow-list
    assert seen["host"] == f"127.0.0.1:{up.port}"
    assert seen["mcp-method"] == "tools/list"


async def test_a_configured_authorization_credential_replaces_the_clients_token(
        http: Any, gw: Gateway, guarded: Upstream) -> None:
    rpc_id = f"bearer-{uuid.uuid4().hex[:8]}"
    headers = modern_headers("tools/list", Authorization="Bearer client-token-that-must-stay-here")
    reply = await post(http, gw.url("guarded"), listed(rpc_id), headers, version=None)
    assert reply.status == 200, reply.body
    assert record_of(guarded, rpc_id)["headers"]["authorization"] == f"Bearer {UPSTREAM_BEARER}"


async def test_an_upstream_auth_challenge_becomes_502_and_is_never_relayed(
        http: Any, gw: Gateway, guarded: Upstream) -> None:
    rpc_id = f"challenge-{uuid.uuid4().hex[:8]}"
    headers = modern_headers("tools/list", Authorization=f"Bearer {UPSTREAM_BEARER}")   # not passed through
    reply = await post(http, gw.url("guarded-nocreds"), listed(rpc_id), headers, version=None)
    assert_refused(reply, 502, -32000, "upstream_auth_refused", rpc_id)
    assert "WWW-Authenticate" not in reply.headers
    assert "authorization" not in record_of(guarded, rpc_id)["headers"]


async def test_an_upstreams_cookies_are_neither_relayed_nor_replayed_to_it_for_the_next_caller(
        http: Any, gw: Gateway, cookie_setter: Upstream) -> None:
    # One connection pool serves every principal: a cookie jar in it would hand one
    # caller's upstream session cookie to the next caller.
    ids = [f"cookie-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)]
    for rpc_id in ids:
        reply = await post(http, gw.url("cookies"), listed(rpc_id), modern_headers("tools/list"), version=None)
        assert reply.status == 200, reply.body
        assert "Set-Cookie" not in reply.headers
    for rpc_id in ids:
        seen = record_of(cookie_setter, rpc_id)
        assert seen is not None and seen["headers"]["host"] == f"localhost:{cookie_setter.port}"
        assert "cookie" not in seen["headers"], seen["headers"]


# A configured credential holding CR/LF no longer reaches this point: check and serve refuse it
# (tests/test_gateway_config.py::test_an_empty_or_newline_secret_is_refused_by_check_and_at_start);
# a token an AS issues at run time is still never written with CR/LF (tests/test_upstream_http.py).


# --------------------------------------------------------------------------- listeners

@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/", "/mcp", "/mcp/up/extra"])
async def test_the_public_listener_serves_only_mcp_mounts(http: Any, gw: Gateway, path: str) -> None:
    reply = await request(http, "GET", gw.base_url + path)
    assert reply.status == 404
    assert reply.json["error"]["code"] == -32601 and reply.error_reason == "not_found"
    assert b"mcpgw_" not in reply.body


async def test_an_unknown_mount_is_404_with_a_json_rpc_body(http: Any, gw: Gateway) -> None:
    reply = await post(http, gw.url("nope"), listed("unknown-mount"), modern_headers("tools/list"), version=None)
    assert reply.status == 404 and reply.error_reason == "unknown_server"


async def test_health_readiness_and_metrics_live_on_the_admin_listener(http: Any, gw: Gateway) -> None:
    refused = await post(http, gw.url("up"), listed("metrics-refused"),
                         modern_headers("tools/list", Origin="https://evil.example"), version=None)
    assert refused.status == 403
    assert (await post(http, gw.url("up"), listed("metrics-ok"), modern_headers("tools/list"), version=None)).status == 200
    health = await request(http, "GET", gw.admin_url + "/healthz")
    ready = await request(http, "GET", gw.admin_url + "/readyz")
    assert (health.status, health.json["status"]) == (200, "ok")
    assert (ready.status, ready.json["status"], ready.json["store"]) == (200, "ready", "ok")
    metrics = await request(http, "GET", gw.admin_url + "/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert 'mcpgw_requests_total{method="tools/list",server="up",status="200"}' in text
    assert 'mcpgw_rejections_total{reason="origin_rejected",server="up"}' in text
    for family in ("mcpgw_request_duration_seconds_bucket", "mcpgw_inflight_requests", "mcpgw_build_info"):
        assert family in text
    # The forwarding pool kept the connection that served the request alive.
    pool = {state: float(n) for state, n in re.findall(
        r'^mcpgw_upstream_connections\{server="up",state="(open|idle)"\} (\S+)$', text, re.M)}
    assert pool.keys() == {"open", "idle"} and pool["open"] >= pool["idle"] >= 1, pool
    assert (await request(http, "GET", gw.admin_url + "/mcp/up")).status == 404


# -- CORS for browser clients on allowed origins ------------------------------------------


async def test_a_preflight_from_an_allowed_origin_is_answered_by_the_gateway_with_cors_headers(  # noqa: E501
        tmp_path: Any, gateway: Any, upstream: Any) -> None:
    import aiohttp
    up = await upstream.astart()
    gw = await gateway.astart(with_policy({"servers": {"up": up},
                                           "http": {"allowed_origins": ["https://inspector.example"]}},
                                          tmp_path))
    async with aiohttp.ClientSession() as http:
        async with http.options(gw.url("up"), headers={
                "Origin": "https://inspector.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id"}) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://inspector.example"
            allowed = resp.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed and "mcp-session-id" in allowed
        async with http.options(gw.url("up"), headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["data"]["reason"] == "origin_rejected"
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with http.post(gw.url("up"), json=body, headers={
                "Origin": "https://inspector.example", "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": "2025-11-25"}) as resp:
            assert resp.headers.get("Access-Control-Allow-Origin") == "https://inspector.example"
            assert "mcp-session-id" in resp.headers["Access-Control-Expose-Headers"].lower()
    assert all(r["method"] != "OPTIONS" for r in up.records())
