"""The gateway as a process: graceful shutdown on SIGTERM, ``--workers`` on one port,
and the warning ``auth: {mode: none}`` logs at every start."""
from __future__ import annotations

import asyncio
from http.client import HTTPConnection
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Factory
from tests.support.components import Gateway, Upstream
from tests.support.procs import free_port
from tests.support.gw_helpers import (
    Event, Stack, child_pids, http_client, listener_pids, modern_headers, modern_params, next_event, peer_pid,
    post, read_events, request, rpc, stack, start_gateway_argv, with_policy,  # noqa: F401  (fixture)
)

STEPS, INTERVAL_MS = 6, 150


@pytest.fixture(scope="module")
def up(stack: Stack) -> Upstream:
    return stack.upstream()


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with http_client() as client:
        yield client


def refuses_connections(port: int) -> Any:
    def probe() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return False
        except ConnectionRefusedError:
            return True
    return probe


async def test_sigterm_lets_the_stream_in_flight_finish_refuses_new_connections_and_exits_0(
        http: Any, up: Upstream, gateway: Factory[Gateway], tmp_path: Path) -> None:
    gw = await gateway.astart(with_policy({"servers": {"up": up}, "shutdown_grace": "20s"}, tmp_path))
    port = gw.config["listen"]["port"]
    params = modern_params({"name": "slow_progress", "arguments": {"steps": STEPS, "interval_ms": INTERVAL_MS}})
    params["_meta"]["progressToken"] = "drain"
    body = rpc("tools/call", params)
    headers = {**modern_headers("tools/call", "slow_progress"), "Accept": "application/json, text/event-stream"}
    events: list[Event] = []
    async with http.post(gw.url("up"), json=body, headers=headers) as resp:
        stream = read_events(resp)
        events.append(await next_event(stream))
        os.kill(gw.proc.pid, signal.SIGTERM)
        await asyncio.to_thread(gw.wait_for_log, {"event": "gateway.stopping"})
        await asyncio.to_thread(gw.proc.wait_until, refuses_connections(port), 10.0, "listener closed")
        ready = await request(http, "GET", gw.admin_url + "/readyz")
        assert (ready.status, ready.json["shutting_down"]) == (503, True)
        async with asyncio.timeout(15):
            events.extend([e async for e in stream])
    messages = [e.message for e in events if e.data]
    assert [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"] == \
        list(range(1, STEPS + 1))
    assert messages[-1]["id"] == body["id"]
    assert messages[-1]["result"]["content"][0]["text"] == f"done after {STEPS} steps"
    assert await asyncio.to_thread(gw.proc.popen.wait, 20) == 0


async def test_sigterm_turns_readyz_unready_first_keeps_accepting_for_the_delay_then_stops(
        http: Any, up: Upstream, gateway: Factory[Gateway], tmp_path: Path) -> None:
    """The order a rolling update needs (#15): unready -> still serving for shutdown_delay -> closed."""
    gw = await gateway.astart(with_policy({"servers": {"up": up}, "shutdown_delay": "2s"}, tmp_path))
    port = gw.config["listen"]["port"]
    os.kill(gw.proc.pid, signal.SIGTERM)
    await asyncio.to_thread(gw.wait_for_log, {"event": "gateway.draining"})
    ready = await request(http, "GET", gw.admin_url + "/readyz")
    assert (ready.status, ready.json["shutting_down"]) == (503, True)
    # Inside the delay a new connection is still accepted and served.
    reply = await post(http, gw.url("up"), rpc("tools/list", modern_params()), modern_headers("tools/list"),
                       version=None)
    assert reply.status == 200
    assert not any("gateway.stopping" in line for line in gw.log_lines())
    await asyncio.to_thread(gw.wait_for_log, {"event": "gateway.stopping"}, 10.0)
    # With nothing in flight the process may exit between two probes: wait_until probes once
    # more after the exit, and a closed listener is what is asked.
    await asyncio.to_thread(gw.proc.wait_until, refuses_connections(port), 10.0, "listener closed")
    assert await asyncio.to_thread(gw.proc.popen.wait, 20) == 0


def _exchange(port: int, body: dict[str, Any], headers: dict[str, str], workers: list[int]) -> tuple[Any, int | None]:
    """POST on a fresh connection; return the response and the worker PID that accepted it."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.connect()
        client_port = conn.sock.getsockname()[1]
        conn.request("POST", "/mcp/up", body=orjson.dumps(body), headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers})
        resp = conn.getresponse()
        resp.read()
        return resp, peer_pid(port, client_port, workers)
    finally:
        conn.close()


def test_workers_serve_one_port_from_two_processes_sharing_sessions(
        up: Upstream, redis_store: dict[str, str], tmp_path: Path) -> None:
    # Workers are separate processes: sessions must live in a shared store.
    master, cfg = start_gateway_argv(tmp_path, {"servers": {"up": up}, "store": redis_store}, ["--workers", "2"])
    try:
        port = cfg["listen"]["port"]
        master.wait_until(lambda: len(listener_pids(port, child_pids(master.pid))) == 2, 30.0,
                          "both workers listening")
        workers = child_pids(master.pid)
        assert master.pid not in listener_pids(port, [master.pid])   # the master only supervises
        init = rpc("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                  "clientInfo": {"name": "t", "version": "0"}})
        resp, first = _exchange(port, init, {}, workers)
        assert resp.status == 200 and first in workers
        session = {"Mcp-Session-Id": resp.getheader("Mcp-Session-Id"), "MCP-Protocol-Version": "2025-11-25"}
        resp, _ = _exchange(port, rpc("notifications/initialized", id=None), session, workers)
        assert resp.status == 202
        answered = {first}
        for _ in range(64):          # SO_REUSEPORT hashes each new connection to one worker
            resp, owner = _exchange(port, rpc("tools/list"), session, workers)
            assert resp.status == 200 and owner in workers
            answered.add(owner)
            if len(answered) == 2:
                break
        assert answered == set(workers)
    finally:
        code = master.stop(timeout=15)
    assert code == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


async def test_mode_none_logs_a_warning_at_start(up: Upstream, gateway: Factory[Gateway], tmp_path: Path) -> None:
    gw = await gateway.astart(with_policy({"servers": {"up": up}}, tmp_path))
    entry = await asyncio.to_thread(gw.wait_for_log, {"event": "gateway.auth_disabled"})
    assert entry["level"] == "warning"


@pytest.mark.skipif(not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists(), reason="no IPv6 stack")
async def test_host_double_colon_listens_on_ipv4_and_ipv6(
        up: Upstream, gateway: Factory[Gateway], tmp_path: Path, http: Any) -> None:
    """``host: "::"`` (the shipped container configs) must mean every address. asyncio
    binds IPv6 sockets IPv6-only, which refused the IPv4 address a Kubernetes probe or
    a compose neighbour uses. The only test that binds beyond loopback, for one request."""
    port = free_port()
    config = with_policy({"servers": {"up": up}, "listen": {"host": "::", "port": port},
                          "auth": {"mode": "none", "allow_none_on_public_listener": True}}, tmp_path)
    await gateway.astart(config)
    for host in ("127.0.0.1", "[::1]"):
        reply = await post(http, f"http://{host}:{port}/mcp/up", rpc("initialize", {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
            headers={"Host": f"127.0.0.1:{port}"})
        assert reply.status == 200, (host, reply.status)
