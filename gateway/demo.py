"""``mcp-gateway demo``: the gateway with real authentication, on this machine, in one command.

Starts, all on 127.0.0.1:

- a development issuer (``gateway.auth.devissuer``): fresh RSA key, RFC 8414
  metadata and JWKS on loopback only;
- a demo MCP server written with the ``mcp`` SDK (``echo``, ``add``,
  ``count_slowly`` with progress, and a destructive ``reset_counter``), in a
  child process stopped by PID on exit;
- the gateway, mounting it as ``demo`` with the default policy (tools need
  ``mcp:read``; destructive ones also ``mcp:admin``);

then prints ready tokens for a *reader* and an *admin* persona (audience =
the mount URL) and example calls (curl and the Python SDK).  Ctrl-C stops it all.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .demo_server import READY_TAG

DEMO_POLICY = """\
# The demo's policy: tools need mcp:read; destructive tools also need mcp:admin.
servers:
  "*":
    default: deny
    destructive: {scopes: [mcp:admin]}
    tools:
      - id: demo-tools
        match: "**"
        scopes: [mcp:read]
"""


# --------------------------------------------------------------------------- the demo MCP server

async def _start_demo_mcp(timeout: float = 30.0) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.demo_server", stdout=asyncio.subprocess.PIPE,
        start_new_session=True)
    assert proc.stdout is not None

    async def ready() -> str:
        while line := (await proc.stdout.readline()).decode():   # type: ignore[union-attr]
            if line.startswith(READY_TAG):
                return f"http://127.0.0.1:{json.loads(line.split(' ', 1)[1])['port']}/mcp"
        raise RuntimeError(f"the demo MCP server exited (code {await proc.wait()}) before it was ready")

    try:
        return proc, await asyncio.wait_for(ready(), timeout)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.kill(proc.pid, 15)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the banner

def _banner(url: str, reader: str, admin: str, issuer: str, config_path: Path, admin_url: str) -> str:
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "curl", "version": "0"}}}
    common = ("-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' "
              "-H 'MCP-Protocol-Version: 2025-11-25'")
    return f"""
mcp-gateway demo is running (Ctrl-C stops everything)

  MCP endpoint  {url}
  issuer        {issuer}   (development issuer: loopback only, keys live in memory)
  config        {config_path}
  metrics       {admin_url}/metrics

Tokens (aud = the mount URL, valid 8 h):
  export READER_TOKEN={reader}
  export ADMIN_TOKEN={admin}

  reader = mcp:read             -> echo, add, count_slowly
  admin  = mcp:read mcp:admin   -> also reset_counter (destructive)

Try it with curl (a 2025-11-25 session: initialize, list the tools, call one):
  SID=$(curl -s -D - -o /dev/null {url} -H "Authorization: Bearer $READER_TOKEN" {common} \\
        -d {shlex.quote(json.dumps(init))} | awk 'tolower($1)=="mcp-session-id:" {{print $2}}' | tr -d '\\r')
  curl -s {url} -H "Authorization: Bearer $READER_TOKEN" -H "Mcp-Session-Id: $SID" {common} \\
        -d {shlex.quote(json.dumps(listing))}
  curl -s {url} -H "Authorization: Bearer $READER_TOKEN" -H "Mcp-Session-Id: $SID" {common} \\
        -d {shlex.quote(json.dumps(call))}
  curl -s -i {url} {common} -d {shlex.quote(json.dumps(init))}     # no token: 401 + WWW-Authenticate

Or with the Python SDK (pip install mcp):
  import asyncio, os, httpx2
  from mcp.client import Client
  from mcp.client.streamable_http import streamable_http_client

  async def main():
      headers = {{"Authorization": "Bearer " + os.environ["READER_TOKEN"]}}
      async with httpx2.AsyncClient(headers=headers) as http:
          async with Client(streamable_http_client("{url}", http_client=http)) as client:
              print([t.name for t in (await client.list_tools()).tools])
              print((await client.call_tool("add", {{"a": 2, "b": 3}})).content[0].text)

  asyncio.run(main())
"""


# --------------------------------------------------------------------------- orchestration

async def _demo(port: int, admin_port: int, workdir: Path) -> int:
    from .app import serve
    from .auth.devissuer import DevIssuer
    from .config.model import load_config
    from .errors import ConfigError
    from .telemetry.logging import configure_logging

    issuer = await DevIssuer.start("127.0.0.1")
    mcp_proc: asyncio.subprocess.Process | None = None
    try:
        mcp_proc, mcp_url = await _start_demo_mcp()
        port = port or _free_port()
        admin_port = admin_port or _free_port()
        public_url = f"http://127.0.0.1:{port}"
        policy = workdir / "demo.policy.yaml"
        policy.write_text(DEMO_POLICY)
        (workdir / "pins").mkdir(exist_ok=True)
        config_doc = {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "public_url": public_url,
            "store": "memory",
            "shutdown_delay": 0,   # no load balancer to tell
            "auth": {"issuers": [{"issuer": issuer.issuer, "jwks_uri": f"{issuer.issuer}/jwks"}]},
            "policies": str(policy),
            "pins": str(workdir / "pins"),
            "servers": {"demo": {"url": mcp_url, "auth": {
                # 401s ask for mcp:read only; admin is a step-up (403 insufficient_scope).
                "scopes": ["mcp:read"], "scopes_supported": ["mcp:read", "mcp:admin"]}}},
        }
        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config_doc, sort_keys=False))
        try:
            config = load_config(str(config_path))
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
        configure_logging(config.logging.level, config.logging)
        url = config.servers["demo"].resource_url
        reader = issuer.mint(url, "reader@example.com", "mcp:read")
        admin = issuer.mint(url, "admin@example.com", "mcp:read mcp:admin")
        ready = asyncio.Event()
        server = asyncio.create_task(serve(config, ready=ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            await server            # re-raises why it could not start
            return 1
        print(_banner(url, reader, admin, issuer.issuer, config_path, f"http://127.0.0.1:{admin_port}"), flush=True)
        print("DEMO_READY " + json.dumps({"url": url, "reader": reader, "admin": admin,
                                          "admin_url": f"http://127.0.0.1:{admin_port}"}), flush=True)
        await server
        return 0
    finally:
        if mcp_proc is not None:
            _stop(mcp_proc)
            await mcp_proc.wait()
        await issuer.close()


def run_demo(args: Any = None) -> int:
    """Entry point for ``mcp-gateway demo``: ``args`` is the CLI namespace or an argv list."""
    if args is None or isinstance(args, (list, tuple)):
        parser = argparse.ArgumentParser(prog="mcp-gateway demo")
        parser.add_argument("--port", type=int, default=8080)
        parser.add_argument("--admin-port", type=int, default=9464)
        args = parser.parse_args(list(args or []))
    if importlib.util.find_spec("mcp") is None or importlib.util.find_spec("uvicorn") is None:
        print("mcp-gateway demo runs a demo MCP server written with the mcp SDK, which is not installed:\n"
              "  pip install 'mcp>=2.3,<3'   (or: make demo, which sets everything up)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="mcpgw-demo-"))
    try:
        return asyncio.run(_demo(getattr(args, "port", 8080), getattr(args, "admin_port", 9464), workdir))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
