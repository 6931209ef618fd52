"""The registry of things to benchmark. Each target starts itself and says how to reach it.

A target kind is one of:
- ``direct``: the upstream itself; the physical limit of this box's Python upstream.
- ``baseline``: a bare proxy the gateway is measured against.
- ``gateway``: the gateway with some configuration. A new variant is a config fragment
  plus the headers a client sends: see ``GATEWAY_VARIANTS`` at the end.
"""
from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import yaml

from .issuer import LocalIssuer
from .procs import Proc, free_port

SERVER_NAME = "bench"  # the gateway serves the upstream at /mcp/<SERVER_NAME>
POLICY = Path(__file__).resolve().parent / "policy.yaml"


@dataclass
class Context:
    """What every target's start function may use; one per harness run."""

    run_dir: Path
    repo_root: Path
    upstream_origin: str
    upstream_path: str = "/mcp"
    gateway_workers: int | None = None
    nice: int | None = None
    python: str = sys.executable
    _issuer: LocalIssuer | None = None
    _redis: Proc | None = None
    _redis_url: str = ""

    async def issuer(self) -> LocalIssuer:
        """The run's local RS256 issuer, started on first use."""
        if self._issuer is None:
            self._issuer = await LocalIssuer.start()
        return self._issuer

    async def redis(self) -> tuple[str, Proc]:
        """The run's own redis-server (free port, no persistence), started on first use."""
        if self._redis is None:
            port = free_port()
            proc = await Proc.start("redis", [
                shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                "--port", str(port), "--save", "", "--appendonly", "no"],
                self.run_dir, ready_line=False, nice=self.nice)
            try:
                await proc.wait_redis_ready(port)
            except BaseException:
                await proc.stop()
                raise
            self._redis, self._redis_url = proc, f"redis://127.0.0.1:{port}/0"
        return self._redis_url, self._redis

    async def close(self) -> None:
        if self._issuer is not None:
            await self._issuer.close()
        if self._redis is not None:
            await self._redis.stop()


@dataclass
class Running:
    """A started target. ``proc`` is the process charged as "proxy CPU" (None for direct)."""

    url: str
    proc: Proc | None
    headers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    aux: list[Proc] = field(default_factory=list)  # helpers it needs (redis): CPU shown apart

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop()


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "direct" | "baseline" | "gateway"
    description: str
    start: Callable[[Context], Awaitable[Running]]
    # Returns why the target cannot run on this checkout, or None when it can.
    unavailable: Callable[[Context], str | None] = lambda ctx: None


async def _start_direct(ctx: Context) -> Running:
    return Running(url=ctx.upstream_origin + ctx.upstream_path, proc=None)


def _bare(name: str, *flags: str) -> Callable[[Context], Awaitable[Running]]:
    async def start(ctx: Context) -> Running:
        proc = await Proc.start(name, [ctx.python, "-m", "bench.bare_proxy",
                                       "--upstream", ctx.upstream_origin, *flags],
                                ctx.run_dir, cwd=ctx.repo_root, nice=ctx.nice)
        try:
            port = (await proc.wait_ready_line())["port"]
        except BaseException:
            await proc.stop()
            raise
        return Running(url=f"http://127.0.0.1:{port}{ctx.upstream_path}", proc=proc)
    return start


# -- the gateway ----------------------------------------------------------------------

ConfigFn = Callable[[Context, str], Awaitable[dict[str, Any]]]
HeadersFn = Callable[[Context, str], Awaitable[dict[str, str]]]


async def _no_config(ctx: Context, public_url: str) -> dict[str, Any]:
    return {}


async def _no_headers(ctx: Context, endpoint: str) -> dict[str, str]:
    return {}


def gateway_config(ctx: Context, port: int, admin_port: int) -> dict[str, Any]:
    """The base config: auth off, memory store, the bench policy, one upstream.

    Variants replace whole top-level sections (``auth``, say) with their own.
    """
    public_url = f"http://127.0.0.1:{port}"
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "public_url": public_url,
        "store": "memory",
        "shutdown_delay": 0,   # no load balancer to tell
        "auth": {"mode": "none"},
        "policies": str(POLICY),
        "pins": str(ctx.run_dir / "pins"),  # tool pins (lock files) stay inside the run
        "servers": {SERVER_NAME: {"url": ctx.upstream_origin + ctx.upstream_path}},
    }


def gateway_unavailable(ctx: Context) -> str | None:
    if not (ctx.repo_root / "gateway" / "__main__.py").exists():
        return "gateway/__main__.py does not exist"
    return None


def gateway_target(name: str, description: str, config: ConfigFn = _no_config,
                   headers: HeadersFn = _no_headers, workers: int | None = None,
                   unavailable: Callable[[Context], str | None] = gateway_unavailable,
                   preload: str | None = None) -> Target:
    """A gateway target: the base config updated with ``config``'s sections, plus headers.

    ``workers`` fixes ``--workers`` for this variant; otherwise ``--gateway-workers`` applies.
    """

    async def start(ctx: Context) -> Running:
        port, admin_port = free_port(), free_port()
        cfg = gateway_config(ctx, port, admin_port)
        cfg.update(await config(ctx, cfg["public_url"]))
        aux = [(await ctx.redis())[1]] if str(cfg["store"]).startswith("redis") else []
        (ctx.run_dir / "pins").mkdir(exist_ok=True)
        cfg_path = ctx.run_dir / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [ctx.python, "-m", "gateway", "serve", "-c", str(cfg_path)]
        if preload is not None:       # a bench-only ablation exec'd before the gateway starts
            argv[1:1] = ["-m", "bench.instr", "_preload", str(Path(__file__).with_name(preload))]
        if workers or ctx.gateway_workers:
            argv += ["--workers", str(workers or ctx.gateway_workers)]
        proc = await Proc.start(name, argv, ctx.run_dir, cwd=ctx.repo_root, ready_line=False,
                                nice=ctx.nice)
        try:
            await proc.wait_http_ready(f"http://127.0.0.1:{admin_port}/readyz")
        except BaseException:
            await proc.stop()
            raise
        endpoint = f"{cfg['public_url']}/mcp/{SERVER_NAME}"
        return Running(url=endpoint, proc=proc, headers=await headers(ctx, endpoint),
                       notes=[f"config {cfg_path}"], aux=aux)

    return Target(name, "gateway", description, start, unavailable)


async def _jwt_config(ctx: Context, public_url: str) -> dict[str, Any]:
    issuer = await ctx.issuer()
    return {"auth": {"issuers": [{"issuer": issuer.issuer, "jwks_uri": issuer.jwks_uri}]}}


async def _redis_config(ctx: Context, public_url: str) -> dict[str, Any]:
    return {"store": (await ctx.redis())[0]}


async def _quiet_config(ctx: Context, public_url: str) -> dict[str, Any]:
    # The same gateway with its per-request output off: no audit record, only error logs.
    return {"logging": {"audit": False, "level": "error"}}


async def _noaudit_config(ctx: Context, public_url: str) -> dict[str, Any]:
    return {"logging": {"audit": False}}


async def _audit_null_config(ctx: Context, public_url: str) -> dict[str, Any]:
    return {"logging": {"audit_file": "/dev/null"}}


def _redis_unavailable(ctx: Context) -> str | None:
    return gateway_unavailable(ctx) or (
        None if shutil.which("redis-server") else "redis-server is not installed")


async def _jwt_headers(ctx: Context, endpoint: str) -> dict[str, str]:
    # One token for the whole run, as a real client reuses it for its session.
    return {"Authorization": "Bearer " + (await ctx.issuer()).mint(endpoint)}


def _jwt_unavailable(ctx: Context) -> str | None:
    why = gateway_unavailable(ctx)
    if why:
        return why
    for path in (ctx.repo_root / "gateway").rglob("*.py"):
        if re.search(r"\bissuers\b", path.read_text(errors="replace")):
            return None
    return "the gateway's config has no auth.issuers yet"


LIMITS = """
    limits:                 # three limits on every call, high enough never to refuse
      - {id: bench-per-principal, match: {tools: ["*"]}, key: [principal], windows: [{limit: 100000000, per: 1s}]}
      - {id: bench-per-tool, match: {tools: ["*"]}, key: [tool], windows: [{limit: 100000000, per: 1s}]}
      - {id: bench-global, match: {methods: ["**"], tools: ["*"]}, key: [global],
         windows: [{limit: 100000000, per: 1s}, {limit: 1000000000, per: 1m}]}
"""


async def _jwt_redis_config(ctx: Context, public_url: str) -> dict[str, Any]:
    return {**await _jwt_config(ctx, public_url), **await _redis_config(ctx, public_url)}


async def _jwt_redis_limits_config(ctx: Context, public_url: str) -> dict[str, Any]:
    policy = ctx.run_dir / "policy-limits.yaml"
    policy.write_text(POLICY.read_text().replace("    default: deny\n", "    default: deny\n" + LIMITS.lstrip("\n"), 1))
    return {**await _jwt_redis_config(ctx, public_url), "policies": str(policy)}


async def _scan_config(ctx: Context, public_url: str) -> dict[str, Any]:
    # Every tools/call result and resource read scanned for prompt injection (annotate).
    return {"servers": {SERVER_NAME: {"url": ctx.upstream_origin + ctx.upstream_path,
                                      "scan_results": {"action": "annotate"}}}}


def _jwt_redis_unavailable(ctx: Context) -> str | None:
    return _jwt_unavailable(ctx) or _redis_unavailable(ctx)


GATEWAY_VARIANTS = [
    gateway_target("gateway", "the gateway, auth off, memory store"),
    gateway_target("gateway-quiet", "the same with the audit record and info logs off (what they cost)",
                   config=_quiet_config),
    gateway_target("gateway-dark", "audit, info logs and per-request metrics all off (bench/ablate_metrics.py)",
                   config=_quiet_config, preload="ablate_metrics.py"),
    gateway_target("gateway-noaudit", "the same with only the audit record off (info logs on)",
                   config=_noaudit_config),
    gateway_target("gateway-audit-null", "the gateway writing its audit records to /dev/null (what building them costs)",
                   config=_audit_null_config),
    gateway_target("gateway-jwt", "the gateway verifying an RS256 JWT from a local issuer",
                   config=_jwt_config, headers=_jwt_headers, unavailable=_jwt_unavailable),
    gateway_target("gateway-redis", "the gateway with its session store in Redis",
                   config=_redis_config, unavailable=_redis_unavailable),
    # Sessions must be shared between workers, hence Redis.
    gateway_target("gateway-2w", "the gateway, 2 SO_REUSEPORT workers, Redis store",
                   config=_redis_config, workers=2, unavailable=_redis_unavailable),
    gateway_target("gateway-scan", "the gateway scanning every result for prompt injection (scan_results: annotate)",
                   config=_scan_config),
    gateway_target("gateway-jwt-redis", "JWT, policy, pinning, Redis store (no limits)",
                   config=_jwt_redis_config, headers=_jwt_headers, unavailable=_jwt_redis_unavailable),
    gateway_target("gateway-jwt-redis-limits", "the same plus three rate limits on every call, in Redis",
                   config=_jwt_redis_limits_config, headers=_jwt_headers, unavailable=_jwt_redis_unavailable),
]

TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("direct", "direct", "the upstream, no proxy", _start_direct),
    Target("bare", "baseline", "bare aiohttp proxy, asyncio loop", _bare("bare")),
    Target("bare-uvloop", "baseline", "bare aiohttp proxy, uvloop", _bare("bare-uvloop", "--uvloop")),
    Target("bare-uvloop-buf", "baseline", "bare aiohttp proxy, uvloop, bodies read whole",
           _bare("bare-uvloop-buf", "--uvloop", "--buffer")),
    *GATEWAY_VARIANTS,
]}

DEFAULT_TARGETS = ["direct", "bare-uvloop", "gateway", "gateway-jwt"]
BASELINE = "bare-uvloop"  # what "× bare" and the goals compare against
