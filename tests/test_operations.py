"""Operator defects (#15): audit of unknown mounts, /readyz without the config path, client addresses."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.evil_upstream import EvilUpstream, http
from tests.support.gw_helpers import MODERN_VERSION, allow_all, http_client, modern_headers, modern_params, post, rpc


@pytest.fixture
async def up() -> Any:
    evil = await EvilUpstream().start()

    async def ok(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": []}}).encode())
    evil.scripts["tools/list"] = ok
    yield evil
    await evil.stop()


async def _list(gw: Any, headers: dict[str, str] | None = None) -> None:
    async with http_client() as client:
        reply = await post(client, gw.url("up"), rpc("tools/list", modern_params()),
                           headers={**modern_headers("tools/list"), **(headers or {})}, version=MODERN_VERSION)
    assert reply.status == 200


async def test_a_request_to_an_unknown_mount_leaves_an_audit_record(up: EvilUpstream, gateway: Any,
                                                                    tmp_path: Path) -> None:
    gw = await gateway.astart({"servers": {"up": {"url": up.url}}, "policies": allow_all(tmp_path)})
    async with http_client() as client:
        reply = await post(client, gw.url("nosuch"), rpc("tools/list", modern_params()), version=MODERN_VERSION)
    assert reply.status == 404
    entry = gw.wait_for_log({"event": "mcp.request", "server": "_unknown"})
    assert entry["status"] == 404 and entry["reason"] == "unknown_server" and entry["client_address"] == "127.0.0.1"


async def test_readyz_does_not_reveal_the_config_path(up: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    gw = await gateway.astart({"servers": {"up": {"url": up.url}}, "policies": allow_all(tmp_path)})
    async with http_client() as client:
        async with client.get(gw.admin_url + "/readyz") as resp:
            text = await resp.text()
    assert resp.status == 200 and str(gw.config_path) not in text and "config" not in json.loads(text)


@pytest.mark.parametrize("trusted,xff,client", [
    ([], "203.0.113.7", "127.0.0.1"),                                   # not from a trusted proxy: ignored
    (["127.0.0.0/8"], "203.0.113.7", "203.0.113.7"),
    (["127.0.0.0/8", "10.1.0.0/16"], "198.51.100.1, 203.0.113.7, 10.1.2.3", "203.0.113.7"),  # rightmost untrusted
    (["127.0.0.0/8"], "not-an-address", "127.0.0.1"),
])
async def test_the_client_address_in_the_audit_record_believes_only_trusted_proxies(
        up: EvilUpstream, gateway: Any, tmp_path: Path, trusted: list[str], xff: str, client: str) -> None:
    gw = await gateway.astart({"servers": {"up": {"url": up.url, "pinning": {"mode": "off"}}},
                               "policies": allow_all(tmp_path), "http": {"trusted_proxies": trusted}})
    await _list(gw, {"X-Forwarded-For": xff})
    entry = gw.wait_for_log({"event": "mcp.request", "method": "tools/list"})
    assert entry["client_address"] == client
    (_, headers, _) = up.requests[-1]
    assert "x-forwarded-for" not in headers                             # never forwarded upstream
