"""Summaries, the markdown report and the PASS/FAIL goals.

Ratios measured in one run are the figures that carry over between machines and hours;
absolute req/s move by up to 1.6x with the host's load (see perf-baseline.md), so every
gateway figure is shown next to the baselines of the same run.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from .sse import EXPECTED_EVENTS, SseResult

# The goals, relative to baselines measured in the same run.
GOAL_RPS_VS_BARE = 0.85        # at c = 16 and c = 64
GOAL_RPS_CONCS = (16, 64)
GOAL_ADDED_P50_MS = 0.5        # gateway p50 - direct p50 at c = 1
GOAL_SSE_FIRST_EVENT_MS = 1.0  # gateway - bare first-event p50 at c = 1
GOAL_CPU_VS_BARE = 1.5         # CPU µs/req at every concurrency


def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Summary:
    """Median over the repeats of one (target, concurrency)."""

    target: str
    conc: int
    repeats: int
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    non2xx: int
    rpc_errors: int
    proxy_us_per_req: float
    proxy_cpu_pct: float
    upstream_us_per_req: float
    aux_us_per_req: float
    wrk_cpu_pct: float
    other_cpu_pct: float
    steal_pct: float


def summarize(runs: list[dict[str, Any]]) -> dict[tuple[str, int], Summary]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["conc"]), []).append(r)
    out = {}
    for (target, conc), rs in groups.items():
        med: Callable[[str], float] = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        out[(target, conc)] = Summary(
            target, conc, len(rs), med("rps"), min(r["rps"] for r in rs),
            max(r["rps"] for r in rs), med("p50_ms"), med("p90_ms"), med("p99_ms"),
            max(r["max_ms"] for r in rs), sum(r["errors"] for r in rs),
            sum(r["non2xx"] for r in rs), sum(r["rpc_errors"] for r in rs),
            med("proxy_us_per_req"), med("proxy_cpu_pct"), med("upstream_us_per_req"),
            med("aux_us_per_req"),
            med("wrk_cpu_pct"), med("other_cpu_pct"), med("steal_pct"))
    return out


def sse_summary(target: str, r: SseResult) -> dict[str, Any]:
    firsts = [e[0] for e in r.events_ms if e]
    per_event = [pct([e[i] for e in r.events_ms if len(e) > i], 50)
                 for i in range(EXPECTED_EVENTS)]
    return {"target": target, "conc": r.conc, "sessions": r.sessions, "n": r.n,
            "errors": len(r.errors), "error_samples": r.errors[:3],
            "headers_p50_ms": pct(r.headers_ms, 50), "first_p50_ms": pct(firsts, 50),
            "first_p99_ms": pct(firsts, 99), "events_p50_ms": per_event,
            "total_p50_ms": pct([e[-1] for e in r.events_ms if e], 50),
            "events_min": min((len(e) for e in r.events_ms), default=0)}


def _f(x: float, nd: int = 2) -> str:
    if x != x:  # NaN
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def throughput_table(summ: dict[tuple[str, int], Summary], targets: list[str],
                     concs: list[int], baseline: str) -> list[str]:
    rows = []
    for c in concs:
        d, b = summ.get(("direct", c)), summ.get((baseline, c))
        for t in targets:
            s = summ.get((t, c))
            if s is None:
                continue
            rows.append([t, str(c), f"{s.rps:,.0f}", f"{s.rps_min:,.0f}–{s.rps_max:,.0f}",
                         _f(s.p50_ms), _f(s.p90_ms), _f(s.p99_ms), _f(s.max_ms, 1),
                         f"{s.errors}/{s.non2xx}/{s.rpc_errors}",
                         _f(s.rps / d.rps, 3) if d else "–",
                         _f(s.rps / b.rps, 3) if b else "–",
                         _f(s.p50_ms - d.p50_ms) if d else "–",
                         _f(s.proxy_us_per_req, 1), _f(s.proxy_cpu_pct, 0),
                         _f(s.upstream_us_per_req, 1),
                         _f(s.aux_us_per_req, 1) if s.aux_us_per_req else "–",
                         _f(s.wrk_cpu_pct, 0), _f(s.other_cpu_pct, 0),
                         _f(s.steal_pct, 1)])
    return _table(["target", "c", "req/s", "min–max", "p50 ms", "p90 ms", "p99 ms", "max ms",
                   "err/non2xx/rpc", "× direct", f"× {baseline}", "+p50 ms vs direct",
                   "proxy µs/req", "proxy CPU %", "upstream µs/req", "redis µs/req", "wrk CPU %", "other CPU %", "steal %"],
                  rows)


def gateway_table(summ: dict[tuple[str, int], Summary], gateways: list[str],
                  concs: list[int], baseline: str) -> list[str]:
    rows = []
    for g in gateways:
        for c in concs:
            s, b, d = summ.get((g, c)), summ.get((baseline, c)), summ.get(("direct", c))
            if s is None or b is None:
                continue
            rows.append([g, str(c), _f(s.rps / b.rps, 3), _f(s.rps / d.rps, 3) if d else "–",
                         _f(s.p50_ms - d.p50_ms) if d else "–", _f(s.p50_ms - b.p50_ms),
                         _f(s.p99_ms - b.p99_ms),
                         f"{_f(s.proxy_us_per_req, 1)} / {_f(b.proxy_us_per_req, 1)}",
                         _f(s.proxy_us_per_req / b.proxy_us_per_req, 2)
                         if b.proxy_us_per_req else "–"])
    return _table(["target", "c", f"req/s × {baseline}", "req/s × direct",
                   "+p50 ms vs direct", f"+p50 ms vs {baseline}", f"+p99 ms vs {baseline}",
                   f"CPU µs/req (target / {baseline})", f"CPU × {baseline}"], rows)


def sse_table(rows_in: list[dict[str, Any]]) -> list[str]:
    rows = [[r["target"], str(r["conc"]), str(r["sessions"]), str(r["n"]), str(r["errors"]),
             _f(r["headers_p50_ms"]), _f(r["first_p50_ms"]), _f(r["first_p99_ms"]),
             " / ".join(_f(x, 1) for x in r["events_p50_ms"]), _f(r["total_p50_ms"], 1),
             f"{r['events_min']}/{EXPECTED_EVENTS}"] for r in rows_in]
    return _table(["target", "c", "MCP sessions", "n", "err", "headers p50 ms",
                   "first event p50 ms", "first event p99 ms", "event 1…5 p50 ms",
                   "total p50 ms", "events seen (min)"], rows)


def goals(summ: dict[tuple[str, int], Summary], sse_rows: list[dict[str, Any]],
          gateways: list[str], concs: list[int], baseline: str) -> list[dict[str, Any]]:
    """One verdict per (gateway target, goal): PASS, FAIL or SKIP with the figures."""
    out = []

    def verdict(g: str, goal: str, ok: bool | None, detail: str) -> None:
        out.append({"target": g, "goal": goal, "detail": detail,
                    "verdict": "SKIP" if ok is None else ("PASS" if ok else "FAIL")})

    sse = {(r["target"], r["conc"], r["sessions"]): r for r in sse_rows}
    for g in gateways:
        mine = [s for (t, _), s in summ.items() if t == g]
        bad = sum(s.errors + s.non2xx + s.rpc_errors for s in mine)
        bad += sum(r["errors"] for r in sse_rows if r["target"] == g)
        verdict(g, "no errors, no non-2xx, no JSON-RPC errors, all SSE events",
                bad == 0 if mine else None, f"{bad} failed requests")

        parts, oks = [], []
        for c in GOAL_RPS_CONCS:
            s, b = summ.get((g, c)), summ.get((baseline, c))
            if s and b:
                oks.append(s.rps / b.rps >= GOAL_RPS_VS_BARE)
                parts.append(f"c={c}: {s.rps / b.rps:.2f}×")
        verdict(g, f"req/s ≥ {GOAL_RPS_VS_BARE:.0%} of {baseline} at c=16 and c=64",
                all(oks) if len(oks) == len(GOAL_RPS_CONCS) else None,
                ", ".join(parts) or "c=16/64 not measured")

        s, d = summ.get((g, 1)), summ.get(("direct", 1))
        verdict(g, f"added p50 over direct ≤ {GOAL_ADDED_P50_MS} ms at c=1",
                (s.p50_ms - d.p50_ms <= GOAL_ADDED_P50_MS) if s and d else None,
                f"+{s.p50_ms - d.p50_ms:.2f} ms ({baseline}: "
                f"+{summ[(baseline, 1)].p50_ms - d.p50_ms:.2f} ms)"
                if s and d and (baseline, 1) in summ else
                (f"+{s.p50_ms - d.p50_ms:.2f} ms" if s and d else "c=1 not measured"))

        sg, sb = sse.get((g, 1, 1)), sse.get((baseline, 1, 1))
        ok = None
        detail = "SSE at c=1 not measured"
        if sg and sb:
            delta = sg["first_p50_ms"] - sb["first_p50_ms"]
            ok = delta <= GOAL_SSE_FIRST_EVENT_MS and sg["errors"] == 0
            detail = (f"{sg['first_p50_ms']:.2f} vs {sb['first_p50_ms']:.2f} ms "
                      f"(+{delta:.2f}), events {sg['events_min']}/{EXPECTED_EVENTS}")
        verdict(g, f"first SSE event p50 within {GOAL_SSE_FIRST_EVENT_MS:g} ms of {baseline} "
                "at c=1, every event delivered", ok, detail)

        parts, oks = [], []
        for c in concs:
            s, b = summ.get((g, c)), summ.get((baseline, c))
            if s and b and b.proxy_us_per_req:
                r = s.proxy_us_per_req / b.proxy_us_per_req
                oks.append(r <= GOAL_CPU_VS_BARE)
                parts.append(f"c={c}: {s.proxy_us_per_req:.0f}/{b.proxy_us_per_req:.0f} µs "
                             f"= {r:.2f}×")
        verdict(g, f"CPU µs/req ≤ {GOAL_CPU_VS_BARE}× {baseline} at every c",
                all(oks) if oks else None, ", ".join(parts) or "not measured")
    return out


def goal_lines(results: list[dict[str, Any]]) -> list[str]:
    return [f"{r['verdict']:<4}  {r['target']}: {r['goal']} — {r['detail']}" for r in results]
