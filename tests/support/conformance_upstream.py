"""A 2026-07-28 upstream with the fixture tools, resources and prompts the conformance suite calls.

The suite's server scenarios call fixtures by name (``test_simple_text``,
``test://static-text``, ``test_simple_prompt``...); against a server without them a
scenario fails directly and so proves nothing about the gateway.  This is the SDK's
``MCPServer`` (dual-era, as ``upstream_server.py``) with those fixtures, written from the
scenarios' checks, so more of the 2026-07-28 requirement set passes directly and must
then pass through the gateway too.  Run it like ``upstream_server``::

    python -m tests.support.conformance_upstream --port 0

It prints the same ``UPSTREAM_READY {...}`` line once it serves.
"""
from __future__ import annotations

import argparse
import base64
import socket
import sys
from typing import Annotated

from mcp.server.mcpserver import Context, Elicit, ElicitationResult, ListRoots, MCPServer, Resolve, Sample
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp_types import (
    AudioContent,
    Completion,
    CreateMessageResult,
    EmbeddedResource,
    ImageContent,
    ListRootsResult,
    SamplingMessage,
    TextContent,
    TextResourceContents,
)
from pydantic import BaseModel, Field

from .upstream_server import MCP_PATH, InMemoryEventStore, _AnnouncingServer

# A 1x1 PNG and a tiny WAV header: real media types, a few bytes each.
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cfc0f01f0005000201"
    "5f1d3e4a0000000049454e44ae426082")).decode()
WAV = base64.b64encode(b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00D\xac\x00\x00\x88X\x01\x00"
                       b"\x02\x00\x10\x00data\x00\x00\x00\x00").decode()


class Name(BaseModel):
    name: str


# Resolvers: in 2026-07-28 the SDK returns what they ask for as an InputRequiredResult whose
# inputRequests are keyed by the parameter name (the keys the suite expects).
def _ask_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)


def _ask_capital() -> Sample:
    return Sample([SamplingMessage(role="user", content=TextContent(type="text", text="What is the capital of France?"))],
                  max_tokens=100)


def _ask_greeting() -> Sample:
    return Sample([SamplingMessage(role="user", content=TextContent(type="text", text="Generate a greeting"))],
                  max_tokens=50)


def _roots() -> ListRoots:
    return ListRoots()


def _resource(uri: str, text: str) -> EmbeddedResource:
    return EmbeddedResource(type="resource",
                            resource=TextResourceContents(uri=uri, mime_type="text/plain", text=text))


def build_server() -> MCPServer:
    mcp = MCPServer(name="conformance-upstream", version="1.0.0")

    @mcp.tool(description="Returns simple text content.")
    def test_simple_text() -> str:
        return "This is a simple text response for testing."

    @mcp.tool(description="Returns image content.")
    def test_image_content() -> list[ImageContent]:
        return [ImageContent(type="image", data=PNG, mime_type="image/png")]

    @mcp.tool(description="Returns audio content.")
    def test_audio_content() -> list[AudioContent]:
        return [AudioContent(type="audio", data=WAV, mime_type="audio/wav")]

    @mcp.tool(description="Returns an embedded resource.")
    def test_embedded_resource() -> list[EmbeddedResource]:
        return [_resource("test://embedded-resource", "This is an embedded resource content.")]

    @mcp.tool(description="Returns text, image and resource content.")
    def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
        return [TextContent(type="text", text="Multiple content types test:"),
                ImageContent(type="image", data=PNG, mime_type="image/png"),
                _resource("test://mixed-content-resource", '{"test": "data"}')]

    @mcp.tool(description="Reports three progress notifications, then returns.")
    async def test_tool_with_progress(ctx: Context) -> str:
        for step in (0, 50, 100):
            await ctx.report_progress(step, 100, f"step {step}")
        return "progress done"

    @mcp.tool(description="Always fails with an error result.")
    def test_error_handling() -> str:
        raise ValueError("This tool intentionally returns an error for testing")

    @mcp.tool(description="Asks the user's name (elicitation as input required).")
    async def test_input_required_result_elicitation(
            user_name: Annotated[ElicitationResult[Name], Resolve(_ask_name)]) -> str:
        return f"Hello, {user_name.data.name}!" if user_name.action == "accept" else user_name.action

    @mcp.tool(description="Asks the client's LLM (sampling as input required).")
    async def test_input_required_result_sampling(
            capital_question: Annotated[CreateMessageResult, Resolve(_ask_capital)]) -> str:
        content = capital_question.content
        return content.text if isinstance(content, TextContent) else "sampled"

    @mcp.tool(description="Asks the client's roots (roots/list as input required).")
    async def test_input_required_result_list_roots(client_roots: Annotated[ListRootsResult, Resolve(_roots)]) -> str:
        return "roots: " + ", ".join(str(root.uri) for root in client_roots.roots)

    @mcp.tool(description="Asks for a name, a greeting and the roots at once.")
    async def test_input_required_result_multiple_inputs(
            user_name: Annotated[ElicitationResult[Name], Resolve(_ask_name)],
            greeting: Annotated[CreateMessageResult, Resolve(_ask_greeting)],
            client_roots: Annotated[ListRootsResult, Resolve(_roots)]) -> str:
        return f"got {len(client_roots.roots)} roots"

    @mcp.tool(description="Mirrors its region parameter into the Mcp-Param-Region header.")
    def test_custom_headers(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
        return f"region {region}"

    @mcp.resource("test://static-text", name="static-text", mime_type="text/plain")
    def static_text() -> str:
        return "This is the content of the static text resource."

    @mcp.resource("test://static-binary", name="static-binary", mime_type="image/png")
    def static_binary() -> bytes:
        return base64.b64decode(PNG)

    @mcp.resource("test://template/{id}/data", name="template", mime_type="application/json")
    def template(id: str) -> str:
        return f'{{"id": "{id}", "templateTest": true, "data": "Data for ID: {id}"}}'

    @mcp.prompt(description="A prompt without arguments.")
    def test_simple_prompt() -> str:
        return "This is a simple prompt for testing."

    @mcp.prompt(description="A prompt with arguments.")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @mcp.prompt(description="A prompt with an embedded resource.")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:  # noqa: N803 (the suite's name)
        return [UserMessage(_resource(resourceUri, "Embedded resource content for testing.")),
                UserMessage("Please process the embedded resource above.")]

    @mcp.prompt(description="A prompt with an image.")
    def test_prompt_with_image() -> list[UserMessage]:
        return [UserMessage(ImageContent(type="image", data=PNG, mime_type="image/png")),
                UserMessage("Please analyze the image above.")]

    @mcp.completion()
    async def complete(ref: object, argument: object, context: object) -> Completion:
        return Completion(values=["paris", "park", "party"], total=3, has_more=False)

    return mcp


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m tests.support.conformance_upstream")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    app = build_server().streamable_http_app(streamable_http_path=MCP_PATH, event_store=InMemoryEventStore(),
                                             host="127.0.0.1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    _AnnouncingServer(config, sock.getsockname()[1]).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
