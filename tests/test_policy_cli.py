"""``mcp-gateway policy test|explain`` and the policy part of ``mcp-gateway check``, as a user runs them."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from tests.support.components import REPO


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def config(tmp_path: Path, servers: tuple[str, ...], policies: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 18080}, "admin": {"host": "127.0.0.1", "port": 19464},
        "public_url": "http://127.0.0.1:18080", "auth": {"mode": "none"}, "policies": policies,
        "servers": {s: {"url": f"http://127.0.0.1:{i + 1}/mcp", "pinning": {"mode": "off"}}
                    for i, s in enumerate(servers)},
    }))
    return path


def test_the_shipped_policies_pass_their_own_tests() -> None:
    done = run("policy", "test", "--policies", "policies")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", 0 failed" in done.stdout


def test_the_shipped_policies_pass_check_against_a_config_with_their_servers(tmp_path: Path) -> None:
    cfg = config(tmp_path, ("files", "everything", "demo"), str(REPO / "policies"))
    done = run("check", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    tests = run("policy", "test", "-c", str(cfg))
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_a_failing_case_is_reported_with_its_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("servers:\n  s:\n    tools:\n      - {id: r, match: x, scopes: [a]}\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yaml").write_text(textwrap.dedent("""\
        principals:
          a: {scopes: [a]}
        cases:
          - {name: passes, as: a, server: s, tool: x, annotations: {readOnlyHint: true}, expect: allow}
          - name: fails
            server: s
            tool: x
            expect: {decision: allow, rule: r}
        """))
    done = run("policy", "test", "--policies", str(tmp_path))
    assert done.returncode == 1
    assert f"FAIL {tmp_path}/tests/t.yaml:5: fails" in done.stdout
    # no annotations given: the MCP default (destructive), and the server's default is deny
    assert "decision: expected allow, got deny (destructive_denied)" in done.stdout
    assert "1 passed, 1 failed" in done.stdout


def test_a_malformed_test_file_is_a_failure_too(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("servers:\n  s: {}\n")
    bad = tmp_path / "cases.yaml"
    bad.write_text("cases:\n  - {name: x, server: s, tool: a, expect: perhaps}\n")
    done = run("policy", "test", "--policies", str(tmp_path / "p.yaml"), str(bad))
    assert done.returncode == 1
    assert f"{bad}:2:" in done.stderr and "must be one of" in done.stderr


def test_explain_lists_every_rule_and_the_decision() -> None:
    done = run("policy", "explain", "--policies", "policies", "--server", "files", "--tool", "delete_file",
               "--scopes", "files:read files:write", "--client-id", "ci-bot",
               "--arguments", '{"path": "/srv/shared/notes.md"}', "--annotations", '{"destructiveHint": true}')
    assert done.returncode == 1   # not allowed
    out = done.stdout
    assert "files-no-bot-deletes" in out and "denies" in out
    assert "decision:  deny (deny_rule) by rule files-no-bot-deletes" in out
    assert "files-delete-shared" in out and "not reached" in out


def test_check_reports_policy_problems_with_file_and_line(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text(textwrap.dedent("""\
        servers:
          files:
            tools:
              - {id: broad, match: "read_*"}
              - {id: narrow, match: read_file, scopes: [x]}
          github:
            tools: []
        """))
    done = run("check", "-c", str(config(tmp_path, ("files", "other"), "policies")))
    assert done.returncode == 1
    assert f"{policies}/a.yaml:6:3: unknown server 'github'" in done.stderr
    clean = policies / "a.yaml"
    clean.write_text(clean.read_text().replace("  github:\n    tools: []\n", ""))
    done = run("check", "-c", str(config(tmp_path, ("files", "other"), "policies")))
    assert f"{policies}/a.yaml:5:9: rule 'narrow' is shadowed by rule 'broad'" in done.stderr
    assert "server 'other' has no policy" in done.stderr
