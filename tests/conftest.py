"""Fixtures that start real components on loopback ports.  See ``tests/support/``.

    redis_server  (session)  RedisServer: own redis-server per xdist worker, .url(db), .port
    redis_url     (session)  "redis://127.0.0.1:<port>/0"
    redis_prefix             a key prefix no other test uses, e.g. "t:gw0:1a2b3c4d:"
    redis_store              {"url": redis_url, "prefix": redis_prefix}: drop in as gateway `store:`
    upstream                 factory: upstream(json_response=, stateless=, require_bearer=,
                             retry_interval_ms=, echo_description=, port=) -> Upstream
                             (.url .port .records(method=None) .clear_records() .stop());
                             `await upstream.astart(...)` from async tests
    everything               Everything: server-everything over Streamable HTTP (.url .port .stop())
    gateway                  factory: gateway(config_dict, env=None) -> Gateway
                             (.base_url .url(name) .admin_url .config .log_lines() .json_logs()
                             .wait_for_log(pred) .stop()); `await gateway.astart(...)` from async tests
    idp                      factory: idp(env=None) -> Idp, a real oidc-provider AS (tests/idp/fixture.py)

Every process is stopped by PID at teardown; when a test fails its processes' log tails are
attached to the report.
"""
from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from tests.support.components import (
    Everything,
    Gateway,
    RedisServer,
    Upstream,
    start_everything,
    start_gateway,
    start_redis,
    start_upstream,
    worker_tag,
)
from tests.support.procs import ManagedProcess

# The OAuth authorization server fixture (`idp`) lives with its start script.
pytest_plugins = ["tests.idp.fixture"]

T = TypeVar("T")
_PROCS_KEY = pytest.StashKey[list[ManagedProcess]]()


class Factory(Generic[T]):
    """Calls a ``start_*`` function, remembers what it started, stops it all at teardown.

    ``factory(...)`` starts synchronously.  ``await factory.astart(...)`` runs the same start in
    a thread, so a test whose event loop serves something the process needs at startup does
    not deadlock.
    """

    def __init__(self, starter: Callable[..., T], workdir: Path, node: pytest.Item) -> None:
        self._starter = starter
        self._workdir = workdir
        self._node = node
        self.started: list[T] = []

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        handle = self._starter(self._workdir, *args, **kwargs)
        self.started.append(handle)
        self._node.stash.setdefault(_PROCS_KEY, []).append(handle.proc)  # type: ignore[attr-defined]
        return handle

    async def astart(self, *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(functools.partial(self, *args, **kwargs))

    def stop_all(self) -> None:
        for handle in reversed(self.started):
            handle.proc.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp(f"redis-{worker_tag()}"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url(0)


@pytest.fixture
def redis_prefix() -> str:
    return f"t:{worker_tag()}:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def redis_store(redis_url: str, redis_prefix: str) -> dict[str, str]:
    return {"url": redis_url, "prefix": redis_prefix}


@pytest.fixture
def upstream(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Factory[Upstream]]:
    factory = Factory(start_upstream, tmp_path / "upstream", request.node)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def everything(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Everything]:
    factory = Factory(start_everything, tmp_path / "everything", request.node)
    try:
        yield factory()
    finally:
        factory.stop_all()


@pytest.fixture
def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Factory[Gateway]]:
    factory = Factory(start_gateway, tmp_path / "gateway", request.node)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for proc in item.stash.get(_PROCS_KEY, []):
            report.sections.append((f"log of {proc.name} (pid {proc.pid}, {proc.log_path})", proc.tail(60)))
    return report


@pytest.fixture
async def evil() -> Any:
    """A socket-level MCP upstream whose answers the test scripts (tests/support/evil_upstream.py)."""
    from tests.support.evil_upstream import EvilUpstream

    up = await EvilUpstream().start()
    try:
        yield up
    finally:
        await up.stop()
