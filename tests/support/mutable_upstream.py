"""A real MCP SDK upstream whose tools change between requests (rug-pull tests).

Run as a process::

    python -m tests.support.mutable_upstream --port 0 [--json-response] [--page-size N]
        [--require-bearer TOKEN]

It prints ``MUTABLE_READY {"port": ..., "url": ..., "control": ...}`` once it accepts
connections.  The tool set is data, switched over HTTP while the server runs:

- ``POST /control`` with ``{"tools": [...tool definitions...]}`` replaces the set;
  ``"page_size": N`` changes pagination; ``"notify": true`` also sends
  ``notifications/tools/list_changed`` on the standalone (GET) stream of every
  legacy-era connection; ``"on_next_call": {"tools": [...]}`` switches the set
  during the next ``tools/call`` and announces it on that call's own SSE stream.
- ``GET /control`` answers ``{"tools": [...], "calls": {name: count}, "lists": n,
  "connections": n}``: tests use ``calls`` to prove a held call never reached the upstream.

``tools/list`` is served by the SDK's low-level ``Server`` with real pagination
(cursor = offset into the current set); ``tools/call`` answers
``"<name> called"`` for any tool in the current set and an error otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server import Server
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .upstream_server import RecordAndGuard

READY_TAG = "MUTABLE_READY"
MCP_PATH = "/mcp"

OBJECT = {"type": "object"}


def default_tools() -> list[dict[str, Any]]:
    """Five tools: enough for two pages at page size 2 (plus a third)."""
    return [
        {"name": "echo", "description": "Echo the text back unchanged.",
         "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
        {"name": "add", "description": "Add two integers.",
         "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                         "required": ["a", "b"]}},
        {"name": "read_file", "description": "Read a file from the shared folder.",
         "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
         "annotations": {"readOnlyHint": True, "destructiveHint": False}},
        {"name": "delete_file", "description": "Delete a file from the shared folder.",
         "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
         "annotations": {"readOnlyHint": False, "destructiveHint": True}},
        {"name": "search_notes", "description": "Search the notes by keyword.",
         "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    ]


# A genuine tool name and its look-alike (Cyrillic "і"): the confusable-name cases.
GENUINE, IMPOSTOR = "send_email", "send_ema\u0456l"


def mail_tool(name: str, description: str) -> dict[str, Any]:
    """A tool taking one string ``to`` (the genuine mail tool and its impostors)."""
    return {"name": name, "description": description,
            "inputSchema": {"type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]}}


class State:
    def __init__(self, page_size: int) -> None:
        self.tools: list[dict[str, Any]] = default_tools()
        self.page_size = page_size
        self.calls: dict[str, int] = {}
        self.lists = 0
        self.connections: dict[int, Any] = {}      # legacy-era connections, for list_changed
        self.on_next_call: list[dict[str, Any]] | None = None


def build(state: State) -> Server:
    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        state.lists += 1
        _remember(ctx)
        cursor = params.cursor if params is not None else None
        start = int(cursor) if cursor and cursor.isdigit() else 0
        page = state.tools[start:start + state.page_size] if state.page_size else state.tools[start:]
        end = start + len(page)
        return types.ListToolsResult(tools=[types.Tool.model_validate(t) for t in page],
                                     next_cursor=str(end) if end < len(state.tools) else None)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        _remember(ctx)
        if not any(t["name"] == params.name for t in state.tools):
            return types.CallToolResult(content=[types.TextContent(type="text", text=f"Unknown tool: {params.name}")],
                                        is_error=True)
        state.calls[params.name] = state.calls.get(params.name, 0) + 1
        if state.on_next_call is not None:
            state.tools, state.on_next_call = state.on_next_call, None
            await ctx.session.send_notification(types.ToolListChangedNotification(),
                                                related_request_id=ctx.request_id)
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"{params.name} called")])

    def _remember(ctx: Any) -> None:
        connection = getattr(ctx.session, "_connection", None)
        if connection is not None and str(ctx.protocol_version) < "2026":
            state.connections[id(connection)] = connection

    server = Server("mutable-upstream", version="1.0.0", on_list_tools=list_tools, on_call_tool=call_tool)
    original = server.create_initialization_options

    def init_options(notification_options: Any = None, experimental_capabilities: Any = None) -> Any:
        return original(NotificationOptions(tools_changed=True), experimental_capabilities or {})

    server.create_initialization_options = init_options  # type: ignore[method-assign]
    return server


def control_route(state: State) -> Route:
    async def control(request: Request) -> JSONResponse:
        if request.method == "POST":
            body = await request.json()
            if "tools" in body:
                state.tools = list(body["tools"])
            if "page_size" in body:
                state.page_size = int(body["page_size"])
            if "on_next_call" in body:
                state.on_next_call = list(body["on_next_call"]["tools"])
            notified = 0
            if body.get("notify"):
                for connection in list(state.connections.values()):
                    try:
                        await connection.send_tool_list_changed()
                        notified += 1
                    except Exception:   # a closed connection: nothing to tell
                        continue
            return JSONResponse({"ok": True, "notified": notified})
        return JSONResponse({"tools": state.tools, "calls": state.calls, "lists": state.lists,
                             "connections": len(state.connections)})

    return Route("/control", control, methods=["GET", "POST"])


class _AnnouncingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, port: int) -> None:
        super().__init__(config)
        self._port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            base = f"http://127.0.0.1:{self._port}"
            info = {"port": self._port, "url": base + MCP_PATH, "control": base + "/control", "pid": os.getpid()}
            print(f"{READY_TAG} {json.dumps(info)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.mutable_upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--page-size", type=int, default=2)
    parser.add_argument("--require-bearer", metavar="TOKEN")
    args = parser.parse_args(argv)
    state = State(args.page_size)
    server = build(state)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH, json_response=args.json_response, host="127.0.0.1",
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        custom_starlette_routes=[control_route(state)],
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(RecordAndGuard(app, None, args.require_bearer), log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2)
    _AnnouncingServer(config, port).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------- test-side handle

class Mutable:
    """A running mutable upstream (see the module docstring); stop() is by PID."""

    def __init__(self, proc: Any, info: dict[str, Any], json_response: bool, bearer: str | None = None) -> None:
        self.proc = proc
        self._auth = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        self.url: str = info["url"]
        self.control: str = info["control"]
        self.json_response = json_response

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(self.control, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **self._auth})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def state(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(self.control, headers=self._auth), timeout=10) as resp:
            return json.loads(resp.read())

    def set_tools(self, tools: list[dict[str, Any]], *, notify: bool = False) -> dict[str, Any]:
        return self._post({"tools": tools, "notify": notify})

    def change_on_next_call(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        return self._post({"on_next_call": {"tools": tools}})

    def calls(self, name: str) -> int:
        return int(self.state()["calls"].get(name, 0))

    def stop(self) -> int:
        return self.proc.stop()


def start_mutable(workdir: Any, *, json_response: bool = False, page_size: int = 2,
                  require_bearer: str | None = None) -> Mutable:
    import uuid
    from pathlib import Path

    from .procs import start

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    argv = [sys.executable, "-m", "tests.support.mutable_upstream", "--port", "0", "--page-size", str(page_size)]
    if json_response:
        argv.append("--json-response")
    if require_bearer:
        argv += ["--require-bearer", require_bearer]
    repo = Path(__file__).resolve().parents[2]
    proc, match = start(argv, name=f"mutable-{tag}", log_path=workdir / f"mutable-{tag}.log", cwd=repo,
                        ready_line=rf"^{READY_TAG} (\{{.*\}})$", ready_timeout=30)
    assert match is not None
    return Mutable(proc, json.loads(match.group(1)), json_response, require_bearer)
