"""Hot reload in process: atomic swap, change detection, refusal of broken sets, SIGHUP."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.pipeline import Principal
from gateway.policy.decide import decide
from gateway.policy.load import load_policies_strict
from gateway.policy.reload import PolicyHolder, PolicyWatcher

READER = Principal(issuer="https://iss", subject="u", scopes=frozenset({"read"}))
RO = {"readOnlyHint": True}


def policy(scope: str) -> str:
    return f"servers:\n  s:\n    tools:\n      - {{id: r, match: read_file, scopes: [{scope}]}}\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def failed_reloads() -> float:
    return REGISTRY.get_sample_value("mcpgw_config_reloads_total", {"what": "policies", "result": "failed"}) or 0.0


@pytest.fixture
def setup(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text(policy("read"))
    holder = PolicyHolder(load_policies_strict(str(tmp_path), ["s"]))
    return tmp_path, path, holder


def allowed(holder: PolicyHolder) -> bool:
    return decide(holder.current, "s", "tools", "read_file", READER, {}, RO).allowed


async def test_a_changed_file_is_swapped_in(setup) -> None:
    root, path, holder = setup
    watcher = PolicyWatcher(holder, str(root), ["s"], interval=0.05)
    await watcher.start(sighup=False)
    try:
        before = holder.current
        assert allowed(holder)
        write_atomically(path, policy("admin"))
        await watcher.wait_attempts(1, timeout=5)
        assert holder.current is not before and holder.generation == 2
        assert not allowed(holder)
        assert allowed(PolicyHolder(before))   # the old set object itself is untouched
    finally:
        await watcher.close()


async def test_an_invalid_change_keeps_the_old_set_and_counts_a_failure(setup) -> None:
    root, path, holder = setup
    watcher = PolicyWatcher(holder, str(root), ["s"], interval=0.05)
    failures = failed_reloads()
    await watcher.start(sighup=False)
    try:
        current = holder.current
        write_atomically(path, policy("read") + "    default: sometimes\n")
        await watcher.wait_attempts(1, timeout=5)
        assert holder.current is current and holder.generation == 1 and allowed(holder)
        assert failed_reloads() == failures + 1
        assert any("default must be one of" in str(p) for p in watcher.last_problems)
        write_atomically(path, policy("other"))        # fixing the file applies the fix
        await watcher.wait_attempts(2, timeout=5)
        assert holder.generation == 2 and not allowed(holder)
    finally:
        await watcher.close()


async def test_a_new_file_and_a_removed_file_are_noticed(setup) -> None:
    root, path, holder = setup
    watcher = PolicyWatcher(holder, str(root), ["s", "t"], interval=0.05)
    await watcher.start(sighup=False)
    try:
        (root / "t.yaml").write_text("servers:\n  t:\n    tools: [{id: t1, match: x}]\n")
        await watcher.wait_attempts(1, timeout=5)
        assert "t" in holder.current.servers
        (root / "t.yaml").unlink()
        await watcher.wait_attempts(2, timeout=5)
        assert "t" not in holder.current.servers
    finally:
        await watcher.close()


async def test_sighup_reloads_at_once(setup) -> None:
    root, path, holder = setup
    # A long poll interval: only the signal can explain a prompt reload.
    watcher = PolicyWatcher(holder, str(root), ["s"], interval=3600)
    await watcher.start(sighup=True)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await watcher.wait_attempts(1, timeout=5)
        assert holder.generation == 2
    finally:
        await watcher.close()


async def test_touching_a_file_without_changing_it_does_not_reload(setup) -> None:
    root, path, holder = setup
    watcher = PolicyWatcher(holder, str(root), ["s"], interval=3600)
    os.utime(path, ns=(1, 1))
    assert await watcher.check_once() is None
    assert holder.generation == 1 and watcher.attempts == 0


async def test_the_watcher_survives_a_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "p.yaml").write_text(policy("read"))
    holder = PolicyHolder(load_policies_strict(str(tmp_path / "d"), ["s"]))
    watcher = PolicyWatcher(holder, str(tmp_path / "d"), ["s"], interval=3600)
    (tmp_path / "d" / "p.yaml").unlink()
    (tmp_path / "d").rmdir()
    assert await watcher.check_once() is False
    assert allowed(holder)
