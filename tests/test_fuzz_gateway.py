"""Fuzzing through a running gateway, over raw sockets, in both directions.

Requests: generated malformed requests (invalid UTF-8, deep nesting, huge
integers, NUL bytes, odd media types and encodings, broken JSON-RPC shapes,
damaged ``Mcp-*`` headers) to a gateway in front of a well-behaved upstream.
Responses: a socket-level upstream answers a valid call with generated malformed
bodies (the same damage, plus broken SSE) under generated media types.

For every input: no 500 and no ``gateway.internal_error`` log event; a refusal is
a JSON-RPC error body with a ``reason``; whatever is relayed is JSON-RPC the codec
accepts.  ``tests/test_failclosed_*.py`` cover the targeted tricks (header
smuggling, filtered lists); this covers volume and shape.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import codec
from tests.support.evil_upstream import EvilUpstream, http, sse_head
from tests.support.gw_helpers import LEGACY_VERSION, MODERN_VERSION, allow_all, http_client, modern_params, request

FUZZ = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def rpc_body(**members: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": modern_params({"name": "echo", "arguments": {"text": "hi"}}), **members}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@st.composite
def request_bodies(draw: Any) -> bytes:
    """A tools/call body, damaged in one of the ways parsers trip on."""
    good = _dumps(rpc_body())
    how = draw(st.sampled_from(["invalid_utf8", "deep_array", "deep_object", "huge_int", "nul", "shape",
                                "truncated", "bytes", "bom", "dup_key", "lone_surrogate", "big_float"]))
    if how == "invalid_utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]))
        return good.replace(b'"hi"', b'"h' + bad + b'i"')
    if how == "deep_array":
        depth = draw(st.integers(200, 5000))
        return good.replace(b'"hi"', b"[" * depth + b"]" * depth)
    if how == "deep_object":
        depth = draw(st.integers(200, 3000))
        return good.replace(b'"hi"', b'{"a":' * depth + b"1" + b"}" * depth)
    if how == "huge_int":
        n = draw(st.sampled_from([2 ** 64, -(2 ** 63) - 1, 10 ** 400, 10 ** 4000]))
        where = draw(st.sampled_from([b'"id":1', b'"hi"']))
        return good.replace(where, b'"id":' + str(n).encode() if where == b'"id":1' else str(n).encode(), 1)
    if how == "nul":
        return draw(st.sampled_from([good.replace(b"tools/call", b"tools/\x00call"),
                                     good.replace(b'"hi"', b'"h\x00i"'), good + b"\x00",
                                     good.replace(b'"hi"', b'"h\\u0000i"'), b"\x00" + good]))
    if how == "shape":
        shape = draw(st.sampled_from([
            [rpc_body()], [], {}, "x", 1, None, {"jsonrpc": "1.0", "id": 1, "method": "ping"},
            rpc_body(params=[1, 2]), rpc_body(id={"a": 1}), rpc_body(id=True), rpc_body(id=1.5),
            rpc_body(method=7), rpc_body(result={}), rpc_body(error={"code": 1, "message": "m"}),
            {"jsonrpc": "2.0", "id": 1}, {"jsonrpc": "2.0", "id": 1, "result": 5},
            rpc_body(params={"name": 5}), rpc_body(params={"name": "echo", "_meta": 1}),
            rpc_body(extra=1), {"jsonrpc": "2.0", "method": "notifications/x", "params": "p"},
        ]))
        return _dumps(shape)
    if how == "truncated":
        return good[:draw(st.integers(0, len(good) - 1))]
    if how == "bom":
        return b"\xef\xbb\xbf" + good
    if how == "dup_key":
        return good[:-1] + b',"method":"tools/list"}'
    if how == "lone_surrogate":
        return good.replace(b'"hi"', b'"\\ud800"')
    if how == "big_float":
        return good.replace(b'"hi"', draw(st.sampled_from([b"1e400", b"-1e400", b"NaN", b"Infinity", b"1e-400"])))
    return draw(st.binary(max_size=200))


MEDIA_TYPES = st.sampled_from([
    "application/json", "Application/JSON; charset=UTF-8", "application/json; charset=latin-1",
    "application/json;charset=utf-16", "text/plain", "application/json-seq", "text/event-stream",
    "multipart/form-data; boundary=x", "", "application/json\x7f", "application/x-www-form-urlencoded",
    "application/json; charset=\"utf-8\"; q=1", "a" * 300, None,
])
EXTRA_HEADERS = st.lists(st.sampled_from([
    ("Content-Encoding", "gzip"), ("Content-Encoding", "identity"), ("Mcp-Method", "=?base64?é?="),
    ("Mcp-Method", "=?base64?//79?="), ("Mcp-Name", "=?base64?w6k?="), ("Mcp-Name", "=?base64?ZWNobw==?="),
    ("MCP-Protocol-Version", "9999-99-99"), ("MCP-Protocol-Version", "\x01"), ("Accept", "text/html"),
    ("Accept", ""), ("Mcp-Session-Id", "\x7fbogus"), ("Mcp-Session-Id", "x" * 2000), ("Last-Event-ID", "a.b.c"),
]), max_size=3, unique_by=lambda h: h[0].lower())


async def exchange(host: str, port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (Connection: close), de-chunk it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return int(lines[0].split(" ", 2)[1]), headers, body


def request_bytes(host: str, port: int, body: bytes, ctype: str | None, extra: list[tuple[str, str]]) -> bytes:
    headers = {"Host": f"{host}:{port}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
    if ctype is not None:
        headers["Content-Type"] = ctype
    for name, value in extra:
        headers[name] = value
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST /mcp/up HTTP/1.1\r\n{lines}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            .encode("utf-8", "surrogateescape") + body)


def assert_json_rpc_answer(status: int, headers: dict[str, str], body: bytes, *, upstream_fault: bool = False) -> None:
    """No 500; a refusal is a JSON-RPC error with a reason; a relay is JSON-RPC the codec accepts.

    ``upstream_fault``: the upstream misbehaved, so 502 (reason ``upstream_*``) is the declared outcome.
    """
    assert status != 500 and (status < 500 or upstream_fault and status == 502), (status, body[:300])
    if status == 202:
        return
    kind = codec.media_type(headers.get("content-type"))[0]
    if kind == codec.SSE:
        # Every relayed event is strict JSON-RPC.  A stream the upstream closed cleanly without
        # answering is relayed as such (2025-11-25 clients resume it with Last-Event-ID).
        datas = [line[5:].strip() for line in body.decode().splitlines() if line.startswith("data:")]
        assert all(codec.decode(d) for d in datas), body[:300]
        return
    assert kind == codec.JSON, (status, headers, body[:300])
    msg = codec.decode(body)
    if status >= 400:
        err = msg.value["error"]
        assert isinstance(err["code"], int) and isinstance(err["message"], str)
        assert isinstance(err["data"]["reason"], str), msg.value
        assert status != 502 or err["data"]["reason"].startswith("upstream_"), msg.value


def assert_no_internal_error(gw: Any) -> None:
    assert not [e for e in gw.json_logs() if e.get("event") == "gateway.internal_error"], gw.log_lines()[-20:]


@pytest.fixture
async def gw(gateway: Any, evil: EvilUpstream, tmp_path: Path) -> Any:
    async def call(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return http(200, _dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": []}}))
    evil.scripts["tools/call"] = call
    g = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                              "policies": allow_all(tmp_path)})
    g.evil = evil
    host, port = g.base_url.split("//")[1].split(":")
    g.addr = (host, int(port))
    return g


# Each case once by name: the crash the header fuzzer found, and the classic shapes.
NAMED = {
    "base64_header_with_non_ascii": (_dumps(rpc_body()), "application/json", [("Mcp-Method", "=?base64?é?=")]),
    "invalid_utf8": (_dumps(rpc_body()).replace(b"hi", b"h\xffi"), "application/json", []),
    "deep_nesting": (_dumps(rpc_body()).replace(b'"hi"', b"[" * 100_000 + b"]" * 100_000), "application/json", []),
    "huge_integer_id": (_dumps(rpc_body()).replace(b'"id":1', b'"id":' + b"9" * 5000), "application/json", []),
    "nul_in_method": (_dumps(rpc_body()).replace(b"tools/call", b"tools\x00call"), "application/json", []),
    "odd_media_type": (_dumps(rpc_body()), "application/json; charset=utf-16", []),
}


@pytest.mark.parametrize("case", sorted(NAMED))
async def test_a_named_malformed_request_gets_a_json_rpc_error_never_a_500(gw: Any, case: str) -> None:
    body, ctype, extra = NAMED[case]
    status, headers, answer = await exchange(*gw.addr, request_bytes(*gw.addr, body, ctype, extra))
    assert 400 <= status < 500
    assert_json_rpc_answer(status, headers, answer)
    assert_no_internal_error(gw)


@FUZZ
@given(body=request_bodies(), ctype=MEDIA_TYPES, extra=EXTRA_HEADERS)
async def test_generated_malformed_requests_get_a_json_rpc_answer_never_a_500(gw: Any, body: bytes, ctype: Any,
                                                                              extra: list) -> None:
    status, headers, answer = await exchange(*gw.addr, request_bytes(*gw.addr, body, ctype, extra))
    assert_json_rpc_answer(status, headers, answer)
    forwarded = gw.evil.requests[-1][2] if status == 200 else None
    if forwarded is not None:
        codec.decode(forwarded)            # what reached the upstream is strict JSON-RPC
    assert_no_internal_error(gw)


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"POST /mcp/up HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                     b"POST /mcp/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
                     b"POST /mcp/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                     b"POST /mcp/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
                     b"POST /mcp/up\x00 HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /mcp/%ff%00 HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"POST /mcp/up HTTP/9.9\r\nHost: x\r\n\r\n", b"POST /mcp/up HTTP/1.1\r\nX: \xff\xfe\r\n\r\n",
                     b"POST /mcp/up HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"])))
async def test_malformed_http_is_refused_with_a_4xx_never_a_500(gw: Any, raw: bytes) -> None:
    reader, writer = await asyncio.open_connection(*gw.addr)
    writer.write(raw + b"\r\n\r\n")
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    if answer:                              # the server may just close on bytes that are not HTTP
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        assert 400 <= status < 500, answer[:300]
        assert_json_rpc_answer(status, headers, body)
    assert_no_internal_error(gw)


@st.composite
def upstream_answers(draw: Any) -> bytes:
    """A raw HTTP answer to tools/call id 1: damaged JSON, or SSE framed badly."""
    body = draw(request_bodies()).replace(b'"method":"tools/call","params"', b'"result"')
    if draw(st.booleans()):
        ctype = draw(st.sampled_from(["application/json", "APPLICATION/JSON", "application/json; charset=latin-1",
                                      "text/html", "application/octet-stream", None]))
        return http(200, body, ctype)
    sep = draw(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r", b"\n", b""]))
    prefix = draw(st.sampled_from([b"data: ", b"data:", b"event: message\ndata: ", b": c\n", b"\xef\xbb\xbfdata: "]))
    ctype = draw(st.sampled_from(["text/event-stream", "Text/Event-Stream; charset=utf-8",
                                  "text/event-stream; charset=latin-1"]))
    return sse_head(ctype) + prefix + body + sep


@FUZZ
@given(answer=upstream_answers())
async def test_generated_malformed_upstream_answers_never_reach_the_client_or_cause_a_500(gw: Any,
                                                                                          answer: bytes) -> None:
    async def call(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return answer
    gw.evil.scripts["tools/call"] = call
    body = _dumps(rpc_body())
    status, headers, relayed = await exchange(*gw.addr, request_bytes(*gw.addr, body, "application/json", []))
    assert_json_rpc_answer(status, headers, relayed, upstream_fault=True)
    assert_no_internal_error(gw)


async def test_malformed_http_gets_a_json_rpc_400_and_an_info_log_not_a_traceback(gw: Any) -> None:
    """aiohttp's own answer quotes the bytes in text/plain and logs a traceback at error level."""
    raw = request_bytes(*gw.addr, _dumps(rpc_body()), "application/json", [("Mcp-Session-Id", "\x7fbad")])
    start = len(gw.log_lines())
    status, headers, body = await exchange(*gw.addr, raw)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["data"]["reason"] == "malformed_http" and b"\x7f" not in body
    gw.wait_for_log({"event": "listener.malformed_http", "status": 400}, start=start)
    assert not [e for e in gw.json_logs() if e.get("logger") == "aiohttp.server"]
    async with http_client() as client:
        metrics = await request(client, "GET", gw.admin_url + "/metrics")
    assert 'mcpgw_rejections_total{reason="malformed_http",server="_unknown"} 1.0' in metrics.body.decode()


HEADER_TEXT = st.one_of(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xff, blacklist_characters="\x7f"),
                                max_size=120),
                        st.builds(lambda a, b, c: f"{a}.{b}.{c}", *[st.text("AZaz09-_=+/", max_size=30)] * 3))


@FUZZ
@given(method=st.sampled_from(["GET", "DELETE"]), event_id=st.one_of(st.none(), HEADER_TEXT),
       session=st.one_of(st.none(), HEADER_TEXT), version=st.sampled_from([MODERN_VERSION, LEGACY_VERSION]))
async def test_generated_stream_and_session_headers_get_a_json_rpc_answer_never_a_500(
        gw: Any, method: str, event_id: str | None, session: str | None, version: str) -> None:
    host, port = gw.addr
    lines = [f"{method} /mcp/up HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream",
             f"MCP-Protocol-Version: {version}", "Connection: close"]
    if event_id is not None:
        lines.append(f"Last-Event-ID: {event_id}")
    if session is not None:
        lines.append(f"Mcp-Session-Id: {session}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(raw)
    await writer.drain()
    # A GET that is accepted opens a stream that stays open: read the head, then decide.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    status = int(head.split(b" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (ln.partition(":") for ln in head.decode("latin-1").split("\r\n")[1:] if ln)}
    if status >= 300:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 15)
        assert_json_rpc_answer(status, headers, body)
    else:
        assert status in (200, 202, 204), head
    writer.close()
    assert_no_internal_error(gw)
