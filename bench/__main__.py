"""``python -m bench``: the gateway against the upstream and a bare proxy, same run, same box.

Starts the upstream, then every selected target (a target that cannot start is reported
as skipped, not fatal), runs wrk rounds and the SSE test, and writes
``bench/results/latest.md`` and ``latest.json``. Exit status: 0, or 1 with ``--strict``
when a goal fails or a selected target was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import report
from .procs import Proc, set_priority
from .runner import RunOptions, say, start_targets, streaming, throughput
from .targets import BASELINE, DEFAULT_TARGETS, TARGETS, Context
from .upstream import run
from .wrk import WORKLOADS, wrk_binary

REPO_ROOT = Path(__file__).resolve().parent.parent
BUSY_OTHER_PCT = 15.0  # median CPU % of other processes above which the report warns


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-t", "--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma list, or 'all'; known: {', '.join(TARGETS)}")
    ap.add_argument("-c", "--conc", type=_ints, default=[1, 16, 64], help="wrk connections")
    # wrk takes whole seconds only.
    ap.add_argument("-d", "--duration", type=int, default=5, help="seconds per run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds before each run, 0 = none")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="echo")
    ap.add_argument("--no-check-bodies", dest="check_bodies", action="store_false",
                    help="skip the Lua check that each 2xx body holds a JSON-RPC result")
    ap.add_argument("--tools", type=int, default=50, help="tools the upstream lists")
    ap.add_argument("--sse-conc", type=_ints, default=[1, 16])
    ap.add_argument("--sse-requests", type=int, default=None,
                    help="streamed calls per SSE row (default max(10, 4*c))")
    ap.add_argument("--no-sse-session-per-worker", dest="sse_per_worker",
                    action="store_false", help="at c>1, only the one-session row")
    ap.add_argument("--no-wrk", action="store_true", help="SSE test only")
    ap.add_argument("--no-sse", action="store_true", help="throughput only")
    ap.add_argument("--gateway-workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    ap.add_argument("--keep-logs", action="store_true", help="keep the run directory")
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--nice", type=int, default=None,
                    help="scheduling priority for the harness and everything it starts "
                         "(e.g. -10 as root on a box shared with other work)")
    ap.add_argument("--list", action="store_true", help="list targets and exit")
    args = ap.parse_args(argv)
    names = list(TARGETS) if args.targets == "all" else args.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    # direct and the baseline are what every ratio is computed against.
    args.names = [n for n in ["direct", BASELINE] if n not in names] + names
    return args


def environment() -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "absent"

    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=5,
                                  cwd=REPO_ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    model = next((ln.split(":", 1)[1].strip() for ln in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    wrk_v = cmd(wrk_binary(), "-v").splitlines()
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "git": cmd("git", "rev-parse", "--short", "HEAD") or "no commit",
            "cpus": len(os.sched_getaffinity(0)), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "wrk": wrk_v[0].split(" [")[0] if wrk_v else "?",
            **{p: version(p) for p in ("aiohttp", "uvloop", "httptools", "orjson", "psutil")}}


async def bench(args: argparse.Namespace) -> int:
    opts = RunOptions(args.conc, args.duration, args.warmup, args.repeats, args.wrk_threads,
                      args.workload, args.check_bodies, args.sse_conc, args.sse_requests,
                      args.sse_per_worker)
    run_dir = Path(tempfile.mkdtemp(prefix="mcp-bench-"))
    say(f"run directory {run_dir}")
    upstream = await Proc.start("upstream", [sys.executable, "-m", "bench.upstream",
                                             "--tools", str(args.tools)], run_dir, cwd=REPO_ROOT,
                            nice=args.nice)
    ctx: Context | None = None
    active = []
    try:
        port = (await upstream.wait_ready_line())["port"]
        ctx = Context(run_dir, REPO_ROOT, f"http://127.0.0.1:{port}",
                      gateway_workers=args.gateway_workers, nice=args.nice)
        active, skipped = await start_targets(ctx, [TARGETS[n] for n in args.names], opts)
        names = [a.target.name for a in active]
        if "direct" not in names or BASELINE not in names:
            say("direct or the baseline did not start; nothing to compare against")
            return 2
        runs = [] if args.no_wrk else await throughput(active, upstream, opts, skipped)
        sse = [] if args.no_sse else await streaming(active, opts, skipped)
    finally:
        for a in active:
            await a.running.stop()
        await upstream.stop()
        if ctx is not None:
            await ctx.close()
    env = environment()
    text, doc = render(args, env, names, skipped, active, runs, sse)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(text)
    say(f"wrote {args.out / 'latest.md'} and latest.json")
    if args.keep_logs:
        say(f"logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    failed = any(g["verdict"] == "FAIL" for g in doc["goals"]) or bool(skipped)
    return 1 if args.strict and failed else 0


def render(args: argparse.Namespace, env: dict[str, Any], names: list[str],
           skipped: list[Any], active: list[Any], runs: list[dict[str, Any]],
           sse: list[tuple[str, Any]]) -> tuple[str, dict[str, Any]]:
    summ = report.summarize(runs)
    sse_rows = [report.sse_summary(t, r) for t, r in sse]
    gateways = [a.target.name for a in active if a.target.kind == "gateway"]
    goals = report.goals(summ, sse_rows, gateways, args.conc, BASELINE)
    cmdline = "python -m bench " + shlex.join(sys.argv[1:])
    lines = [
        "# MCP gateway benchmark", "",
        f"{env['date_utc']} UTC, git {env['git']}, {env['cpus']} CPUs ({env['cpu_model']}), "
        f"kernel {env['kernel']}, Python {env['python']}, aiohttp {env['aiohttp']}, "
        f"uvloop {env['uvloop']}, httptools {env['httptools']}, {env['wrk']}.", "",
        f"`{cmdline}`: workload `{args.workload}`, {args.duration:g} s runs after "
        f"{args.warmup:g} s warm-up, {args.repeats} interleaved repeat(s) (median shown), "
        f"wrk -t{args.wrk_threads}, one MCP session per target, unique JSON-RPC ids"
        f"{f', nice {args.nice}' if args.nice is not None else ''}. "
        "Absolute figures belong to this box and hour; compare the ratios.", "",
    ]
    if skipped:
        lines += ["Skipped or failed targets:",
                  *(f"- `{s.name}`: {s.reason}" for s in skipped), ""]
    other = [r["other_cpu_pct"] for r in runs]
    if other and statistics.median(other) > BUSY_OTHER_PCT:
        lines += [f"**Warning: the box was busy.** Other processes used a median "
                  f"{statistics.median(other):.0f} % of a core during the runs (max "
                  f"{max(other):.0f} %); absolute figures are low and ratios noisy. Re-run "
                  "when it is quiet, or with `--repeats 3`.", ""]
    if runs:
        lines += ["## Throughput (wrk, closed loop)", "",
                  "err/non2xx/rpc = socket errors and timeouts / HTTP ≥ 400 / 2xx without a "
                  "JSON-RPC result. proxy µs/req = CPU of the proxy's process tree per "
                  "request. CPU % is of one core over the run (the box has "
                  f"{env['cpus'] * 100} %); other = busy CPU not charged to the proxy, the "
                  "upstream, wrk or the harness (other work on a shared box); steal % is of "
                  "the whole box.", "",
                  *report.throughput_table(summ, names, args.conc, BASELINE), ""]
        if gateways:
            lines += ["## Gateway against the baselines", "",
                      *report.gateway_table(summ, gateways, args.conc, BASELINE), ""]
    if sse_rows:
        lines += ["## SSE pass-through (Python aiohttp client)", "",
                  "`tools/call stream`: 4 progress events then the result, 100 ms apart, the "
                  "first at once. Times are from sending the request.", "",
                  *report.sse_table(sse_rows), ""]
    lines += ["## Goals", "", "```", *(report.goal_lines(goals) or ["(no gateway target ran)"]),
              "```", ""]
    doc = {"environment": env, "command": cmdline, "options": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": {a.target.name: {"url": a.running.url, "preflight": a.preflight,
                                    "notes": a.running.notes} for a in active},
        "skipped": {s.name: s.reason for s in skipped},
        "runs": runs, "summary": [vars(s) for s in summ.values()], "sse": sse_rows,
        "sse_raw": [{"target": t, **r.to_json()} for t, r in sse], "goals": goals}
    return "\n".join(lines), doc


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:<18} {t.kind:<9} {t.description}")
        return
    wrk_binary()
    if args.nice is not None:
        # The harness and wrk (same session); each server gets it again in Proc.start.
        set_priority(os.getpid(), args.nice)
    sys.exit(run(bench(args), uvloop=True))


if __name__ == "__main__":
    main()
