"""W3C trace context through the gateway, and OTLP span export to a collector (#11).

A request carrying ``traceparent`` reaches the upstream with the same trace id, a new
parent span (the gateway's) and its flags; ``tracestate`` follows.  A malformed
``traceparent`` is dropped, never forwarded.  The trace id is in the audit record.  With
``tracing.otlp_endpoint`` pointing at a local collector, the spans arrive as OTLP/HTTP
JSON: ``mcp.request`` continuing the caller's span, one span per stage, and
``mcp.upstream`` whose id is the parent the upstream saw.
"""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support.evil_upstream import EvilUpstream, http, result
from tests.support.gw_helpers import http_client, initialize, post, rpc

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
POLICY = """\
servers:
  evil:
    default: deny
    tools:
      - {id: evil-safe, match: safe_tool, destructive: allow}
    limits:
      - {id: roomy, match: {tools: ["*"]}, key: [principal], windows: [{limit: 1000, per: 1s}]}
"""


class Collector:
    """An OTLP/HTTP receiver on 127.0.0.1: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/json"
        body = await request.json()
        for rs in body["resourceSpans"]:
            self.resources.append(rs["resource"])
            for ss in rs["scopeSpans"]:
                self.spans += ss["spans"]
        self.arrived.set()
        return web.json_response({})

    async def start(self) -> "Collector":
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1/traces"
        return self

    async def wait_for(self, name: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(s["name"] == name for s in self.spans):
                self.arrived.clear()
                await self.arrived.wait()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def _gateway(gateway: Any, evil: EvilUpstream, tmp_path: Path, tracing: dict[str, Any] | None = None) -> Any:
    async def listing(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return http(200, result(rid))

    async def call(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "content": [{"type": "text", "text": "ok"}]}}).encode())

    evil.scripts.update({"tools/list": listing, "tools/call": call})
    (tmp_path / "p").mkdir(exist_ok=True)
    (tmp_path / "p" / "evil.yaml").write_text(POLICY)
    cfg: dict[str, Any] = {"servers": {"evil": {"url": evil.url}}, "policies": str(tmp_path / "p")}
    if tracing is not None:
        cfg["tracing"] = tracing
    return await gateway.astart(cfg)


def _upstream_traceparents(evil: EvilUpstream, method: str) -> list[str | None]:
    return [h.get("traceparent") for m, h, b in evil.requests if m == "POST" and f'"{method}"'.encode() in b]


async def _call(client: Any, gw: Any, sid: str, headers: dict[str, str]) -> Any:
    return await post(client, gw.url("evil"), rpc("tools/call", {"name": "safe_tool", "arguments": {}}), headers,
                      session_id=sid)


async def test_a_traceparent_reaches_the_upstream_with_the_same_trace_and_a_new_parent(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    gw = await _gateway(gateway, evil, tmp_path)
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        reply = await _call(client, gw, sid, {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=abc"})
    assert reply.status == 200
    (seen,) = _upstream_traceparents(evil, "tools/call")
    version, trace, parent, flags = seen.split("-")
    assert (version, trace, flags) == ("00", TRACE, "01")
    assert re.fullmatch(r"[0-9a-f]{16}", parent) and parent != PARENT          # the gateway's span
    (headers,) = [h for m, h, b in evil.requests if b'"tools/call"' in b]
    assert headers["tracestate"] == "vendor=abc"
    audit = gw.wait_for_log(lambda e: e.get("event") == "mcp.request" and e.get("method") == "tools/call")
    assert audit["trace_id"] == TRACE


@pytest.mark.parametrize("bad", [
    f"00-{TRACE.upper()}-{PARENT}-01",          # upper-case hex
    f"00-{'0' * 32}-{PARENT}-01",               # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",                # all-zero parent
    f"00-{TRACE}-{PARENT}-01-junk",             # version 00 with a trailing part
    f"ff-{TRACE}-{PARENT}-01",                  # forbidden version
    "00-" + "a" * 4000,                         # huge
])
async def test_a_malformed_traceparent_is_dropped_never_forwarded(
        gateway: Any, evil: EvilUpstream, tmp_path: Path, bad: str) -> None:
    gw = await _gateway(gateway, evil, tmp_path)
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        reply = await _call(client, gw, sid, {"traceparent": bad, "tracestate": "vendor=abc"})
    assert reply.status == 200
    assert _upstream_traceparents(evil, "tools/call") == [None]
    (headers,) = [h for m, h, b in evil.requests if b'"tools/call"' in b]
    assert "tracestate" not in headers


async def test_start_traces_gives_an_untraced_request_a_new_trace(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    gw = await _gateway(gateway, evil, tmp_path, {"start_traces": True})
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        await _call(client, gw, sid, {})
    (seen,) = _upstream_traceparents(evil, "tools/call")
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", seen)


async def test_spans_are_exported_to_an_otlp_collector(gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    collector = await Collector().start()
    try:
        gw = await _gateway(gateway, evil, tmp_path, {"otlp_endpoint": collector.url, "service_name": "gw-test"})
        async with http_client() as client:
            sid, _ = await initialize(client, gw.url("evil"))
            reply = await _call(client, gw, sid, {"traceparent": f"00-{TRACE}-{PARENT}-01"})
            assert reply.status == 200
            # Not sampled (flags 00): continued upstream, not recorded.
            unsampled = "1" * 32
            await _call(client, gw, sid, {"traceparent": f"00-{unsampled}-{PARENT}-00"})
        await collector.wait_for("mcp.upstream")
        spans = [s for s in collector.spans if s["traceId"] == TRACE]
        names = {s["name"] for s in spans}
        assert {"mcp.request", "mcp.policy", "mcp.pinning", "mcp.limits", "mcp.upstream"} <= names, names
        root = next(s for s in spans if s["name"] == "mcp.request")
        assert root["parentSpanId"] == PARENT and root["kind"] == 2
        attrs = {a["key"]: a["value"] for a in root["attributes"]}
        assert attrs["mcp.method"] == {"stringValue": "tools/call"}
        assert all(s["parentSpanId"] == root["spanId"] for s in spans if s is not root)
        upstream = next(s for s in spans if s["name"] == "mcp.upstream")
        (seen, _) = _upstream_traceparents(evil, "tools/call")
        assert seen == f"00-{TRACE}-{upstream['spanId']}-01"                 # the upstream's parent is that span
        for s in spans:
            assert int(s["startTimeUnixNano"]) <= int(s["endTimeUnixNano"])
        assert all(s["traceId"] != unsampled for s in collector.spans)
        assert collector.resources[0]["attributes"][0] == {"key": "service.name", "value": {"stringValue": "gw-test"}}
    finally:
        await collector.stop()


async def test_a_collector_that_is_down_costs_the_requests_nothing(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    from tests.support.procs import free_port

    gw = await _gateway(gateway, evil, tmp_path, {"otlp_endpoint": f"http://127.0.0.1:{free_port()}/v1/traces"})
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        replies = [await _call(client, gw, sid, {"traceparent": f"00-{TRACE}-{PARENT}-01"}) for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 200]
    gw.wait_for_log({"event": "tracing.export_failed"})


async def test_a_call_through_a_virtual_server_stays_in_one_trace(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    """The client's request and the origin's sub-request share the trace: one trace id in the
    audit record and at the upstream, and the origin's server span is a child of the virtual one's."""
    collector = await Collector().start()
    try:
        await _gateway(gateway, evil, tmp_path)       # writes the policy and scripts the upstream
        (tmp_path / "p" / "evil.yaml").write_text(POLICY)
        gw = await gateway.astart({
            "servers": {"evil": {"url": evil.url}}, "policies": str(tmp_path / "p"),
            "virtual_servers": {"suite": {"include": [{"server": "evil"}]}},
            "tracing": {"start_traces": True, "otlp_endpoint": collector.url}})
        async with http_client() as client:
            sid, _ = await initialize(client, gw.url("suite"))
            reply = await post(client, gw.url("suite"),
                               rpc("tools/call", {"name": "evil__safe_tool", "arguments": {}}), {}, session_id=sid)
            assert reply.status == 200 and reply.response_to(reply.messages[-1]["id"])["result"]
        (seen,) = _upstream_traceparents(evil, "tools/call")
        trace = seen.split("-")[1]
        # The request's one audit record is the origin's, naming the virtual server.
        record = gw.wait_for_log(lambda e: e.get("event") == "mcp.request" and e.get("method") == "tools/call")
        assert (record["server"], record["via"], record["trace_id"]) == ("evil", "suite", trace)
        async with asyncio.timeout(10):
            while True:
                roots = {s["attributes"][0]["value"]["stringValue"]: s for s in collector.spans
                         if s["name"] == "mcp.request" and s["traceId"] == trace}
                if len(roots) == 2:
                    break
                collector.arrived.clear()
                await collector.arrived.wait()
        assert roots["evil"]["parentSpanId"] == roots["suite"]["spanId"]
        # Each exchange's stages are its own spans: the front under the virtual server's span, the
        # origin's stages, the virtual section and the upstream call under the origin's call span
        # (the origin's session opening, initialize and initialized, is in the same trace too).
        def attrs(span: dict[str, Any]) -> dict[str, str]:
            return {a["key"]: a["value"].get("stringValue") for a in span.get("attributes", ())}

        def children(parent: dict[str, Any]) -> dict[str, dict[str, Any]]:
            return {s["name"]: s for s in collector.spans
                    if s["traceId"] == trace and s.get("parentSpanId") == parent["spanId"]}

        call = next(s for s in collector.spans if s["traceId"] == trace and s["name"] == "mcp.request"
                    and attrs(s) == {**attrs(s), "mcp.server": "evil", "mcp.method": "tools/call"})
        async with asyncio.timeout(10):
            while "mcp.upstream" not in children(call):
                collector.arrived.clear()
                await collector.arrived.wait()
        under_call = children(call)
        assert {"mcp.policy", "mcp.pinning", "mcp.policy.virtual", "mcp.limits", "mcp.upstream"} <= set(under_call)
        assert not set(under_call) & {"mcp.hygiene", "mcp.authn", "mcp.parse"}, under_call
        assert seen == f"00-{trace}-{under_call['mcp.upstream']['spanId']}-01"   # the origin's parent is that span
        front = set(children(roots["suite"])) - {"mcp.request"}
        assert front == {"mcp.hygiene", "mcp.parse"}, front          # (authn: auth mode none, idle)
    finally:
        await collector.stop()
