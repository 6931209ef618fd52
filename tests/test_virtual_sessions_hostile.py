"""Hostile 2025-11-25 requests to a virtual server: each a JSON-RPC error with its status, none reaching an origin.

One gateway process with real OAuth (an in-process development issuer: alice and mallory
hold valid tokens for the virtual server), one SDK origin that records every request.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.devissuer import DevIssuer
from tests.conftest import Factory
from tests.support.components import Gateway, Upstream
from tests.support.gw_helpers import (
    ACCEPT, LEGACY_VERSION, call_in_progress, http_client, initialize, next_event, post, read_events, rpc, with_policy,
)


@pytest.fixture
async def issuer() -> AsyncIterator[DevIssuer]:
    dev = await DevIssuer.start()
    try:
        yield dev
    finally:
        await dev.close()


async def _team(upstream: Factory[Upstream], gateway: Factory[Gateway], issuer: DevIssuer, tmp_path: Path,
                stateless: bool = False) -> tuple[Upstream, Gateway, DevIssuer]:
    """One origin ``alpha`` and the virtual server ``team`` over it, with real OAuth."""
    up = await upstream.astart(stateless=stateless)
    config = with_policy({"auth": {"issuers": [{"issuer": issuer.issuer}]},
                          "servers": {"alpha": {"url": up.url}},
                          "virtual_servers": {"team": {"include": [{"server": "alpha"}]}}}, tmp_path)
    gw = await gateway.astart(config)
    return up, gw, issuer


@pytest.fixture
async def setup(upstream: Factory[Upstream], gateway: Factory[Gateway], issuer: DevIssuer,
                tmp_path: Path) -> tuple[Upstream, Gateway, DevIssuer]:
    return await _team(upstream, gateway, issuer, tmp_path)


def bearer(issuer: DevIssuer, gw: Gateway, subject: str, mount: str = "team") -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(gw.url(mount), subject, 'mcp:read')}"}


async def _initialize_sampling(http: Any, gw: Gateway, auth: dict[str, str]) -> str:
    """A 2025-11-25 handshake whose client can sample (the origin asks only such clients)."""
    init = rpc("initialize", {"protocolVersion": LEGACY_VERSION, "capabilities": {"sampling": {}},
                              "clientInfo": {"name": "hostile-tests", "version": "0"}})
    reply = await post(http, gw.url("team"), init, auth, version=None)
    assert reply.status == 200
    sid = reply.headers["Mcp-Session-Id"]
    assert (await post(http, gw.url("team"), rpc("notifications/initialized", id=None), auth,
                       session_id=sid)).status == 202
    return sid


async def _sampling_request(http: Any, gw: Gateway, sid: str, auth: dict[str, str], call: dict[str, Any]
                            ) -> tuple[Any, dict[str, Any]]:
    """POST a call that makes the origin ask the client to sample; the open response and that request."""
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", "Mcp-Session-Id": sid,
               "MCP-Protocol-Version": LEGACY_VERSION, **auth}
    resp = await http.post(gw.url("team"), json=call, headers=headers)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    events = read_events(resp)
    while True:
        ev = await next_event(events)
        if ev.message and ev.message.get("method") == "sampling/createMessage":
            return (resp, events), ev.message


async def test_requests_without_or_with_an_unknown_session_are_refused_before_any_origin(
        setup: tuple[Upstream, Gateway, DevIssuer]) -> None:
    up, gw, dev = setup
    alice = bearer(dev, gw, "alice")
    async with http_client() as http:
        none = await post(http, gw.url("team"), rpc("tools/list", id="n"), alice)
        assert (none.status, none.json["id"], none.error_reason) == (400, "n", "session_required")
        unknown = await post(http, gw.url("team"), rpc("tools/list", id="u"), alice, session_id="no-such-session")
        assert (unknown.status, unknown.json["error"]["code"], unknown.error_reason) == \
            (404, -32001, "session_not_found")
        # A virtual session is no session of the origin's mount, nor the other way round.
        sid, _ = await initialize(http, gw.url("team"), alice)
        mount = await post(http, gw.url("alpha"), rpc("tools/list"), bearer(dev, gw, "alice", "alpha"),
                           session_id=sid)
        assert mount.status == 404 and mount.error_reason == "session_not_found"
        mount_sid, _ = await initialize(http, gw.url("alpha"), bearer(dev, gw, "alice", "alpha"))
        before = len(up.records())
        crossed = await post(http, gw.url("team"), rpc("tools/list"), alice, session_id=mount_sid)
        assert crossed.status == 404 and crossed.error_reason == "session_not_found"
    assert len(up.records()) == before


@pytest.fixture(params=["stateful", "stateless"])
async def either_origin(request: Any, upstream: Factory[Upstream], gateway: Factory[Gateway], issuer: DevIssuer,
                        tmp_path: Path) -> tuple[Upstream, Gateway, DevIssuer]:
    """``setup``, with an origin that keeps sessions or one that keeps none (its route stands for
    the cached "sessionless" mapping: legacy.py ``OriginRoute.mark``)."""
    return await _team(upstream, gateway, issuer, tmp_path, stateless=request.param == "stateless")


async def test_a_session_presented_by_another_principal_is_404_and_reaches_no_origin(
        either_origin: tuple[Upstream, Gateway, DevIssuer]) -> None:
    up, gw, dev = either_origin
    alice, mallory = bearer(dev, gw, "alice"), bearer(dev, gw, "mallory")
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("team"), alice)
        # Alice's call opens the origin session and warms this replica's route to it (legacy.py
        # OriginRoute): Mallory's call naming her session must not ride it.
        warm = await post(http, gw.url("team"), rpc("tools/call", {"name": "alpha__echo",
                                                                   "arguments": {"message": "a"}}),
                          alice, session_id=sid)
        assert warm.status == 200 and "result" in warm.messages[-1]
        before = len(up.records())
        start = len(gw.log_lines())
        for msg in (rpc("tools/list"), rpc("ping"),
                    rpc("tools/call", {"name": "alpha__echo", "arguments": {"message": "m"}})):
            stolen = await post(http, gw.url("team"), msg, mallory, session_id=sid)
            assert (stolen.status, stolen.error_reason) == (404, "session_principal_mismatch")
        async with http.get(gw.url("team"), headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid,
                                                     **mallory}) as resp:
            assert resp.status == 404
        async with http.delete(gw.url("team"), headers={"Mcp-Session-Id": sid, **mallory}) as resp:
            assert resp.status == 404
        gw.wait_for_log(lambda r: r.get("event") == "security.session_hijack_attempt", start=start)
        assert len(up.records()) == before
        mine = await post(http, gw.url("team"), rpc("tools/list"), alice, session_id=sid)
        assert mine.status == 200 and mine.messages[-1]["result"]["tools"]


async def test_a_forged_or_foreign_answer_id_is_refused_and_the_genuine_answer_completes_the_call(
        setup: tuple[Upstream, Gateway, DevIssuer]) -> None:
    up, gw, dev = setup
    alice = bearer(dev, gw, "alice")
    async with http_client() as http:
        sid = await _initialize_sampling(http, gw, alice)
        other = await _initialize_sampling(http, gw, alice)
        call = rpc("tools/call", {"name": "alpha__ask_sampling", "arguments": {"prompt": "P"}})
        (resp, events), asked = await _sampling_request(http, gw, sid, alice, call)
        relayed_id = asked["id"]
        assert isinstance(relayed_id, str) and relayed_id.startswith("~")
        answer = {"role": "assistant", "model": "m", "content": {"type": "text", "text": "genuine"}}
        before = len(up.records())
        tampered = relayed_id[:-3] + ("AAA" if not relayed_id.endswith("AAA") else "BBB")
        for forged, sess in ((tampered, sid), ("~e30.AAAA", sid), (7, sid), ("x" * 5000, sid),
                             (relayed_id, other)):           # the last: genuine, but another session's
            reply = await post(http, gw.url("team"), {"jsonrpc": "2.0", "id": forged, "result": answer}, alice,
                               session_id=sess)
            assert (reply.status, reply.error_reason) == (400, "answer_id_invalid"), (forged, reply.json)
            assert reply.json["error"]["code"] < 0
        assert len(up.records()) == before                   # nothing was forwarded
        ok = await post(http, gw.url("team"), {"jsonrpc": "2.0", "id": relayed_id, "result": answer}, alice,
                        session_id=sid)
        assert ok.status == 202
        while True:
            ev = await next_event(events)
            if ev.message and ev.message.get("id") == call["id"]:
                break
        resp.close()
    assert ev.message["result"]["content"][0]["text"] == "sampled[m]: genuine"
    # The origin saw its own id back, with its own type.
    (sent,) = [r for r in up.records() if r["jsonrpc_method"] is None and isinstance(r.get("body"), dict)
               and "result" in r["body"]]
    assert not isinstance(sent["body"]["id"], str) or not sent["body"]["id"].startswith("~")
    assert "genuine" in json.dumps(sent["body"])


async def test_a_tampered_last_event_id_of_a_call_stream_is_refused(
        setup: tuple[Upstream, Gateway, DevIssuer]) -> None:
    up, gw, dev = setup
    alice = bearer(dev, gw, "alice")
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("team"), alice)
        call = rpc("tools/call", {"name": "alpha__slow_progress", "arguments": {"steps": 2, "interval_ms": 10},
                                  "_meta": {"progressToken": "t"}})
        first = await post(http, gw.url("team"), call, alice, session_id=sid)
        ids = [e.id for e in first.events if e.id]
        assert ids and all(i.count(".") == 2 for i in ids)
        before = len(up.records())
        enc, packed, mac = ids[-1].split(".")
        for forged in (f"{enc}.{packed}.{'A' * len(mac)}", f"QUJD.{packed}.{mac}", "x" * 2000):
            async with http.get(gw.url("team"), headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid,
                                                         "Last-Event-ID": forged, **alice}) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 400 and body["error"]["data"]["reason"] == "event_id_invalid", body
    assert len(up.records()) == before


async def test_another_principals_cancellation_of_a_running_call_is_404_and_reaches_no_origin(
        setup: tuple[Upstream, Gateway, DevIssuer]) -> None:
    """Mallory (a valid token, another subject) names Alice's session and her running call's id: the
    cancellation is refused before it is routed (neither to the origin running it nor broadcast)."""
    up, gw, dev = setup
    alice, mallory = bearer(dev, gw, "alice"), bearer(dev, gw, "mallory")
    async with http_client() as http:
        sid, _ = await initialize(http, gw.url("team"), alice)
        call = rpc("tools/call", {"name": "alpha__slow_progress", "arguments": {"steps": 40, "interval_ms": 50},
                                  "_meta": {"progressToken": "p"}})
        async with call_in_progress(http, gw.url("team"), sid, call, **alice) as events:
            for request_id in (call["id"], "not-running"):
                cancel = rpc("notifications/cancelled", {"requestId": request_id}, id=None)
                stolen = await post(http, gw.url("team"), cancel, mallory, session_id=sid)
                assert (stolen.status, stolen.error_reason) == (404, "session_principal_mismatch")
            answer = None
            async for ev in events:                    # Alice's call runs to its end
                if ev.message and ev.message.get("id") == call["id"]:
                    answer = ev.message
    assert answer is not None and answer["result"]["content"][0]["text"] == "done after 40 steps"
    assert up.records("notifications/cancelled") == []
