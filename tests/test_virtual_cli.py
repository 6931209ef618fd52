"""``check``, ``policy explain`` and ``pins`` understand virtual server names (real CLI processes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.components import REPO

CONFIG = """\
listen: {port: 8080}
admin: {port: 9464}
public_url: http://127.0.0.1:8080
auth: {mode: none}
policies: policies
servers:
  ledger: {url: "http://127.0.0.1:9/mcp", pinning: {mode: tofu}}
  github: {url: "http://127.0.0.1:9/mcp", pinning: {mode: tofu}}
virtual_servers:
  finance:
    include:
      - server: ledger
      - {server: github, prefix: gh_, tools: ["search_*", get_issue]}
"""
POLICY = """\
servers:
  "*": {default: deny}
  github:
    default: deny
    destructive: allow
    tools:
      - {id: gh-search, match: "search_*"}
  finance:
    default: allow
    destructive: allow
    tools:
      - {id: fin-no-code, effect: deny, match: gh_search_code}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY)
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_check_accepts_a_virtual_server_and_its_own_policy_section(config: Path) -> None:
    done = cli("check", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert "1 virtual server(s)" in done.stdout and "github as gh_*" in done.stdout


@pytest.mark.parametrize("include,message", [
    ("[{server: ledger}, {server: nope}]", "'nope' is not one of servers"),
    ("[{server: ledger, prefix: x_}, {server: github, prefix: x_y}]", "could publish the same name"),
    ("[{server: ledger, tools: ['[ab']}]", "is not a valid glob"),
    ("[{server: ledger}, {server: ledger, prefix: l2_}]", "is included twice"),
])
def test_check_refuses_a_broken_virtual_server_at_its_line(config: Path, include: str, message: str) -> None:
    text = CONFIG.split("virtual_servers:")[0] + f"virtual_servers:\n  finance:\n    include: {include}\n"
    config.write_text(text)
    done = cli("check", "-c", str(config))
    assert done.returncode == 1
    assert message in done.stderr and f"{config}:" in done.stderr


@pytest.mark.parametrize("tool,code,last", [
    ("gh_search_issues", 0, "through finance: allow"),
    ("gh_search_code", 1, "through finance: deny"),           # the virtual section's deny wins
    ("gh_get_issue", 1, "through finance: deny"),             # the origin's default deny
    ("gh_delete_repo", 1, "does not publish"),                # outside the include's globs
])
def test_policy_explain_follows_a_published_name_to_its_origin(config: Path, tool: str, code: int,
                                                              last: str) -> None:
    done = cli("policy", "explain", "-c", str(config), "--server", "finance", "--tool", tool, "--anonymous")
    assert done.returncode == code, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith(last) or last in done.stdout


def test_pins_name_the_origins_of_a_virtual_server(config: Path) -> None:
    whole = cli("pins", "diff", "finance", "-c", str(config))
    assert whole.returncode != 0 and "its pins are its origins' (ledger, github)" in whole.stderr
    mixed = cli("pins", "approve", "finance", "gh_search_code", "ledger__pay", "-c", str(config))
    assert mixed.returncode != 0 and "several origins" in mixed.stderr
    unknown = cli("pins", "approve", "finance", "gh_delete_repo", "-c", str(config))
    assert unknown.returncode != 0 and "does not publish gh_delete_repo" in unknown.stderr
    # One origin's names are translated; the origin itself (port 9: nothing listens) then fails.
    one = cli("pins", "approve", "finance", "gh_search_code", "-c", str(config))
    assert "finance: gh_search_code -> github: search_code" in one.stdout
