"""An upstream session the gateway cannot map is ended at once, never orphaned.

``initialize`` reaches the upstream, which opens a session; the gateway must store
its own id for it.  If the store write fails (Redis gone), the client gets 503 with
a JSON-RPC error and never learns an id for that session, so the gateway ends the
upstream session with a ``DELETE`` carrying the upstream's id.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.support.components import start_redis
from tests.support.evil_upstream import EvilUpstream
from tests.support.gw_helpers import LEGACY_VERSION, allow_all, http_client, post, rpc




async def test_a_session_whose_mapping_cannot_be_stored_is_ended_upstream(
        evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    redis = await asyncio.to_thread(start_redis, tmp_path / "redis")
    try:
        gw = await gateway.astart({"servers": {"up": {"url": evil.url, "pinning": {"mode": "off"}}},
                                   "policies": allow_all(tmp_path),
                                   "store": {"url": redis.url(0), "prefix": "orphan:"}})
        redis.stop()                          # the store is gone after the gateway started
        init = rpc("initialize", {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                                  "clientInfo": {"name": "t", "version": "0"}})
        async with http_client() as client:
            reply = await post(client, gw.url("up"), init, version=None)
    finally:
        redis.stop()
    assert reply.status == 503
    assert reply.json["error"]["data"]["reason"] == "store_unavailable"
    assert "Mcp-Session-Id" not in reply.headers
    deletes = [h for m, h, _ in evil.requests if m == "DELETE"]
    assert [h.get("mcp-session-id") for h in deletes] == ["evil-session-1"]
    gw.wait_for_log({"event": "session.upstream_terminated", "server": "up"})
