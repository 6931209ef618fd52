"""The ``mcp-gateway`` command: serve, check, demo, policy, pins."""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from . import __version__
from .errors import ConfigError


def _load(path: str, *, check_secrets: bool = True) -> Any:
    from .config.model import load_config

    return load_config(path, check_secrets=check_secrets)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and everything it references; print every problem."""
    from .inspect.pins_cli import check_pins
    from .policy.cli import check_policies

    problems = []
    try:
        config = _load(args.config)
    except ConfigError as exc:
        problems.extend(exc.problems)
        config = None
    if config is not None:
        problems.extend(check_policies(config))
        problems.extend(check_pins(config))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    if config.policies_path is None:
        print(f"{config.path}:1:1: warning: no 'policies:' configured: every tool, resource, prompt and "
              "method call is refused (default deny; see docs/policy.md)", file=sys.stderr)
    virtual = "".join(f"\n  virtual server {v.name}: " + ", ".join(f"{i.server} as {i.prefix}*" for i in v.includes)
                      for v in config.virtual_servers.values())
    print(f"{args.config}: OK ({len(config.servers)} server(s))"
          + (f", {len(config.virtual_servers)} virtual server(s){virtual}" if virtual else ""))
    return 0


# A request allocates a few hundred short-lived containers.  With the interpreter's
# default young-generation threshold (700) a busy process runs a collection every ~100
# requests at c=16, each traversing every in-flight request's objects: ~1 % of the CPU
# per request (callgrind).  Nothing on the request path relies on the cycle collector
# (2,000 requests at c=16 left 5 objects for it), so young collections run 10x less often.
GC_GEN0_THRESHOLD = 7000


def _tune_gc() -> None:
    """For the serving process only: startup objects (imports, config) leave the collector's
    view for good (gc.freeze), and young collections run less often."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _run_one(config: Any, reuse_port: bool) -> int:
    from .app import serve

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    _tune_gc()
    try:
        runner(serve(config, reuse_port=reuse_port))
    except ConfigError as exc:
        # Stages that load their own files at start (policies: gateway.stages.authz) refuse here.
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("refusing to start: fix the files above (mcp-gateway check -c FILE)", file=sys.stderr)
        return 2
    return 0


def _metrics_dir(parent: str | None) -> str:
    """A fresh directory for the workers' shared metric files (under ``parent`` when given:
    with a read-only root filesystem, point it at a writable tmpfs)."""
    return tempfile.mkdtemp(prefix="mcpgw-metrics-", dir=parent or None)


def _run_workers(args: argparse.Namespace, n: int) -> int:
    """N processes on one port (SO_REUSEPORT); metrics aggregated across them.

    The supervisor restarts a worker that dies (its live gauges are dropped with
    ``mark_process_dead``, so a killed worker's in-flight count does not stick),
    forwards SIGTERM/SIGINT/SIGHUP, and removes the metrics directory on exit.
    """
    from prometheus_client import multiprocess

    from .telemetry.logging import configure_logging
    import structlog

    configure_logging()
    log = structlog.get_logger("gateway.master")
    parent = args.metrics_dir or os.environ.get("MCPGW_METRICS_DIR")
    try:
        metrics_dir = _metrics_dir(parent)
    except OSError as exc:
        log.error("gateway.start_failed", reason="metrics_dir_unwritable", directory=parent or tempfile.gettempdir(),
                  detail=exc.strerror or str(exc),
                  hint="--workers needs a writable directory for metric files: --metrics-dir DIR "
                       "(or MCPGW_METRICS_DIR), e.g. a tmpfs under a read-only root")
        return 2
    env = dict(os.environ)
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    cmd = [sys.executable, "-m", "gateway", "serve", "-c", args.config, "--reuse-port"]
    children: list[subprocess.Popen[bytes]] = [subprocess.Popen(cmd, env=env) for _ in range(n)]
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = stopping or signum in (signal.SIGTERM, signal.SIGINT)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("gateway.workers_started", workers=n, pids=[c.pid for c in children], metrics_dir=metrics_dir)
    status = 0
    try:
        while children:
            for i, child in enumerate(list(children)):
                try:
                    code = child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                multiprocess.mark_process_dead(child.pid, metrics_dir)
                if stopping:
                    children.remove(child)
                    status = status or (code if code and code > 0 else 0)
                else:
                    log.error("gateway.worker_died", pid=child.pid, code=code)
                    children[i] = subprocess.Popen(cmd, env=env)
                    log.info("gateway.worker_restarted", pid=children[i].pid)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def cmd_serve(args: argparse.Namespace) -> int:
    from .telemetry.logging import configure_logging

    try:
        config = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("refusing to start: fix the configuration above (mcp-gateway check -c FILE)", file=sys.stderr)
        return 2
    if args.workers > 1:
        if config.store.kind == "memory":
            print(f"{config.store.loc}: store 'memory' is per process: with --workers {args.workers} "
                  "sessions and pins would not be shared; use a redis:// store", file=sys.stderr)
            return 2
        return _run_workers(args, args.workers)
    configure_logging(config.logging.level, config.logging)
    if config.logging.audit_file is not None:
        from .telemetry import audit
        try:
            audit.WRITER.open_file(config.logging.audit_file)
        except OSError as exc:
            import structlog
            structlog.get_logger("gateway").error(
                "gateway.start_failed", reason="audit_file_unwritable", path=config.logging.audit_file,
                detail=exc.strerror or type(exc).__name__)
            return 2
    return _run_one(config, reuse_port=args.reuse_port or args.workers > 1)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="Security-enforcing MCP gateway")
    parser.add_argument("--version", action="version", version=f"mcp-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("-c", "--config", required=True, help="gateway YAML file")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--metrics-dir", default=None,
                   help="with --workers: where the shared metric files go (default: $MCPGW_METRICS_DIR, "
                        "else the temporary directory); must be writable")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate the config and everything it references")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="run a self-contained demo (dev issuer, demo MCP server)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--admin-port", type=int, default=9464)
    p.set_defaults(func=cmd_demo)

    from .inspect import pins_cli
    from .policy import cli as policy_cli

    policy_cli.register(sub)
    pins_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
