"""The pinning stage in process: failure modes (closed by default), reloads, pagination edges.

The end-to-end behaviour is in test_pinning_e2e/tofu/cli; these tests reach the
corners a live upstream cannot easily produce (a store that fails, a lock file
broken mid-flight, a continuation page started on another replica).
"""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config.model import load_config
from gateway.errors import ToolHeld, Unavailable, UpstreamUnavailable
from gateway.inspect.catalog import ToolCatalog
from gateway.inspect.lockfile import Approved, write_lock
from gateway.inspect.tool_fetch import FetchError
from gateway.pipeline import Exchange
from gateway.stages.pinning import Pinning
from gateway.store.base import StoreError
from gateway.store.memory import MemoryStore
from tests.support.mutable_upstream import default_tools


class FailingStore(MemoryStore):
    async def get(self, key: str) -> bytes | None:
        raise StoreError("down")


def make(tmp_path: Path, mode: str, *, lock: list[dict[str, Any]] | None = None, store: Any = None,
         live: list[dict[str, Any]] | None = None, fetch_error: bool = False) -> tuple[Any, Pinning]:
    (tmp_path / "pins").mkdir(exist_ok=True)
    if lock is not None:
        write_lock(str(tmp_path / "pins" / "s.lock.yaml"), Approved.from_definitions("s", "lock", lock))
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("listen: {port: 0}\nadmin: {port: 1}\npublic_url: http://127.0.0.1\nauth: {mode: none}\n"
                   f"pins: pins\nservers:\n  s:\n    url: http://127.0.0.1:9/mcp\n    pinning: {{mode: {mode}}}\n")
    config = load_config(str(cfg))
    calls: list[int] = []

    async def fetch(server: Any, ex: Any) -> list[dict[str, Any]]:
        calls.append(1)
        if fetch_error:
            raise FetchError("no route", "upstream_unavailable")
        return copy.deepcopy(live if live is not None else default_tools())

    stage = Pinning(config, store if store is not None else MemoryStore(), ToolCatalog(), fetch)
    stage.fetches = calls   # type: ignore[attr-defined]
    return config, stage


def exchange(config: Any, method: str, name: str | None = None, cursor: str | None = None) -> Exchange:
    ex = Exchange(SimpleNamespace(method="POST", headers={}), config.servers["s"])  # type: ignore[arg-type]
    ex.method, ex.name = method, name
    params: dict[str, Any] = {"name": name} if name else ({"cursor": cursor} if cursor else {})
    ex.message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    return ex


async def listed(stage: Pinning, config: Any, tools: list[dict[str, Any]], cursor: str | None = None,
                 next_cursor: str | None = None) -> list[str]:
    ex = exchange(config, "tools/list", cursor=cursor)
    await stage.on_request(ex)
    result: dict[str, Any] = {"tools": copy.deepcopy(tools)}
    if next_cursor:
        result["nextCursor"] = next_cursor
    out = ex.response_hooks[-1](ex, {"jsonrpc": "2.0", "id": 1, "result": result})
    return [t["name"] for t in out["result"]["tools"]]


async def test_tofu_fails_closed_when_the_store_is_unreachable(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "tofu", store=FailingStore())
    with pytest.raises(Unavailable) as err:
        await stage.on_request(exchange(config, "tools/list"))
    assert err.value.status == 503 and err.value.reason == "pins_unavailable"


async def test_warn_relays_when_the_store_is_unreachable(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "warn", store=FailingStore())
    assert await listed(stage, config, default_tools()) == [t["name"] for t in default_tools()]


async def test_enforce_without_a_lock_file_holds_every_tool(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "enforce")
    await stage.start()
    assert await listed(stage, config, default_tools()) == []
    with pytest.raises(ToolHeld) as held:
        await stage.on_request(exchange(config, "tools/call", "echo"))
    assert held.value.data["kinds"] == ["tool_added"]


async def test_a_call_on_a_replica_that_never_listed_fetches_once_and_decides(tmp_path: Path) -> None:
    changed = default_tools()
    changed[0]["description"] = "Echo, and remember everything."
    config, stage = make(tmp_path, "enforce", lock=default_tools(), live=changed)
    await stage.start()
    with pytest.raises(ToolHeld) as held:
        await stage.on_request(exchange(config, "tools/call", "echo"))
    assert held.value.data == {"tool": "echo", "kinds": ["description_changed"]}
    await stage.on_request(exchange(config, "tools/call", "add"))   # approved: no error
    assert len(stage.fetches) == 1                                  # type: ignore[attr-defined]
    assert stage.catalog.get("s", "echo")["description"] == "Echo, and remember everything."


async def test_an_unreachable_upstream_during_the_call_check_fails_closed(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "enforce", lock=default_tools(), fetch_error=True)
    await stage.start()
    with pytest.raises(UpstreamUnavailable):
        await stage.on_request(exchange(config, "tools/call", "echo"))


async def test_a_broken_lock_file_edit_keeps_the_previous_approval(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "enforce", lock=default_tools())
    await stage.start()
    names = [t["name"] for t in default_tools()]
    assert await listed(stage, config, default_tools()) == names
    lock = tmp_path / "pins" / "s.lock.yaml"
    lock.write_text(lock.read_text().replace("Echo the text back unchanged.", "Edited by hand."))
    assert await listed(stage, config, default_tools()) == names     # refused edit: old lock in force


async def test_approval_takes_effect_on_the_next_listing(tmp_path: Path) -> None:
    changed = default_tools()
    changed[1]["inputSchema"]["properties"]["c"] = {"type": "integer"}
    config, stage = make(tmp_path, "enforce", lock=default_tools())
    await stage.start()
    assert "add" not in await listed(stage, config, changed)
    write_lock(str(tmp_path / "pins" / "s.lock.yaml"), Approved.from_definitions("s", "lock", changed))
    assert "add" in await listed(stage, config, changed)


async def test_a_continuation_page_from_another_replica_is_checked_but_never_completes(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "enforce", lock=default_tools())
    await stage.start()
    page2 = default_tools()[2:4]
    page2[0]["annotations"]["destructiveHint"] = True
    assert await listed(stage, config, page2, cursor="unknown-cursor") == ["delete_file"]
    # No complete listing was seen, so nothing is reported removed and calls still re-check.
    assert not stage.catalog.server("s").complete


async def test_pagination_completes_a_listing_and_reports_removed_tools(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "enforce", lock=default_tools())
    await stage.start()
    tools = default_tools()[:4]   # search_notes is gone
    first = await listed(stage, config, tools[:2], next_cursor="p2")
    second = await listed(stage, config, tools[2:], cursor="p2")
    assert first + second == ["echo", "add", "read_file", "delete_file"]
    cat = stage.catalog.server("s")
    assert cat.complete and set(cat.tools) == {"echo", "add", "read_file", "delete_file"}
    with pytest.raises(ToolHeld) as held:
        await stage.on_request(exchange(config, "tools/call", "search_notes"))
    assert held.value.data["kinds"] == ["tool_removed"]


async def test_a_tool_never_listed_nor_approved_is_left_to_the_upstream(tmp_path: Path) -> None:
    """No definition of it ever reached the model: nothing to pin (the policy decides on names)."""
    config, stage = make(tmp_path, "enforce", lock=default_tools())
    await stage.start()
    await stage.on_request(exchange(config, "tools/call", "no_such_tool"))


async def test_malformed_entries_are_dropped_not_guessed(tmp_path: Path) -> None:
    config, stage = make(tmp_path, "warn", lock=default_tools())
    await stage.start()
    ex = exchange(config, "tools/list")
    await stage.on_request(ex)
    out = ex.response_hooks[-1](ex, {"jsonrpc": "2.0", "id": 1, "result": {
        "tools": [{"description": "no name"}, "text", default_tools()[0]]}})
    assert out["result"]["tools"] == [default_tools()[0]]
