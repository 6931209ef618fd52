"""NDJSON line streams through the gateway: relayed message by message, checked like SSE events.

Some 2026-07-28 servers answer ``subscriptions/listen`` with a body that never ends, one
JSON-RPC message a line, under ``application/json``.  Two real upstreams run in a thread of
their own (their own event loop): a small aiohttp server that streams lines when the test
fires a trigger (no sleeps: each step waits on an event), and a hostile raw-socket server
that sends a huge line, an endless line, a line that stalls, invalid JSON or invalid UTF-8.
The gateway is a real process; the client reads each line as it arrives.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.inspect.ndjson import LineFramer, LineProbe, LineTooLarge
from tests.support.components import Gateway
from tests.support.gw_helpers import (
    ACCEPT, EVENT_TIMEOUT, Stack, http_client, modern_headers, modern_params, rpc, stack,  # noqa: F401
)

LINE_LIMIT = 64 * 1024
GATEWAY_ERROR = -32000
JSON_HEAD = {"Content-Type": "application/json"}


def line(msg: dict[str, Any]) -> bytes:
    return orjson.dumps(msg) + b"\n"


def ack(rpc_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
            "params": {"_meta": {"io.modelcontextprotocol/subscriptionId": rpc_id},
                       "notifications": {"toolsListChanged": True}}}


def changed(rpc_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
            "params": {"_meta": {"io.modelcontextprotocol/subscriptionId": rpc_id}}}


def complete(rpc_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id,
            "result": {"resultType": "complete", "_meta": {"io.modelcontextprotocol/subscriptionId": rpc_id}}}


# --------------------------------------------------------------------------- the upstreams


class Upstreams:
    """Both upstreams, served by one event loop in a background thread.

    ``fire(name)`` sets the trigger ``name`` in that loop; a handler waiting on it
    then writes its next line.  A trigger fired before anyone waits stays set.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._triggers: dict[str, asyncio.Event] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self.half_sent = threading.Event()     # the pretty-printed answer's first half is out
        self._thread = threading.Thread(target=self.loop.run_forever, name="ndjson-upstreams", daemon=True)
        self._thread.start()
        self.aio_port, self.raw_port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def _trigger(self, name: str) -> asyncio.Event:
        return self._triggers.setdefault(name, asyncio.Event())

    def fire(self, name: str) -> None:
        self.loop.call_soon_threadsafe(lambda: self._trigger(name).set())

    async def _start(self) -> tuple[int, int]:
        app = web.Application()
        app.router.add_post("/mcp", self._cooperative)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._raw = await asyncio.start_server(self._hostile, "127.0.0.1", 0)
        return site._server.sockets[0].getsockname()[1], self._raw.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        async def stop() -> None:
            self._raw.close()
            # Handlers still waiting on a connection end here, in this loop, not at the
            # interpreter's exit after the loop closed.
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # -- a well-behaved server that streams its listen answer as NDJSON -----------------

    async def _cooperative(self, request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        rid, method = msg.get("id"), msg.get("method")
        if method == "subscriptions/listen":
            out = web.StreamResponse(headers=JSON_HEAD)       # no Content-Length: chunked
            await out.prepare(request)
            await out.write(line(ack(rid)))
            await self._trigger(f"{rid}:changed").wait()
            await out.write(line(changed(rid)) + b"\n")         # and a blank keep-alive line
            await self._trigger(f"{rid}:end").wait()
            await out.write(line(complete(rid)))
            await out.write_eof()
            return out
        if method == "tools/call":
            # A finite NDJSON body, all at once with a Content-Length: progress, then the result.
            progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                        "params": {"progressToken": "p", "progress": 1}}
            result = {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "ok"}]}}
            return web.Response(body=line(progress) + orjson.dumps(result), headers=JSON_HEAD)
        if method == "prompts/list":
            # One pretty-printed JSON text (a newline in it) sent in two halves: not a line stream.
            text = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"prompts": []}}, indent=2).encode()
            out = web.StreamResponse(headers=JSON_HEAD)
            await out.prepare(request)
            await out.write(text[:20])
            self.half_sent.set()
            await self._trigger(f"{rid}:rest").wait()
            await out.write(text[20:])
            await out.write_eof()
            return out
        # Anything else: one ordinary JSON answer.
        return web.Response(body=orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": []}}),
                            headers=JSON_HEAD)

    # -- a hostile server: the path names what goes wrong after a valid first line ------

    async def _hostile(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            length = next((int(h.split(b":", 1)[1]) for h in head.split(b"\r\n")
                           if h.lower().startswith(b"content-length:")), 0)
            rid = orjson.loads(await reader.readexactly(length)).get("id")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            self._chunk(writer, line(ack(rid)))
            canary = line({"jsonrpc": "2.0", "method": "notifications/message",
                           "params": {"level": "info", "data": "CANARY-after-the-bad-line"}})
            if path == "/huge":                                  # one line past the limit
                self._chunk(writer, b'{"jsonrpc":"2.0","method":"x","params":{"p":"' + b"a" * (2 * LINE_LIMIT) + b'"}}\n')
            elif path == "/endless":                             # a line that never ends, sent as it grows
                self._chunk(writer, b'{"jsonrpc":"2.0","method":"x","params":{"p":"')
                for _ in range(2 * LINE_LIMIT // 4096):
                    self._chunk(writer, b"a" * 4096)
                    await writer.drain()
            elif path == "/stall":                              # half a line, then silence
                self._chunk(writer, b'{"jsonrpc":"2.0","method":"x","params":{')
            elif path == "/invalid-json":
                self._chunk(writer, b'{"jsonrpc":"2.0","method":"x","params":{}\n' + canary)
            elif path == "/invalid-utf8":
                self._chunk(writer, b'{"jsonrpc":"2.0","method":"x","params":{"p":"\xff\xfe"}}\n' + canary)
            elif path == "/duplicate-key":
                self._chunk(writer, b'{"jsonrpc":"2.0","method":"x","method":"y"}\n' + canary)
            await writer.drain()
            await reader.read()                                  # until the gateway hangs up
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    ups = Upstreams()
    try:
        yield ups
    finally:
        ups.stop()


HOSTILE = ["huge", "endless", "stall", "invalid-json", "invalid-utf8", "duplicate-key"]


@pytest.fixture(scope="module")
def gw(stack: Stack, upstreams: Upstreams) -> Gateway:
    servers: dict[str, Any] = {"lines": {"url": f"http://127.0.0.1:{upstreams.aio_port}/mcp"}}
    for name in HOSTILE:
        servers[name] = {"url": f"http://127.0.0.1:{upstreams.raw_port}/{name}"}
    servers["stall"]["read_timeout"] = "500ms"
    return stack.gateway({"servers": servers, "limits": {"max_sse_event_bytes": LINE_LIMIT}})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with http_client() as client:
        yield client


def _headers(method: str, name: str | None = None) -> dict[str, str]:
    return {"Accept": ACCEPT, "Content-Type": "application/json", **modern_headers(method, name)}


def _listen(rpc_id: Any) -> bytes:
    return orjson.dumps(rpc("subscriptions/listen", modern_params({"notifications": {"toolsListChanged": True}}),
                            id=rpc_id))


async def _line(resp: aiohttp.ClientResponse) -> bytes:
    return await asyncio.wait_for(resp.content.readline(), EVENT_TIMEOUT)


# --------------------------------------------------------------------------- through the gateway


async def test_a_listen_stream_delivers_each_notification_before_the_stream_ends(
        http: aiohttp.ClientSession, gw: Gateway, upstreams: Upstreams) -> None:
    rid = "listen-1"
    async with http.post(gw.url("lines"), data=_listen(rid), headers=_headers("subscriptions/listen")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        assert "Content-Length" not in resp.headers
        assert orjson.loads(await _line(resp)) == ack(rid)          # before anything else was sent
        upstreams.fire(f"{rid}:changed")
        assert orjson.loads(await _line(resp)) == changed(rid)
        assert await _line(resp) == b"\n"                            # the keep-alive, relayed
        upstreams.fire(f"{rid}:end")
        assert orjson.loads(await _line(resp)) == complete(rid)
        assert await asyncio.wait_for(resp.content.read(), EVENT_TIMEOUT) == b""


async def test_a_client_that_closes_a_listen_stream_leaves_the_gateway_serving(
        http: aiohttp.ClientSession, gw: Gateway, upstreams: Upstreams) -> None:
    rid = "listen-closed"
    async with http.post(gw.url("lines"), data=_listen(rid), headers=_headers("subscriptions/listen")) as resp:
        assert orjson.loads(await _line(resp)) == ack(rid)
        resp.close()                                                  # 2026-07-28: this is the cancellation
    upstreams.fire(f"{rid}:changed")
    upstreams.fire(f"{rid}:end")
    body = orjson.dumps(rpc("tools/list", modern_params(), id="after"))
    async with http.post(gw.url("lines"), data=body, headers=_headers("tools/list")) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == "after"


async def test_a_finite_ndjson_body_is_relayed_line_by_line(http: aiohttp.ClientSession, gw: Gateway) -> None:
    body = orjson.dumps(rpc("tools/call", modern_params({"name": "t", "arguments": {}}), id="finite"))
    async with http.post(gw.url("lines"), data=body, headers=_headers("tools/call", "t")) as resp:
        assert resp.status == 200
        lines = (await resp.read()).splitlines()
    assert [orjson.loads(x).get("method") or orjson.loads(x).get("id") for x in lines] == \
        ["notifications/progress", "finite"]


async def test_an_ordinary_json_answer_keeps_its_content_length(http: aiohttp.ClientSession, gw: Gateway) -> None:
    body = orjson.dumps(rpc("tools/list", modern_params(), id="plain"))
    async with http.post(gw.url("lines"), data=body, headers=_headers("tools/list")) as resp:
        assert resp.status == 200
        assert resp.headers.get("Transfer-Encoding") is None and "Content-Length" in resp.headers
        assert await resp.json() == {"jsonrpc": "2.0", "id": "plain", "result": {"tools": []}}


async def test_a_pretty_printed_answer_arriving_in_pieces_is_still_one_json_answer(
        http: aiohttp.ClientSession, gw: Gateway, upstreams: Upstreams) -> None:
    body = orjson.dumps(rpc("prompts/list", modern_params(), id="pretty"))
    pending = asyncio.ensure_future(http.post(gw.url("lines"), data=body, headers=_headers("prompts/list")))
    assert await asyncio.to_thread(upstreams.half_sent.wait, EVENT_TIMEOUT)
    upstreams.fire("pretty:rest")
    async with await asyncio.wait_for(pending, EVENT_TIMEOUT) as resp:
        assert resp.status == 200 and "Content-Length" in resp.headers
        assert await resp.json() == {"jsonrpc": "2.0", "id": "pretty", "result": {"prompts": []}}


@pytest.mark.parametrize(("mount", "reason"), [
    ("huge", "upstream_too_large"),
    ("endless", "upstream_too_large"),
    ("stall", "upstream_timeout"),
    ("invalid-json", "upstream_invalid_json"),
    ("invalid-utf8", "upstream_invalid_json"),
    ("duplicate-key", "upstream_duplicate_key"),
])
async def test_a_hostile_line_ends_the_stream_with_an_in_band_error_and_nothing_after_it(
        http: aiohttp.ClientSession, gw: Gateway, mount: str, reason: str) -> None:
    rid = f"hostile-{mount}"
    async with http.post(gw.url(mount), data=_listen(rid), headers=_headers("subscriptions/listen")) as resp:
        assert resp.status == 200
        assert orjson.loads(await _line(resp)) == ack(rid)
        error = orjson.loads(await _line(resp))
        rest = await asyncio.wait_for(resp.content.read(), EVENT_TIMEOUT)
    assert error["id"] == rid and error["error"]["code"] == GATEWAY_ERROR, error
    assert error["error"]["data"]["reason"] == reason
    assert rest == b""                                  # the stream ended; the canary never came through


# --------------------------------------------------------------------------- the framing itself


@pytest.mark.parametrize(("chunks", "verdict"), [
    ([b'{"jsonrpc":"2.0","method":"a"}\n'], True),
    ([b'{"jsonrpc":"2.0",', b'"method":"a"}\r\n{"x"'], True),
    ([b"\n\n", b'{"jsonrpc":"2.0","method":"a"}\n'], True),       # blank lines before the first message
    ([b'{\n  "jsonrpc": "2.0",\n  "id": 1\n}'], False),             # pretty-printed: one JSON text
    ([b'[{"a":1}]\n'], False),                                       # not an object
    ([b'{"jsonrpc":"2.0"', b',"id":1'], None),                       # no newline yet
    ([b"a" * (LINE_LIMIT + 1)], False),                              # a first line past the limit
])
def test_the_probe_calls_a_body_a_line_stream_only_when_its_first_line_is_a_whole_object(
        chunks: list[bytes], verdict: bool | None) -> None:
    probe = LineProbe(LINE_LIMIT)
    found = None
    for chunk in chunks:
        found = probe.feed(chunk)
        if found is not None:
            break
    assert found is verdict


def test_the_framer_cuts_whole_lines_across_chunks_and_bounds_one_line() -> None:
    framer = LineFramer(16)
    assert framer.feed(b'{"a":1}\r\n{"b"') == [b'{"a":1}']
    assert framer.pending
    assert framer.feed(b":2}\n\n") == [b'{"b":2}', b""]
    assert not framer.pending
    assert framer.feed(b'{"c":3}') == [] and framer.finish() == [b'{"c":3}']
    with pytest.raises(LineTooLarge):
        framer.feed(b"x" * 17)
    with pytest.raises(LineTooLarge) as caught:
        LineFramer(16).feed(b'{"d":4}\n' + b"y" * 20 + b"\n")
    assert caught.value.before == [b'{"d":4}']            # the whole lines before it are still relayed
