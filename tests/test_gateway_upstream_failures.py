"""Upstream failures through the gateway: nothing listening, killed mid-stream, too slow.

Before the response starts the gateway answers with an HTTP error and a JSON-RPC body
carrying the request id; after it started, the error goes in-band as a JSON-RPC error
event for that id, and the gateway keeps serving everyone else.
"""
from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.components import Gateway, Upstream
from tests.support.gw_helpers import (
    LEGACY_VERSION, Event, Stack, http_client, initialize, modern_headers, modern_params, next_event, post,
    read_events, request, rpc, stack,  # noqa: F401  (fixture)
)
from tests.support.procs import free_port

GATEWAY_ERROR = -32000
ERAS = ["legacy", "modern"]


@pytest.fixture(scope="module")
def ups(stack: Stack) -> dict[str, Upstream]:
    """Each mount has its own upstream, so a test that kills or stalls one leaves the rest alone."""
    names = ["healthy", "victim-legacy", "victim-modern", "slow-json"]
    options = [{"json_response": True} if name == "slow-json" else {} for name in names]
    return dict(zip(names, stack.upstreams(*options)))


@pytest.fixture(scope="module")
def gw(stack: Stack, ups: dict[str, Upstream]) -> Gateway:
    servers: dict[str, Any] = {name: {"url": up.url} for name, up in ups.items()}
    servers["dead"] = {"url": f"http://127.0.0.1:{free_port()}/mcp"}        # nothing listens there
    servers["slow-json"]["read_timeout"] = "300ms"
    servers["slow-sse"] = {"url": ups["healthy"].url, "read_timeout": "300ms"}   # same upstream, own mount
    servers["redirecting"] = {"url": ups["healthy"].url + "/"}     # Starlette answers 307 -> /mcp
    return stack.gateway({"servers": servers})


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with http_client() as client:
        yield client


def call(tool: str, args: dict[str, Any], era: str, token: str = "p") -> tuple[dict[str, Any], dict[str, str]]:
    """A tools/call message and the headers for it in ``era`` (legacy carries a progress token)."""
    if era == "modern":
        params = modern_params({"name": tool, "arguments": args})
        params["_meta"]["progressToken"] = token
        return rpc("tools/call", params), modern_headers("tools/call", tool)
    return rpc("tools/call", {"name": tool, "arguments": args, "_meta": {"progressToken": token}}), {}


async def session_for(http: Any, url: str, era: str) -> str | None:
    return (await initialize(http, url))[0] if era == "legacy" else None


def assert_error(message: dict[str, Any], rpc_id: Any, reason: str) -> None:
    assert message["jsonrpc"] == "2.0" and message["id"] == rpc_id, message
    assert (message["error"]["code"], message["error"]["data"]["reason"]) == (GATEWAY_ERROR, reason)


@pytest.mark.parametrize("era", ERAS)
async def test_an_upstream_with_nothing_listening_is_502_with_the_request_id(http: Any, gw: Gateway, era: str) -> None:
    if era == "legacy":
        body = rpc("initialize", {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                                  "clientInfo": {"name": "t", "version": "0"}}, id=7)
        reply = await post(http, gw.url("dead"), body, version=None)
    else:
        body = rpc("tools/list", modern_params(), id="seven")
        reply = await post(http, gw.url("dead"), body, modern_headers("tools/list"), version=None)
    assert reply.status == 502
    assert reply.headers["Content-Type"].startswith("application/json")
    assert_error(reply.json, body["id"], "upstream_unavailable")


async def test_an_upstream_redirect_is_502_and_its_location_never_reaches_the_client(http: Any, gw: Gateway) -> None:
    body = rpc("tools/list", modern_params(), id="redirected")
    reply = await post(http, gw.url("redirecting"), body, modern_headers("tools/list"), version=None)
    assert reply.status == 502
    assert "Location" not in reply.headers
    assert_error(reply.json, "redirected", "upstream_redirect")


@pytest.mark.parametrize("era", ERAS)
async def test_an_upstream_killed_mid_stream_ends_the_stream_with_an_in_band_error_and_the_gateway_keeps_serving(
        http: Any, gw: Gateway, ups: dict[str, Upstream], era: str) -> None:
    mount = f"victim-{era}"
    victim = ups[mount]
    sid = await session_for(http, gw.url(mount), era)
    body, headers = call("slow_progress", {"steps": 200, "interval_ms": 50}, era)
    headers.update({"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                    "MCP-Protocol-Version": headers.get("MCP-Protocol-Version", LEGACY_VERSION)})
    if sid:
        headers["Mcp-Session-Id"] = sid
    events: list[Event] = []
    async with http.post(gw.url(mount), json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        stream = read_events(resp)
        while not any(e.data and e.message.get("method") == "notifications/progress" for e in events):
            events.append(await next_event(stream))
        os.kill(victim.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(victim.proc.popen.wait, 10)
        events.extend([e async for e in _until_eof(stream)])
    last = events[-1].message
    assert_error(last, body["id"], "upstream_stream_broken")
    assert not any(e.data and e.message.get("id") == body["id"] and "result" in e.message for e in events)
    # Everyone else is still served; the dead mount answers 502 straight away.
    ok = await post(http, gw.url("healthy"), rpc("tools/list", modern_params(), id="after"),
                    modern_headers("tools/list"), version=None)
    assert ok.status == 200 and "result" in ok.response_to("after")
    again = await post(http, gw.url(mount), rpc("tools/list", modern_params(), id="again"),
                       modern_headers("tools/list"), version=None)
    assert again.status == 502 and again.error_reason == "upstream_unavailable"
    assert (await request(http, "GET", gw.admin_url + "/healthz")).status == 200
    assert gw.proc.returncode is None


async def _until_eof(stream: AsyncIterator[Event], timeout: float = 10.0) -> AsyncIterator[Event]:
    async with asyncio.timeout(timeout):
        async for event in stream:
            yield event


@pytest.mark.parametrize("era", ERAS)
async def test_an_upstream_silent_past_read_timeout_before_answering_is_504(http: Any, gw: Gateway, era: str) -> None:
    # A JSON-response upstream sends its headers only with the result.
    sid = await session_for(http, gw.url("slow-json"), era)
    body, headers = call("slow_progress", {"steps": 2, "interval_ms": 1200}, era)
    reply = await post(http, gw.url("slow-json"), body, headers, session_id=sid,
                       version=None if era == "modern" else LEGACY_VERSION)
    assert reply.status == 504
    assert_error(reply.json, body["id"], "upstream_timeout")
    fast = rpc("tools/call", modern_params({"name": "add", "arguments": {"a": 1, "b": 1}}))
    assert (await post(http, gw.url("slow-json"), fast, modern_headers("tools/call", "add"),
                       version=None)).status == 200


@pytest.mark.parametrize("era", ERAS)
async def test_a_stream_silent_past_read_timeout_ends_with_an_in_band_timeout_error(
        http: Any, gw: Gateway, era: str) -> None:
    sid = await session_for(http, gw.url("slow-sse"), era)
    body, headers = call("slow_progress", {"steps": 2, "interval_ms": 1200}, era)
    reply = await post(http, gw.url("slow-sse"), body, headers, session_id=sid,
                       version=None if era == "modern" else LEGACY_VERSION)
    assert reply.status == 200
    progress = [m for m in reply.messages if m and m.get("method") == "notifications/progress"]
    assert [p["params"]["progress"] for p in progress] == [1]
    assert_error(reply.messages[-1], body["id"], "upstream_timeout")
    gw.wait_for_log({"event": "upstream.stream_silent", "server": "slow-sse"})
    metrics = (await request(http, "GET", gw.admin_url + "/metrics")).body.decode()
    assert 'mcpgw_upstream_errors_total{reason="timeout",server="slow-sse"}' in metrics


# -- a kept-alive connection closed by the upstream as a request arrives (#15 item 7) ----------

EVIL_POLICY = """\
servers:
  evil:
    default: deny
    tools:
      - {id: evil-safe, match: safe_tool, destructive: allow}
"""


async def _evil_gateway(gateway: Any, evil: Any, tmp_path: Any) -> Gateway:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "evil.yaml").write_text(EVIL_POLICY)
    return await gateway.astart({"servers": {"evil": {"url": evil.url, "pinning": {"mode": "off"}}},
                                 "policies": str(tmp_path / "policies")})


async def test_a_clients_answer_to_a_server_request_survives_a_keep_alive_close_race(
        gateway: Any, evil: Any, tmp_path: Any) -> None:
    """The conformance suite's elicitation scenario timed out now and then: the client's answer
    went out on a kept-alive connection the upstream was closing, the gateway answered 502, the
    SDK dropped the error and the server waited for the answer until its 60 s timeout.  A POST
    carrying only an answer is now sent again on a fresh connection."""
    evil.hang_up = lambda n, body: n > 0 and b'"result"' in body and not evil.hung_up
    gw = await _evil_gateway(gateway, evil, tmp_path)
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        answer = {"jsonrpc": "2.0", "id": "elicit-1", "result": {"action": "accept", "content": {"name": "x"}}}
        reply = await post(client, gw.url("evil"), answer, session_id=sid)
    assert reply.status == 202, reply
    assert len(evil.hung_up) == 1                                   # the race happened once ...
    delivered = [b for m, _, b in evil.requests if m == "POST" and b'"elicit-1"' in b]
    assert len(delivered) == 1                                      # ... and the answer still arrived


async def test_a_request_is_never_sent_twice_when_the_upstream_closes_as_it_arrives(
        gateway: Any, evil: Any, tmp_path: Any) -> None:
    evil.hang_up = lambda n, body: n > 0 and b'"tools/call"' in body
    gw = await _evil_gateway(gateway, evil, tmp_path)
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        call = rpc("tools/call", {"name": "safe_tool", "arguments": {}})
        reply = await post(client, gw.url("evil"), call, session_id=sid)
    assert reply.status == 502 and reply.json["error"]["data"]["reason"] == "upstream_unavailable", reply
    assert len(evil.hung_up) == 1                                   # a call with effects goes once
