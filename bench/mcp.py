"""The MCP client side of the harness: request headers, the session handshake, SSE framing.

Every target is reached the same way a client would: ``initialize`` through the target
itself, keep the ``Mcp-Session-Id`` *that target* returned (a gateway mints its own and
maps it to the upstream's), then ``notifications/initialized``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp

PROTOCOL_VERSION = "2025-11-25"

# The Mcp-Method / Mcp-Name pair is required only by the modern era (2026-07-28); sending
# it, always matching the body, lets a dual-era gateway check header == body on every call.
_NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


class ProtocolError(RuntimeError):
    """A target answered something a working MCP server would not."""


def base_headers() -> dict[str, str]:
    return {"Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "MCP-Protocol-Version": PROTOCOL_VERSION}


def request_headers(msg: dict[str, Any], session_id: str | None,
                    extra: dict[str, str]) -> dict[str, str]:
    """Headers for one JSON-RPC message, mirroring its method (and name) as the spec says."""
    h = base_headers()
    h["Mcp-Method"] = msg["method"]
    key = _NAME_PARAM.get(msg["method"])
    if key is not None:
        h["Mcp-Name"] = msg["params"][key]
    if session_id is not None:
        h["Mcp-Session-Id"] = session_id
    h.update(extra)
    return h


async def iter_sse(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Yield each whole SSE event's ``data`` as JSON; chunk boundaries are never trusted."""
    buf = b""
    async for chunk in content.iter_any():
        # Normalise the whole buffer, not the chunk: a CRLF may be split across two chunks.
        buf = (buf + chunk).replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            data = b"\n".join(line[5:].lstrip(b" ") for line in raw.split(b"\n")
                              if line.startswith(b"data:"))
            if data:
                yield json.loads(data)


async def read_response(resp: aiohttp.ClientResponse, rpc_id: Any) -> dict[str, Any]:
    """The JSON-RPC response to ``rpc_id``, from either a JSON or an SSE answer."""
    ctype = resp.headers.get("Content-Type", "")
    if ctype.startswith("text/event-stream"):
        async for msg in iter_sse(resp.content):
            if msg.get("id") == rpc_id and ("result" in msg or "error" in msg):
                return msg
        raise ProtocolError(f"SSE stream ended without a response to id {rpc_id!r}")
    if ctype.startswith("application/json"):
        return await resp.json(content_type=None)
    raise ProtocolError(f"HTTP {resp.status}, Content-Type {ctype!r}: "
                        f"{(await resp.text())[:300]}")


@dataclass
class McpSession:
    """One MCP session through one target URL."""

    url: str
    extra_headers: dict[str, str] = field(default_factory=dict)
    session_id: str | None = None
    server_info: dict[str, Any] = field(default_factory=dict)
    _next_id: int = 0

    def next_id(self) -> str:
        self._next_id += 1
        return f"h-{self._next_id}"

    async def call(self, http: aiohttp.ClientSession, method: str,
                   params: dict[str, Any]) -> dict[str, Any]:
        rpc_id = self.next_id()
        msg = {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}
        async with http.post(self.url, data=json.dumps(msg),
                             headers=request_headers(msg, self.session_id,
                                                     self.extra_headers)) as resp:
            if resp.status != 200:
                raise ProtocolError(f"{method}: HTTP {resp.status}: {(await resp.text())[:300]}")
            answer = await read_response(resp, rpc_id)
            if method == "initialize":
                self.session_id = resp.headers.get("Mcp-Session-Id")
        if "error" in answer:
            raise ProtocolError(f"{method}: JSON-RPC error {answer['error']}")
        return answer["result"]

    async def notify(self, http: aiohttp.ClientSession, method: str) -> None:
        msg = {"jsonrpc": "2.0", "method": method}
        async with http.post(self.url, data=json.dumps(msg),
                             headers=request_headers(msg, self.session_id,
                                                     self.extra_headers)) as resp:
            if resp.status != 202:
                raise ProtocolError(f"{method}: HTTP {resp.status}, expected 202: "
                                    f"{(await resp.text())[:300]}")

    async def open(self, http: aiohttp.ClientSession) -> "McpSession":
        """initialize + notifications/initialized; the session id is the target's own."""
        self.server_info = await self.call(http, "initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"}})
        await self.notify(http, "notifications/initialized")
        return self

    async def preflight(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """One tools/list and one echo call, checked, before anything is timed."""
        tools = (await self.call(http, "tools/list", {}))["tools"]
        echo = await self.call(http, "tools/call", {"name": "echo",
                                                    "arguments": {"text": "preflight"}})
        if echo.get("content", [{}])[0].get("text") != "preflight" or echo.get("isError"):
            raise ProtocolError(f"echo answered {echo!r}")
        return {"tools": len(tools), "session_id": self.session_id is not None}
