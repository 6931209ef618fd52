"""The six rug-pull cases and client-side helpers shared by the pinning tests.

Each case turns the mutable upstream's default tool set into a changed one and
names the tool whose definition the model must no longer see unapproved.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx2
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from .components import REPO
from .mutable_upstream import default_tools

TOOL_HELD = -32005


@dataclass(frozen=True)
class Case:
    id: str
    kind: str                      # the pinning kind the gateway reports
    tool: str                      # the tool the change concerns
    args: dict[str, Any]
    mutate: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]

    def tools(self) -> list[dict[str, Any]]:
        return self.mutate(copy.deepcopy(default_tools()))


def _edit(name: str, fn: Callable[[dict[str, Any]], None]) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    def mutate(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for tool in tools:
            if tool["name"] == name:
                fn(tool)
        return tools
    return mutate


def _append_description(tool: dict[str, Any]) -> None:
    tool["description"] += " Results are cached for a minute."


def _optional_parameter(tool: dict[str, Any]) -> None:
    tool["inputSchema"]["properties"]["verbose"] = {"type": "boolean"}


def _flip_destructive(tool: dict[str, Any]) -> None:
    tool["annotations"]["destructiveHint"] = True


def _add_tool(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*tools, {"name": "upload_file", "description": "Upload a file to the shared folder.",
                     "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}}}]


def _remove_tool(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in tools if t["name"] != "search_notes"]


def _rename_tool(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for tool in tools:
        if tool["name"] == "delete_file":
            tool["name"] = "remove_file"
    return tools


CASES = [
    Case("description", "description_changed", "echo", {"text": "hi"}, _edit("echo", _append_description)),
    Case("schema", "schema_changed", "add", {"a": 1, "b": 2}, _edit("add", _optional_parameter)),
    Case("annotations", "annotations_changed", "read_file", {"path": "/srv/a"},
         _edit("read_file", _flip_destructive)),
    Case("added", "tool_added", "upload_file", {"path": "/srv/a"}, _add_tool),
    Case("removed", "tool_removed", "search_notes", {"query": "x"}, _remove_tool),
    Case("renamed", "tool_renamed", "remove_file", {"path": "/srv/a"}, _rename_tool),
]
BASE_NAMES = [t["name"] for t in default_tools()]


def names(tools: list[dict[str, Any]]) -> list[str]:
    return [t["name"] for t in tools]


@asynccontextmanager
async def mcp_client(url: str, transport: str, **kw: Any) -> AsyncIterator[Client]:
    """A real SDK client: ``json`` speaks 2026-07-28 (JSON answers from a JSON upstream),
    ``sse`` speaks 2025-11-25 against an SSE upstream (every answer is an event stream)."""
    mode = "legacy" if transport == "sse" else "auto"
    async with Client(url, mode=mode, cache=None, **kw) as client:
        yield client


async def list_all(client: Client) -> list[str]:
    """Every page of tools/list, as the client sees it."""
    out: list[str] = []
    cursor = None
    for _ in range(50):
        page = await client.list_tools(cursor=cursor)
        out += [t.name for t in page.tools]
        cursor = page.next_cursor
        if not cursor:
            return out
    raise AssertionError("tools/list did not end")


async def metric(admin_url: str, name: str, **labels: str) -> float:
    """The current value of one counter sample on the gateway's /metrics (0 when absent)."""
    async with httpx2.AsyncClient() as http:
        text = (await http.get(f"{admin_url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def pins_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """``mcp-gateway pins ...`` as a user runs it (a separate process)."""
    return subprocess.run([sys.executable, "-m", "gateway", "pins", *args, "-c", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
