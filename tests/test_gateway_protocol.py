"""Streamable HTTP through the gateway, spoken raw: header/body checks, bodies the gateway
refuses, sessions it owns, ``Last-Event-ID`` resumption, and pass-through of what it does not know.

Every refusal is asserted on its HTTP status, JSON-RPC code and ``error.data.reason``, and
on the upstream's record file showing the refused message never reached it.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.support.clients import ProgressLog, mcp_client
from tests.support.components import Gateway, Upstream
from tests.support.gw_helpers import (
    ACCEPT, LEGACY_VERSION, MODERN_VERSION, Stack, b64_header, http_client, initialize, modern_headers,
    modern_params, next_event, post, read_events, request, rpc, stack,  # noqa: F401  (fixture)
)

MAX_BODY = 64 * 1024
HEADER_MISMATCH, PARSE_ERROR, INVALID_REQUEST, SESSION_NOT_FOUND = -32020, -32700, -32600, -32001


@pytest.fixture(scope="module")
def up(stack: Stack) -> Upstream:
    # retry_interval lets reconnecting_progress close its stream for a Last-Event-ID resume.
    return stack.upstream(retry_interval_ms=50)


@pytest.fixture(scope="module")
def gw(stack: Stack, up: Upstream) -> Gateway:
    return stack.gateway({"servers": {"up": up, "twin": {"url": up.url}},
                          "limits": {"max_body_bytes": MAX_BODY}})


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with http_client() as client:
        yield client


def reached_upstream(up: Upstream, rpc_id: Any) -> bool:
    return any(r["jsonrpc_id"] == rpc_id for r in up.records())


def assert_refused(reply: Any, status: int, code: int, reason: str, rpc_id: Any = None) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json
    assert body["jsonrpc"] == "2.0" and body["id"] == rpc_id
    assert (body["error"]["code"], reply.error_reason) == (code, reason)


# --------------------------------------------------------------------------- 2026-07-28 headers vs body

def _call(name: str) -> dict[str, Any]:
    return rpc("tools/call", modern_params({"name": name, "arguments": {"text": "hi"}}))


HEADER_CASES = [
    # (id, body, headers, expected: None = forwarded, else the refusal reason)
    ("headers agree", _call("echo"), modern_headers("tools/call", "echo"), None),
    ("Mcp-Method names another method", _call("echo"), modern_headers("tools/list", "echo"), "header_mismatch"),
    ("Mcp-Name names another tool", _call("echo"), modern_headers("tools/call", "add"), "header_mismatch"),
    ("base64 Mcp-Name that matches", _call("echo"), modern_headers("tools/call", b64_header("echo")), None),
    ("base64 Mcp-Name that does not match", _call("echo"),
     modern_headers("tools/call", b64_header("delete_file")), "header_mismatch"),
    ("base64 non-ASCII Mcp-Name that matches", _call("écho-☃"),
     modern_headers("tools/call", b64_header("écho-☃")), None),
    ("malformed base64 Mcp-Name", _call("echo"), modern_headers("tools/call", "=?base64?@@@?="), "header_malformed"),
    ("Mcp-Method missing", _call("echo"), {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Name": "echo"},
     "header_missing"),
    ("Mcp-Name missing on tools/call", _call("echo"), modern_headers("tools/call"), "header_missing"),
    ("Mcp-Name on a method that has no name", rpc("tools/list", modern_params()),
     modern_headers("tools/list", "echo"), "header_mismatch"),
    ("resources/read URI mismatch", rpc("resources/read", modern_params({"uri": "config://app"})),
     modern_headers("resources/read", "file:///srv/private/credentials.env"), "header_mismatch"),
    ("_meta protocolVersion disagrees with the header",
     rpc("tools/list", {"_meta": {"io.modelcontextprotocol/protocolVersion": "2025-11-25"}}),
     modern_headers("tools/list"), "header_mismatch"),
]


@pytest.mark.parametrize(("body", "headers", "refusal"), [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
async def test_modern_headers_must_agree_with_the_body_or_the_request_is_refused_with_32020(
        http: Any, gw: Gateway, up: Upstream, body: dict[str, Any], headers: dict[str, str],
        refusal: str | None) -> None:
    reply = await post(http, gw.url("up"), body, headers, version=None)
    if refusal is None:
        assert reply.status == 200, reply.body
        assert "result" in reply.response_to(body["id"]) or "error" in reply.response_to(body["id"])
        assert reached_upstream(up, body["id"])
    else:
        assert_refused(reply, 400, HEADER_MISMATCH, refusal, body["id"])
        assert not reached_upstream(up, body["id"])


async def test_a_legacy_request_with_a_contradicting_mcp_method_header_is_refused(
        http: Any, gw: Gateway, up: Upstream) -> None:
    sid, _ = await initialize(http, gw.url("up"))
    body = rpc("tools/call", {"name": "echo", "arguments": {"text": "x"}})
    reply = await post(http, gw.url("up"), body, {"Mcp-Method": "tools/list"}, session_id=sid)
    assert_refused(reply, 400, HEADER_MISMATCH, "header_mismatch", body["id"])
    assert not reached_upstream(up, body["id"])


async def test_unknown_mcp_param_headers_are_forwarded_untouched(http: Any, gw: Gateway, up: Upstream) -> None:
    body = _call("echo")
    extra = {"Mcp-Param-Text": "hi", "Mcp-Param-Future-Thing": b64_header("ünïcode"),
             "Mcp-Param-Trace": "  spaced value ; x=1"}
    reply = await post(http, gw.url("up"), body, modern_headers("tools/call", "echo", **extra), version=None)
    assert reply.status == 200
    (record,) = [r for r in up.records() if r["jsonrpc_id"] == body["id"]]
    for name, value in extra.items():
        assert record["headers"][name.lower()] == value.strip()  # HTTP trims only the ends
    assert (record["headers"]["mcp-method"], record["headers"]["mcp-name"]) == ("tools/call", "echo")
    assert record["headers"]["mcp-protocol-version"] == MODERN_VERSION


# --------------------------------------------------------------------------- bodies the gateway refuses

def _chunks(data: bytes, size: int = 8192) -> Any:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i:i + size]
    return gen()


BIG = orjson.dumps(rpc("tools/call", {"name": "echo", "arguments": {"text": "x" * (MAX_BODY + 1)}}, id="big"))

BODY_CASES = [
    # (id, body bytes, content type, status, JSON-RPC code, reason)
    ("batch array", orjson.dumps([rpc("tools/list", id="b1"), rpc("ping", id="b2")]), "application/json",
     400, INVALID_REQUEST, "batch_rejected"),
    ("empty batch", b"[]", "application/json", 400, INVALID_REQUEST, "batch_rejected"),
    ("invalid JSON", b'{"jsonrpc": "2.0", "id": "bad", "method": ', "application/json",
     400, PARSE_ERROR, "parse_error"),
    ("empty body", b"", "application/json", 400, PARSE_ERROR, "parse_error"),
    ("not a JSON-RPC object", b'"tools/list"', "application/json", 400, INVALID_REQUEST, "invalid_jsonrpc"),
    ("wrong jsonrpc version", b'{"jsonrpc": "1.0", "id": "v1", "method": "ping"}', "application/json",
     400, INVALID_REQUEST, "invalid_jsonrpc"),
    ("oversized body with Content-Length", BIG, "application/json", 413, INVALID_REQUEST, "body_too_large"),
    ("not JSON at all", b"method=ping", "application/x-www-form-urlencoded", 415, INVALID_REQUEST,
     "unsupported_media_type"),
]


@pytest.mark.parametrize(("data", "ctype", "status", "code", "reason"), [c[1:] for c in BODY_CASES],
                         ids=[c[0] for c in BODY_CASES])
async def test_bodies_that_are_not_one_acceptable_json_rpc_message_are_refused_before_the_upstream(
        http: Any, gw: Gateway, up: Upstream, data: bytes, ctype: str, status: int, code: int,
        reason: str) -> None:
    before = len(up.records())
    reply = await post(http, gw.url("up"), data, {"Content-Type": ctype})
    assert_refused(reply, status, code, reason)
    assert len(up.records()) == before


async def test_an_oversized_chunked_body_is_refused_with_413(http: Any, gw: Gateway, up: Upstream) -> None:
    before = len(up.records())
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", "MCP-Protocol-Version": LEGACY_VERSION}
    async with http.post(gw.url("up"), data=_chunks(BIG), headers=headers) as resp:
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        body = await resp.json()
        assert resp.status == 413
    assert (body["error"]["code"], body["error"]["data"]["reason"]) == (INVALID_REQUEST, "body_too_large")
    assert len(up.records()) == before


async def test_a_body_just_under_the_limit_is_forwarded(http: Any, gw: Gateway, up: Upstream) -> None:
    text = "y" * (MAX_BODY - 1024)
    body = rpc("tools/call", modern_params({"name": "echo", "arguments": {"text": text}}))
    reply = await post(http, gw.url("up"), body, modern_headers("tools/call", "echo"), version=None)
    assert reply.status == 200
    assert reply.response_to(body["id"])["result"]["content"][0]["text"] == text


# --------------------------------------------------------------------------- pass-through

@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_unknown_methods_and_future_fields_reach_the_upstream_as_the_value_checked(
        http: Any, gw: Gateway, up: Upstream, era: str) -> None:
    rpc_id = f"future-{uuid.uuid4().hex[:6]}"
    meta_fields = dict(modern_params()["_meta"])
    if era == "legacy":         # a body that names its protocol version must agree with the header
        meta_fields["io.modelcontextprotocol/protocolVersion"] = LEGACY_VERSION
    meta = orjson.dumps(meta_fields)[:-1] + b',"x.example/field":[1,2.50,{"deep":null}]}'
    raw = (b'{"jsonrpc":"2.0","id":"' + rpc_id.encode() + b'","method":"vendor/future",'
           b'"params":{"_meta":' + meta + b',"unknownField":"kept"}  }')
    if era == "modern":
        reply = await post(http, gw.url("up"), raw, modern_headers("vendor/future"), version=None)
    else:
        sid, _ = await initialize(http, gw.url("up"))
        reply = await post(http, gw.url("up"), raw, session_id=sid)
    # The upstream's own answer (the SDK says 404 in 2026-07-28, 200 + error in 2025-11-25), relayed.
    assert reply.status == (404 if era == "modern" else 200)
    error = reply.response_to(rpc_id)["error"]
    assert error["code"] == -32601 and error["data"] == "vendor/future"
    (record,) = [r for r in up.records() if r["jsonrpc_id"] == rpc_id]
    # Not byte for byte (the spelling was not canonical: the gateway forwards its own
    # serialisation of what it checked), but every field, unknown ones included, arrives.
    assert record["body"] == orjson.loads(raw)
    assert record["body_bytes"] == len(orjson.dumps(orjson.loads(raw)))


# --------------------------------------------------------------------------- sessions the gateway owns

async def test_the_gateway_mints_its_own_session_id_and_never_shows_the_upstreams(
        http: Any, gw: Gateway, up: Upstream) -> None:
    sid, init = await initialize(http, gw.url("up"))
    listed = await post(http, gw.url("up"), rpc("tools/list"), session_id=sid)
    assert listed.status == 200
    (init_record,) = [r for r in up.records("initialize") if r["jsonrpc_id"] == init.messages[0]["id"]]
    upstream_sids = {r["headers"].get("mcp-session-id") for r in up.records()} - {None}
    assert sid not in upstream_sids                       # the gateway's id never goes upstream
    assert "mcp-session-id" not in init_record["headers"]
    assert len(sid) >= 32 and all(0x21 <= ord(c) <= 0x7E for c in sid)
    for reply in (init, listed):
        assert reply.headers.getall("Mcp-Session-Id", [sid]) == [sid]


UNKNOWN_SESSION_CASES = [
    ("POST", lambda: rpc("tools/list", id="ghost-1"), "ghost-1"),
    ("GET", lambda: None, None),
    ("DELETE", lambda: None, None),
]


@pytest.mark.parametrize(("method", "make_body", "rpc_id"), UNKNOWN_SESSION_CASES,
                         ids=[c[0] for c in UNKNOWN_SESSION_CASES])
async def test_an_unknown_session_id_is_answered_404_with_a_json_rpc_body(
        http: Any, gw: Gateway, up: Upstream, method: str, make_body: Any, rpc_id: Any) -> None:
    before = len(up.records())
    headers = {"Accept": ACCEPT, "Mcp-Session-Id": "not-a-session-" + uuid.uuid4().hex,
               "MCP-Protocol-Version": LEGACY_VERSION, "Content-Type": "application/json"}
    body = make_body()
    reply = await request(http, method, gw.url("up"), headers=headers,
                          data=orjson.dumps(body) if body is not None else None)
    assert_refused(reply, 404, SESSION_NOT_FOUND, "session_not_found", rpc_id)
    assert len(up.records()) == before


async def test_delete_ends_the_session_upstream_and_the_next_request_gets_404(
        http: Any, gw: Gateway, up: Upstream) -> None:
    sid, init = await initialize(http, gw.url("up"))
    (init_record,) = [r for r in up.records("initialize") if r["jsonrpc_id"] == init.messages[0]["id"]]
    upstream_sid = [r for r in up.records() if r["jsonrpc_method"] == "notifications/initialized"
                    and r["headers"].get("mcp-session-id")][-1]["headers"]["mcp-session-id"]
    deleted = await request(http, "DELETE", gw.url("up"),
                            headers={"Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION})
    assert deleted.status == 200
    assert any(r["method"] == "DELETE" and r["headers"].get("mcp-session-id") == upstream_sid for r in up.records())
    after = rpc("tools/list", id="after-delete")
    assert_refused(await post(http, gw.url("up"), after, session_id=sid), 404, SESSION_NOT_FOUND,
                   "session_not_found", "after-delete")
    get = await request(http, "GET", gw.url("up"), headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid})
    assert get.status == 404
    assert init_record is not None


async def test_a_session_is_not_valid_on_another_mount(http: Any, gw: Gateway) -> None:
    sid, _ = await initialize(http, gw.url("up"))
    reply = await post(http, gw.url("twin"), rpc("tools/list", id="other-mount"), session_id=sid)
    assert_refused(reply, 404, SESSION_NOT_FOUND, "session_not_found", "other-mount")


async def test_notifications_and_client_responses_are_answered_202_without_a_body(
        http: Any, gw: Gateway) -> None:
    sid, _ = await initialize(http, gw.url("up"))
    note = await post(http, gw.url("up"), rpc("notifications/roots/list_changed", id=None), session_id=sid)
    assert (note.status, note.body) == (202, b"")


async def test_the_standalone_get_stream_is_relayed_unbuffered(http: Any, gw: Gateway) -> None:
    sid, _ = await initialize(http, gw.url("up"))
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}
    async with http.get(gw.url("up"), headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert resp.headers.getall("X-Accel-Buffering") == ["no"]
        assert resp.headers.getall("Cache-Control") == ["no-cache, no-transform"]   # the upstream's, kept
        assert "Content-Encoding" not in resp.headers


# --------------------------------------------------------------------------- Last-Event-ID

async def test_a_get_with_last_event_id_replays_the_rest_of_the_stream_from_the_upstream(
        http: Any, gw: Gateway, up: Upstream) -> None:
    sid, _ = await initialize(http, gw.url("up"))
    call = rpc("tools/call", {"name": "reconnecting_progress", "arguments": {"steps": 3, "interval_ms": 100},
                              "_meta": {"progressToken": "resume-me"}})
    first = await post(http, gw.url("up"), call, session_id=sid)
    assert first.status == 200
    ids = [e.id for e in first.events if e.id]
    assert ids, first.events
    assert not any(e.message.get("id") == call["id"] for e in first.events if e.data)  # closed early
    assert any(e.retry for e in first.events)    # ...and told the client when to come back
    progress = [e.message["params"]["progress"] for e in first.events if e.data]
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "Last-Event-ID": ids[-1],
               "MCP-Protocol-Version": LEGACY_VERSION}
    async with http.get(gw.url("up"), headers=headers) as resp:
        assert resp.status == 200
        events: list[Any] = []
        stream = read_events(resp)
        while not any(isinstance(m := e.message, dict) and m.get("id") == call["id"] for e in events if e.data):
            events.append(await next_event(stream))
    messages = [e.message for e in events if e.data]
    replayed = [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"]
    assert progress + replayed == [1, 2, 3]
    assert messages[-1]["result"]["content"][0]["text"] == "resumed and done after 3 steps"
    # Event ids are the gateway's own (bound to session and principal), never the upstream's.
    assert all(e.id.count(".") == 2 and "/" not in e.id for e in events + first.events if e.id), \
        [e.id for e in events]
    # The upstream was asked to resume from its own id (the gateway's id carries it, bound).
    (get_record,) = [r for r in up.records() if r["method"] == "GET" and "last-event-id" in r["headers"]]
    assert get_record["headers"]["last-event-id"] != ids[-1] and "/" in get_record["headers"]["last-event-id"]
    (call_record,) = [r for r in up.records() if r["jsonrpc_id"] == call["id"]]
    assert get_record["headers"]["mcp-session-id"] == call_record["headers"]["mcp-session-id"]


async def test_the_sdk_client_resumes_a_closed_stream_through_the_gateway(gw: Gateway, up: Upstream) -> None:
    async with mcp_client(gw.url("up"), era="legacy") as client:
        log = ProgressLog()
        result = await client.call_tool("reconnecting_progress", {"steps": 3, "interval_ms": 100},
                                        progress_callback=log.callback)
    assert result.content[0].text == "resumed and done after 3 steps"
    assert [p for _, p, _, _ in log.events] == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- 2026-07-28 discovery and subscriptions

async def test_server_discover_passes_through(http: Any, gw: Gateway, up: Upstream) -> None:
    body = rpc("server/discover", modern_params())
    reply = await post(http, gw.url("up"), body, modern_headers("server/discover"), version=None)
    assert reply.status == 200
    assert "tools" in reply.response_to(body["id"])["result"]["capabilities"]
    assert reached_upstream(up, body["id"])


async def test_subscriptions_listen_streams_through_the_gateway(http: Any, gw: Gateway) -> None:
    body = rpc("subscriptions/listen", modern_params({"notifications": {"toolsListChanged": True}}))
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", **modern_headers("subscriptions/listen")}
    async with http.post(gw.url("up"), json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        first = await next_event(read_events(resp))
    assert first.message["method"] == "notifications/subscriptions/acknowledged"
    assert first.message["params"]["notifications"] == {"toolsListChanged": True}


async def test_a_legacy_client_disconnect_is_not_a_cancel_and_an_immediate_resume_continues_the_stream(
        http: Any, gw: Gateway) -> None:
    sid, _ = await initialize(http, gw.url("up"))
    call = rpc("tools/call", {"name": "slow_progress", "arguments": {"steps": 6, "interval_ms": 200},
                              "_meta": {"progressToken": "walk-away"}})
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", "Mcp-Session-Id": sid,
               "MCP-Protocol-Version": LEGACY_VERSION}
    async with http.post(gw.url("up"), json=call, headers=headers) as resp:
        stream = read_events(resp)
        seen = await next_event(stream)
        while not seen.data:
            seen = await next_event(stream)
        resp.close()                                   # the client walks away mid-call
    assert seen.id and seen.message["params"]["progress"] == 1
    resume = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "Last-Event-ID": seen.id,
              "MCP-Protocol-Version": LEGACY_VERSION}
    messages: list[Any] = []
    async with http.get(gw.url("up"), headers=resume) as resp:
        assert resp.status == 200
        async with asyncio.timeout(10):
            async for event in read_events(resp):
                if event.data:
                    messages.append(event.message)
                    if messages[-1].get("id") == call["id"]:
                        break
    assert [m["params"]["progress"] for m in messages if "method" in m] == [2, 3, 4, 5, 6]
    assert messages[-1]["result"]["content"][0]["text"] == "done after 6 steps"
