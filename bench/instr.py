"""Deterministic per-request cost: CPU instructions counted by valgrind's callgrind.

Wall-clock and CPU-time figures on a shared 2-core box move by 2x between runs; the
number of instructions a process executes to serve one request does not (±0.5 %).
This runs one target (the bare proxy or the gateway with some config) under
``valgrind --tool=callgrind --instr-atstart=no``, opens an MCP session through it,
warms it up, switches instrumentation on, sends ``-n`` identical-shape
``tools/call echo`` requests (unique ids) over ``-c`` keep-alive connections,
dumps, and prints instructions (Ir) and system calls per request.  Only the
target is counted: the upstream and this client run natively.

    .venv/bin/python -m bench.instr -t bare,gateway,gateway-allow,gateway-jwt -n 300

Targets: ``bare`` (bench/bare_proxy.py, uvloop), ``gateway`` (bench/policy.yaml, tofu
pinning, audit and metrics on, auth none: the bench's config), ``gateway-allow``
(allow-all policy, pinning off, audit off), ``gateway-jwt`` (``gateway`` + RS256 JWT
with a warm verified-token cache), ``bare-token`` (the bare proxy sent the same
~800-byte Bearer header: what carrying the token costs a proxy that ignores it; the
bench's bare-uvloop target is sent none).  ``--keep`` keeps the callgrind files for
``callgrind_annotate``; ``-c 16`` spreads the requests over 16 connections (more
work per event-loop iteration, as under load).

Attribution helpers: ``--profiler cprofile`` runs the target natively and saves a
cProfile of just the counted requests (call counts are exact, times are not);
``--profiler strace`` runs it natively under ``strace -c -f`` (which system calls, how
many per request); ``--preload FILE`` executes FILE in the target before it starts, to measure a
change (a monkeypatch) without editing the tree.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .issuer import LocalIssuer
from .mcp import McpSession, request_headers
from .procs import free_port
from .targets import LIMITS, POLICY, SERVER_NAME

ROOT = Path(__file__).resolve().parent.parent
ALLOW_ALL = {"servers": {"*": {"default": "allow", "destructive": "allow",
                               "methods": [{"id": "all", "match": ["**"]}]}}}
TARGETS = ("bare", "bare-token", "gateway", "gateway-allow", "gateway-quiet", "gateway-noaudit", "gateway-nolog", "gateway-jwt", "gateway-redis",
           "gateway-redis-limits", "gateway-scan", "gateway-virtual")
REDIS: dict[str, str] = {}      # "url" once main_async started a redis-server for the *-redis* targets


async def _read_line(proc: asyncio.subprocess.Process, prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}")
        text = line.decode(errors="replace")
        if text.startswith(prefix):
            return text[len(prefix):]


async def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


ECHO_TEXT = "hello"          # the echo argument; --workload echo-2k: 2 KiB of realistic text


MIRROR_HEADERS = False        # --mirror-headers: a 2025-11-25 request carries Mcp-Method/Mcp-Name too
ERA = "legacy"                # --era modern: 2026-07-28 requests (no session; _meta and Mcp-* headers)
_MODERN_META = ('"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
                '"io.modelcontextprotocol/clientInfo":{"name":"bench","version":"0"},'
                '"io.modelcontextprotocol/clientCapabilities":{}},')
_MODERN_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "echo"}


def _request_bytes(path: str, host: str, headers: dict[str, str], rpc_id: int) -> bytes:
    meta = _MODERN_META if ERA == "modern" else ""
    body = ('{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{%s"name":"echo",'
            '"arguments":{"text":%s}}}' % (rpc_id, meta, json.dumps(ECHO_TEXT))).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _conn_loop(host: str, port: int, path: str, headers: dict[str, str], ids: range) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for rpc_id in ids:
            writer.write(_request_bytes(path, f"{host}:{port}", headers, rpc_id))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if m is None:
                raise RuntimeError(f"no Content-Length in {head!r}")
            body = await reader.readexactly(int(m.group(1)))
            if status != 200 or b'"result"' not in body:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    finally:
        writer.close()


async def _load(url: str, headers: dict[str, str], n: int, conc: int, first_id: int) -> None:
    u = aiohttp.client.URL(url)
    per = n // conc
    await asyncio.gather(*(
        _conn_loop(u.host, u.port, u.path, headers, range(first_id + i * per, first_id + (i + 1) * per))
        for i in range(conc)))


def _callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)


def _totals(path: str) -> dict[str, int]:
    events: list[str] = []
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith(("summary:", "totals:")):
                return dict(zip(events, map(int, line.split()[1:])))
    raise RuntimeError(f"no totals in {path}")


def _gateway_config(work: Path, upstream: str, kind: str, issuer: LocalIssuer | None) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "public_url": f"http://127.0.0.1:{port}",
        "store": "memory",
        "shutdown_delay": 0,   # no load balancer to tell
        "auth": {"mode": "none"},
        "policies": str(POLICY),
        "pins": str(work / "pins"),
        "servers": {SERVER_NAME: {"url": upstream + "/mcp"}},
    }
    if kind == "gateway-allow":
        policy = work / "allow-all.yaml"
        policy.write_text(yaml.safe_dump(ALLOW_ALL))
        cfg["policies"] = str(policy)
        cfg["servers"][SERVER_NAME]["pinning"] = {"mode": "off"}
        cfg["logging"] = {"audit": False}
    if kind == "gateway-scan":
        cfg["servers"][SERVER_NAME]["scan_results"] = {"action": "annotate"}   # every result scanned
    if kind == "gateway-quiet":
        cfg["logging"] = {"audit": False, "level": "error"}     # what the per-request output costs
    if kind == "gateway-noaudit":
        cfg["logging"] = {"audit": False}                        # the audit record alone
    if kind == "gateway-nolog":
        cfg["logging"] = {"level": "error"}                      # the log level alone
    if kind == "gateway-jwt":
        assert issuer is not None
        cfg["auth"] = {"issuers": [{"issuer": issuer.issuer, "jwks_uri": issuer.jwks_uri}]}
    if "redis" in kind:
        cfg["store"] = {"url": REDIS["url"], "prefix": f"instr:{os.getpid()}:{kind}:"}
    if kind.endswith("-limits"):
        policy = work / "policy-limits.yaml"
        policy.write_text(POLICY.read_text().replace("    default: deny\n", "    default: deny\n" + LIMITS.lstrip("\n"), 1))
        cfg["policies"] = str(policy)
    if kind == "gateway-virtual":
        # The same server published by a virtual server (no prefix): the same call, routed.
        cfg["virtual_servers"] = {"v": {"include": [{"server": SERVER_NAME, "prefix": ""}]}}
    (work / "pins").mkdir(exist_ok=True)
    path = work / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, port, admin


def _wrapped(argv: list[str]) -> None:
    """``_cprofile OUT -m module args...``: run a module; SIGUSR1 starts cProfile, SIGUSR2 saves it."""
    import cProfile
    import runpy

    out, rest = argv[0], argv[1:]
    prof = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
    signal.signal(signal.SIGUSR2, lambda *_: (prof.disable(), prof.dump_stats(out)))
    if rest[:2] == ["-m", "bench.instr"]:
        main(rest[2:])
        return
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


def _preloaded(argv: list[str]) -> None:
    """``_preload FILE -m module args...``: exec FILE (an experiment's patches), then run the module."""
    import runpy

    path, module, rest = argv[0], argv[2], argv[3:]
    exec(compile(Path(path).read_text(), path, "exec"), {"__name__": "__preload__"})
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


async def _straced(pid: int, out_file: Path, load: Any) -> int:
    """Run ``load`` with ``strace -c -f`` attached to ``pid``; return the syscalls counted.

    strace announces each attached thread on stderr; the load starts after the first line.
    """
    tracer = await asyncio.create_subprocess_exec(
        "strace", "-c", "-f", "-o", str(out_file), "-p", str(pid), stderr=asyncio.subprocess.PIPE)
    assert tracer.stderr is not None
    try:
        line = await asyncio.wait_for(tracer.stderr.readline(), 30)
        if b"attached" not in line:
            raise RuntimeError(f"strace did not attach: {line!r}")
        await load
    finally:
        tracer.send_signal(signal.SIGINT)
        await asyncio.wait_for(tracer.wait(), 30)
    table = out_file.read_text()
    total = re.search(r"^100\.00\s+\S+\s+\S+\s+(\d+)", table, re.M)
    return int(total.group(1)) if total else 0


async def measure(kind: str, upstream: str, work: Path, n: int, conc: int, warmup: int,
                  issuer: LocalIssuer | None, python: str, keep: bool,
                  profiler: str = "callgrind", preload: str | None = None) -> dict[str, Any]:
    module = ["-m", "bench.instr", "_preload", preload, "-m"] if preload else ["-m"]
    if profiler == "cprofile":
        out_file = work / f"cprofile.{kind}.prof"
        run = [python, "-m", "bench.instr", "_cprofile", str(out_file), *module]
    elif profiler == "strace":
        out_file = work / f"strace.{kind}.txt"
        run = [python, *module]
    else:
        out_file = work / f"callgrind.{kind}.out"
        run = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-systime=yes",
               f"--callgrind-out-file={out_file}", python, *module]
    log = open(work / f"{kind}.log", "wb")
    extra: dict[str, str] = {}
    if kind.startswith("bare"):
        argv = [*run, "bench.bare_proxy", "--uvloop", "--upstream", upstream]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=log)
        port = json.loads(await _read_line(proc, "BENCH_READY ", 600))["port"]
        url = f"http://127.0.0.1:{port}/mcp"
        if issuer is not None and kind == "bare-token":
            extra["Authorization"] = "Bearer " + issuer.mint(url)   # forwarded; the upstream ignores it
    else:
        cfg, port, admin = _gateway_config(work, upstream, kind, issuer)
        argv = [*run, "gateway", "serve", "-c", str(cfg)]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=log, stderr=log)
        await _wait_http(f"http://127.0.0.1:{admin}/readyz", 600)
        url = f"http://127.0.0.1:{port}/mcp/{'v' if kind == 'gateway-virtual' else SERVER_NAME}"
        if issuer is not None and kind == "gateway-jwt":
            extra["Authorization"] = "Bearer " + issuer.mint(url)
    totals: dict[str, int] = {}
    dumps: list[str] = []
    try:
        if ERA == "modern":
            headers = {**_MODERN_HEADERS, **extra}
        else:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
                sess = await McpSession(url, extra).open(http)
                await sess.preflight(http)
            msg = {"method": "tools/call", "params": {"name": "echo", "arguments": {"text": ECHO_TEXT}}}
            headers = request_headers(msg, sess.session_id, extra)
            if not MIRROR_HEADERS:
                # As the SDK clients of 2025-11-25 send it: Mcp-Method and Mcp-Name are headers
                # of 2026-07-28 (--mirror-headers: sent anyway, as bench.wrk does).
                headers.pop("Mcp-Method", None)
                headers.pop("Mcp-Name", None)
        await _load(url, headers, warmup, conc, 1_000_000)
        if profiler == "cprofile":
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.2)
            await _load(url, headers, n, conc, 2_000_000)
            proc.send_signal(signal.SIGUSR2)
            await asyncio.sleep(1.0)
            dumps = [str(out_file)]
        elif profiler == "strace":
            totals["sysCount"] = await _straced(proc.pid, out_file, _load(url, headers, n, conc, 2_000_000))
            dumps = [str(out_file)]
        else:
            for f in glob.glob(f"{out_file}*"):
                os.unlink(f)
            _callgrind_control("-i", "on", str(proc.pid))
            _callgrind_control("-z", str(proc.pid))
            await _load(url, headers, n, conc, 2_000_000)
            _callgrind_control("-d", str(proc.pid))
            _callgrind_control("-i", "off", str(proc.pid))
            dumps = sorted(glob.glob(f"{out_file}*"))
            totals = _totals(dumps[-1])
            if not keep:
                for f in dumps:
                    os.unlink(f)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 120)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()
    served = (n // conc) * conc
    return {"target": kind, "requests": served, "conc": conc, "Ir": totals.get("Ir", 0),
            "Ir/req": totals.get("Ir", 0) / served, "sys/req": totals.get("sysCount", 0) / served,
            "file": dumps[-1] if (keep or profiler != "callgrind") and dumps else None}


async def main_async(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="instr-"))
    work.mkdir(parents=True, exist_ok=True)
    up = await asyncio.create_subprocess_exec(args.python, "-m", "bench.upstream", "--port", "0",
                                              *(["--stateless"] if ERA == "modern" else []), cwd=ROOT,
                                              stdout=asyncio.subprocess.PIPE)
    issuer = None
    redis = None
    results = []
    try:
        upstream = f"http://127.0.0.1:{json.loads(await _read_line(up, 'BENCH_READY ', 60))['port']}"
        if any("redis" in t for t in args.targets):
            port = free_port()
            redis = await asyncio.create_subprocess_exec(
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                stdout=asyncio.subprocess.PIPE)
            assert redis.stdout is not None
            while b"eady to accept connections" not in await asyncio.wait_for(redis.stdout.readline(), 30):
                if redis.returncode is not None:
                    raise RuntimeError("redis-server exited before it was ready")
            REDIS["url"] = f"redis://127.0.0.1:{port}/0"
        if "gateway-jwt" in args.targets or "bare-token" in args.targets:
            issuer = await LocalIssuer.start()
        for kind in args.targets:
            runs = []
            for _ in range(args.repeats):
                r = await measure(kind, upstream, work, args.n, args.conc, args.warmup, issuer, args.python,
                                  args.keep, args.profiler, args.preload)
                runs.append(r)
                print(f"{r['target']:14} c={r['conc']:<3} n={r['requests']:<5} Ir/req={r['Ir/req']:>10,.0f}  "
                      f"syscalls/req={r['sys/req']:.2f}" + (f"  {r['file']}" if r["file"] else ""), flush=True)
            runs.sort(key=lambda r: r["Ir/req"])
            r = dict(runs[len(runs) // 2], runs=[x["Ir/req"] for x in runs])
            results.append(r)
            if args.repeats > 1:
                print(f"{kind:14} median Ir/req={r['Ir/req']:>10,.0f}  (min {runs[0]['Ir/req']:,.0f}, "
                      f"max {runs[-1]['Ir/req']:,.0f})", flush=True)
    finally:
        if issuer is not None:
            await issuer.close()
        if redis is not None:
            redis.send_signal(signal.SIGTERM)
            await redis.wait()
        up.send_signal(signal.SIGTERM)
        await up.wait()
    base = next((r for r in results if r["target"] == "bare"), None)
    if base is not None and base["Ir/req"]:
        for r in results:
            print(f"{r['target']:14} {r['Ir/req'] / base['Ir/req']:.3f} x bare")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_cprofile"]:
        _wrapped(argv[1:])
        return
    if argv[:1] == ["_preload"]:
        _preloaded(argv[1:])
        return
    ap = argparse.ArgumentParser(prog="python -m bench.instr", description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--targets", default="bare,gateway",
                    type=lambda s: [t for t in s.split(",") if t])
    ap.add_argument("-n", type=int, default=300, help="requests counted")
    ap.add_argument("-c", "--conc", type=int, default=1, help="keep-alive connections in parallel")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per target; the median is reported (the gateway varies by ~1 %%: the number "
                         "of event-loop iterations per request depends on timing)")
    ap.add_argument("--work", help="directory for configs, logs and callgrind files")
    ap.add_argument("--keep", action="store_true", help="keep the callgrind output files")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--preload", help="a Python file executed in the target before it starts (experiments)")
    ap.add_argument("--profiler", choices=("callgrind", "cprofile", "strace"), default="callgrind",
                    help="cprofile: no valgrind; saves a cProfile of the counted requests instead; "
                         "strace: no valgrind; `strace -c -f` table of the counted requests' syscalls")
    ap.add_argument("--workload", choices=("echo", "echo-2k"), default="echo",
                    help="the echo argument: 'hello', or 2 KiB of realistic text (bench/wrk.py)")
    ap.add_argument("--era", choices=("legacy", "modern"), default="legacy",
                    help="legacy: 2025-11-25 (a session); modern: 2026-07-28 (sessionless)")
    ap.add_argument("--mirror-headers", action="store_true",
                    help="legacy era: send Mcp-Method/Mcp-Name too (2026-07-28 headers; SDK clients of "
                         "2025-11-25 send neither)")
    args = ap.parse_args(argv)
    global ERA, MIRROR_HEADERS
    ERA, MIRROR_HEADERS = args.era, args.mirror_headers
    if args.workload == "echo-2k":
        from .wrk import WORKLOADS
        global ECHO_TEXT
        ECHO_TEXT = WORKLOADS["echo-2k"]["params"]["arguments"]["text"]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
