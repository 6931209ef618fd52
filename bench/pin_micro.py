"""Micro-benchmark of tool pinning and poisoning scanning, in process.

    python -m bench.pin_micro [--iterations N]

Measures what the pinning stage adds to a request, with the real stage, catalog
and rule set (no network):

- ``tools/list`` (50 realistic definitions, from tests/corpus/benign.json and
  renamed copies): the response hook over the whole result, (a) warm: the
  definitions were seen before, the steady state of every listing after the
  first; (b) cold: every definition is new (first sight after a deploy):
  full RFC 8785 fingerprint and poisoning scan of all 50; plus the JSON
  parse/serialise the forwarder does because a hook is installed.
- ``tools/call``: ``on_request`` of the stage for an approved tool whose
  catalog entry is fresh (the pin check on every call).
- first-sight scan per definition: ``RuleSet.scan`` of each definition of the
  poisoning corpus (tests/corpus/poisoned.json and benign.json), the cost the
  gateway pays once per new fingerprint before memoising it.

Prints p50/p99 and the targets (list < 2 ms at p99, call < 20 µs).  Each
figure is measured twice: wall-clock time, and the thread's CPU time
(``CLOCK_THREAD_CPUTIME_ID``), which leaves out the time the process was not
running.  On a shared or loaded machine the wall p99 is the scheduler's, not
the code's; the CPU-time p99 is the one compared with the targets.  The
machine's load average is printed too.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]


def fifty_tools() -> list[dict[str, Any]]:
    corpus = json.loads((REPO / "tests" / "corpus" / "benign.json").read_text())["tools"]
    tools = [copy.deepcopy(e["tool"]) for e in corpus]
    i = 0
    while len(tools) < 50:
        extra = copy.deepcopy(corpus[i % len(corpus)]["tool"])
        extra["name"] = f"{extra['name']}_v{i}"
        tools.append(extra)
        i += 1
    return tools[:50]


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def build(tools: list[dict[str, Any]], workdir: Path) -> Any:
    from gateway.config.model import load_config
    from gateway.inspect.catalog import ToolCatalog
    from gateway.inspect.lockfile import Approved, write_lock
    from gateway.stages.pinning import Pinning
    from gateway.store.memory import MemoryStore

    (workdir / "pins").mkdir()
    write_lock(str(workdir / "pins" / "bench.lock.yaml"), Approved.from_definitions("bench", "lock", tools))
    cfg = workdir / "gateway.yaml"
    cfg.write_text("listen: {port: 0}\nadmin: {port: 1}\npublic_url: http://127.0.0.1\nauth: {mode: none}\n"
                   "pins: pins\nservers:\n  bench:\n    url: http://127.0.0.1:9/mcp\n"
                   "    pinning: {mode: enforce}\n")
    config = load_config(str(cfg))

    async def fetch(server: Any, ex: Any) -> list[dict[str, Any]]:
        return copy.deepcopy(tools)

    return config, Pinning(config, MemoryStore(), ToolCatalog(), fetch)


def exchange(config: Any, method: str, name: str | None = None) -> Any:
    from gateway.pipeline import Exchange

    ex = Exchange(SimpleNamespace(method="POST", headers={}), config.servers["bench"])
    ex.method = method
    ex.name = name
    params: dict[str, Any] = {"name": name, "arguments": {}} if name else {}
    ex.message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    return ex


async def bench_list(stage: Any, config: Any, tools: list[dict[str, Any]], n: int, cold: bool) -> dict[str, float]:
    hook_us: list[float] = []
    total_us: list[float] = []
    cpu_us: list[float] = []
    for i in range(n):
        page = copy.deepcopy(tools)
        if cold:
            for tool in page:
                tool["description"] = f"{tool.get('description', '')} (build {i})"
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": page}})
        ex = exchange(config, "tools/list")
        await stage.on_request(ex)
        hook = ex.response_hooks[-1]
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        msg = orjson.loads(body)
        t1 = time.perf_counter_ns()
        out = hook(ex, msg)
        t2 = time.perf_counter_ns()
        orjson.dumps(out)
        t3 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        hook_us.append((t2 - t1) / 1000)
        total_us.append((t3 - t0) / 1000)
        cpu_us.append((c1 - c0) / 1000)
        if cold:
            assert len(out["result"]["tools"]) == 0   # every definition is unapproved: all held
        else:
            assert len(out["result"]["tools"]) == 50
    return {"hook_p50": percentile(hook_us, 50), "hook_p99": percentile(hook_us, 99),
            "total_p50": percentile(total_us, 50), "total_p99": percentile(total_us, 99),
            "cpu_p50": percentile(cpu_us, 50), "cpu_p99": percentile(cpu_us, 99)}


async def bench_call(stage: Any, config: Any, tools: list[dict[str, Any]], n: int) -> dict[str, float]:
    await bench_list(stage, config, tools, 1, cold=False)   # the catalog holds the approved definitions
    warm = exchange(config, "tools/call", "read_text_file")
    await stage.on_request(warm)
    wall: list[float] = []
    cpu: list[float] = []
    batch = 50   # CPU time is read per batch: the clock itself costs about a microsecond
    for _ in range(max(1, n // batch)):
        exs = [exchange(config, "tools/call", "read_text_file") for _ in range(batch)]
        c0 = time.thread_time_ns()
        for ex in exs:
            t0 = time.perf_counter_ns()
            await stage.on_request(ex)
            wall.append((time.perf_counter_ns() - t0) / 1000)
        cpu.append((time.thread_time_ns() - c0) / 1000 / batch)
    return {"p50": percentile(wall, 50), "p99": percentile(wall, 99),
            "cpu_p50": percentile(cpu, 50), "cpu_p99": percentile(cpu, 99)}


def corpus_definitions() -> list[dict[str, Any]]:
    corpus = REPO / "tests" / "corpus"
    return [e["tool"] for f in ("poisoned.json", "benign.json")
            for e in json.loads((corpus / f).read_text())["tools"]]


def bench_scan(rounds: int) -> dict[str, float]:
    """CPU time of one first-sight scan, per definition of the corpus (every round scans each once)."""
    from gateway.inspect.poisoning import RuleSet

    rules = RuleSet.load()
    defs = corpus_definitions()
    cpu: list[float] = []
    for _ in range(rounds):
        for tool in defs:
            c0 = time.thread_time_ns()
            rules.scan(tool)
            cpu.append((time.thread_time_ns() - c0) / 1000)
    return {"n": len(defs), "p50": percentile(cpu, 50), "p99": percentile(cpu, 99), "max": max(cpu)}


async def main(n: int) -> int:
    import logging

    import structlog

    # Audit events are deduplicated in the gateway; here they would only measure the terminal.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    tools = fifty_tools()
    with tempfile.TemporaryDirectory() as tmp:
        config, stage = build(tools, Path(tmp))
        await stage.start()
        # Prime: the first listing fingerprints and scans everything once.
        await bench_list(stage, config, tools, 1, cold=False)
        warm = await bench_list(stage, config, tools, n, cold=False)
        cold = await bench_list(stage, config, tools, max(20, n // 10), cold=True)
        call = await bench_call(stage, config, tools, n * 10)
    scan = bench_scan(max(5, n // 100))
    load = os.getloadavg()[0]
    print(f"pin_micro: 50-tool tools/list and tools/call pin checks ({n} iterations; load average {load:.2f}, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'':36s}{'wall p50':>10s}{'wall p99':>10s}{'CPU p50':>10s}{'CPU p99':>10s}")

    def row(label: str, r: dict[str, float], note: str = "") -> None:
        print(f"{label:36s}{r['total_p50']:>8.0f}µs{r['total_p99']:>8.0f}µs{r['cpu_p50']:>8.0f}µs"
              f"{r['cpu_p99']:>8.0f}µs  {note}")

    row("list, warm: hook + parse/dump", warm,
        f"target CPU p99 < 2000 µs: {'PASS' if warm['cpu_p99'] < 2000 else 'FAIL'} (hook alone p50 "
        f"{warm['hook_p50']:.0f} µs)")
    row("list, cold: 50 unseen definitions", cold, "first sight only, memoised afterwards")
    print(f"{'call: pin check (on_request)':36s}{call['p50']:>8.1f}µs{call['p99']:>8.1f}µs{call['cpu_p50']:>8.1f}µs"
          f"{call['cpu_p99']:>8.1f}µs  target < 20 µs: {'PASS' if call['cpu_p99'] < 20 else 'FAIL'}"
          f" (CPU per call, batches of 50)")
    print(f"{'scan: first sight, per definition':36s}{'':20s}{scan['p50']:>8.0f}µs{scan['p99']:>8.0f}µs"
          f"  {scan['n']} corpus definitions, max {scan['max']:.0f} µs; memoised per fingerprint")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.pin_micro")
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.iterations)))
