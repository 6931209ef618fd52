"""Virtual servers in the 2025-11-25 era: the official SDK client, three real origins, one gateway.

``trio`` publishes server-everything (``ev_``: legacy era only, sampling and elicitation
tools), the SDK upstream with SSE answers and an event store (``alpha__``) and the SDK
upstream with JSON answers (``b_``).  The client's one virtual session opens an upstream
session per origin when it first needs one; server-to-client requests from any origin
reach the client's callbacks and the answers go back to that origin.
"""
from __future__ import annotations

import json
import uuid
import time
from typing import Any

import mcp_types as types
import pytest

from tests.support.clients import (
    ProgressLog, fake_elicitation, fake_roots, fake_sampling, mcp_client,
)
from tests.support.components import Everything, Gateway, Upstream, start_everything
from tests.support.gw_helpers import (
    LEGACY_VERSION, Stack, http_client, initialize, post, read_events, request, rpc, stack,  # noqa: F401
    call_in_progress, next_event,
)


@pytest.fixture(scope="module")
def everything(stack: Stack) -> Everything:
    ev = start_everything(stack.workdir / "everything")
    stack.procs.append(ev.proc)
    return ev


@pytest.fixture(scope="module")
def upstreams(stack: Stack) -> dict[str, Upstream]:
    alpha, beta = stack.upstreams({"retry_interval_ms": 100}, {"json_response": True})
    return {"alpha": alpha, "beta": beta}


@pytest.fixture(scope="module")
def stateless(stack: Stack) -> Upstream:
    """An SDK origin that keeps no sessions (its initialize answer names none)."""
    return stack.upstream(stateless=True)


@pytest.fixture(scope="module")
def gw(stack: Stack, upstreams: dict[str, Upstream], everything: Everything, stateless: Upstream) -> Gateway:
    return stack.gateway({
        "servers": {**upstreams, "ev": everything, "gamma": stateless},
        "virtual_servers": {
            "trio": {"description": "three origins", "origin_timeout": "5s",
                     "include": [{"server": "ev", "prefix": "ev_"}, {"server": "alpha"},
                                 {"server": "beta", "prefix": "b_"}]},
            "sessionless": {"include": [{"server": "gamma", "prefix": "g_"}, {"server": "beta", "prefix": "b_"}]},
        },
    })


def text_of(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


def upstream_sessions(up: Upstream) -> set[str]:
    return {r["headers"]["mcp-session-id"] for r in up.records() if "mcp-session-id" in r["headers"]}


async def test_lists_are_the_prefixed_union_of_three_origins(gw: Gateway) -> None:
    async with mcp_client(gw.url("trio"), era="legacy", sampling_callback=fake_sampling(),
                          elicitation_callback=fake_elicitation()) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
    assert {"ev_echo", "ev_trigger-sampling-request", "ev_trigger-elicitation-request",
            "alpha__echo", "alpha__slow_progress", "b_add"} <= tools
    assert {"alpha__greet", "b_greet"} <= prompts and any(p.startswith("ev_") for p in prompts)
    assert {"file:///srv/shared/readme.txt", "config://app"} <= resources
    assert any(u.startswith("demo://") for u in resources), resources


async def test_calls_reads_and_prompts_reach_each_origin(gw: Gateway) -> None:
    marker = uuid.uuid4().hex
    async with mcp_client(gw.url("trio"), era="legacy") as client:
        assert marker in text_of(await client.call_tool("ev_echo", {"message": marker}))
        assert text_of(await client.call_tool("alpha__add", {"a": 20, "b": 22})) == "42"
        assert text_of(await client.call_tool("b_echo", {"text": marker})) == marker
        config = await client.read_resource("config://app")
        assert json.loads(config.contents[0].text)["region"] == "test-1"
        greeting = await client.get_prompt("b_greet", {"name": "Ada"})
        assert "Ada" in greeting.messages[0].content.text


async def test_progress_notifications_stream_during_a_call(gw: Gateway) -> None:
    async with mcp_client(gw.url("trio"), era="legacy") as client:
        log = ProgressLog()
        result = await client.call_tool("alpha__slow_progress", {"steps": 3, "interval_ms": 50},
                                        progress_callback=log.callback)
    assert text_of(result) == "done after 3 steps"
    assert [p for _, p, _, _ in log.events] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(("tool", "args", "expected"), [
    pytest.param("alpha__ask_sampling", {"prompt": "P"}, "sampled[fake-llm]: R{m}", id="sdk-sampling"),
    pytest.param("alpha__ask_elicitation", {"question": "Q"}, "accepted: A{m}", id="sdk-elicitation"),
    pytest.param("alpha__list_client_roots", {}, '["file:///work/R{m}"]', id="sdk-roots"),
    pytest.param("ev_trigger-sampling-request", {"prompt": "P"}, "R{m}", id="everything-sampling"),
    pytest.param("ev_trigger-elicitation-request", {}, "A{m}", id="everything-elicitation"),
])
async def test_server_to_client_requests_reach_the_client_and_their_answers_the_origin(
        gw: Gateway, tool: str, args: dict[str, Any], expected: str) -> None:
    marker = uuid.uuid4().hex[:8]
    async with mcp_client(gw.url("trio"), era="legacy", sampling_callback=fake_sampling(reply=f"R{marker}"),
                          elicitation_callback=fake_elicitation(content={"answer": f"A{marker}",
                                                                         "name": f"A{marker}"}),
                          list_roots_callback=fake_roots(f"file:///work/R{marker}")) as client:
        result = await client.call_tool(tool, args)
    assert not result.is_error, result
    assert expected.format(m=marker) in "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_delete_ends_every_origin_session(gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("trio"))
        listed = await post(http, gw.url("trio"), rpc("tools/list"), session_id=sid)
        assert listed.status == 200 and listed.messages[-1]["result"]["tools"]
        # server-everything names its session on every answer: the client only ever sees its own.
        echoed = await post(http, gw.url("trio"), rpc("tools/call", {"name": "ev_echo",
                                                                      "arguments": {"message": "m"}}), session_id=sid)
        assert echoed.status == 200 and echoed.headers.get("Mcp-Session-Id") == sid
        mine = {}
        for name, up in upstreams.items():
            inits = [r for r in up.records("initialize") if r["headers"].get("mcp-session-id") is None]
            assert inits
            mine[name] = [r["headers"]["mcp-session-id"] for r in up.records("tools/list")][-1]
        deleted = await request(http, "DELETE", gw.url("trio"), headers={"Mcp-Session-Id": sid})
        assert deleted.status == 200
        for name, up in upstreams.items():
            # The origin forgot the session: a request in it is 404 there.
            direct = await post(http, up.url, rpc("tools/list"), session_id=mine[name])
            assert direct.status == 404, (name, direct)
        after = await post(http, gw.url("trio"), rpc("tools/list"), session_id=sid)
        assert after.status == 404 and after.error_reason == "session_not_found"


async def test_the_clients_roots_list_changed_reaches_every_open_origin_session(
        gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("trio"))
        listed = await post(http, gw.url("trio"), rpc("prompts/list"), session_id=sid)   # opens every origin
        assert listed.status == 200
        for up in upstreams.values():
            up.clear_records()
        note = await post(http, gw.url("trio"), rpc("notifications/roots/list_changed", id=None), session_id=sid)
        assert note.status == 202
    for name, up in upstreams.items():
        assert len(up.records("notifications/roots/list_changed")) == 1, name


async def test_an_origin_without_sessions_is_served_in_a_virtual_session(gw: Gateway, stateless: Upstream) -> None:
    async with mcp_client(gw.url("sessionless"), era="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"g_echo", "b_echo"} <= tools
        assert text_of(await client.call_tool("g_add", {"a": 2, "b": 5})) == "7"
        assert text_of(await client.call_tool("b_add", {"a": 2, "b": 6})) == "8"
        # A replica keeps one route per (virtual session, origin), a sessionless origin's too:
        # a second session's calls, interleaved with the first's, are its own.
        async with mcp_client(gw.url("sessionless"), era="legacy") as other:
            for n in range(3):
                assert text_of(await client.call_tool("g_echo", {"text": f"first {n}"})) == f"first {n}"
                assert text_of(await other.call_tool("g_echo", {"text": f"second {n}"})) == f"second {n}"
        assert text_of(await client.call_tool("g_add", {"a": 1, "b": 1})) == "2"   # after the other's DELETE
    calls = stateless.records("tools/call")
    assert len(calls) >= 8 and all("mcp-session-id" not in r["headers"] for r in calls)


async def test_a_cancellation_reaches_the_origin_running_the_call(gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("trio"))
        call = rpc("tools/call", {"name": "alpha__slow_progress", "arguments": {"steps": 100, "interval_ms": 100},
                                  "_meta": {"progressToken": "long"}})
        async with call_in_progress(http, gw.url("trio"), sid, call):
            cancel = rpc("notifications/cancelled", {"requestId": call["id"], "reason": "enough"}, id=None)
            note = await post(http, gw.url("trio"), cancel, session_id=sid)
            assert note.status == 202
    (sent,) = upstreams["alpha"].records("notifications/cancelled")
    assert sent["body"]["params"]["requestId"] == call["id"]
    running = upstreams["alpha"].records("tools/call")[-1]
    assert sent["headers"]["mcp-session-id"] == running["headers"]["mcp-session-id"]


async def test_a_cancellation_naming_a_running_integer_id_as_a_string_is_not_taken_for_it(
        gw: Gateway, upstreams: dict[str, Upstream]) -> None:
    # JSON-RPC ids 7 and "7" are different requests.  The gateway's registry of running calls keys
    # by the id itself, so a cancellation of "7" is not routed as the cancellation of running call
    # 7: it is not a call this replica runs, so (as one that reached another replica) it goes to
    # every origin open in the session, as sent.  (What an origin then does is its own: the
    # Python SDK's server cancels its request 7 on "7", as it would through the origin's mount.)
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("trio"))
        opened = await post(http, gw.url("trio"), rpc("tools/call", {"name": "b_add", "arguments": {"a": 1, "b": 2}}),
                            session_id=sid)
        assert opened.status == 200
        for up in upstreams.values():
            up.clear_records()
        call = rpc("tools/call", {"name": "alpha__slow_progress", "arguments": {"steps": 4, "interval_ms": 100},
                                  "_meta": {"progressToken": "typed"}})
        assert isinstance(call["id"], int)
        async with call_in_progress(http, gw.url("trio"), sid, call) as events:
            cancel = rpc("notifications/cancelled", {"requestId": str(call["id"]), "reason": "typed"}, id=None)
            note = await post(http, gw.url("trio"), cancel, session_id=sid)
            assert note.status == 202
            while ((await next_event(events)).message or {}).get("id") != call["id"]:   # the answer
                pass
    for name in ("alpha", "beta"):
        sent = upstreams[name].records("notifications/cancelled")
        assert [r["body"]["params"]["requestId"] for r in sent] == [str(call["id"])], name


async def test_when_an_origin_ends_its_stream_the_merged_stream_ends_and_a_reconnect_loses_nothing(
        gw: Gateway) -> None:
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("trio"))
        get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}

        async def announce(start: int, close: bool) -> None:
            call = rpc("tools/call", {"name": "alpha__announce",
                                      "arguments": {"start": start, "count": 1, "close_stream": close}})
            assert (await post(http, gw.url("trio"), call, session_id=sid)).status == 200

        def logged(events: list[Any]) -> list[str]:
            return [e.message["params"]["data"] for e in events
                    if e.message and e.message.get("method") == "notifications/message"]

        before: list[Any] = []
        async with http.get(gw.url("trio"), headers=get_headers) as stream:
            assert stream.status == 200
            events = read_events(stream)
            await announce(1, close=False)
            while "announcement 1" not in logged(before):
                before.append(await next_event(events))
            await announce(2, close=True)
            before += [ev async for ev in events]          # it ends: alpha closed its stream
        last = [e.id for e in before if e.id][-1]
        after: list[Any] = []
        async with http.get(gw.url("trio"), headers={**get_headers, "Last-Event-ID": last}) as stream:
            assert stream.status == 200
            await announce(3, close=False)
            events = read_events(stream)
            while "announcement 3" not in logged(after):
                after.append(await next_event(events))
    # Whether announcement 2 beat the close on the live stream or was replayed from alpha's
    # event store on the reconnect, each arrived once, in order.
    assert logged(before) + logged(after) == ["announcement 1", "announcement 2", "announcement 3"]


async def test_the_merged_streams_200_means_each_origin_stream_is_open(stack: Stack) -> None:
    """An origin slow to open its GET stream: what it sends once the client holds the 200 still arrives
    (as from the origin itself, whose 200 means its stream exists)."""
    slow = stack.upstream(get_delay_ms=400)
    gw = stack.gateway({"servers": {"slow": slow}, "virtual_servers": {"solo": {"include": [{"server": "slow"}]}}})
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("solo"))
        get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}
        async with http.get(gw.url("solo"), headers=get_headers) as stream:
            assert stream.status == 200
            call = rpc("tools/call", {"name": "slow__announce", "arguments": {"start": 1, "count": 1}})
            assert (await post(http, gw.url("solo"), call, session_id=sid)).status == 200
            events = read_events(stream)
            ev = await next_event(events)
            while ev.message is None:
                ev = await next_event(events)
            assert ev.message["method"] == "notifications/message"
            assert ev.message["params"]["data"] == "announcement 1"


@pytest.mark.parametrize(("chosen", "sent"), [
    ("2025-06-18", "2025-06-18"),
    ("2025-03-26", "2025-03-26"),
    ("2026-07-28", LEGACY_VERSION),          # not a session era: the client's version stays
    ("1999-01-01\r\nX-Evil: 1", LEGACY_VERSION),   # hostile text never becomes a header
    (20250618, LEGACY_VERSION),
])
async def test_each_origin_is_spoken_to_in_the_version_it_negotiated(
        gateway: Any, evil: Any, tmp_path: Any, chosen: Any, sent: str) -> None:
    """The client's virtual session speaks 2025-11-25; an origin that answers initialize with
    2025-06-18 gets MCP-Protocol-Version: 2025-06-18 on every later request (as the spec asks of
    a client), not the client's version it may not support.  An answer naming anything but a
    2025 session revision changes nothing."""
    from tests.support.evil_upstream import http as raw_http
    from tests.support.gw_helpers import with_policy

    async def older(e: Any, rid: Any, msg: dict[str, Any]) -> bytes:
        return raw_http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "protocolVersion": chosen, "capabilities": {"tools": {}},
            "serverInfo": {"name": "older", "version": "1"}}}).encode(),
            "application/json", "Mcp-Session-Id: older-session-1")

    async def call(e: Any, rid: Any, msg: dict[str, Any]) -> bytes:
        return raw_http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "content": [{"type": "text", "text": "ok"}]}}).encode())

    evil.scripts.update({"initialize": older, "tools/call": call})
    gw = await gateway.astart(with_policy({"servers": {"old": {"url": evil.url}},
                                           "virtual_servers": {"v": {"include": [{"server": "old"}]}}}, tmp_path))
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("v"))              # 2025-11-25 with the virtual server
        for _ in range(2):
            reply = await post(http, gw.url("v"), rpc("tools/call", {"name": "old__safe_tool", "arguments": {}}),
                               session_id=sid)
            assert reply.status == 200
            assert reply.response_to(reply.messages[-1]["id"])["result"]["content"][0]["text"] == "ok"
    seen = [(json.loads(b).get("method"), h.get("mcp-protocol-version"))
            for m, h, b in evil.requests if m == "POST"]
    assert seen[0][0] == "initialize"
    assert seen[1:] == [("notifications/initialized", sent), ("tools/call", sent), ("tools/call", sent)], seen


@pytest.mark.parametrize("names_session", [True, False], ids=["origin-names-its-session", "origin-names-none"])
async def test_a_routed_answer_names_the_clients_session_where_a_mount_would_name_its_own(
        gateway: Any, evil: Any, tmp_path: Any, names_session: bool) -> None:
    """As on the origin's mount, a call's answer carries Mcp-Session-Id when the origin's answer names
    its session, and then it is the client's own (virtual) session id, never the origin's."""
    from tests.support.evil_upstream import http as raw_http
    from tests.support.gw_helpers import with_policy

    async def call(e: Any, rid: Any, msg: dict[str, Any]) -> bytes:
        named = ("Mcp-Session-Id: evil-session-1",) if names_session else ()
        return raw_http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "content": [{"type": "text", "text": "ok"}]}}).encode(), "application/json", *named)

    evil.scripts["tools/call"] = call
    gw = await gateway.astart(with_policy({"servers": {"evil": {"url": evil.url}},
                                           "virtual_servers": {"v": {"include": [{"server": "evil"}]}}}, tmp_path))
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("v"))
        routed = await post(http, gw.url("v"), rpc("tools/call", {"name": "evil__safe_tool", "arguments": {}}),
                            session_id=sid)
        mount_sid, _ = await initialize(http, gw.url("evil"))
        direct = await post(http, gw.url("evil"), rpc("tools/call", {"name": "safe_tool", "arguments": {}}),
                            session_id=mount_sid)
    assert routed.status == direct.status == 200
    assert routed.headers.get("Mcp-Session-Id") == (sid if names_session else None)
    assert direct.headers.get("Mcp-Session-Id") == (mount_sid if names_session else None)


async def test_an_origin_that_stalls_its_stream_holds_the_merged_200_no_longer_than_origin_timeout(
        stack: Stack) -> None:
    """The merged stream waits for each origin's stream to open (see above), but an origin that
    stalls its GET (here for 20 s) delays the client's 200 by at most ``origin_timeout``."""
    stalled = stack.upstream(get_delay_ms=20_000)
    gw = stack.gateway({"servers": {"stalled": stalled},
                        "virtual_servers": {"solo": {"origin_timeout": "0.5s", "include": [{"server": "stalled"}]}}})
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("solo"))
        get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}
        started = time.monotonic()
        async with http.get(gw.url("solo"), headers=get_headers) as stream:
            waited = time.monotonic() - started
            assert stream.status == 200 and stream.content_type == "text/event-stream"
    assert 0.4 <= waited < 3.0, waited
