"""The official ``mcp`` SDK client through the gateway, against a real ``mcp`` SDK upstream, both eras.

One SSE upstream and one JSON-response upstream are mounted on one gateway for the whole
module; each test clears the upstream's record file and reads it back to prove what the
upstream saw.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import mcp_types as types
import pytest

from tests.support.clients import ProgressLog, fake_elicitation, fake_roots, fake_sampling, mcp_client
from tests.support.components import Gateway, Upstream
from tests.support.gw_helpers import MODERN_VERSION, Stack, stack  # noqa: F401  (fixture)

ERAS = ["legacy", "modern", "auto"]
MOUNTS = ["sse", "json"]


@pytest.fixture(scope="module")
def upstreams(stack: Stack) -> dict[str, Upstream]:
    sse, json_response = stack.upstreams({}, {"json_response": True})
    return {"sse": sse, "json": json_response}


@pytest.fixture(scope="module")
def gw(stack: Stack, upstreams: dict[str, Upstream]) -> Gateway:
    return stack.gateway({"servers": dict(upstreams)})


@pytest.fixture
def fresh(upstreams: dict[str, Upstream]) -> Iterator[dict[str, Upstream]]:
    for up in upstreams.values():
        up.clear_records()
    yield upstreams


def text_of(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


def assert_spoke_era(up: Upstream, era: str) -> None:
    """The upstream saw the era the client chose (the gateway does not translate)."""
    methods = [r["jsonrpc_method"] for r in up.records()]
    versions = {r["headers"].get("mcp-protocol-version") for r in up.records() if r["jsonrpc_method"] != "initialize"}
    if era == "legacy":
        assert "initialize" in methods and versions == {"2025-11-25"}
    else:
        assert "initialize" not in methods and versions == {MODERN_VERSION}
    if era == "auto":
        assert methods[0] == "server/discover"


@pytest.mark.parametrize("mount", MOUNTS)
@pytest.mark.parametrize("era", ERAS)
async def test_sdk_client_lists_and_calls_tools_through_the_gateway(gw: Gateway, fresh: dict[str, Upstream],
                                                                    era: str, mount: str) -> None:
    async with mcp_client(gw.url(mount), era=era) as client:
        tools = await client.list_tools()
        assert {"echo", "add", "slow_progress", "ask_sampling"} <= {t.name for t in tools.tools}
        assert text_of(await client.call_tool("add", {"a": 20, "b": 22})) == "42"
        marker = f"héllo {uuid.uuid4()}"
        assert text_of(await client.call_tool("echo", {"text": marker})) == marker
    assert_spoke_era(fresh[mount], era)


@pytest.mark.parametrize("mount", MOUNTS)
@pytest.mark.parametrize("era", ERAS)
async def test_sdk_client_reads_resources_and_prompts_through_the_gateway(gw: Gateway, fresh: dict[str, Upstream],
                                                                          era: str, mount: str) -> None:
    async with mcp_client(gw.url(mount), era=era) as client:
        resources = await client.list_resources()
        assert {str(r.uri) for r in resources.resources} >= {"file:///srv/shared/readme.txt", "config://app"}
        config = await client.read_resource("config://app")
        assert json.loads(config.contents[0].text)["region"] == "test-1"
        templated = await client.read_resource("notes://n-7")
        assert templated.contents[0].text == "note n-7"
        prompts = await client.list_prompts()
        assert {p.name for p in prompts.prompts} == {"greet", "summarize"}
        greeting = await client.get_prompt("greet", {"name": "Ada"})
        assert "Ada" in greeting.messages[0].content.text
    assert_spoke_era(fresh[mount], era)


@pytest.mark.parametrize("mount", MOUNTS)
async def test_a_large_tool_result_reaches_the_client_whole(gw: Gateway, mount: str) -> None:
    """A big reply arrives from the upstream in many TCP reads; the gateway relays all of them."""
    big = "x" * 3_000_000 + str(uuid.uuid4())
    async with mcp_client(gw.url(mount), era="modern") as client:
        assert text_of(await client.call_tool("echo", {"text": big})) == big


# --------------------------------------------------------------------------- progress

STEPS, INTERVAL_MS = 5, 150


@pytest.mark.parametrize("era", ERAS)
async def test_progress_notifications_arrive_while_the_tool_call_runs(gw: Gateway, fresh: dict[str, Upstream],
                                                                      era: str) -> None:
    async with mcp_client(gw.url("sse"), era=era) as client:
        log = ProgressLog()
        result = await client.call_tool("slow_progress", {"steps": STEPS, "interval_ms": INTERVAL_MS},
                                        progress_callback=log.callback)
        done = log.elapsed()
    assert text_of(result) == f"done after {STEPS} steps"
    assert [p for _, p, _, _ in log.events] == [float(s) for s in range(1, STEPS + 1)]
    arrivals = [t for t, *_ in log.events]
    interval = INTERVAL_MS / 1000
    # Streamed, not buffered: the first progress arrives long before the result, and the
    # events are spread over the call as the upstream emitted them.
    assert done - arrivals[0] >= (STEPS - 2) * interval, (arrivals, done)
    assert arrivals[-1] - arrivals[0] >= 0.8 * (STEPS - 1) * interval, arrivals
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert gaps[len(gaps) // 2] >= 0.5 * interval, arrivals     # median: one scheduler stall is not a failure


@pytest.mark.parametrize("era", ERAS)
async def test_a_json_response_upstream_gives_the_same_progress_through_the_gateway_as_directly(
        gw: Gateway, fresh: dict[str, Upstream], era: str) -> None:
    """An upstream that answers application/json has no stream to carry progress on (the SDK
    server drops it); the gateway neither loses the result nor invents events."""
    seen: dict[str, list[Any]] = {}
    for route, url in (("direct", fresh["json"].url), ("gateway", gw.url("json"))):
        async with mcp_client(url, era=era) as client:
            log = ProgressLog()
            result = await client.call_tool("slow_progress", {"steps": 3, "interval_ms": 20},
                                            progress_callback=log.callback)
            assert text_of(result) == "done after 3 steps"
            seen[route] = [p for _, p, _, _ in log.events]
    assert seen["gateway"] == seen["direct"]


# --------------------------------------------------------------------------- server-to-client input

def _answers(up: Upstream) -> list[dict[str, Any]]:
    """POSTs whose body is a JSON-RPC *response* (a client answering a server request)."""
    return [r for r in up.records() if isinstance(r["body"], dict) and "method" not in r["body"]
            and ("result" in r["body"] or "error" in r["body"])]


def _calls(up: Upstream, tool: str) -> list[dict[str, Any]]:
    return [r for r in up.records("tools/call") if r["body"]["params"]["name"] == tool]


INPUT_CASES = [
    pytest.param("ask_sampling", {"prompt": "P"}, "sampled[fake-llm]: R{m}", id="sampling"),
    pytest.param("ask_elicitation", {"question": "Q"}, "accepted: A{m}", id="elicitation"),
    pytest.param("list_client_roots", {}, '["file:///work/R{m}"]', id="roots"),
]


def _callbacks(marker: str) -> dict[str, Any]:
    return {
        "sampling_callback": fake_sampling(reply=f"R{marker}"),
        "elicitation_callback": fake_elicitation(content={"answer": f"A{marker}"}),
        "list_roots_callback": fake_roots(f"file:///work/R{marker}"),
    }


@pytest.mark.parametrize(("tool", "args", "expected"), INPUT_CASES)
async def test_legacy_server_requests_reach_the_client_and_its_answer_returns_to_the_same_upstream_session(
        gw: Gateway, fresh: dict[str, Upstream], tool: str, args: dict[str, Any], expected: str) -> None:
    marker = uuid.uuid4().hex[:8]
    async with mcp_client(gw.url("sse"), era="legacy", **_callbacks(marker)) as client:
        result = await client.call_tool(tool, args)
    assert text_of(result) == expected.format(m=marker)
    up = fresh["sse"]
    (call,) = _calls(up, tool)
    (answer,) = _answers(up)
    # The answer was POSTed by the client with the gateway's session id and reached the
    # upstream with the upstream's own session id, the one the call used.
    assert answer["headers"]["mcp-session-id"] == call["headers"]["mcp-session-id"]
    assert marker in json.dumps(answer["body"]["result"])


@pytest.mark.parametrize(("tool", "args", "expected"), INPUT_CASES)
async def test_modern_input_required_round_trips_pass_through_the_gateway(
        gw: Gateway, fresh: dict[str, Upstream], tool: str, args: dict[str, Any], expected: str) -> None:
    marker = uuid.uuid4().hex[:8]
    async with mcp_client(gw.url("sse"), era="modern", **_callbacks(marker)) as client:
        result = await client.call_tool(tool, args)
    assert text_of(result) == expected.format(m=marker)
    up = fresh["sse"]
    first, retry = _calls(up, tool)
    # MRTR: no server-to-client request; the client retries the call with inputResponses
    # and the opaque requestState, which the gateway forwards unchanged.
    assert "inputResponses" not in first["body"]["params"]
    assert marker in json.dumps(retry["body"]["params"]["inputResponses"])
    assert retry["body"]["params"]["requestState"]
    assert _answers(up) == []
