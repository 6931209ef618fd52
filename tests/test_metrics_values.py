"""Metric values after known traffic, in one process and with ``--workers 2`` (#11).

Seven allowed ``echo`` calls, three calls of the listed but denied ``add`` and four of a
name the server never listed: the per-tool series count each with its effect (unlisted
names share ``tool="other"``), the decisions, requests and duration histograms add up,
and the audit records carry the durations split (gateway before the upstream, upstream
to its answer).  With two workers the shared multiprocess files give the same sums.
"""
from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.components import Upstream
from tests.support.gw_helpers import (free_port, gateway_config, modern_headers, modern_params, rpc, start_gateway_argv,
                                      with_policy, write_config)
from tests.support.pin_cases import pins_cli
from tests.test_workers_metrics import sample, scrape, wait_for

POLICY = """\
servers:
  up:
    default: deny
    tools:
      - {id: echo-ok, match: echo, destructive: allow}
"""


def _call(port: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """One modern tools/call on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        return _call_on(conn, name, args)
    finally:
        conn.close()


def _call_on(conn: http.client.HTTPConnection, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """One modern tools/call on ``conn`` (kept alive: one worker serves all its calls)."""
    body = json.dumps(rpc("tools/call", modern_params({"name": name, "arguments": args}))).encode()
    conn.request("POST", "/mcp/up", body=body, headers={
        **modern_headers("tools/call", name), "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream"})
    resp = conn.getresponse()
    text = resp.read().decode()
    data = text if not text.startswith(("event:", "id:", "data:", ":")) else \
        next(line[5:] for line in text.splitlines() if line.startswith("data:") and '"id"' in line)
    return json.loads(data)


@pytest.mark.parametrize("workers", [1, 2])
def test_per_tool_and_request_metrics_add_up_after_known_traffic(
        upstream: Any, redis_store: dict[str, str], tmp_path: Path, workers: int) -> None:
    up: Upstream = upstream(json_response=True)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "up.yaml").write_text(POLICY)
    # Pinning on (tofu): each worker fetches the server's tools before its first call, so the
    # tool label knows them whichever worker a connection lands on.
    cfg_in: dict[str, Any] = {"servers": {"up": {"url": up.url, "pinning": {"mode": "tofu"}}},
                              "policies": str(tmp_path / "p"), "pins": str(tmp_path / "pins")}
    if workers > 1:
        cfg_in["store"] = redis_store
    proc, cfg = start_gateway_argv(tmp_path, cfg_in, ["--workers", str(workers)] if workers > 1 else [])
    port = cfg["listen"]["port"]
    try:
        # Seven connections, which the kernel spreads over the workers.  Each starts with an
        # allowed echo, whose pinning fetch teaches that worker the server's tools; the denied
        # call that follows on the same connection (same worker) is then labelled by name.
        # (A worker that has never seen the listing labels every name 'other': the label is
        # bounded by what this replica has seen listed.)
        for i in range(7):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            try:
                assert "result" in _call_on(conn, "echo", {"text": f"hi {i}"})
                if i < 3:
                    assert "error" in _call_on(conn, "add", {"a": 1, "b": 2})
                else:
                    assert "error" in _call_on(conn, f"never-listed-{i}", {})
            finally:
                conn.close()

        def settled() -> str | None:
            # Each worker flushes its tallies once a second, at its own time: wait for all
            # the series the test reads.
            text = scrape(cfg)
            calls = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith('mcpgw_requests_total{') and 'method="tools/call"' in line)
            done = sample(text, "mcpgw_tool_calls_total", 'effect="allow",server="up",tool="echo"') == 7 and \
                sample(text, "mcpgw_tool_calls_total", 'effect="deny",server="up",tool="other"') == 4 and \
                sample(text, "mcpgw_tool_calls_total", 'effect="deny",server="up",tool="add"') == 3 and calls == 14
            return text if done else None

        text = wait_for(settled, 15, "the tool-call series")     # workers flush once a second
        assert sample(text, "mcpgw_tool_calls_total", 'effect="deny",server="up",tool="add"') == 3
        allowed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("mcpgw_policy_decisions_total{") and 'effect="allow"' in line)
        assert allowed == 7
        calls = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith('mcpgw_requests_total{') and 'method="tools/call"' in line)
        assert calls == 14
        assert sample(text, "mcpgw_request_duration_seconds_count", 'server="up"') >= 14
        assert "_created" not in text
        def echo_records() -> list[dict[str, Any]]:
            records = [json.loads(line) for line in proc.lines() if '"mcp.request"' in line]
            return [r for r in records if r.get("target") == "echo"]

        proc.wait_until(lambda: len(echo_records()) == 7, 10, "the audit records")   # written every 10 ms
        echo = echo_records()
        for r in echo:                       # the durations split: stages, then the upstream's answer
            assert 0 <= r["gateway_ms"] <= r["duration_ms"] and 0 < r["upstream_ms"] <= r["duration_ms"]
    finally:
        proc.stop()


def test_a_replica_that_never_listed_labels_pinned_tools_by_name(upstream: Any, tmp_path: Path) -> None:
    """With a lock file (read at start), a denied call to a pinned tool is counted under its
    name even as the replica's very first request, before any listing; an unpinned name is
    'other'."""
    up: Upstream = upstream(json_response=True)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "up.yaml").write_text(POLICY)
    cfg_in: dict[str, Any] = {"servers": {"up": {"url": up.url, "pinning": {"mode": "enforce"}}},
                              "policies": str(tmp_path / "p"), "pins": str(tmp_path / "pins")}
    cli_config = write_config(tmp_path / "cli.yaml",
                              gateway_config(with_policy(cfg_in, tmp_path), free_port(), free_port()))
    fetched = pins_cli("fetch", "up", config=cli_config)
    assert fetched.returncode == 0, fetched.stderr
    proc, cfg = start_gateway_argv(tmp_path, cfg_in, [])
    try:
        assert "error" in _call(cfg["listen"]["port"], "add", {"a": 1, "b": 2})       # the first request
        assert "error" in _call(cfg["listen"]["port"], "never-listed", {})
        def settled() -> str | None:
            text = scrape(cfg)
            return text if sample(text, "mcpgw_tool_calls_total",
                                  'effect="deny",server="up",tool="other"') == 1 else None

        text = wait_for(settled, 15, "the tool-call series")
        assert sample(text, "mcpgw_tool_calls_total", 'effect="deny",server="up",tool="add"') == 1
    finally:
        proc.stop()
