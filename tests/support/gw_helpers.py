"""Helpers for the gateway end-to-end tests: raw MCP over HTTP, SSE with arrival times, shared stacks.

* ``Stack`` (the ``stack`` module-scoped fixture): starts upstreams and gateways once per
  test module and stops them by PID at module teardown, for tests that only read.
* ``post`` / ``open_stream`` speak raw Streamable HTTP with aiohttp, so tests can send
  what no SDK client would (batches, mismatched headers, stale session ids...).
* ``read_events`` is the test side's own SSE parser (deliberately not the gateway's
  framer) and stamps each event with its arrival time.
* ``listener_pids`` / ``peer_pid`` tell which process accepted a TCP connection
  (``--workers`` tests), from ``/proc``.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from .components import REPO, Gateway, Upstream, gateway_config, start_gateway, start_upstream
from .procs import ManagedProcess, free_port, http_probe, start, tcp_probe

LEGACY_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
ACCEPT = "application/json, text/event-stream"
EVENT_TIMEOUT = 10.0       # longest a test waits for any single event

_ids = itertools.count(1000)


def rpc(method: str, params: dict[str, Any] | None = None, *, id: Any = "auto") -> dict[str, Any]:
    """A JSON-RPC request (``id=None``: a notification)."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    if id == "auto":
        id = next(_ids)
    if id is not None:
        msg["id"] = id
    return msg


def modern_params(params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``params`` with the 2026-07-28 per-request ``_meta`` a modern client sends."""
    out = dict(params or {})
    out["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
        "io.modelcontextprotocol/clientInfo": {"name": "gateway-tests", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return out


def modern_headers(method: str, name: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    headers.update(extra)
    return headers


def b64_header(value: str) -> str:
    """The ``=?base64?...?=`` form of a header value (2026-07-28 non-ASCII names)."""
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


# --------------------------------------------------------------------------- SSE

@dataclass
class Event:
    at: float                      # time.monotonic() when the blank line ending it arrived
    data: str | None
    id: str | None = None
    event: str | None = None
    retry: int | None = None

    @property
    def message(self) -> Any:
        return orjson.loads(self.data) if self.data else None


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Yield SSE events as they complete (a minimal parser, independent of the gateway's)."""
    data: list[str] = []
    fields: dict[str, Any] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line == "":
            if data or fields:
                yield Event(time.monotonic(), "\n".join(data) if data else None, fields.get("id"),
                            fields.get("event"), fields.get("retry"))
            data, fields = [], {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "retry" and value.isdigit():
            fields["retry"] = int(value)
        elif name in ("id", "event"):
            fields[name] = value


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes
    events: list[Event] = field(default_factory=list)
    sent_at: float = 0.0

    @property
    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    @property
    def messages(self) -> list[Any]:
        """Every JSON-RPC message: the JSON body, or each SSE event's data."""
        if self.events:
            return [e.message for e in self.events if e.data]
        return [self.json] if self.body else []

    def response_to(self, rpc_id: Any) -> dict[str, Any]:
        for msg in self.messages:
            if isinstance(msg, dict) and msg.get("id") == rpc_id and "method" not in msg:
                return msg
        raise AssertionError(f"no response to id {rpc_id!r} in {self.messages!r}")

    @property
    def error_reason(self) -> str | None:
        body = self.json
        return body["error"].get("data", {}).get("reason") if isinstance(body, dict) and "error" in body else None


def _payload(body: Any) -> bytes:
    return body if isinstance(body, bytes) else orjson.dumps(body)


async def post(http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None,
               *, session_id: str | None = None, version: str | None = LEGACY_VERSION) -> Reply:
    """POST one message and read the whole answer (JSON body or every SSE event)."""
    hdrs = {"Accept": ACCEPT, "Content-Type": "application/json"}
    if version is not None:
        hdrs["MCP-Protocol-Version"] = version
    if session_id is not None:
        hdrs["Mcp-Session-Id"] = session_id
    hdrs.update(headers or {})
    sent = time.monotonic()
    async with http.post(url, data=_payload(body), headers=hdrs) as resp:
        return await _collect(resp, sent)


async def request(http: aiohttp.ClientSession, method: str, url: str, *, headers: dict[str, str] | None = None,
                  data: Any = None) -> Reply:
    sent = time.monotonic()
    async with http.request(method, url, headers=headers, data=data) as resp:
        return await _collect(resp, sent)


async def _collect(resp: aiohttp.ClientResponse, sent: float) -> Reply:
    if resp.content_type == "text/event-stream":
        events = [ev async for ev in read_events(resp)]
        return Reply(resp.status, resp.headers, b"", events, sent)
    return Reply(resp.status, resp.headers, await resp.read(), sent_at=sent)


async def initialize(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> tuple[str, Reply]:
    """The 2025-11-25 handshake (initialize + notifications/initialized); returns the session id."""
    init = rpc("initialize", {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                              "clientInfo": {"name": "gateway-tests", "version": "0"}})
    reply = await post(http, url, init, headers, version=None)
    assert reply.status == 200, reply
    sid = reply.headers["Mcp-Session-Id"]
    note = await post(http, url, rpc("notifications/initialized", id=None), headers, session_id=sid)
    assert note.status == 202, note
    return sid, reply


@asynccontextmanager
async def http_client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield http


async def next_event(events: AsyncIterator[Event], timeout: float = EVENT_TIMEOUT) -> Event:
    return await asyncio.wait_for(anext(events), timeout)


@asynccontextmanager
async def call_in_progress(http: aiohttp.ClientSession, url: str, sid: str, call: dict[str, Any],
                           **headers: str) -> AsyncIterator[AsyncIterator[Event]]:
    """POST ``call`` (a tools/call that reports progress) in 2025-11-25 session ``sid``; yields its
    SSE stream once the first progress notification came, i.e. while the call runs."""
    async with http.post(url, json=call, headers={"Accept": ACCEPT, "Content-Type": "application/json",
                                                  "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION,
                                                  **headers}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream", resp.status
        events = read_events(resp)
        while ((await next_event(events)).message or {}).get("method") != "notifications/progress":
            pass
        yield events


# --------------------------------------------------------------------------- policy

# These tests are about the transport, not about policy: every server allows everything.
ALLOW_ALL_POLICY = """\
servers:
  "*":
    default: allow
    destructive: allow
    methods:
      - id: e2e-all-methods
        match: ["**"]
"""


def allow_all(workdir: Path) -> str:
    """Write the allow-everything policy directory under ``workdir``; return its absolute path."""
    policies = workdir / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    (policies / "allow-all.yaml").write_text(ALLOW_ALL_POLICY)
    return str(policies)


def with_policy(config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """``config`` set up for transport tests: a policy allowing everything (unless it names
    its own ``policies``) and tool pinning off on every server (unless it sets ``pinning``)."""
    out = dict(config)
    out.setdefault("policies", allow_all(workdir))
    servers = {}
    for name, entry in (config.get("servers") or {}).items():
        entry = {"url": entry.url} if hasattr(entry, "url") and not isinstance(entry, dict) else dict(entry)
        entry.setdefault("pinning", {"mode": "off"})
        servers[name] = entry
    out["servers"] = servers
    return out


# --------------------------------------------------------------------------- shared processes

class Stack:
    """Processes shared by one test module; everything is stopped by PID at module teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[ManagedProcess] = []

    def upstream(self, **options: Any) -> Upstream:
        up = start_upstream(self.workdir / "upstream", **options)
        self.procs.append(up.proc)
        return up

    def upstreams(self, *options: dict[str, Any]) -> list[Upstream]:
        """Start several upstreams at once (each start is mostly the SDK's import time)."""
        with ThreadPoolExecutor(len(options)) as pool:
            futures = [pool.submit(start_upstream, self.workdir / "upstream", **o) for o in options]
            started = [f.result() for f in futures if f.exception() is None]
            self.procs.extend(up.proc for up in started)
            for f in futures:
                if f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
        return started

    def gateway(self, config: dict[str, Any], env: dict[str, str] | None = None) -> Gateway:
        gw = start_gateway(self.workdir / "gateway", with_policy(config, self.workdir), env=env)
        self.procs.append(gw.proc)
        return gw

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    try:
        yield s
    finally:
        s.stop()


# --------------------------------------------------------------------------- raw gateway processes

def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway_argv(workdir: Path, config: dict[str, Any], extra_args: list[str],
                       env: dict[str, str] | None = None) -> tuple[ManagedProcess, dict[str, Any]]:
    """Start ``python -m gateway serve -c FILE <extra_args>`` (e.g. ``--workers 2``) and wait until ready."""
    listen = free_port()
    admin = free_port()
    while admin == listen:          # two free_port() calls can return the same port
        admin = free_port()
    cfg = gateway_config(with_policy(config, workdir), listen, admin)
    path = write_config(workdir / f"gateway-{cfg['listen']['port']}.yaml", cfg)
    admin = f"http://127.0.0.1:{cfg['admin']['port']}"
    ready, listening = http_probe(f"{admin}/readyz"), tcp_probe("127.0.0.1", cfg["listen"]["port"])
    proc, _ = start([sys.executable, "-m", "gateway", "serve", "-c", str(path), *extra_args],
                    name=f"gateway-{cfg['listen']['port']}", log_path=path.with_suffix(".log"), cwd=REPO,
                    env=env, ready_probe=lambda: ready() and listening())
    return proc, cfg


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    child_env = dict(os.environ)
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          cwd=REPO, env=child_env, timeout=timeout, check=False)


# --------------------------------------------------------------------------- /proc

def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out.extend(int(c) for c in children)
    return out


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(m.group(1))
    return inodes


def _tcp_rows() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) for every IPv4 TCP socket."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        rows.append((int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16), cols[3], cols[9]))
    return rows


def listener_pids(port: int, candidates: list[int]) -> set[int]:
    """Which of ``candidates`` hold a listening socket on ``port``."""
    listening = {inode for lport, _, state, inode in _tcp_rows() if lport == port and state == "0A"}
    return {pid for pid in candidates if _socket_inodes(pid) & listening}


def peer_pid(server_port: int, client_port: int, candidates: list[int]) -> int | None:
    """Which of ``candidates`` owns the server side of the connection from ``client_port``."""
    inodes = {inode for lport, rport, _, inode in _tcp_rows() if lport == server_port and rport == client_port}
    for pid in candidates:
        if _socket_inodes(pid) & inodes:
            return pid
    return None
