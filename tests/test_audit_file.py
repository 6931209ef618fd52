"""The audit records in their own file, reopened on SIGHUP for log rotation (#11).

With ``logging.audit_file`` the ``mcp.request`` records go to that file (appended,
created 0600), not to stdout; after logrotate renames the file and sends SIGHUP, new
records go to a new file at the configured path and the renamed one keeps the old.
An unwritable path stops the start with a JSON ``gateway.start_failed`` event.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.components import REPO
from tests.support.gw_helpers import start_gateway_argv, write_config, gateway_config, with_policy
from tests.test_metrics_values import _call


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_audit_records_go_to_the_file_and_follow_it_across_a_sighup_rotation(upstream: Any, tmp_path: Path) -> None:
    up = upstream(json_response=True)
    proc, cfg = start_gateway_argv(tmp_path, {"servers": {"up": {"url": up.url}},
                                              "logging": {"audit_file": "audit.jsonl"}}, [])
    port = cfg["listen"]["port"]
    audit_file = tmp_path / "audit.jsonl"
    try:
        assert "result" in _call(port, "echo", {"text": "before"})
        proc.wait_until(lambda: any(r.get("target") == "echo" for r in _records(audit_file)), 10, "the record")
        assert stat.S_IMODE(audit_file.stat().st_mode) == 0o600
        (record,) = [r for r in _records(audit_file) if r.get("target") == "echo"]
        raw = json.dumps({"text": "before"}, separators=(",", ":")).encode()
        assert record["arguments_bytes"] == len(raw)
        assert record["arguments_b2"] == hashlib.blake2b(raw, digest_size=8).hexdigest()   # b2sum -l 64
        assert "arguments" not in record                            # size and hash only, by default
        assert record["result_bytes"] > 0 and len(record["result_b2"]) == 16
        assert len(record["request_id"]) >= 12
        assert not [line for line in proc.lines() if '"mcp.request"' in line]      # not on stdout
        rotated = tmp_path / "audit.jsonl.1"
        audit_file.rename(rotated)                                  # what logrotate does, then SIGHUP
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait_until(audit_file.exists, 10, "the reopened audit file")
        assert "result" in _call(port, "add", {"a": 1, "b": 2})
        proc.wait_until(lambda: any(r.get("target") == "add" for r in _records(audit_file)), 10, "the new record")
        assert [r.get("target") for r in _records(rotated) if r.get("event") == "mcp.request"] == ["echo"]
        assert "echo" not in [r.get("target") for r in _records(audit_file)]
    finally:
        proc.stop()


def test_an_unwritable_audit_file_stops_the_start_with_a_json_event(upstream: Any, tmp_path: Path) -> None:
    up = upstream(json_response=True)
    cfg = gateway_config(with_policy({"servers": {"up": {"url": up.url}},
                                      "logging": {"audit_file": str(tmp_path / "missing-dir" / "audit.jsonl")}},
                                     tmp_path), 1, 2)
    path = write_config(tmp_path / "gw.yaml", cfg)
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    event = next(json.loads(line) for line in result.stdout.splitlines() if "gateway.start_failed" in line)
    assert event["reason"] == "audit_file_unwritable" and "Traceback" not in result.stderr


def test_log_arguments_puts_them_in_the_record_redacted(upstream: Any, tmp_path: Path) -> None:
    up = upstream(json_response=True)
    proc, cfg = start_gateway_argv(tmp_path, {"servers": {"up": {"url": up.url}},
                                              "logging": {"audit_file": "audit.jsonl", "log_arguments": True}}, [])
    try:
        secret = "ghp_" + "A1b2C3d4" * 5
        assert "result" in _call(cfg["listen"]["port"], "echo", {"text": f"token {secret} here"})
        path = tmp_path / "audit.jsonl"
        proc.wait_until(lambda: any(r.get("target") == "echo" for r in _records(path)), 10, "the record")
        (record,) = [r for r in _records(path) if r.get("target") == "echo"]
        assert record["arguments"] == {"text": "token [REDACTED] here"}
        assert secret not in path.read_text()
    finally:
        proc.stop()
