"""The demo MCP server bundled with ``mcp-gateway demo``, written with the ``mcp`` SDK.

Run as a child process by ``gateway.demo``: ``python -m gateway.demo_server [PORT]``.
Binds 127.0.0.1 (port 0: the kernel picks) and prints ``DEMO_MCP_READY {"port": N}``
once it serves.  Tools: ``echo``, ``add``, ``count_slowly`` (progress notifications)
and the destructive ``reset_counter``.
"""
from __future__ import annotations

import json
import socket
import sys
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations

READY_TAG = "DEMO_MCP_READY"


def build() -> MCPServer:
    mcp = MCPServer(name="mcp-gateway-demo", version="1.0.0",
                    instructions="A demo server behind mcp-gateway. Try add, echo and count_slowly.")
    state = {"counter": 0}

    @mcp.tool(description="Echo the text back.", annotations=ToolAnnotations(read_only_hint=True))
    def echo(text: str) -> str:
        return text

    @mcp.tool(description="Add two integers (and count the call).",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
    def add(a: int, b: int) -> int:
        state["counter"] += 1
        return a + b

    @mcp.tool(description="Count to n, one progress notification every interval_ms.",
              annotations=ToolAnnotations(read_only_hint=True))
    async def count_slowly(ctx: Context, n: int = 5, interval_ms: int = 300) -> str:
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"{i}/{n}")
            await anyio.sleep(interval_ms / 1000)
        return f"counted to {n}"

    @mcp.tool(description="Reset the call counter to zero (destructive: needs mcp:admin).",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    def reset_counter() -> str:
        before, state["counter"] = state["counter"], 0
        return f"counter reset (was {before})"

    return mcp


class _Announcing(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, port: int) -> None:
        super().__init__(config)
        self._port = port

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            print(f"{READY_TAG} {json.dumps({'port': self._port})}", flush=True)


def main(port: int = 0) -> int:
    app = build().streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    _Announcing(config, sock.getsockname()[1]).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
