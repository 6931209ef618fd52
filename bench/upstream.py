"""A fast MCP-ish upstream for the benchmarks: asyncio + httptools, uvloop when present.

It speaks just enough of MCP Streamable HTTP 2025-11-25 (the legacy era) for the harness:

- ``initialize`` answers JSON and mints an ``Mcp-Session-Id``; every later request must
  carry a known one (400 without, 404 for an unknown one, as the spec says), so a
  gateway that mis-maps session ids fails loudly instead of measuring fast.
- notifications and client responses get 202 with no body.
- ``tools/list`` returns ``--tools`` tools: ``echo``, ``stream`` and fillers (for pinning runs).
- ``tools/call echo`` answers JSON at once (~100 B, like the reference baseline).
- ``tools/call stream`` answers SSE: ``count`` (default 4) ``notifications/progress`` events
  then the result, ``interval_ms`` (default 100) apart, the first one immediately.

Run ``python -m bench.upstream --port 0``; it prints ``BENCH_READY {"port": N}`` once listening.
It is a benchmark fixture, not a conforming MCP server: no GET stream, no resumability.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections import deque
from typing import Any

import httptools

try:
    import orjson

    _dumps = orjson.dumps
    _loads = orjson.loads
except ImportError:  # orjson is optional; json costs a few µs more per request
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

PROTOCOL_VERSION = "2025-11-25"
SESSION_HEADER = b"mcp-session-id"

_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 404: b"Not Found",
            405: b"Method Not Allowed"}


def make_tools(n: int) -> list[dict[str, Any]]:
    """``echo`` and ``stream`` first, then fillers up to ``n`` tools in all."""
    text_schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    # Read-only, said explicitly: MCP's defaults make an unannotated tool destructive,
    # which a default-secure gateway refuses unless its policy says otherwise.
    read_only = {"readOnlyHint": True, "destructiveHint": False, "openWorldHint": False}
    tools = [
        {"name": "echo", "description": "Echo the text argument.", "inputSchema": text_schema,
         "annotations": read_only},
        {"name": "stream", "description": "Send progress notifications, then a result.",
         "inputSchema": {"type": "object", "properties": {
             "count": {"type": "integer"}, "interval_ms": {"type": "integer"}}},
         "annotations": read_only},
    ]
    for i in range(max(0, n - len(tools))):
        tools.append({"name": f"filler_{i:03d}",
                      "description": f"Filler tool {i} for tools/list and pinning benchmarks.",
                      "inputSchema": text_schema, "annotations": read_only})
    return tools


class Upstream:
    """State shared by all connections: the endpoint path, sessions and the tool list."""

    def __init__(self, path: str, n_tools: int, stateless: bool = False) -> None:
        self.path = path.encode()
        self.stateless = stateless
        self.sessions: set[bytes] = set()
        self.tools = make_tools(n_tools)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; requests are answered strictly in order."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # A request that arrives while an SSE answer is still being written waits here:
        # HTTP/1.1 answers must leave in request order.
        self.pending: deque[tuple[bytes, bytes, bytes | None, bytes, bool]] = deque()
        self.stream_task: asyncio.Task[None] | None = None
        self.url = b""
        self.session: bytes | None = None
        self.body: list[bytes] = []

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stream_task is not None:
            self.stream_task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.respond(400, b"", b"", keep_alive=False)

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.session = None
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == len(SESSION_HEADER) and name.lower() == SESSION_HEADER:
            self.session = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (self.parser.get_method(), self.url, self.session, b"".join(self.body),
                   self.parser.should_keep_alive())
        if self.stream_task is None:
            self.handle(*request)
        else:
            self.pending.append(request)

    # -- MCP ----------------------------------------------------------------------------
    def handle(self, method: bytes, url: bytes, session: bytes | None, body: bytes,
               keep_alive: bool) -> None:
        if url.split(b"?", 1)[0] != self.upstream.path:
            return self.respond(404, b"", b"", keep_alive)
        if method == b"DELETE":
            known = session in self.upstream.sessions
            self.upstream.sessions.discard(session)  # type: ignore[arg-type]
            return self.respond(200 if known else 404, b"", b"", keep_alive)
        if method != b"POST":
            return self.respond(405, b"Allow: POST, DELETE\r\n", b"", keep_alive)
        try:
            msg = _loads(body)
            rpc_method = msg.get("method")
        except (ValueError, AttributeError):
            return self.rpc_error(400, None, -32700, "Parse error", keep_alive)
        rpc_id = msg.get("id")
        if rpc_method == "initialize":
            sid = secrets.token_hex(16).encode()
            self.upstream.sessions.add(sid)
            params = msg.get("params") or {}
            result = {"protocolVersion": params.get("protocolVersion", PROTOCOL_VERSION),
                      "capabilities": {"tools": {"listChanged": False}},
                      "serverInfo": {"name": "bench-upstream", "version": "1"}}
            return self.respond(200, b"Content-Type: application/json\r\nMcp-Session-Id: "
                                + sid + b"\r\n", _dumps(_result(rpc_id, result)), keep_alive)
        if session is None and self.upstream.stateless:
            pass                      # 2026-07-28 requests: no session (bench.virtual)
        elif session is None:
            return self.rpc_error(400, rpc_id, -32600, "Bad Request: missing Mcp-Session-Id",
                                  keep_alive)
        elif session not in self.upstream.sessions:
            return self.rpc_error(404, rpc_id, -32001, "Session not found", keep_alive)
        if rpc_method is None or rpc_id is None:  # a notification or a client's response
            return self.respond(202, b"", b"", keep_alive)
        if rpc_method == "tools/call":
            params = msg.get("params") or {}
            name = params.get("name")
            args = params.get("arguments") or {}
            if name == "echo":
                text = args.get("text", "")
                return self.json(rpc_id, {"content": [{"type": "text", "text": text}],
                                          "isError": False}, keep_alive)
            if name == "stream":
                token = ((params.get("_meta") or {}).get("progressToken"))
                self.stream_task = asyncio.ensure_future(
                    self.stream(rpc_id, token, args, keep_alive))
                return None
            return self.rpc_error(200, rpc_id, -32602, f"Unknown tool: {name}", keep_alive)
        if rpc_method == "tools/list":
            return self.json(rpc_id, {"tools": self.upstream.tools}, keep_alive)
        if rpc_method == "ping":
            return self.json(rpc_id, {}, keep_alive)
        return self.rpc_error(200, rpc_id, -32601, "Method not found", keep_alive)

    async def stream(self, rpc_id: Any, token: Any, args: dict[str, Any],
                     keep_alive: bool) -> None:
        """Write the SSE answer of ``tools/call stream``, one chunk per event."""
        count = int(args.get("count", 4))
        interval = int(args.get("interval_ms", 100)) / 1000
        try:
            self.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                       b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(count):
                if token is not None:
                    self.write_event(_dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                             "params": {"progressToken": token,
                                                        "progress": i + 1, "total": count + 1}}))
                await asyncio.sleep(interval)
            self.write_event(_dumps(_result(rpc_id, {
                "content": [{"type": "text", "text": f"streamed {count} events"}],
                "isError": False})))
            self.write(b"0\r\n\r\n")
        finally:
            self.stream_task = None
        if not keep_alive:
            self.close()
        while self.pending and self.stream_task is None and self.transport is not None:
            self.handle(*self.pending.popleft())

    def write_event(self, data: bytes) -> None:
        event = b"event: message\r\ndata: " + data + b"\r\n\r\n"
        self.write(b"%x\r\n%s\r\n" % (len(event), event))

    # -- HTTP ---------------------------------------------------------------------------
    def json(self, rpc_id: Any, result: Any, keep_alive: bool) -> None:
        self.respond(200, b"Content-Type: application/json\r\n",
                     _dumps(_result(rpc_id, result)), keep_alive)

    def rpc_error(self, status: int, rpc_id: Any, code: int, message: str,
                  keep_alive: bool) -> None:
        body = _dumps({"jsonrpc": "2.0", "id": rpc_id,
                       "error": {"code": code, "message": message}})
        self.respond(status, b"Content-Type: application/json\r\n", body, keep_alive)

    def respond(self, status: int, headers: bytes, body: bytes, keep_alive: bool) -> None:
        self.write(b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n%s\r\n%s" % (
            status, _REASONS[status], headers, len(body),
            b"" if keep_alive else b"Connection: close\r\n", body))
        if not keep_alive:
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _result(rpc_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


async def serve(host: str, port: int, path: str, n_tools: int, stateless: bool = False) -> None:
    upstream = Upstream(path, n_tools, stateless)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(upstream), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print("BENCH_READY " + json.dumps({"port": bound}), flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--path", default="/mcp")
    ap.add_argument("--tools", type=int, default=50, help="tools in tools/list (default 50)")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--stateless", action="store_true", help="also answer requests without a session")
    args = ap.parse_args(argv)
    try:
        run(serve(args.host, args.port, args.path, args.tools, args.stateless), uvloop=not args.no_uvloop)
    except KeyboardInterrupt:
        sys.exit(0)


def run(coro: Any, *, uvloop: bool) -> Any:
    """Run ``coro`` on uvloop when asked for and installed, else on asyncio's loop."""
    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:
            pass
        else:
            return _uvloop.run(coro)
    return asyncio.run(coro)


if __name__ == "__main__":
    main()
