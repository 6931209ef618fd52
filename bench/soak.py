"""``python -m bench.soak``: mixed traffic at half the measured capacity, for minutes, watched.

Two gateway workers (``--workers 2``) with a run-owned Redis store, in front of two
upstreams: the fast bench upstream (``bench``, 2025-11-25 sessions and 2026-07-28
sessionless requests) and the ``mcp`` SDK test server (``sdk``, which closes a stream
early so the client must resume it with ``Last-Event-ID``).  The mix, by weight:

    call     tools/call echo on a pooled session (JSON)          36
    modern   tools/call echo, 2026-07-28, no session (sdk)        12
    list     tools/list                                           12
    stream   tools/call stream: two progress events, then the result (SSE)   12
    refused  a call the policy refuses (unknown tool, or arguments its schema refuses)  12
    session  a new session: initialize, initialized, DELETE        8
    resume   a call whose stream closes early, resumed with GET + Last-Event-ID   8

First the capacity: the mix closed-loop for ``--capacity-seconds`` over 16 connections.
Then the mix open-loop at ``--fraction`` (0.5) of it for ``--minutes``; every
``--sample-seconds`` a window records what was done, the unexpected outcomes, latency
p50/p99, each gateway process's RSS and open file descriptors, and Redis's key count.
Pass means (from the sample after ``--warmup-fraction`` of the run to the last):
no unexpected outcome (or, if any, none more in the last third than in the first);
RSS growth under 5 % per process; descriptors at most 20 (or 10 %) above the baseline
(they follow the client's pooled connections); Redis keys within 10 (or 10 %).  Writes a JSON report and exits 0 on pass, 1 on fail.

    python -m bench.soak --minutes 30          # the README figures
    python -m bench.soak --minutes 0.25 --capacity-seconds 3 --sample-seconds 2   # a smoke
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import psutil
import redis.asyncio as aioredis
import yaml

from .mcp import McpSession, iter_sse, read_response, request_headers
from .procs import Proc, free_port
from .report import pct
from .runner import say
from .targets import POLICY, SERVER_NAME, Context, Running, gateway_target

REPO_ROOT = Path(__file__).resolve().parent.parent
MODERN_VERSION = "2026-07-28"
MIX = [("call", 36), ("modern", 12), ("list", 12), ("stream", 12), ("refused", 12),
       ("session", 8), ("resume", 8)]
MAX_IN_FLIGHT = 64          # open loop: starts beyond this are counted late, not queued
FD_SLACK = 20               # descriptors a process may hold above its baseline (pooled connections)
# The resumed call's gap between its early close and its next event (--resume-gap-ms): the SDK
# server loses the rest of a stream when the client is back only after the call ended (directly,
# 5 ms: 40 of 40 lost; 30 ms: none; through a loaded gateway 100 ms lost 5 of ~400), so the gap
# must outlast the reconnection by a margin.
RESUME_GAP_MS = 500


class Unexpected(Exception):
    """An answer a working gateway would not give for this operation."""


@dataclass
class Window:
    start: float
    done: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    late: int = 0


class Mix:
    """The operations, each an ``async (http) -> None`` that raises ``Unexpected``."""

    def __init__(self, bench_url: str, sdk_url: str, pools: int, resume_gap_ms: int = RESUME_GAP_MS) -> None:
        self.bench_url, self.sdk_url = bench_url, sdk_url
        self.resume_gap_ms = resume_gap_ms
        self.bench: list[McpSession] = [McpSession(bench_url) for _ in range(pools)]
        self.sdk: list[McpSession] = [McpSession(sdk_url) for _ in range(pools)]
        # A session has one GET stream at a time: a resumption holds its session until done.
        self.sdk_free: asyncio.Queue[McpSession] = asyncio.Queue()
        self._n = 0

    async def open(self, http: aiohttp.ClientSession) -> None:
        for s in self.bench + self.sdk:
            await s.open(http)
        for s in self.sdk:
            self.sdk_free.put_nowait(s)

    def _pick(self, pool: list[McpSession]) -> McpSession:
        self._n += 1
        return pool[self._n % len(pool)]

    async def call(self, http: aiohttp.ClientSession) -> None:
        text = f"soak {self._n}"
        result = await self._pick(self.bench).call(http, "tools/call", {"name": "echo", "arguments": {"text": text}})
        if result.get("content", [{}])[0].get("text") != text:
            raise Unexpected(f"echo answered {str(result)[:200]}")

    async def modern(self, http: aiohttp.ClientSession) -> None:
        msg = {"jsonrpc": "2.0", "id": "m", "method": "tools/call", "params": {
            "name": "echo", "arguments": {"text": "modern"}, "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                "io.modelcontextprotocol/clientInfo": {"name": "soak", "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {}}}}
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                   "MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
        async with http.post(self.sdk_url, data=json.dumps(msg), headers=headers) as resp:
            answer = await read_response(resp, "m")
        if resp.status != 200 or answer.get("result", {}).get("content", [{}])[0].get("text") != "modern":
            raise Unexpected(f"modern echo: HTTP {resp.status} {str(answer)[:200]}")

    async def list(self, http: aiohttp.ClientSession) -> None:
        result = await self._pick(self.bench).call(http, "tools/list", {})
        if len(result.get("tools", ())) < 2:
            raise Unexpected(f"tools/list answered {str(result)[:200]}")

    async def stream(self, http: aiohttp.ClientSession) -> None:
        s = self._pick(self.bench)
        msg = {"jsonrpc": "2.0", "id": s.next_id(), "method": "tools/call", "params": {
            "name": "stream", "arguments": {"count": 2, "interval_ms": 0}, "_meta": {"progressToken": "p"}}}
        progress = 0
        async with http.post(s.url, data=json.dumps(msg), headers=request_headers(msg, s.session_id, {})) as resp:
            if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                raise Unexpected(f"stream: HTTP {resp.status} {resp.headers.get('Content-Type')}")
            async for event in iter_sse(resp.content):
                if event.get("method") == "notifications/progress":
                    progress += 1
                elif event.get("id") == msg["id"]:
                    if "result" not in event or progress != 2:
                        raise Unexpected(f"stream: {progress} progress events, then {str(event)[:200]}")
                    return
        raise Unexpected("stream ended without its result")

    async def refused(self, http: aiohttp.ClientSession) -> None:
        s = self._pick(self.bench)
        params = ({"name": "no_such_tool", "arguments": {}} if self._n % 2 else
                  {"name": "echo", "arguments": {"text": "x", "extra": 1}})     # the schema refuses
        msg = {"jsonrpc": "2.0", "id": s.next_id(), "method": "tools/call", "params": params}
        async with http.post(s.url, data=json.dumps(msg), headers=request_headers(msg, s.session_id, {})) as resp:
            answer = await read_response(resp, msg["id"])
        if resp.status >= 500 or "error" not in answer:
            raise Unexpected(f"refusal: HTTP {resp.status} {str(answer)[:200]}")

    async def session(self, http: aiohttp.ClientSession) -> None:
        s = await McpSession(self.bench_url).open(http)
        headers = request_headers({"method": "x"}, s.session_id, {})
        del headers["Mcp-Method"]
        async with http.delete(s.url, headers=headers) as resp:
            if resp.status not in (200, 202, 204):
                raise Unexpected(f"DELETE: HTTP {resp.status}")

    async def resume(self, http: aiohttp.ClientSession) -> None:
        s = await self.sdk_free.get()
        try:
            await self._resume(http, s)
        finally:
            self.sdk_free.put_nowait(s)

    async def _resume(self, http: aiohttp.ClientSession, s: McpSession) -> None:
        msg = {"jsonrpc": "2.0", "id": s.next_id(), "method": "tools/call", "params": {
            "name": "reconnecting_progress", "arguments": {"steps": 2, "interval_ms": self.resume_gap_ms},
            "_meta": {"progressToken": "r"}}}
        last_id = None
        async with http.post(s.url, data=json.dumps(msg), headers=request_headers(msg, s.session_id, {})) as resp:
            if resp.status != 200:
                raise Unexpected(f"resume: HTTP {resp.status}")
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
            for block in buf.replace(b"\r\n", b"\n").split(b"\n\n"):
                for line in block.split(b"\n"):
                    if line.startswith(b"id:"):
                        last_id = line[3:].strip().decode()
                    elif line.startswith(b"data:") and b'"result"' in line:
                        return                  # answered without closing early: fine too
        if last_id is None:
            raise Unexpected("resume: no event id before the stream closed")
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": s.session_id or "",
                   "Last-Event-ID": last_id, "MCP-Protocol-Version": "2025-11-25"}
        async with http.get(s.url, headers=headers) as resp:
            if resp.status != 200:
                raise Unexpected(f"resume GET: HTTP {resp.status}")
            async for event in iter_sse(resp.content):
                if event.get("id") == msg["id"]:
                    if "result" not in event:
                        raise Unexpected(f"resumed: {str(event)[:200]}")
                    return
        raise Unexpected("the resumed stream ended without the result")


class Soak:
    def __init__(self, args: argparse.Namespace, mix: Mix, gateway: Proc, admin: str, redis_url: str) -> None:
        self.args, self.mix, self.gateway, self.admin = args, mix, gateway, admin
        self.redis = aioredis.from_url(redis_url)
        self.windows: list[Window] = []
        self.samples: list[dict[str, Any]] = []
        self.rng = random.Random(7)
        kinds, weights = zip(*MIX)
        self.kinds, self.weights = list(kinds), list(weights)

    def _op(self) -> tuple[str, Callable[[aiohttp.ClientSession], Awaitable[None]]]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        return kind, getattr(self.mix, kind)

    async def _run(self, http: aiohttp.ClientSession, kind: str,
                   op: Callable[[aiohttp.ClientSession], Awaitable[None]], w: Window | None) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(op(http), 30)
        except (Unexpected, aiohttp.ClientError, asyncio.TimeoutError, ValueError, RuntimeError) as exc:
            if w is not None:
                key = f"{kind}: {type(exc).__name__}: {str(exc)[:120]}"
                w.errors[key] = w.errors.get(key, 0) + 1
            return
        if w is not None:
            w.done[kind] = w.done.get(kind, 0) + 1
            w.latencies.append(time.perf_counter() - t0)

    async def capacity(self, http: aiohttp.ClientSession) -> float:
        """The mix closed-loop over 16 connections: operations per second."""
        w = Window(time.monotonic())
        deadline = time.monotonic() + self.args.capacity_seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                kind, op = self._op()
                await self._run(http, kind, op, w)

        await asyncio.gather(*(worker() for _ in range(16)))
        rate = sum(w.done.values()) / self.args.capacity_seconds
        if w.errors:
            say(f"capacity run had unexpected outcomes: {w.errors}")
        return rate

    async def sample(self, t: float) -> dict[str, Any]:
        procs = []
        for p in self.gateway.tree():
            try:
                procs.append({"pid": p.pid, "rss": p.memory_info().rss, "fds": p.num_fds()})
            except psutil.NoSuchProcess:
                continue
        keys = int(await self.redis.dbsize())
        errors_5xx = 0.0
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{self.admin}/metrics") as resp:
                for line in (await resp.text()).splitlines():
                    if line.startswith("mcpgw_requests_total{") and 'status="5' in line:
                        errors_5xx += float(line.rsplit(" ", 1)[1])
        except aiohttp.ClientError:
            errors_5xx = -1
        return {"t": round(t, 1), "procs": procs, "redis_keys": keys, "gateway_5xx": errors_5xx}

    async def run(self, http: aiohttp.ClientSession, rate: float) -> None:
        duration = self.args.minutes * 60
        interval = 1.0 / rate
        start = time.monotonic()
        next_window = start
        tasks: set[asyncio.Task[None]] = set()
        self.samples.append(await self.sample(0.0))
        i = 0
        while True:
            now = time.monotonic()
            if now - start >= duration:
                break
            if now >= next_window:
                if self.windows:
                    self.samples.append(await self.sample(now - start))
                self.windows.append(Window(now - start))
                next_window += self.args.sample_seconds
            due = start + i * interval
            if due > now:
                await asyncio.sleep(min(due - now, next_window - now))   # the open loop's clock
                continue
            i += 1
            if len(tasks) >= MAX_IN_FLIGHT:
                self.windows[-1].late += 1
                continue
            kind, op = self._op()
            task = asyncio.ensure_future(self._run(http, kind, op, self.windows[-1]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=35)
        self.samples.append(await self.sample(time.monotonic() - start))

    def verdict(self, rate: float, capacity: float) -> dict[str, Any]:
        n = len(self.samples)
        base_i = max(1, min(n - 2, int(n * self.args.warmup_fraction)))
        base, last = self.samples[base_i], self.samples[-1]
        checks: dict[str, Any] = {}
        per_proc = []
        base_rss = {p["pid"]: p for p in base["procs"]}
        for p in last["procs"]:
            b = base_rss.get(p["pid"])
            if b is None:
                continue
            growth = (p["rss"] - b["rss"]) / b["rss"]
            per_proc.append({"pid": p["pid"], "rss_base_mb": round(b["rss"] / 2**20, 1),
                             "rss_last_mb": round(p["rss"] / 2**20, 1), "rss_growth_pct": round(100 * growth, 2),
                             "fds_base": b["fds"], "fds_last": p["fds"]})
        checks["rss_growth_under_5pct"] = bool(per_proc) and all(p["rss_growth_pct"] < 5 for p in per_proc)
        # Descriptors follow the client's open connections (up to its pool size), so "flat"
        # is: no more at the end than at the baseline plus that pool's worth of slack.
        checks["fds_flat"] = bool(per_proc) and all(
            p["fds_last"] - p["fds_base"] <= max(FD_SLACK, 0.1 * p["fds_base"]) for p in per_proc)
        keys_b, keys_l = base["redis_keys"], last["redis_keys"]
        checks["redis_keys_flat"] = abs(keys_l - keys_b) <= max(10, 0.1 * keys_b)
        errs = [sum(w.errors.values()) for w in self.windows]
        third = max(1, len(errs) // 3)
        checks["errors_not_growing"] = sum(errs) == 0 or sum(errs[-third:]) <= sum(errs[:third])
        checks["no_gateway_5xx"] = last["gateway_5xx"] == 0
        lat = [x for w in self.windows for x in w.latencies]
        done = sum(sum(w.done.values()) for w in self.windows)
        kinds: dict[str, int] = {}
        for w in self.windows:
            for k, v in w.done.items():
                kinds[k] = kinds.get(k, 0) + v
        all_errors: dict[str, int] = {}
        for w in self.windows:
            for k, v in w.errors.items():
                all_errors[k] = all_errors.get(k, 0) + v
        return {
            "pass": all(checks.values()), "checks": checks,
            "capacity_ops_per_s": round(capacity, 1), "offered_ops_per_s": round(rate, 1),
            "achieved_ops_per_s": round(done / (self.args.minutes * 60), 1), "operations": done,
            "by_kind": kinds, "unexpected": sum(errs), "unexpected_by_kind": all_errors,
            "late": sum(w.late for w in self.windows),
            "latency_ms": {"p50": round(pct(lat, 50) * 1e3, 2), "p99": round(pct(lat, 99) * 1e3, 2)} if lat else {},
            "baseline_sample": base_i, "processes": per_proc,
            "redis_keys": {"base": keys_b, "last": keys_l, "min": min(s["redis_keys"] for s in self.samples),
                           "max": max(s["redis_keys"] for s in self.samples)},
            "windows": [{"t": round(w.start, 1), "done": sum(w.done.values()), "unexpected": sum(w.errors.values()),
                         "late": w.late,
                         "p50_ms": round(pct(w.latencies, 50) * 1e3, 2) if w.latencies else None,
                         "p99_ms": round(pct(w.latencies, 99) * 1e3, 2) if w.latencies else None}
                        for w in self.windows],
            "samples": self.samples,
        }


async def _wait_tcp(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.returncode is not None:
            raise proc.failure("exited before it listened")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)   # a probe interval; the loop ends on a connection or the deadline
    raise proc.failure(f"not listening on {port} after {timeout:g} s")


async def soak(args: argparse.Namespace) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="mcp-soak-"))
    say(f"run directory {run_dir}")
    started: list[Proc] = []
    ctx: Context | None = None
    running: Running | None = None
    try:
        upstream = await Proc.start("upstream", [sys.executable, "-m", "bench.upstream", "--tools", "50"],
                                    run_dir, cwd=REPO_ROOT)
        started.append(upstream)
        port = (await upstream.wait_ready_line())["port"]
        sdk_port = free_port()
        sdk = await Proc.start("sdk-upstream", [sys.executable, "-m", "tests.support.upstream_server",
                                                "--port", str(sdk_port), "--retry-interval", "20"],
                               run_dir, cwd=REPO_ROOT, ready_line=False)
        started.append(sdk)
        await _wait_tcp(sdk_port, sdk)
        ctx = Context(run_dir, REPO_ROOT, f"http://127.0.0.1:{port}")
        redis_url, _ = await ctx.redis()
        policy = yaml.safe_load(POLICY.read_text())
        policy["servers"]["sdk"] = {"default": "deny", "tools": [
            {"id": "sdk-soak", "match": ["echo", "reconnecting_progress"], "destructive": "allow"}]}
        (run_dir / "soak-policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))

        async def config(c: Context, public_url: str) -> dict[str, Any]:
            return {"store": redis_url, "policies": str(run_dir / "soak-policy.yaml"), "servers": {
                SERVER_NAME: {"url": f"http://127.0.0.1:{port}/mcp"},
                "sdk": {"url": f"http://127.0.0.1:{sdk_port}/mcp"}}}

        running = await gateway_target("soak", "the soak's gateway", config=config,
                                       workers=args.workers).start(ctx)
        assert running.proc is not None
        cfg = yaml.safe_load((run_dir / "soak.yaml").read_text())
        admin = f"http://127.0.0.1:{cfg['admin']['port']}"
        base = running.url.rsplit("/", 1)[0]
        mix = Mix(running.url, f"{base}/sdk", pools=8, resume_gap_ms=args.resume_gap_ms)
        conn = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT + 16)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as http:
            await mix.open(http)
            s = Soak(args, mix, running.proc, admin, redis_url)
            capacity = await s.capacity(http)
            rate = args.rate or capacity * args.fraction
            say(f"capacity {capacity:.0f} ops/s; soaking at {rate:.0f} ops/s for {args.minutes:g} min "
                f"on {args.workers} workers")
            await s.run(http, rate)
            report = s.verdict(rate, capacity)
            await s.redis.aclose()
        report["command"] = "python -m bench.soak " + " ".join(sys.argv[1:])
        report["minutes"] = args.minutes
        report["workers"] = args.workers
        report["date_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        summary = {k: report[k] for k in ("pass", "checks", "capacity_ops_per_s", "offered_ops_per_s",
                                          "achieved_ops_per_s", "operations", "unexpected", "late",
                                          "latency_ms", "processes", "redis_keys")}
        say("report " + str(args.out))
        print(json.dumps(summary, indent=1))
        return 0 if report["pass"] else 1
    finally:
        if running is not None:
            await running.stop()
        if ctx is not None:
            await ctx.close()
        for p in reversed(started):
            await p.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.5, help="of the measured capacity")
    ap.add_argument("--rate", type=float, default=None, help="operations per second (overrides --fraction)")
    ap.add_argument("--capacity-seconds", type=float, default=20.0)
    ap.add_argument("--sample-seconds", type=float, default=30.0)
    ap.add_argument("--warmup-fraction", type=float, default=0.1,
                    help="the baseline sample is taken after this share of the run")
    ap.add_argument("--resume-gap-ms", type=int, default=RESUME_GAP_MS,
                    help="how long a resumed call waits between closing its stream and its next event")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "soak.json")
    args = ap.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
