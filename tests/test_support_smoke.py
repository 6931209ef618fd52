"""The test harness itself: real servers, talked to directly with the official SDK client.

If these fail, every gateway test built on the same fixtures is suspect.
"""
from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from tests.support.clients import (
    LEGACY_VERSION,
    MODERN_VERSION,
    ProgressLog,
    fake_elicitation,
    fake_roots,
    fake_sampling,
    mcp_client,
    raises_mcp_error,
)

UPSTREAM_TOOLS = {"echo", "add", "slow_progress", "reconnecting_progress", "announce", "ask_sampling",
                  "ask_elicitation", "list_client_roots", "delete_file", "read_file"}
ERAS = ["legacy", "modern", "auto"]
NEGOTIATED = {"legacy": LEGACY_VERSION, "modern": MODERN_VERSION, "auto": MODERN_VERSION}


def text_of(result) -> str:
    return "".join(block.text for block in result.content if block.type == "text")


@pytest.mark.parametrize("era", ERAS)
async def test_upstream_lists_and_calls_tools_in_each_era(upstream, era):
    up = await upstream.astart()
    async with mcp_client(up.url, era=era) as client:
        assert client.protocol_version == NEGOTIATED[era]
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert UPSTREAM_TOOLS <= set(tools)
        assert tools["delete_file"].annotations.destructive_hint is True
        assert text_of(await client.call_tool("echo", {"text": "hi there"})) == "hi there"
        assert text_of(await client.call_tool("add", {"a": 2, "b": 40})) == "42"
        contents = (await client.read_resource("config://app")).contents
        assert json.loads(contents[0].text)["region"] == "test-1"
        assert {p.name for p in (await client.list_prompts()).prompts} >= {"greet", "summarize"}


@pytest.mark.parametrize("era", ERAS)
async def test_progress_notifications_arrive_while_the_call_is_still_running(upstream, era):
    up = await upstream.astart()
    steps, interval_ms = 3, 300
    async with mcp_client(up.url, era=era) as client:
        log = ProgressLog()
        result = await client.call_tool("slow_progress", {"steps": steps, "interval_ms": interval_ms},
                                        progress_callback=log.callback)
        finished = log.elapsed()
    assert text_of(result) == "done after 3 steps"
    assert [event[1] for event in log.events] == [1, 2, 3]
    # Streamed, not buffered: the first step reached us well before the result did.
    first_arrival = log.events[0][0]
    assert finished - first_arrival >= (steps - 1) * interval_ms / 1000 * 0.5


@pytest.mark.parametrize("era", ERAS)
async def test_sampling_elicitation_and_roots_reach_the_client_callbacks(upstream, era):
    up = await upstream.astart()
    sampling, elicitation = fake_sampling("the sky is blue"), fake_elicitation(content={"answer": "blue"})
    async with mcp_client(up.url, era=era, sampling_callback=sampling, elicitation_callback=elicitation,
                          list_roots_callback=fake_roots("file:///work/repo")) as client:
        sampled = await client.call_tool("ask_sampling", {"prompt": "what colour is the sky?"})
        elicited = await client.call_tool("ask_elicitation", {"question": "favourite colour?"})
        roots = await client.call_tool("list_client_roots", {})
    assert text_of(sampled) == "sampled[fake-llm]: the sky is blue"
    assert sampling.calls[0].messages[0].content.text == "what colour is the sky?"
    assert text_of(elicited) == "accepted: blue"
    assert elicitation.calls[0].message == "favourite colour?"
    assert json.loads(text_of(roots)) == ["file:///work/repo"]


async def test_declined_elicitation_is_reported_by_the_upstream(upstream):
    up = await upstream.astart()
    async with mcp_client(up.url, era="legacy", elicitation_callback=fake_elicitation("decline")) as client:
        assert text_of(await client.call_tool("ask_elicitation", {"question": "ok?"})) == "decline"


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_json_response_mode_answers_with_application_json(upstream, era):
    up = await upstream.astart(json_response=True)
    async with mcp_client(up.url, era=era) as client:
        assert text_of(await client.call_tool("echo", {"text": "plain"})) == "plain"


async def test_records_show_every_request_and_header_the_upstream_received(upstream):
    up = await upstream.astart()
    async with mcp_client(up.url, era="modern", headers={"Authorization": "Bearer direct-token"}) as client:
        await client.call_tool("echo", {"text": "x"})
    calls = up.records("tools/call")
    assert len(calls) == 1
    assert calls[0]["headers"]["authorization"] == "Bearer direct-token"
    assert calls[0]["headers"]["mcp-method"] == "tools/call"
    assert calls[0]["headers"]["mcp-name"] == "echo"
    assert calls[0]["body"]["params"]["arguments"] == {"text": "x"}


async def test_upstream_with_require_bearer_rejects_other_credentials(upstream):
    up = await upstream.astart(require_bearer="upstream-secret")
    async with mcp_client(up.url, era="modern", headers={"Authorization": "Bearer upstream-secret"}) as client:
        assert text_of(await client.call_tool("echo", {"text": "ok"})) == "ok"
    with raises_mcp_error(-32001):
        async with mcp_client(up.url, era="modern", headers={"Authorization": "Bearer wrong"}) as client:
            await client.call_tool("echo", {"text": "no"})
    assert any(r["headers"].get("authorization") == "Bearer wrong" for r in up.records())


async def test_legacy_client_resumes_a_closed_stream_with_last_event_id(upstream):
    up = await upstream.astart(retry_interval_ms=50)
    async with mcp_client(up.url, era="legacy") as client:
        log = ProgressLog()
        result = await client.call_tool("reconnecting_progress", {"steps": 3, "interval_ms": 100},
                                        progress_callback=log.callback)
    assert text_of(result) == "resumed and done after 3 steps"
    assert [event[1] for event in log.events] == [1, 2, 3]
    resumed = [r for r in up.records() if r["method"] == "GET" and "last-event-id" in r["headers"]]
    assert resumed, "the client never resumed with Last-Event-ID"


async def test_modern_request_with_mismatched_mcp_name_header_is_rejected(upstream):
    """The SDK server enforces header/body consistency (HeaderMismatch) in the modern era."""
    import httpx2

    up = await upstream.astart()
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "x"},
                       "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                                 "io.modelcontextprotocol/clientCapabilities": {}}}}
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": MODERN_VERSION,
               "mcp-method": "tools/call", "mcp-name": "delete_file"}
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(up.url, json=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32020


async def test_everything_serves_the_legacy_era_and_its_callbacks(everything):
    sampling, elicitation = fake_sampling("hi from the client"), fake_elicitation(content={"name": "Ada"})
    async with mcp_client(everything.url, era="auto", sampling_callback=sampling,
                          elicitation_callback=elicitation) as client:
        # server-everything is legacy-only: `auto` falls back to initialize.
        assert client.protocol_version == LEGACY_VERSION
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "trigger-long-running-operation", "trigger-sampling-request",
                "trigger-elicitation-request"} <= names
        assert "hello" in text_of(await client.call_tool("echo", {"message": "hello"}))

        log = ProgressLog()
        await client.call_tool("trigger-long-running-operation", {"duration": 0.6, "steps": 3},
                               progress_callback=log.callback)
        finished = log.elapsed()
        assert [event[1] for event in log.events] == [1, 2, 3]
        assert finished - log.events[0][0] >= 0.2

        sampled = await client.call_tool("trigger-sampling-request", {"prompt": "say hi", "maxTokens": 20})
        assert "hi from the client" in text_of(sampled)
        elicited = await client.call_tool("trigger-elicitation-request", {})
        assert "Ada" in text_of(elicited)


async def test_everything_rejects_the_modern_era(everything):
    with raises_mcp_error():
        async with mcp_client(everything.url, era="modern") as client:
            await client.list_tools()


async def test_redis_fixture_gives_a_private_prefix_on_a_real_server(redis_url, redis_prefix, redis_store):
    assert redis_store == {"url": redis_url, "prefix": redis_prefix}
    client = aioredis.from_url(redis_url)
    try:
        assert await client.ping()
        await client.set(f"{redis_prefix}probe", "1", ex=60)
        assert await client.get(f"{redis_prefix}probe") == b"1"
    finally:
        await client.aclose()
