"""Virtual servers end to end: the official SDK client, real SDK upstreams, one gateway process.

``alpha`` (SSE answers) is published whole with the default prefix, ``beta`` (JSON answers)
as a subset under ``b_``, and ``hole`` is a listening socket that never answers: its share
of every list must be left out within ``origin_timeout`` while the others keep working.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import mcp_types as types
import pytest

from tests.support.clients import (
    ProgressLog, fake_elicitation, fake_roots, fake_sampling, mcp_client, raises_mcp_error,
)
from tests.support.components import Gateway, Upstream
from tests.support.pin_cases import metric
from tests.support.gw_helpers import (
    LEGACY_VERSION, Stack, call_in_progress, http_client, initialize, modern_headers, modern_params, post, rpc,
    stack,  # noqa: F401
)

ORIGIN_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def hole() -> Iterator[str]:
    """A TCP port that accepts connections (kernel backlog) and never answers a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    finally:
        sock.close()


@pytest.fixture(scope="module")
def upstreams(stack: Stack) -> dict[str, Upstream]:
    alpha, beta = stack.upstreams({}, {"json_response": True})
    return {"alpha": alpha, "beta": beta}


@pytest.fixture(scope="module")
def gw(stack: Stack, upstreams: dict[str, Upstream], hole: str) -> Gateway:
    return stack.gateway({
        "servers": {**upstreams, "hole": {"url": hole}},
        "virtual_servers": {
            "team": {"description": "alpha, part of beta", "origin_timeout": f"{ORIGIN_TIMEOUT}s",
                     "include": [{"server": "alpha"},
                                 {"server": "beta", "prefix": "b_", "tools": ["add", "ec*"],
                                  "prompts": ["greet"]}]},
            "flaky": {"origin_timeout": f"{ORIGIN_TIMEOUT}s",
                      "include": [{"server": "alpha"}, {"server": "hole"}]},
        },
    })


def text_of(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


async def test_tools_list_is_the_namespaced_union_of_the_origins(gw: Gateway) -> None:
    async with mcp_client(gw.url("team"), era="modern") as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert {"alpha__echo", "alpha__add", "alpha__slow_progress", "b_add", "b_echo"} <= names
    assert not any(n.startswith("b_") and n not in ("b_add", "b_echo") for n in names)   # the subset
    assert not any(n in ("echo", "add") for n in names)                                    # always namespaced


async def test_a_client_that_probes_with_server_discover_settles_on_2026_07_28(gw: Gateway) -> None:
    async with mcp_client(gw.url("team"), era="auto") as client:
        assert "b_add" in {t.name for t in (await client.list_tools()).tools}
        assert text_of(await client.call_tool("b_add", {"a": 2, "b": 3})) == "5"


async def test_a_get_or_delete_on_the_virtual_server_is_405(gw: Gateway) -> None:
    async with http_client() as http:
        for method in ("GET", "DELETE"):
            async with http.request(method, gw.url("team"), headers={"MCP-Protocol-Version": "2026-07-28",
                                                                      "Accept": "text/event-stream"}) as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "POST"


async def test_each_published_tool_records_its_origin(gw: Gateway) -> None:
    async with http_client() as http:
        reply = await post(http, gw.url("team"), rpc("tools/list", modern_params()),
                           modern_headers("tools/list"), version=None)
    tools = reply.response_to(reply.messages[-1]["id"])["result"]["tools"]
    origins = {t["name"]: t["_meta"]["io.mcpgw/origin"] for t in tools}
    assert origins["alpha__echo"] == "alpha" and origins["b_echo"] == "beta"


async def test_tools_call_reaches_the_origin_under_its_original_name(gw: Gateway,
                                                                    upstreams: dict[str, Upstream]) -> None:
    upstreams["beta"].clear_records()
    seen = len(gw.log_lines())
    marker = f"virtual {uuid.uuid4()}"
    async with mcp_client(gw.url("team"), era="modern") as client:
        assert text_of(await client.call_tool("alpha__add", {"a": 20, "b": 22})) == "42"
        assert text_of(await client.call_tool("b_echo", {"text": marker})) == marker
        await client.list_resources()
    record = gw.wait_for_log(lambda r: r.get("event") == "mcp.request" and r.get("method") == "tools/call"
                             and r.get("server") == "beta" and r.get("via") == "team", start=seen)
    assert (record["target"], record["decision"], record["outcome"]) == ("echo", "allow", "ok")  # the origin's record
    # One audit record per client request: the routed call's is the origin's, none for the virtual server
    # (a resources/list, answered by the virtual server itself after the calls, is the fence).
    gw.wait_for_log({"event": "mcp.request", "server": "team", "method": "resources/list"}, start=seen)
    calls = [r for r in gw.json_logs() if r.get("event") == "mcp.request" and r.get("method") == "tools/call"]
    assert not [r for r in calls if r.get("server") == "team"]
    calls = upstreams["beta"].records("tools/call")
    assert len(calls) == 1
    assert calls[0]["headers"]["mcp-name"] == "echo"
    assert marker in json.dumps(calls[0])


async def test_progress_streams_through_the_virtual_server_while_the_call_runs(gw: Gateway) -> None:
    steps, interval_ms = 4, 150
    async with mcp_client(gw.url("team"), era="modern") as client:
        log = ProgressLog()
        result = await client.call_tool("alpha__slow_progress", {"steps": steps, "interval_ms": interval_ms},
                                        progress_callback=log.callback)
        done = log.elapsed()
    assert text_of(result) == f"done after {steps} steps"
    assert [p for _, p, _, _ in log.events] == [float(s) for s in range(1, steps + 1)]
    assert done - log.events[0][0] >= (steps - 2) * interval_ms / 1000     # relayed as emitted, not buffered


@pytest.mark.parametrize(("tool", "args", "expected"), [
    pytest.param("alpha__ask_sampling", {"prompt": "P"}, "sampled[fake-llm]: R{m}", id="sampling"),
    pytest.param("alpha__ask_elicitation", {"question": "Q"}, "accepted: A{m}", id="elicitation"),
    pytest.param("alpha__list_client_roots", {}, '["file:///work/R{m}"]', id="roots"),
])
async def test_input_required_round_trips_reach_the_client_and_return_to_the_origin(
        gw: Gateway, upstreams: dict[str, Upstream], tool: str, args: dict[str, Any], expected: str) -> None:
    upstreams["alpha"].clear_records()
    marker = uuid.uuid4().hex[:8]
    async with mcp_client(gw.url("team"), era="modern", sampling_callback=fake_sampling(reply=f"R{marker}"),
                          elicitation_callback=fake_elicitation(content={"answer": f"A{marker}"}),
                          list_roots_callback=fake_roots(f"file:///work/R{marker}")) as client:
        result = await client.call_tool(tool, args)
    assert text_of(result) == expected.format(m=marker)
    first, retry = upstreams["alpha"].records("tools/call")
    assert first["body"]["params"]["name"] == retry["body"]["params"]["name"] == tool.split("__", 1)[1]
    assert marker in json.dumps(retry["body"]["params"]["inputResponses"])


@pytest.mark.parametrize("name", ["b_slow_progress", "alpha_echo", "echo", "b_", "zz__add"])
async def test_a_name_the_virtual_server_does_not_publish_is_an_unknown_tool(gw: Gateway, name: str) -> None:
    async with mcp_client(gw.url("team"), era="modern") as client:
        with raises_mcp_error(-32602):
            await client.call_tool(name, {"text": "x"})


async def test_resources_and_prompts_are_merged_and_routed(gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    async with mcp_client(gw.url("team"), era="modern") as client:
        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        assert {"file:///srv/shared/readme.txt", "config://app"} <= uris
        config = await client.read_resource("config://app")
        assert json.loads(config.contents[0].text)["region"] == "test-1"
        templated = await client.read_resource("notes://n-7")       # from a template, never listed
        assert templated.contents[0].text == "note n-7"
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert prompts == {"alpha__greet", "alpha__summarize", "b_greet"}
        greeting = await client.get_prompt("b_greet", {"name": "Ada"})
        assert "Ada" in greeting.messages[0].content.text


async def test_a_silent_origin_is_left_out_within_its_timeout_and_the_rest_still_works(gw: Gateway) -> None:
    async with http_client() as http:
        started = time.monotonic()
        reply = await post(http, gw.url("flaky"), rpc("tools/list", modern_params()),
                           modern_headers("tools/list"), version=None)
        took = time.monotonic() - started
    result = reply.response_to(reply.messages[-1]["id"])["result"]
    assert ORIGIN_TIMEOUT <= took < ORIGIN_TIMEOUT + 3.0
    assert result["_meta"]["io.mcpgw/omittedOrigins"] == [{"server": "hole", "reason": "timeout"}]
    assert (result["cacheScope"], result["ttlMs"]) == ("private", 0)      # an incomplete list is not cached
    assert "alpha__echo" in {t["name"] for t in result["tools"]}
    omitted = gw.wait_for_log(lambda r: r.get("event") == "virtual.origin_omitted" and r.get("server") == "hole")
    assert (omitted["virtual"], omitted["reason"]) == ("flaky", "timeout")
    assert await metric(gw.admin_url, "mcpgw_virtual_origin_omitted_total", virtual="flaky", server="hole",
                        reason="timeout") >= 1
    async with mcp_client(gw.url("flaky"), era="modern") as client:
        assert text_of(await client.call_tool("alpha__add", {"a": 1, "b": 2})) == "3"


async def test_a_forged_or_foreign_cursor_is_refused(gw: Gateway) -> None:
    async with http_client() as http:
        for cursor in ("bm9wZQ", "x" * 5000, 7):
            reply = await post(http, gw.url("team"), rpc("tools/list", modern_params({"cursor": cursor})),
                               modern_headers("tools/list"), version=None)
            assert reply.json["error"]["code"] == -32602
            assert reply.error_reason == "cursor_invalid"


async def test_a_2025_11_25_initialize_is_answered_by_the_gateway_with_a_virtual_session(
        gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    before = {name: len(up.records()) for name, up in upstreams.items()}
    async with http_client() as http:
        init = rpc("initialize", {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                                  "clientInfo": {"name": "t", "version": "0"}})
        reply = await post(http, gw.url("team"), init, version=None)
    assert reply.status == 200 and reply.headers["Mcp-Session-Id"]
    result = reply.messages[-1]["result"]
    assert (result["protocolVersion"], result["serverInfo"]["name"]) == (LEGACY_VERSION, "team")
    assert set(result["capabilities"]) >= {"tools", "resources", "prompts"}
    # Origin sessions are opened when first needed, not at initialize.
    assert {name: len(up.records()) for name, up in upstreams.items()} == before


async def test_a_method_the_virtual_server_cannot_route_is_method_not_found(gw: Gateway) -> None:
    async with http_client() as http:
        reply = await post(http, gw.url("team"), rpc("logging/setLevel", modern_params({"level": "info"})),
                           modern_headers("logging/setLevel"), version=None)
    assert reply.json["error"]["code"] == -32601


def _unused(_: Any) -> None:    # keeps the fixture import visible to linters
    return None


async def test_hostile_requests_to_the_virtual_mount_get_json_rpc_errors_and_never_reach_an_origin(
        gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    """The virtual mount runs the same front stages as a mount: an oversized body is 413, a body
    that is not JSON-RPC is 400, a request whose Mcp-Method contradicts its body is refused; none
    of them is fanned out to an origin, and the gateway keeps answering."""
    before = {name: len(up.records()) for name, up in upstreams.items()}
    url = gw.url("team")
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               **modern_headers("tools/list")}
    async with http_client() as http:
        huge = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"x":"' + b"a" * (5 << 20) + b'"}}'
        async with http.post(url, data=huge, headers=headers) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 413 and body["error"]["data"]["reason"] == "body_too_large", body
        for raw in (b"\xff\xfe not json", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":[[[[]',
                    b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]'):    # invalid UTF-8, broken, a batch
            async with http.post(url, data=raw, headers=headers) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 400 and body["error"]["code"] < 0 and body["error"]["data"]["reason"], body
        liar = rpc("tools/call", modern_params({"name": "alpha__echo", "arguments": {"text": "x"}}))
        reply = await post(http, url, liar, modern_headers("tools/list"), version=None)
        assert reply.status == 400 and reply.json["error"]["data"]["reason"], reply.json
        sane = await post(http, url, rpc("tools/list", modern_params()), modern_headers("tools/list"), version=None)
        assert sane.status == 200 and sane.json["result"]["tools"]
    after = {name: len(up.records()) for name, up in upstreams.items()}
    # Only the sane listing reached the origins (one tools/list each).
    assert all(after[n] - before[n] <= 1 for n in after), (before, after)


async def test_in_a_2025_11_25_session_a_silent_origin_is_left_out_and_the_rest_still_works(gw: Gateway) -> None:
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("flaky"))
        started = time.monotonic()
        reply = await post(http, gw.url("flaky"), rpc("tools/list"), session_id=sid)
        took = time.monotonic() - started
        result = reply.messages[-1]["result"]
        assert ORIGIN_TIMEOUT <= took < ORIGIN_TIMEOUT + 3.0
        assert result["_meta"]["io.mcpgw/omittedOrigins"] == [{"server": "hole", "reason": "timeout"}]
        assert "alpha__echo" in {t["name"] for t in result["tools"]}
        call = rpc("tools/call", {"name": "alpha__add", "arguments": {"a": 1, "b": 2}})
        added = await post(http, gw.url("flaky"), call, session_id=sid)
        assert added.response_to(call["id"])["result"]["content"][0]["text"] == "3"
        # The merged stream opens too, within origin_timeout, without the silent origin.
        started = time.monotonic()
        async with http.get(gw.url("flaky"), headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid,
                                                       "MCP-Protocol-Version": LEGACY_VERSION}) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert time.monotonic() - started < ORIGIN_TIMEOUT + 3.0


async def test_concurrent_first_uses_of_an_origin_open_one_upstream_session(
        gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("team"))
        upstreams["beta"].clear_records()
        calls = [rpc("tools/call", {"name": "b_add", "arguments": {"a": i, "b": 1}}) for i in range(6)]
        replies = await asyncio.gather(*(post(http, gw.url("team"), c, session_id=sid) for c in calls))
        assert [r.response_to(c["id"])["result"]["content"][0]["text"] for r, c in zip(replies, calls)] == \
            [str(i + 1) for i in range(6)]
    records = upstreams["beta"].records()
    assert len([r for r in records if r["jsonrpc_method"] == "initialize"]) == 1
    assert len({r["headers"].get("mcp-session-id") for r in records if r["jsonrpc_method"] == "tools/call"}) == 1


async def test_a_routed_call_is_counted_once_under_its_origin(stack: Stack, upstreams: dict[str, Upstream]) -> None:
    """requests_total counts client requests: a call routed to beta counts under beta (like its audit
    record), never a second time under the virtual server.  (A gateway of its own: exact counts.)"""
    gw = stack.gateway({"servers": upstreams,
                        "virtual_servers": {"team": {"include": [{"server": "beta", "prefix": "b_"}]}}})
    labels = {"method": "tools/call", "status": "200"}
    async with mcp_client(gw.url("team"), era="modern") as client:
        await client.list_tools()                  # answered by the virtual server itself
        for i in range(3):
            assert text_of(await client.call_tool("b_echo", {"text": f"count {i}"})) == f"count {i}"
    # Each answer here is one JSON body: its request was tallied before it was sent, and a scrape
    # of this one-process gateway flushes the tallies first.  So the counts are final now.
    assert await metric(gw.admin_url, "mcpgw_requests_total", server="team", method="tools/list") >= 1
    assert await metric(gw.admin_url, "mcpgw_requests_total", server="beta", **labels) == 3
    assert await metric(gw.admin_url, "mcpgw_requests_total", server="team", **labels) == 0


async def test_a_routed_call_in_progress_is_in_flight_at_its_origin_only(
        stack: Stack, upstreams: dict[str, Upstream]) -> None:
    """mcpgw_inflight_requests follows requests_total: a call routed to alpha is in flight under alpha
    while it runs, not under the virtual server as well.  (A gateway of its own: exact levels.)"""
    gw = stack.gateway({"servers": upstreams, "virtual_servers": {"team": {"include": [{"server": "alpha"}]}}})
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("team"))
        call = rpc("tools/call", {"name": "alpha__slow_progress", "arguments": {"steps": 50, "interval_ms": 100},
                                  "_meta": {"progressToken": "inflight"}})
        async with call_in_progress(http, gw.url("team"), sid, call):
            assert await metric(gw.admin_url, "mcpgw_inflight_requests", server="alpha") == 1
            assert await metric(gw.admin_url, "mcpgw_inflight_requests", server="team") == 0


@pytest.mark.parametrize("client_headers", [{}, {"Mcp-Method": "tools/call", "mcp-name": "b_echo"}],
                         ids=["without-mcp-headers", "with-the-published-name"])
async def test_a_2025_11_25_call_reaches_the_origin_without_the_published_name_in_any_header(
        gw: Gateway, upstreams: dict[str, Upstream], client_headers: dict[str, str]) -> None:
    """2025-11-25 clients need not send Mcp-Method/Mcp-Name (2026-07-28 headers): the origin then
    gets none, as from its mount.  A client that sends them, naming the published tool, never gets
    that name to the origin: the origin's headers name its own tool."""
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("team"))
        upstreams["beta"].clear_records()
        reply = await post(http, gw.url("team"), rpc("tools/call", {"name": "b_echo", "arguments": {"text": "hi"}}),
                           client_headers, session_id=sid)
        assert reply.status == 200
        assert reply.response_to(reply.messages[-1]["id"])["result"]["content"][0]["text"] == "hi"
    (call,) = upstreams["beta"].records("tools/call")
    sent = call["headers"]
    assert call["body"]["params"]["name"] == "echo"
    assert "b_echo" not in json.dumps(sent)
    if client_headers:
        assert (sent["mcp-method"], sent["mcp-name"]) == ("tools/call", "echo")
    else:
        assert "mcp-method" not in sent and "mcp-name" not in sent
    assert sent["mcp-protocol-version"] == LEGACY_VERSION
