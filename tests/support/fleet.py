"""A fleet: three gateway replicas on one Redis behind the round-robin proxy, and an SDK client for it.

``start_fleet`` starts the proxy first, because every replica's ``public_url`` is the
proxy's URL (a client only ever sees the load balancer's address: the ``Host`` check, the
mount URLs and token audiences all name it), then the replicas in parallel, then points
the proxy at their public listeners.

``fleet_client`` is ``tests.support.clients.mcp_client`` without keep-alive: every HTTP
request of the SDK opens a new TCP connection, so consecutive requests of one session
land on consecutive replicas.
"""
from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from .clients import MODERN_VERSION, Era
from .components import Gateway
from .rr_proxy import Connection, RoundRobinProxy

REPLICAS = 3
_MODES = {"legacy": "legacy", "modern": MODERN_VERSION, "auto": "auto"}


@dataclass
class Fleet:
    proxy: RoundRobinProxy
    gateways: list[Gateway]

    def url(self, server: str) -> str:
        """The mount URL as a client sees it: through the proxy."""
        return f"{self.proxy.url}/mcp/{server}"

    def kill(self, index: int) -> None:
        """SIGKILL one replica by PID and reap it: no drain, no goodbye."""
        proc = self.gateways[index].proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)


async def start_fleet(gateway: Any, config: dict[str, Any], replicas: int = REPLICAS) -> Fleet:
    """``gateway`` is the conftest factory (it stops every replica by PID at teardown).
    The caller closes ``fleet.proxy``."""
    proxy = await RoundRobinProxy().start()
    config = {**config, "public_url": proxy.url}
    gateways = list(await asyncio.gather(*(gateway.astart(config) for _ in range(replicas))))
    proxy.backends = [(gw.config["listen"]["host"], int(gw.config["listen"]["port"])) for gw in gateways]
    return Fleet(proxy, gateways)


@asynccontextmanager
async def fleet_client(url: str, *, era: Era = "legacy", timeout: float = 15.0,
                       **client_kwargs: Any) -> AsyncIterator[Client]:
    """A connected SDK ``Client`` that opens a new TCP connection for every HTTP request."""
    client_kwargs.setdefault("read_timeout_seconds", timeout)
    client_kwargs.setdefault("cache", None)
    limits = httpx2.Limits(max_keepalive_connections=0)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(timeout), limits=limits) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=_MODES[era], **client_kwargs) as client:
            yield client


def is_tool_call(name: str, marker: str | None = None) -> Any:
    """A predicate on proxy connections: a POST calling tool ``name`` (with the string argument ``marker``)."""
    def predicate(conn: Connection) -> bool:
        body = conn.body
        return (conn.method == "POST" and b'"tools/call"' in body and f'"{name}"'.encode() in body
                and (marker is None or f'"{marker}"'.encode() in body))
    return predicate
