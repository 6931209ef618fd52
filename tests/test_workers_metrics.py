"""``serve --workers N`` as an operator runs it (#15 items 1 and 3).

A worker killed with SIGKILL mid-request is restarted and its live gauges vanish
(``mcpgw_inflight_requests`` back to 0, not stuck at 1); every live worker has
``process_*`` series (label ``pid``); the metrics directory can be placed with
``--metrics-dir`` (a writable tmpfs under a read-only root) and is removed after
a clean SIGTERM; an unusable one stops the start with a JSON log event, not a
traceback; the policy reload timestamp is set from the initial load.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

from tests.support.components import REPO, Upstream
from tests.support.gw_helpers import (
    child_pids, listener_pids, modern_headers, modern_params, peer_pid, rpc, start_gateway_argv, write_config,
    gateway_config, with_policy,
)
from tests.support.procs import free_port


def scrape(cfg: dict[str, Any]) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cfg['admin']['port']}/metrics", timeout=5) as resp:
        return resp.read().decode()


def sample(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(name + ("{" + labels if labels else "")) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)   # a poll on a condition with a deadline (the metrics flush is once a second)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_is_replaced_and_its_gauges_and_metric_files_do_not_stick(
        upstream: Any, redis_store: dict[str, str], tmp_path: Path) -> None:
    upstream: Upstream = upstream()
    metrics_parent = tmp_path / "metrics"
    metrics_parent.mkdir()
    env = {"TMPDIR": str(tmp_path / "no-such-dir")}        # only --metrics-dir is usable
    master, cfg = start_gateway_argv(tmp_path, {"servers": {"up": {"url": upstream.url, "pinning": {"mode": "off"}}}, "store": redis_store},
                                     ["--workers", "2", "--metrics-dir", str(metrics_parent)], env=env)
    port = cfg["listen"]["port"]
    try:
        master.wait_until(lambda: len(listener_pids(port, child_pids(master.pid))) == 2, 30.0, "both workers")
        workers = child_pids(master.pid)
        (run_dir,) = list(metrics_parent.iterdir())
        def per_worker() -> str | None:
            text = scrape(cfg)
            return text if all(f'process_resident_memory_bytes{{pid="{p}"}}' in text for p in workers) else None

        text = wait_for(per_worker, 10, "process_* per worker")
        assert sample(text, "mcpgw_policy_last_reload_timestamp_seconds") > time.time() - 600
        # A slow call held by one worker, then that worker is killed.
        conn = HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        victim = wait_for(lambda: peer_pid(port, conn.sock.getsockname()[1], workers), 5, "the accepting worker")
        params = modern_params({"name": "slow_progress", "arguments": {"steps": 50, "interval_ms": 100}})
        conn.request("POST", "/mcp/up", body=json.dumps(rpc("tools/call", params)),
                     headers={**modern_headers("tools/call", "slow_progress"), "Content-Type": "application/json",
                              "Accept": "application/json, text/event-stream", "Host": f"127.0.0.1:{port}"})
        wait_for(lambda: (sample(scrape(cfg), "mcpgw_inflight_requests", 'server="up"') or 0) >= 1, 10,
                 "the in-flight gauge to show the call")
        os.kill(victim, signal.SIGKILL)
        conn.close()
        master.wait_for(lambda line: "gateway.worker_restarted" in line, 20, what="a replacement worker")
        try:
            wait_for(lambda: not sample(scrape(cfg), "mcpgw_inflight_requests", 'server="up"'), 10,
                     "the dead worker's in-flight gauge to vanish")
        except AssertionError:
            raise AssertionError((victim, workers, sorted(p.name for p in run_dir.iterdir()),
                                  [ln for ln in scrape(cfg).splitlines() if "inflight" in ln]))
        assert f'pid="{victim}"' not in scrape(cfg)
    finally:
        code = master.stop(timeout=20)
    assert code == 0
    assert not run_dir.exists()                            # removed after a clean SIGTERM
    assert not [ln for ln in master.lines() if ln.startswith("Traceback")]


def test_an_unusable_metrics_directory_stops_the_start_with_a_json_event(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = gateway_config(with_policy({"servers": {"up": {"url": "http://127.0.0.1:9/mcp"}},
                                      "store": "redis://127.0.0.1:1/0"}, tmp_path), free_port(), free_port())
    path = write_config(tmp_path / "gw.yaml", cfg)
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path), "--workers", "2",
                             "--metrics-dir", str(blocker)], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    events = [json.loads(ln) for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("{")]
    assert any(e["event"] == "gateway.start_failed" and e["reason"] == "metrics_dir_unwritable" for e in events)
