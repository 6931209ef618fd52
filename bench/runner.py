"""Running the measurements: targets up and checked, wrk rounds interleaved, then SSE.

Order of a throughput round (as in perf-baseline.md): repeat -> concurrency -> target,
the target order rotated by one each repeat so no target always runs first or last on a
box whose speed drifts. Each measured run has its own warm-up just before it.
"""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil

from .mcp import McpSession, ProtocolError, base_headers
from .procs import Proc, StartError
from .sse import run_sse
from .targets import Context, Running, Target
from .wrk import run_wrk, write_script


@dataclass
class Active:
    """A target that started and passed the preflight."""

    target: Target
    running: Running
    session: McpSession
    preflight: dict[str, Any]
    script: Any = None


@dataclass
class Skipped:
    name: str
    reason: str


@dataclass
class RunOptions:
    concs: list[int]
    duration: int
    warmup: int
    repeats: int
    wrk_threads: int
    workload: str
    check_bodies: bool
    sse_concs: list[int]
    sse_requests: int | None
    sse_session_per_worker: bool


# /proc/stat fields that add up to wall time; guest time is already inside user.
_TOTAL_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def say(*parts: Any) -> None:
    print("bench:", *parts, file=sys.stderr, flush=True)


async def start_targets(ctx: Context, targets: list[Target], opts: RunOptions
                        ) -> tuple[list[Active], list[Skipped]]:
    active: list[Active] = []
    skipped: list[Skipped] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for t in targets:
            why = t.unavailable(ctx)
            if why:
                say(f"{t.name}: skipped: {why}")
                skipped.append(Skipped(t.name, why))
                continue
            running: Running | None = None
            try:
                running = await t.start(ctx)
                session = await McpSession(running.url, dict(running.headers)).open(http)
                pre = await session.preflight(http)
                if "Authorization" in running.headers:
                    await _expect_401(http, running.url)
            except (StartError, ProtocolError, aiohttp.ClientError, asyncio.TimeoutError,
                    OSError) as exc:
                reason = exc.summary if isinstance(exc, StartError) else \
                    f"{type(exc).__name__}: {exc}"
                say(f"{t.name}: skipped: {exc if isinstance(exc, StartError) else reason}")
                skipped.append(Skipped(t.name, reason.splitlines()[0][:400]))
                if running is not None:
                    await running.stop()
                continue
            a = Active(t, running, session, pre)
            a.script = write_script(ctx.run_dir / f"wrk-{t.name}.lua", running.url,
                                    session.session_id, running.headers, opts.workload,
                                    opts.check_bodies, f"target {t.name}, {opts.workload}")
            say(f"{t.name}: ready at {running.url} ({pre['tools']} tools, "
                f"session id {'yes' if pre['session_id'] else 'none'})")
            active.append(a)
    return active, skipped


async def _expect_401(http: aiohttp.ClientSession, url: str) -> None:
    """A target measured "with auth" must refuse a request without the token."""
    async with http.post(url, data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                         headers=base_headers()) as resp:
        if resp.status != 401:
            raise ProtocolError(f"no token: expected 401, got HTTP {resp.status}")


async def throughput(active: list[Active], upstream: Proc, opts: RunOptions,
                     failed: list[Skipped]) -> list[dict[str, Any]]:
    """All wrk rounds; a target that breaks is dropped (and listed in ``failed``)."""
    runs: list[dict[str, Any]] = []
    run_no = 0
    for rep in range(opts.repeats):
        for conc in opts.concs:
            k = rep % len(active)
            for a in active[k:] + active[:k]:
                if any(f.name == a.target.name for f in failed):
                    continue
                try:
                    if opts.warmup > 0:
                        run_no += 1
                        await run_wrk(a.running.url, a.script, conc, opts.warmup, run_no,
                                      opts.wrk_threads)
                    run_no += 1
                    r = await _measure(a, upstream, conc, opts, run_no)
                    proc = a.running.proc
                    if proc is not None and proc.proc.returncode is not None:
                        raise RuntimeError(f"exited with code {proc.proc.returncode} "
                                           f"(log {proc.log_path})")
                except RuntimeError as exc:
                    say(f"{a.target.name}: dropped at c={conc}: {exc}")
                    failed.append(Skipped(a.target.name, f"failed at c={conc}: {exc}"[:400]))
                    continue
                r["repeat"] = rep
                runs.append(r)
                say(f"r{rep} c={conc:<3} {a.target.name:<16} {r['rps']:>9,.0f} req/s  "
                    f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms  "
                    f"proxy {r['proxy_us_per_req']:.0f} µs/req  other {r['other_cpu_pct']:.0f}%  "
                    f"err {r['errors']}/{r['non2xx']}/{r['rpc_errors']}")
    return runs


async def _measure(a: Active, upstream: Proc, conc: int, opts: RunOptions,
                   run_no: int) -> dict[str, Any]:
    """One wrk run with the CPU of the proxy tree, the upstream and the box around it."""
    proxy = a.running.proc
    p0 = proxy.cpu_seconds() if proxy else 0.0
    u0 = upstream.cpu_seconds()
    a0 = sum(p.cpu_seconds() for p in a.running.aux)
    h0 = time.process_time()
    s0 = psutil.cpu_times()
    t0 = time.monotonic()
    w = await run_wrk(a.running.url, a.script, conc, opts.duration, run_no, opts.wrk_threads)
    wall = time.monotonic() - t0
    s1 = psutil.cpu_times()
    harness_s = time.process_time() - h0
    proxy_s = (proxy.cpu_seconds() - p0) if proxy else 0.0
    upstream_s = upstream.cpu_seconds() - u0
    aux_s = sum(p.cpu_seconds() for p in a.running.aux) - a0
    total_s = sum(getattr(s1, f) - getattr(s0, f) for f in _TOTAL_FIELDS if hasattr(s0, f))
    busy_s = total_s - (s1.idle - s0.idle) - (getattr(s1, "iowait", 0) - getattr(s0, "iowait", 0))
    # On a shared box, CPU used by anything else during the run is the noise to watch.
    other_s = busy_s - proxy_s - upstream_s - aux_s - w.wrk_cpu_s - harness_s
    n = max(w.requests, 1)
    return {
        "target": a.target.name, "conc": conc, "requests": w.requests, "rps": w.rps,
        "p50_ms": w.p50_ms, "p90_ms": w.p90_ms, "p99_ms": w.p99_ms, "max_ms": w.max_ms,
        "errors": w.errors, "non2xx": w.non2xx, "rpc_errors": w.rpc_errors,
        "wall_s": wall, "proxy_cpu_s": proxy_s, "proxy_us_per_req": proxy_s / n * 1e6,
        "proxy_cpu_pct": proxy_s / wall * 100, "upstream_us_per_req": upstream_s / n * 1e6,
        "upstream_cpu_pct": upstream_s / wall * 100, "wrk_cpu_pct": w.wrk_cpu_s / wall * 100,
        "aux_us_per_req": aux_s / n * 1e6, "other_cpu_pct": max(other_s, 0.0) / wall * 100,
        "steal_pct": (getattr(s1, "steal", 0) - getattr(s0, "steal", 0)) / total_s * 100
        if total_s > 0 else 0.0,
        "wrk": w.raw,
    }


async def streaming(active: list[Active], opts: RunOptions,
                    failed: list[Skipped]) -> list[tuple[str, Any]]:
    out = []
    for conc in opts.sse_concs:
        n = opts.sse_requests or max(10, 4 * conc)
        modes = [1] + ([conc] if conc > 1 and opts.sse_session_per_worker else [])
        for sessions in modes:
            for a in active:
                if any(f.name == a.target.name for f in failed):
                    continue
                try:
                    r = await run_sse(a.running.url, a.running.headers, conc, n, sessions)
                except (ProtocolError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    say(f"{a.target.name}: dropped in the SSE test: {exc}")
                    failed.append(Skipped(a.target.name, f"SSE session setup failed: {exc}"[:400]))
                    continue
                firsts = sorted(e[0] for e in r.events_ms if e)
                say(f"sse c={conc:<3} sessions={sessions:<3} {a.target.name:<16} "
                    f"first event p50 {firsts[len(firsts) // 2] if firsts else float('nan'):.2f} "
                    f"ms, errors {len(r.errors)}" + (f" ({r.errors[0]})" if r.errors else ""))
                out.append((a.target.name, r))
    return out
