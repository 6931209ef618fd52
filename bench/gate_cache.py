"""The result-scan gate's memory footprint: cache misses per pass, counted, not timed.

    python -m bench.gate_cache [--passes 100] [--l2 1048576]

In the gateway the gate's automaton runs cold: between two results the rest of the request
evicts its states from L2, so a pass costs what it touches (each distinct cache line an L3
round trip in a pointer chase), not its instructions.  Wall-clock micro-benchmarks on a
shared box cannot see that reliably; cachegrind's cache model can.  This runs the ASCII gate
(``RegexGate.clean_ascii`` of the built-in results profile) over the bench's ``echo-2k`` text
under ``valgrind --tool=cachegrind`` with an L2-sized last-level cache (``--l2``), evicting
it between passes, and prints per pass: instructions, L1 data read misses and L2 read misses
in RE2's DFA search loop only.  Deterministic: the same tree gives the same figures.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

_WARM = 50


def _passes(n: int) -> None:
    from gateway.inspect.poisoning import RuleSet
    from gateway.inspect.result_scan import ResultScanner

    from .wrk import WORKLOADS

    clean = ResultScanner(RuleSet.load(), "high").clean
    text = WORKLOADS["echo-2k"]["params"]["arguments"]["text"]
    evict = bytearray(3 << 20)                 # larger than any L2 this models
    ones = b"\x01" * (len(evict) // 64)
    for _ in range(_WARM):                     # the states built once, as in a long-running gateway
        clean(text)
    for _ in range(n):
        evict[::64] = ones
        clean(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=100)
    ap.add_argument("--l2", type=int, default=1 << 20, help="modelled last-level cache, bytes (default: 1 MiB)")
    ap.add_argument("--run-passes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_passes is not None:
        _passes(args.run_passes)
        return 0
    if shutil.which("valgrind") is None or shutil.which("cg_annotate") is None:
        print("bench.gate_cache: valgrind (cachegrind) is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cachegrind.out")
        subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=yes", f"--LL={args.l2},16,64",
                        f"--cachegrind-out-file={out}", sys.executable, "-m", "bench.gate_cache",
                        "--run-passes", str(args.passes)], check=True, capture_output=True)
        report = subprocess.run(["cg_annotate", "--show=Ir,D1mr,DLmr", out], check=True,
                                capture_output=True, text=True).stdout
    for line in report.splitlines():
        if "InlinedSearchLoop" in line:
            ir, d1, ll = (int(v.replace(",", "")) for v in re.findall(r"([\d,]+)\s*(?:\([^)]*\))?", line)[:3])
            total = args.passes + _WARM
            print(f"ASCII gate, echo-2k text ({len(_text())} bytes), {args.passes} passes, L2 model "
                  f"{args.l2 // 1024} KiB: per pass {ir // total:,} instructions, {d1 // args.passes:,} L1d "
                  f"read misses, {ll // args.passes:,} L2 read misses")
            return 0
    print("bench.gate_cache: no DFA search loop in the profile (is google-re2 installed?)", file=sys.stderr)
    return 1


def _text() -> str:
    from .wrk import WORKLOADS
    return WORKLOADS["echo-2k"]["params"]["arguments"]["text"]


if __name__ == "__main__":
    sys.exit(main())
