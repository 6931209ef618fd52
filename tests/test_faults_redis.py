"""Redis faults for the session store, each with its declared outcome (docs/faults.md).

Every test owns its redis-server (started on a free port, stopped by PID): down
when the gateway starts, killed mid-run, blocked (slow), or out of memory with
``noeviction``.  Whatever needs the store fails closed with 503 and reason
``store_unavailable`` within the store's socket timeout, ``/readyz`` says
``unreachable`` when Redis does not answer, the failed operation is counted in
``mcpgw_store_errors_total`` and logged, and the gateway recovers by itself.
The rate limiter's own Redis faults are in tests/test_ratelimit.py, failover in
tests/test_store_sentinel.py.
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.support.components import REPO, Gateway, RedisServer, gateway_config, start_redis
from tests.support.gw_helpers import (
    allow_all, http_client, initialize, post, request, rpc, write_config,
)
from tests.support.procs import free_port, start, tcp_probe

STORE_TIMEOUT = 2.0      # gateway/store/redis.py socket_timeout: the longest one store call may take
UNAVAILABLE = (503, "store_unavailable")


async def _start_redis(workdir: Path, *args: str, port: int | None = None) -> RedisServer:
    if port is None:
        return await asyncio.to_thread(start_redis, workdir, args)
    from tests.test_ratelimit import _restart_redis
    return await asyncio.to_thread(_restart_redis, workdir, port)


@pytest.fixture
async def owned() -> AsyncIterator[list[Any]]:
    """Processes a test starts itself; stopped by PID at the end."""
    procs: list[Any] = []
    yield procs
    for proc in reversed(procs):
        await asyncio.to_thread(proc.stop)


async def _start(workdir: Path, redis_url: str, upstream_url: str, owned: list[Any]) -> Gateway:
    cfg = gateway_config({"servers": {"up": {"url": upstream_url}},
                          "store": {"url": redis_url, "prefix": "faults:"},
                          "policies": allow_all(workdir)}, free_port(), free_port())
    path = write_config(workdir / "gateway.yaml", cfg)
    proc, _ = await asyncio.to_thread(
        start, [sys.executable, "-m", "gateway", "serve", "-c", str(path)], name="gateway-faults",
        log_path=workdir / "gateway.log", cwd=REPO, ready_probe=tcp_probe("127.0.0.1", cfg["listen"]["port"]),
        ready_timeout=30)
    owned.append(proc)
    return Gateway(base_url=cfg["public_url"], admin_url=f"http://127.0.0.1:{cfg['admin']['port']}",
                   config=cfg, config_path=path, proc=proc)


async def _ready(client: Any, gw: Gateway) -> tuple[int, Any]:
    reply = await request(client, "GET", gw.admin_url + "/readyz")
    return reply.status, reply.json


async def _init(client: Any, gw: Gateway) -> Any:
    body = rpc("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                              "clientInfo": {"name": "faults", "version": "0"}})
    started = time.monotonic()
    reply = await post(client, gw.url("up"), body, version=None)
    reply.elapsed = time.monotonic() - started
    return reply


async def _until_blocked(redis: RedisServer, timeout: float = 15.0) -> None:
    """Until Redis is inside DEBUG SLEEP: each probe waits up to half a second for its PONG."""
    deadline = time.monotonic() + timeout
    while not await _blocked(redis):
        assert time.monotonic() < deadline, "Redis never went to sleep"


async def _recovered(client: Any, gw: Gateway, mark: int) -> None:
    """The gateway's own retry reached Redis again (its log says so), and it is ready."""
    await asyncio.to_thread(gw.wait_for_log, {"event": "store.pubsub_subscribed"}, 15, start=mark)
    assert (await _ready(client, gw))[0] == 200


async def _store_errors(client: Any, gw: Gateway, operation: str) -> float:
    text = await (await client.get(gw.admin_url + "/metrics")).text()
    m = re.search(rf'^mcpgw_store_errors_total\{{operation="{operation}"\}} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


async def _blocked(redis: RedisServer) -> bool:
    """True once a PING goes unanswered for half a second (Redis is inside DEBUG SLEEP)."""
    probe = aioredis.from_url(redis.url(0), socket_timeout=0.5)
    try:
        await probe.ping()
        return False
    except Exception:
        return True
    finally:
        await probe.aclose()


def _refused(reply: Any) -> tuple[int, str | None]:
    return reply.status, reply.error_reason


async def test_redis_down_at_start_fails_closed_until_it_comes_up(upstream: Any, tmp_path: Path,
                                                                  owned: list[Any]) -> None:
    up = await upstream.astart()
    port = free_port()
    gw = await _start(tmp_path, f"redis://127.0.0.1:{port}/0", up.url, owned)
    async with http_client() as client:
        status, body = await _ready(client, gw)
        assert (status, body["store"]) == (503, "unreachable")
        gw.wait_for_log({"event": "store.unreachable_at_start"})
        reply = await _init(client, gw)
        assert _refused(reply) == UNAVAILABLE and reply.elapsed < STORE_TIMEOUT + 1, (reply, reply.elapsed)
        assert await _store_errors(client, gw, "set") >= 1
        gw.wait_for_log({"event": "session.store_failed", "server": "up"})
        assert gw.proc.returncode is None
        mark = len(gw.log_lines())
        redis = await _start_redis(tmp_path / "redis", port=port)
        owned.append(redis.proc)
        await _recovered(client, gw, mark)
        assert (await _init(client, gw)).status == 200


async def test_redis_killed_mid_run_fails_closed_fast_and_the_gateway_recovers_when_it_returns(
        upstream: Any, tmp_path: Path, owned: list[Any]) -> None:
    up = await upstream.astart()
    redis = await _start_redis(tmp_path / "redis")
    owned.append(redis.proc)
    gw = await _start(tmp_path, redis.url(0), up.url, owned)
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("up"))
        await asyncio.to_thread(redis.proc.stop)
        reply = await _init(client, gw)
        assert _refused(reply) == UNAVAILABLE and reply.elapsed < STORE_TIMEOUT + 1, (reply, reply.elapsed)
        assert (await _ready(client, gw))[0] == 503
        mark = len(gw.log_lines())
        again = await _start_redis(tmp_path / "redis2", port=redis.port)
        owned.append(again.proc)
        await _recovered(client, gw, mark)
        assert (await _init(client, gw)).status == 200


async def test_a_redis_out_of_memory_refuses_new_sessions_and_serves_existing_ones(
        upstream: Any, tmp_path: Path, owned: list[Any]) -> None:
    up = await upstream.astart()
    redis = await _start_redis(tmp_path / "redis", "--maxmemory-policy", "noeviction")
    owned.append(redis.proc)
    gw = await _start(tmp_path, redis.url(0), up.url, owned)
    admin = aioredis.from_url(redis.url(0))
    try:
        async with http_client() as client:
            sid, _ = await initialize(client, gw.url("up"))
            # The first listing takes the TOFU pins (a write); later ones only read them.
            assert (await post(client, gw.url("up"), rpc("tools/list", {}), session_id=sid)).status == 200
            await admin.config_set("maxmemory", "1")         # every write is now refused: OOM
            with pytest.raises(Exception, match="maxmemory"):
                await admin.set("probe", b"x")
            reply = await _init(client, gw)
            assert _refused(reply) == UNAVAILABLE, reply
            assert await _store_errors(client, gw, "set") >= 1
            gw.wait_for_log({"event": "session.store_failed", "server": "up"})
            listing = await post(client, gw.url("up"), rpc("tools/list", {}), session_id=sid)
            assert listing.status == 200 and "result" in listing.messages[-1], listing
            await admin.config_set("maxmemory", "0")
            assert (await _init(client, gw)).status == 200
    finally:
        await admin.aclose()


async def test_a_blocked_redis_costs_a_request_at_most_the_store_timeout(
        upstream: Any, tmp_path: Path, owned: list[Any]) -> None:
    up = await upstream.astart()
    redis = await _start_redis(tmp_path / "redis", "--enable-debug-command", "yes")
    owned.append(redis.proc)
    gw = await _start(tmp_path, redis.url(0), up.url, owned)
    admin = aioredis.from_url(redis.url(0), socket_timeout=30)
    try:
        async with http_client() as client:
            assert (await _init(client, gw)).status == 200
            sleeper = asyncio.ensure_future(admin.execute_command("DEBUG", "SLEEP", "4"))
            await _until_blocked(redis)                    # Redis is now asleep
            reply = await _init(client, gw)
            assert _refused(reply) == UNAVAILABLE, reply
            assert reply.elapsed < STORE_TIMEOUT * 2 + 1, reply.elapsed
            assert await _store_errors(client, gw, "set") >= 1
            gw.wait_for_log({"event": "session.store_failed", "server": "up"})
            await sleeper
            assert (await _init(client, gw)).status == 200
    finally:
        await admin.aclose()
