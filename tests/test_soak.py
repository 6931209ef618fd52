"""The soak harness (``python -m bench.soak``, #14) runs end to end: a short soak passes.

The README's figures come from a 30-minute run; this proves in CI that the harness starts
its stack (two gateway workers, a run-owned Redis, the bench and SDK upstreams), drives
every operation of its mix, samples RSS, descriptors and Redis keys, and judges them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.components import REPO

pytestmark = pytest.mark.skipif(subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0,
                                reason="redis-server is not installed")


def test_a_short_soak_drives_every_operation_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "0.25", "--capacity-seconds", "3",
                          "--sample-seconds", "3", "--fraction", "0.3", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=150)
    assert out.exists(), run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert run.returncode == 0 and report["pass"], (report["checks"], report["unexpected_by_kind"], run.stderr[-2000:])
    assert set(report["by_kind"]) == {"call", "modern", "list", "stream", "refused", "session", "resume"}
    assert report["unexpected"] == 0 and report["operations"] > 100
    assert len(report["processes"]) == 3          # the master and its two workers, each sampled
    assert len(report["samples"]) >= 4
