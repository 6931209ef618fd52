"""A 2025-11-25 virtual session over two gateway replicas sharing one real Redis.

The virtual session, the client's handshake and every origin session live in the store:
a replica that never saw the session (or one that replaced a stopped replica) serves it
with the same upstream sessions, and a dropped stream resumes there with ``Last-Event-ID``.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Factory
from tests.support.components import Everything, Gateway, Upstream
from tests.support.gw_helpers import (
    ACCEPT, LEGACY_VERSION, call_in_progress, http_client, initialize, next_event, post, read_events, rpc, with_policy,
)


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with http_client() as client:
        yield client


@pytest.fixture
async def replicas(upstream: Factory[Upstream], gateway: Factory[Gateway], everything: Everything,
                   redis_store: dict[str, str], tmp_path: Path) -> tuple[Upstream, Gateway, Gateway]:
    up = await upstream.astart(retry_interval_ms=100)
    config = with_policy({"servers": {"alpha": up, "ev": everything}, "store": redis_store,
                          "virtual_servers": {"duo": {"include": [{"server": "alpha"},
                                                                  {"server": "ev", "prefix": "ev_"}]}}},
                         tmp_path)
    a, b = await asyncio.gather(gateway.astart(config), gateway.astart(config))
    return up, a, b


def _headers(sid: str, **extra: str) -> dict[str, str]:
    return {"Accept": ACCEPT, "Content-Type": "application/json", "Mcp-Session-Id": sid,
            "MCP-Protocol-Version": LEGACY_VERSION, **extra}


async def test_a_call_stream_dropped_on_one_replica_resumes_on_the_other_after_it_stopped(
        http: Any, replicas: tuple[Upstream, Gateway, Gateway]) -> None:
    up, a, b = replicas
    sid, _ = await initialize(http, a.url("duo"))
    call = rpc("tools/call", {"name": "alpha__reconnecting_progress", "arguments": {"steps": 3, "interval_ms": 200},
                              "_meta": {"progressToken": "p1"}})
    before: list[Any] = []
    async with http.post(a.url("duo"), json=call, headers=_headers(sid)) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        async for ev in read_events(resp):         # the upstream closes the stream after step 1
            before.append(ev)
    assert not any(e.message.get("id") == call["id"] for e in before if e.message)    # closed early
    progress = [e.message["params"]["progress"] for e in before if e.message]
    last = [e.id for e in before if e.id][-1]
    a.stop()                                       # the replica that served the call is gone
    after: list[Any] = []
    async with http.get(b.url("duo"), headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid,
                                               "MCP-Protocol-Version": LEGACY_VERSION,
                                               "Last-Event-ID": last}) as resp:
        assert resp.status == 200, await resp.text()
        events = read_events(resp)
        while True:
            ev = await next_event(events)
            if ev.message is None:
                continue
            after.append(ev.message)
            if ev.message.get("id") == call["id"]:
                break
    # Nothing lost, nothing twice: what arrived before the drop and after the resume is every step.
    assert progress + [m["params"]["progress"] for m in after if m.get("method") == "notifications/progress"] \
        == [1, 2, 3]
    assert after[-1]["result"]["content"][0]["text"] == "resumed and done after 3 steps"
    # One upstream session served both replicas.
    sessions = {r["headers"].get("mcp-session-id") for r in up.records() if r["jsonrpc_method"] != "initialize"}
    assert len(sessions) == 1 and sid not in sessions


async def test_the_merged_stream_resumes_on_another_replica_and_loses_no_event(
        http: Any, replicas: tuple[Upstream, Gateway, Gateway]) -> None:
    _, a, b = replicas
    sid, _ = await initialize(http, a.url("duo"))
    get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}

    async def announced(stream: Any, until: int) -> list[tuple[str, str | None]]:
        seen: list[tuple[str, str | None]] = []
        events = read_events(stream)
        while not seen or seen[-1][0] != f"announcement {until}":
            ev = await next_event(events)
            if ev.message and ev.message.get("method") == "notifications/message":
                assert ev.message["params"]["_meta"]["io.mcpgw/origin"] == "alpha"
                seen.append((ev.message["params"]["data"], ev.id))
        return seen

    async with http.get(a.url("duo"), headers=get_headers) as stream:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        # alpha sends these on the session's own stream: they reach the client on the merged one.
        call = await post(http, a.url("duo"), rpc("tools/call", {"name": "alpha__announce",
                                                                  "arguments": {"start": 1, "count": 2}}),
                          session_id=sid)
        assert call.status == 200
        first = await announced(stream, 2)
    assert [data for data, _ in first] == ["announcement 1", "announcement 2"]
    last = first[-1][1]
    assert last and last.startswith("~")                  # a merged id: every origin's position
    a.stop()
    # While no stream is open, alpha keeps what it sends in its event store.
    call = await post(http, b.url("duo"), rpc("tools/call", {"name": "alpha__announce",
                                                              "arguments": {"start": 3, "count": 2}}),
                      session_id=sid)
    assert call.status == 200
    async with http.get(b.url("duo"), headers={**get_headers, "Last-Event-ID": last}) as stream:
        assert stream.status == 200
        rest = await announced(stream, 4)
    assert [data for data, _ in rest] == ["announcement 3", "announcement 4"]     # nothing lost, nothing twice


async def test_a_tampered_merged_event_id_is_refused_and_reaches_no_origin(
        http: Any, replicas: tuple[Upstream, Gateway, Gateway]) -> None:
    up, a, _ = replicas
    sid, _ = await initialize(http, a.url("duo"))
    get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}
    before = len(up.records())
    for forged in ("~e30.AAAAAAAAAAAAAAAAAAAAAAAA", "~" + "A" * 5000 + ".x", "bm9wZQ.W10.AAAA", "x.y"):
        async with http.get(a.url("duo"), headers={**get_headers, "Last-Event-ID": forged}) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 400 and body["error"]["data"]["reason"] == "event_id_invalid", body
    assert len(up.records()) == before


async def test_two_replicas_opening_one_origin_at_once_end_up_in_one_upstream_session(
        http: Any, replicas: tuple[Upstream, Gateway, Gateway]) -> None:
    """The first calls of one virtual session reach both replicas together: each may open the
    origin's session, one claim wins in Redis, the loser ends its own upstream session and uses
    the winner's.  However the race falls, every call is served in one upstream session (on this
    box both replicas open one in every round: the race is real, and a DELETE ends the loser's)."""
    up, a, b = replicas
    for round_ in range(3):
        up.clear_records()
        sid, _ = await initialize(http, a.url("duo"))
        calls = [post(http, gw.url("duo"), rpc("tools/call", {"name": "alpha__echo", "arguments": {"text": f"r{i}"}}),
                      session_id=sid) for i, gw in enumerate((a, b, a, b))]
        replies = await asyncio.gather(*calls)
        for i, reply in enumerate(replies):
            assert reply.status == 200
            result = reply.response_to(reply.messages[-1]["id"])["result"]
            assert result["content"][0]["text"] == f"r{i}", result
        used = {r["headers"].get("mcp-session-id") for r in up.records("tools/call")}
        assert len(used) == 1, f"round {round_}: calls served in {len(used)} upstream sessions"
        opened = {r["headers"].get("mcp-session-id") for r in up.records("notifications/initialized")}
        ended = {r["headers"].get("mcp-session-id") for r in up.records() if r["method"] == "DELETE"}
        assert opened - ended == used, f"round {round_}: a losing upstream session was left open"


async def test_a_cancellation_sent_to_the_other_replica_stops_the_call_at_its_origin(
        http: Any, replicas: tuple[Upstream, Gateway, Gateway]) -> None:
    """The call runs through replica A; the client's ``notifications/cancelled`` reaches replica B,
    which does not run it: it goes to every open origin, the one running the id stops the call,
    and the other (server-everything) ignores an id it does not know."""
    up, a, b = replicas
    sid, _ = await initialize(http, a.url("duo"))
    listed = await post(http, b.url("duo"), rpc("tools/list"), session_id=sid)     # opens both origins
    assert listed.status == 200
    call = rpc("tools/call", {"name": "alpha__slow_progress", "arguments": {"steps": 100, "interval_ms": 50},
                              "_meta": {"progressToken": "long"}})
    seen: list[Any] = []
    async with call_in_progress(http, a.url("duo"), sid, call) as events:
        cancel = rpc("notifications/cancelled", {"requestId": call["id"], "reason": "enough"}, id=None)
        note = await post(http, b.url("duo"), cancel, session_id=sid)
        assert note.status == 202
        async for ev in events:                    # the call's stream ends: the origin stopped it
            if ev.message:
                seen.append(ev.message)
    progress = [m for m in seen if m.get("method") == "notifications/progress"]
    assert len(progress) < 99, "the call ran to its end: the cancellation never reached it"
    assert not any("result" in m for m in seen)
    (sent,) = up.records("notifications/cancelled")
    assert sent["body"]["params"] == {"requestId": call["id"], "reason": "enough"}
    (running,) = up.records("tools/call")
    assert sent["headers"]["mcp-session-id"] == running["headers"]["mcp-session-id"]


async def test_a_cancellation_broadcast_survives_an_origin_that_hangs_up_on_it(
        upstream: Factory[Upstream], gateway: Factory[Gateway], evil: Any, tmp_path: Path, http: Any) -> None:
    """A cancellation this replica is not running goes to every open origin: a raw-socket origin that
    closes the connection on it costs the client nothing (202) and the other origin still hears it."""
    up = await upstream.astart()
    evil.hang_up = lambda n, body: b'"notifications/cancelled"' in body
    config = with_policy({"servers": {"alpha": up, "evil": {"url": evil.url}},
                          "virtual_servers": {"duo": {"include": [{"server": "alpha"}, {"server": "evil"}]}}},
                         tmp_path)
    gw = await gateway.astart(config)
    sid, _ = await initialize(http, gw.url("duo"))
    listed = await post(http, gw.url("duo"), rpc("tools/list"), session_id=sid)      # opens both origins
    assert listed.status == 200
    start = len(gw.log_lines())
    cancel = rpc("notifications/cancelled", {"requestId": "ran-elsewhere", "reason": "enough"}, id=None)
    note = await post(http, gw.url("duo"), cancel, session_id=sid)
    assert note.status == 202
    (sent,) = up.records("notifications/cancelled")
    assert sent["body"]["params"] == {"requestId": "ran-elsewhere", "reason": "enough"}
    (hung,) = evil.hung_up                         # it reached the raw-socket origin, which hung up, once
    assert b'"ran-elsewhere"' in hung
    assert not [r for r in gw.json_logs()[start:] if r.get("event") == "gateway.internal_error"]
    echoed = await post(http, gw.url("duo"), rpc("tools/call", {"name": "alpha__echo", "arguments": {"text": "ok"}}),
                        session_id=sid)
    assert echoed.response_to(echoed.messages[-1]["id"])["result"]["content"][0]["text"] == "ok"
