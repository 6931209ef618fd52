"""A real MCP upstream for the tests: the official SDK's ``MCPServer`` over Streamable HTTP.

Run it as a process (the ``upstream`` fixture does)::

    python -m tests.support.upstream_server --port 0 [--json-response] [--stateless]
        [--record FILE] [--require-bearer TOKEN] [--retry-interval MS]
        [--echo-description TEXT] [--no-dns-rebinding-protection] [--set-cookie NAME=VALUE]
        [--get-delay MS]

It binds 127.0.0.1 (port 0 lets the kernel choose) and prints one line once it accepts
connections::

    UPSTREAM_READY {"port": 41234, "url": "http://127.0.0.1:41234/mcp", "pid": 1234}

The SDK server is dual-era: a request whose ``MCP-Protocol-Version`` header names a
modern revision (2026-07-28) is served statelessly (``server/discover``, server-to-client
input via ``InputRequiredResult``); anything else takes the legacy path (``initialize``,
``Mcp-Session-Id``, server-to-client requests on SSE, ``Last-Event-ID`` resumption from
the in-memory event store below).

``--record FILE`` appends one JSON line per HTTP request *received*, written before the
request is handled: ``{"ts", "method", "path", "query", "headers" (names lower-cased),
"jsonrpc_method", "jsonrpc_id", "body"}``.  Tests read it to prove what reached the
upstream (for instance that it never saw the client's ``authorization`` header).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import anyio
import uvicorn
from mcp.server.mcpserver import (
    Context,
    Elicit,
    ElicitationResult,
    ListRoots,
    MCPServer,
    Resolve,
    Sample,
)
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import (
    CreateMessageResult,
    JSONRPCMessage,
    ListRootsResult,
    SamplingMessage,
    TextContent,
    ToolAnnotations,
)
from pydantic import BaseModel

READY_TAG = "UPSTREAM_READY"
MCP_PATH = "/mcp"
RECORD_BODY_LIMIT = 64 * 1024  # a record keeps the parsed body only up to this size

# A fake filesystem: the tools never touch the real one.  The secrets are fake too and
# shaped so redaction/leak tests have something recognisable to look for.
FILES: dict[str, str] = {
    "/srv/shared/readme.txt": "Shared folder of the test upstream. Nothing secret here.\n",
    "/srv/shared/notes.md": "# Notes\n- buy milk\n",
    "/srv/private/credentials.env": (
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\n"
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
        "GITHUB_TOKEN=ghp_0123456789abcdefghijklmnopqrstuvwxyzAB\n"
    ),
}


class Answer(BaseModel):
    answer: str


class InMemoryEventStore(EventStore):
    """Keeps every SSE event so a legacy client can resume with ``Last-Event-ID``.

    Ids are ``<stream id>/<sequence>``: globally unique and naming their stream, as the
    2025-11-25 transport asks.  Replay only sends later events of the same stream.
    """

    def __init__(self) -> None:
        self._events: list[tuple[EventId, StreamId, JSONRPCMessage | None]] = []
        self._index: dict[EventId, int] = {}
        self._seq = itertools.count(1)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = f"{stream_id}/{next(self._seq)}"
        self._index[event_id] = len(self._events)
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        position = self._index.get(last_event_id)
        if position is None:
            return None
        stream_id = self._events[position][1]
        for event_id, sid, message in self._events[position + 1 :]:
            if sid == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


# Resolvers: the SDK runs them before the tool body and sends the request they return
# the way the negotiated era wants it (a server-to-client request mid-call in 2025-11-25,
# an InputRequiredResult round trip in 2026-07-28).  Module level: annotations name them.
def _sample(prompt: str) -> Sample:
    message = SamplingMessage(role="user", content=TextContent(type="text", text=prompt))
    return Sample([message], max_tokens=64)


def _elicit(question: str) -> Elicit[Answer]:
    return Elicit(question, Answer)


def _roots() -> ListRoots:
    return ListRoots()


def build_server(echo_description: str | None = None) -> MCPServer:
    mcp = MCPServer(name="test-upstream", version="1.0.0", instructions="Test upstream for the gateway suite.")

    @mcp.tool(description=echo_description or "Echo the text back unchanged.")
    def echo(text: str) -> str:
        return text

    @mcp.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @mcp.tool(description="Send one progress notification per step, interval_ms apart, then return.")
    async def slow_progress(steps: int, interval_ms: int, ctx: Context) -> str:
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}/{steps}")
            if step < steps:
                await anyio.sleep(interval_ms / 1000)
        return f"done after {steps} steps"

    @mcp.tool(
        description="Legacy era only: report progress, close the SSE stream so the client must resume "
        "with Last-Event-ID, then finish. Needs --retry-interval to be useful."
    )
    async def reconnecting_progress(steps: int, interval_ms: int, ctx: Context) -> str:
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}/{steps}")
            if step == 1:
                await ctx.close_sse_stream()
            if step < steps:
                await anyio.sleep(interval_ms / 1000)
        return f"resumed and done after {steps} steps"

    @mcp.tool(description="Legacy era: send log messages 'announcement <n>' for n in [start, start+count) "
              "on the session's own (GET) stream, not this call's; close_stream: then close that stream.")
    async def announce(start: int, count: int, ctx: Context, close_stream: bool = False) -> str:
        for n in range(start, start + count):
            await ctx.session.send_log_message(level="info", data=f"announcement {n}", logger="announce")
        if close_stream:                  # then end that stream: the client must reconnect to hear more
            await ctx.close_standalone_sse_stream()
        return f"announced {count}"

    @mcp.tool(description="Ask the client's LLM (sampling/createMessage) and return its text.")
    async def ask_sampling(prompt: str, reply: Annotated[CreateMessageResult, Resolve(_sample)]) -> str:
        content = reply.content
        text = content.text if isinstance(content, TextContent) else json.dumps(content.model_dump(mode="json"))
        return f"sampled[{reply.model}]: {text}"

    @mcp.tool(description="Ask the user a question (elicitation/create) and report the outcome.")
    async def ask_elicitation(
        question: str, outcome: Annotated[ElicitationResult[Answer], Resolve(_elicit)]
    ) -> str:
        if outcome.action == "accept":
            return f"accepted: {outcome.data.answer}"
        return outcome.action

    @mcp.tool(description="Return the client's roots (roots/list) as a JSON list of URIs.")
    async def list_client_roots(roots: Annotated[ListRootsResult, Resolve(_roots)]) -> str:
        return json.dumps([str(root.uri) for root in roots.roots])

    @mcp.tool(
        description="Delete a file from the shared folder.",
        annotations=ToolAnnotations(destructive_hint=True, read_only_hint=False),
    )
    def delete_file(path: str) -> str:
        if FILES.pop(path, None) is None:
            raise ValueError(f"no such file: {path}")
        return f"deleted {path}"

    @mcp.tool(
        description="Read a file from the (fake) filesystem.",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    def read_file(path: str) -> str:
        if path not in FILES:
            raise ValueError(f"no such file: {path}")
        return FILES[path]

    @mcp.resource("file:///srv/shared/readme.txt", name="readme", mime_type="text/plain")
    def readme() -> str:
        return FILES.get("/srv/shared/readme.txt", "")

    @mcp.resource("config://app", name="app-config", mime_type="application/json")
    def app_config() -> str:
        return json.dumps({"feature_flags": {"beta": False}, "region": "test-1"})

    @mcp.resource("notes://{note_id}", name="note", mime_type="text/plain")
    def note(note_id: str) -> str:
        return f"note {note_id}"

    @mcp.prompt(description="Greet someone by name.")
    def greet(name: str) -> str:
        return f"Please greet {name} warmly."

    @mcp.prompt(description="Summarise a text.")
    def summarize(text: str) -> str:
        return f"Summarise the following text in one sentence:\n\n{text}"

    return mcp


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class RecordAndGuard:
    """ASGI wrapper: records each HTTP request (``--record``), enforces ``--require-bearer``,
    adds ``--set-cookie`` to every response and holds each ``GET`` ``--get-delay`` ms before the
    SDK sees it (a slow origin: its standalone stream exists only once its answer starts)."""

    def __init__(self, app: ASGIApp, record_path: str | None, bearer: str | None,
                 set_cookie: str | None = None, get_delay_ms: int = 0) -> None:
        self.app = app
        self.record_path = record_path
        self.bearer = bearer
        self.cookie = set_cookie.encode("latin-1") if set_cookie else None
        self.get_delay = get_delay_ms / 1000

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Buffer the body so it can be recorded, then replay it to the app unchanged.
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = _headers(scope)
        if self.record_path:
            self._record(scope, headers, body)
        if self.bearer is not None and headers.get("authorization") != f"Bearer {self.bearer}":
            await _send_json(send, 401, {"jsonrpc": "2.0", "id": None,
                                         "error": {"code": -32001, "message": "upstream: bad bearer"}},
                             [(b"www-authenticate", b'Bearer realm="test-upstream"')])
            return
        if self.get_delay and scope["method"] == "GET":
            await anyio.sleep(self.get_delay)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if self.cookie is not None:
            send = self._cookie_sender(send)
        await self.app(scope, replay, send)

    def _cookie_sender(self, send: Any) -> Any:
        cookie = b"set-cookie", self.cookie + b"; Path=/; HttpOnly"

        async def with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), cookie]}
            await send(message)

        return with_cookie

    def _record(self, scope: MutableMapping[str, Any], headers: dict[str, str], body: bytes) -> None:
        parsed: Any = None
        if body and len(body) <= RECORD_BODY_LIMIT:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        rpc_method: Any = None
        rpc_id: Any = None
        if isinstance(parsed, dict):
            rpc_method, rpc_id = parsed.get("method"), parsed.get("id")
        elif isinstance(parsed, list):
            rpc_method = [m.get("method") for m in parsed if isinstance(m, dict)]
        entry = {
            "ts": time.time(),
            "method": scope["method"],
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": headers,
            "jsonrpc_method": rpc_method,
            "jsonrpc_id": rpc_id,
            "body": parsed,
            "body_bytes": len(body),
        }
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        # One write per line on an O_APPEND descriptor: concurrent requests never interleave.
        fd = os.open(self.record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _headers(scope: MutableMapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


async def _send_json(send: Any, status: int, payload: Any, extra: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class _AnnouncingServer(uvicorn.Server):
    """Prints the readiness line only once uvicorn has started serving."""

    def __init__(self, config: uvicorn.Config, port: int) -> None:
        super().__init__(config)
        self._port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            info = {"port": self._port, "url": f"http://127.0.0.1:{self._port}{MCP_PATH}", "pid": os.getpid()}
            print(f"{READY_TAG} {json.dumps(info)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.upstream_server", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json-response", action="store_true", help="answer requests with application/json, not SSE")
    parser.add_argument("--stateless", action="store_true", help="legacy era without Mcp-Session-Id")
    parser.add_argument("--record", metavar="FILE", help="append one JSON line per HTTP request received")
    parser.add_argument("--require-bearer", metavar="TOKEN", help="answer 401 unless 'Authorization: Bearer TOKEN'")
    parser.add_argument("--retry-interval", type=int, metavar="MS", help="SSE retry field sent to legacy clients")
    parser.add_argument("--echo-description", help="replace the echo tool's description (rug-pull tests)")
    parser.add_argument("--no-dns-rebinding-protection", action="store_true")
    parser.add_argument("--set-cookie", metavar="NAME=VALUE", help="a Set-Cookie header on every response")
    parser.add_argument("--get-delay", type=int, default=0, metavar="MS", help="hold each GET this long first")
    args = parser.parse_args(argv)

    mcp = build_server(args.echo_description)
    security = None
    if args.no_dns_rebinding_protection:
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        json_response=args.json_response,
        stateless_http=args.stateless,
        event_store=None if args.stateless else InMemoryEventStore(),
        retry_interval=args.retry_interval,
        transport_security=security,
        host="127.0.0.1",
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        RecordAndGuard(app, args.record, args.require_bearer, args.set_cookie, args.get_delay),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = _AnnouncingServer(config, port)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
