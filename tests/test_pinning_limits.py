"""``limits.max_tools_per_page``: a listing too large to scan is refused, not scanned.

Two SDK upstreams (JSON and SSE answers) list every tool on one page; the gateway
allows four tools per page.  Five tools: the JSON answer becomes a 502 with the
request's id, the SSE answer an in-band JSON-RPC error for that id; nothing of
the listing reaches the client and the refusal is counted.  Four tools: relayed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.components import start_gateway
from tests.support.gw_helpers import allow_all, http_client, initialize, modern_headers, modern_params, post, rpc
from tests.support.mutable_upstream import Mutable, default_tools, start_mutable
from tests.support.pin_cases import metric

LIMIT = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Mutable]]]:
    workdir = tmp_path_factory.mktemp("pin-limits")
    ups: dict[str, Mutable] = {}
    gw = None
    try:
        for transport in ("json", "sse"):
            ups[transport] = start_mutable(workdir / "up", json_response=transport == "json", page_size=0)
        gw = start_gateway(workdir / "gw", {
            "policies": allow_all(workdir), "pins": str(workdir / "pins"),
            "limits": {"max_tools_per_page": LIMIT},
            "servers": {t: {"url": up.url, "pinning": {"mode": "tofu"}} for t, up in ups.items()},
        })
        yield gw, ups
    finally:
        if gw is not None:
            gw.stop()
        for up in ups.values():
            up.stop()


async def list_tools(gw: Any, transport: str) -> tuple[dict[str, Any], Any]:
    """``tools/list`` through the gateway: 2026-07-28 (a JSON answer) for the JSON upstream,
    a 2025-11-25 session (an SSE answer) for the SSE one."""
    async with http_client() as http:
        if transport == "json":
            msg = rpc("tools/list", modern_params())
            return msg, await post(http, gw.url(transport), msg, modern_headers("tools/list"), version=None)
        session, _ = await initialize(http, gw.url(transport))
        msg = rpc("tools/list", {})
        return msg, await post(http, gw.url(transport), msg, session_id=session)


@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_a_page_over_the_limit_is_refused_before_it_is_scanned(stack: Any, transport: str) -> None:
    gw, ups = stack
    tools = default_tools()
    assert len(tools) == LIMIT + 1
    ups[transport].set_tools(tools)
    before = await metric(gw.admin_url, "mcpgw_upstream_errors_total", server=transport, reason="too_many_tools")
    msg, reply = await list_tools(gw, transport)
    if transport == "json":
        assert reply.status == 502 and reply.error_reason == "upstream_too_many_tools"
        errors = [reply.json]
    else:
        assert reply.status == 200 and reply.events            # the stream had started: in band
        errors = [m for m in reply.messages if "error" in m]
        assert not [m for m in reply.messages if "result" in m]
    assert len(errors) == 1 and errors[0]["id"] == msg["id"]
    assert errors[0]["error"]["data"]["reason"] == "upstream_too_many_tools"
    assert f"limit is {LIMIT}" in errors[0]["error"]["message"]
    assert b"inputSchema" not in reply.body                      # no tool definition reached the client
    after = await metric(gw.admin_url, "mcpgw_upstream_errors_total", server=transport, reason="too_many_tools")
    assert after == before + 1


@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_a_page_at_the_limit_is_relayed(stack: Any, transport: str) -> None:
    gw, ups = stack
    ups[transport].set_tools(default_tools()[:LIMIT])
    msg, reply = await list_tools(gw, transport)
    assert reply.status == 200 and (transport == "json") != bool(reply.events)
    results = [m for m in reply.messages if m.get("id") == msg["id"]]
    assert len(results) == 1 and len(results[0]["result"]["tools"]) == LIMIT


def test_the_limit_is_in_the_config_reference() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "`limits.max_tools_per_page`" in readme
