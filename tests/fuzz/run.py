"""Run one fuzz target under atheris (coverage-guided, libFuzzer): ``python -m tests.fuzz.run TARGET [libFuzzer args]``.

The gateway's modules are instrumented for coverage as they are imported; the
seed corpus is ``tests/fuzz/corpus/<target>/`` (read only: new inputs go to the
first directory given on the command line, if any).  A crash writes the input to
``-artifact_prefix`` and exits non-zero; replay it with the same command and the
file as the only argument, or add it to ``tests/test_fuzz_parsers.py``.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["gateway"]):
    from tests.fuzz.targets import MAX_LEN, TARGETS, timed


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = TARGETS[sys.argv[1]]
    args = [sys.argv[0], *sys.argv[2:]]
    if not any(a.startswith("-max_len=") for a in args):
        args.append(f"-max_len={MAX_LEN}")
    atheris.Setup(args, lambda data: timed(target, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
