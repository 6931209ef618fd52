"""A malicious MCP upstream written at the socket level: it answers exactly the bytes a test scripts.

It speaks just enough HTTP/1.1 and MCP for real clients to get through the
handshake (``initialize`` with an ``Mcp-Session-Id``, ``notifications/*`` -> 202,
``DELETE`` -> 200), then answers ``tools/list`` (or any method named in
``scripts``) with whatever the test wants, byte for byte: wrong letter case in
the media type, a byte-order mark, ``NaN``, extra envelope members, an answer
pushed on the session's GET stream instead of the request's own.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# script(evil, request id, parsed body) -> raw HTTP response bytes (may await, e.g. to push on GET),
# or a list of byte chunks, each written and drained on its own (a reply split at chosen offsets),
# or a Writer: it is given the connection's writer and writes what it likes (an endless body);
# the connection is closed when it returns.
Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]
Script = Callable[["EvilUpstream", Any, dict[str, Any]], Awaitable["bytes | list[bytes] | Writer"]]

SAFE_TOOL = {"name": "safe_tool", "description": "Harmless.", "inputSchema": {"type": "object"}}
SECRET_TOOL = {"name": "secret_tool", "description": "Must never reach a caller the policy refuses.",
               "inputSchema": {"type": "object"}}
TOOLS = [SAFE_TOOL, SECRET_TOOL]


def http(status: int, body: bytes, content_type: str | None = "application/json", *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status} X"]
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    head += list(extra)
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def sse_head(content_type: str = "text/event-stream", *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def result(rid: Any, tools: list[dict[str, Any]] | None = None, **envelope: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools or TOOLS}, **envelope}).encode()


@dataclass
class EvilUpstream:
    scripts: dict[str, Script] = field(default_factory=dict)
    port: int = 0
    server: asyncio.AbstractServer | None = None
    get_streams: list[asyncio.StreamWriter] = field(default_factory=list)
    get_stream_open: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    header_lines: list[list[tuple[str, str]]] = field(default_factory=list)   # as received, repeats kept
    # GET with Last-Event-ID: <key> is answered with these SSE bytes, then the stream ends.
    replays: dict[str, bytes] = field(default_factory=dict)
    # hang_up(n, body): True closes the connection instead of answering its n-th request (0 = the
    # first), as a keep-alive timeout firing while a request arrives does.  Closed ones are listed.
    hang_up: Callable[[int, bytes], bool] | None = None
    hung_up: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self) -> "EvilUpstream":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for w in self.get_streams:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def push_on_get(self, data: bytes) -> None:
        """Write one SSE event on the most recent GET stream (waits for one to be open)."""
        await asyncio.wait_for(self.get_stream_open.wait(), 10)
        writer = self.get_streams[-1]
        writer.write(data)
        await writer.drain()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for n in range(1_000_000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ", 1)[0]
                pairs = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
                headers = {k.lower(): v for k, v in pairs}
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                if self.hang_up is not None and self.hang_up(n, body):
                    self.hung_up.append(body)
                    writer.close()
                    return
                self.requests.append((method, headers, body))
                self.header_lines.append(pairs)
                if method == "GET" and "last-event-id" in headers:
                    writer.write(sse_head() + self.replays.get(headers["last-event-id"], b""))
                    await writer.drain()
                    writer.close()
                    return
                if method == "GET":
                    writer.write(sse_head())
                    await writer.drain()
                    self.get_streams.append(writer)
                    self.get_stream_open.set()
                    return                          # held open; pushed to by push_on_get
                if method == "DELETE":
                    writer.write(http(200, b"", None))
                    await writer.drain()
                    continue
                msg = json.loads(body)
                answer = await self._answer(msg, headers)
                if callable(answer):
                    await answer(writer)
                    writer.close()
                    return
                for chunk in answer if isinstance(answer, list) else [answer]:
                    writer.write(chunk)
                    await writer.drain()
                answer = b"".join(answer) if isinstance(answer, list) else answer
                if b"Connection: close" in answer.split(b"\r\n\r\n", 1)[0]:
                    writer.close()
                    return
        except ConnectionError:
            return

    async def _answer(self, msg: dict[str, Any], headers: dict[str, str]) -> "bytes | list[bytes] | Writer":
        method = msg.get("method")
        if method is None or "id" not in msg:
            return http(202, b"", None)
        if method == "initialize" and "initialize" not in self.scripts:
            version = msg.get("params", {}).get("protocolVersion", "2025-11-25")
            body = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {
                "protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "evil", "version": "6.6.6"}}}).encode()
            return http(200, body, "application/json", "Mcp-Session-Id: evil-session-1")
        script = self.scripts.get(method)
        if script is None:
            return http(200, json.dumps({"jsonrpc": "2.0", "id": msg["id"],
                                         "error": {"code": -32601, "message": "Method not found"}}).encode())
        return await script(self, msg["id"], msg)
