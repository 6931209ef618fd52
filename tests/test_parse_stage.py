"""The parse stage reads a body that has fully arrived without a coroutine, and waits for one that has not."""
from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import orjson
import pytest
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request

from gateway.errors import BodyTooLarge
from gateway.pipeline import Exchange
from gateway.stages.parse import Parse

BODY = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                     "params": {"name": "echo", "arguments": {"text": "hi"}}})
HEADERS = {"Content-Type": "application/json", "Mcp-Method": "tools/call", "Mcp-Name": "echo"}


def _setup(chunks: list[bytes], eof: bool, max_body: int = 1 << 20) -> tuple[Parse, Exchange, Any]:
    loop = asyncio.get_running_loop()
    protocol = mock.Mock(_reading_paused=False)
    payload = streams.StreamReader(protocol, 2 ** 16, loop=loop)
    for chunk in chunks:
        payload.feed_data(chunk)
    if eof:
        payload.feed_eof()
    req = make_mocked_request("POST", "/mcp/a", headers=HEADERS, payload=payload)
    config = mock.Mock()
    config.limits.max_body_bytes = max_body
    config.limits.body_timeout = 5.0
    server = mock.Mock()
    server.name = "a"
    return Parse(config), Exchange(req, server), payload


def _parsed(ex: Exchange) -> tuple[Any, ...]:
    return ex.body, ex.rpc_id, ex.method, ex.name, ex.arguments, ex.is_request


async def test_a_complete_body_is_parsed_synchronously() -> None:
    stage, ex, _ = _setup([BODY[:20], BODY[20:]], eof=True)
    assert stage.check(ex) is None
    assert _parsed(ex) == (BODY, 7, "tools/call", "echo", {"text": "hi"}, True)


async def test_a_body_still_arriving_is_awaited_and_parses_the_same() -> None:
    stage, ex, payload = _setup([BODY[:20]], eof=False)
    pending = stage.check(ex)
    assert pending is not None
    payload.feed_data(BODY[20:])
    payload.feed_eof()
    await pending
    assert _parsed(ex) == (BODY, 7, "tools/call", "echo", {"text": "hi"}, True)


async def test_an_oversized_complete_body_is_refused() -> None:
    stage, ex, _ = _setup([BODY], eof=True, max_body=len(BODY) - 1)
    with pytest.raises(BodyTooLarge):
        stage.check(ex)


async def test_on_request_still_does_everything() -> None:
    stage, ex, _ = _setup([BODY], eof=True)
    await stage.on_request(ex)
    assert _parsed(ex) == (BODY, 7, "tools/call", "echo", {"text": "hi"}, True)
