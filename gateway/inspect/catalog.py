"""The last-seen tool definitions of every server, as relayed (or fetched) by this replica.

Filled by the pinning stage from every ``tools/list`` result it inspects, page
by page; a listing that reaches its last page replaces the server's set, so a
removed tool disappears.  Readers:

- the pinning stage, to check a ``tools/call`` against the tool's current
  definition without listing again;
- the policy engine (``ToolCatalog.get(server, tool)``), e.g. for annotation
  defaults such as ``destructiveHint``.

A server's catalog is *fresh* after a complete listing until it is marked
stale (``notifications/tools/list_changed`` on any stream of that server, on
any replica) or ``recheck_after`` passes; a stale catalog is refreshed before
the next call is allowed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .fingerprint import ToolPrint


@dataclass(slots=True)
class Entry:
    """One tool as last seen, with the pinning verdict computed when it was seen.

    ``print`` is None for tools recorded by ``update`` alone (pinning off for
    that server): they carry a definition but no verdict.
    """

    definition: dict[str, Any]
    print: ToolPrint | None = None
    held: bool = False
    kinds: tuple[str, ...] = ()     # pin violations ("description_changed", ...)
    findings: tuple[Any, ...] = ()  # poisoning findings (gateway.inspect.poisoning.Finding)
    blocking: tuple[str, ...] = ()  # why it is held: the kinds and rule ids that block it
    version: int = 0                # the approved-set version the verdict was computed against
    renamed_from: str | None = None


@dataclass(slots=True)
class ServerCatalog:
    tools: dict[str, Entry] = field(default_factory=dict)
    complete: bool = False          # a listing reached its last page
    stale: bool = True
    refreshed_at: float = 0.0       # time.monotonic() of the last complete listing
    tool_set: str = ""              # set fingerprint of the last complete listing
    generation: int = 0             # bumped whenever the set of names changes

    def fresh(self, max_age: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.complete and not self.stale and now - self.refreshed_at < max_age


class ToolCatalog:
    """Per-server catalogs, keyed by server name (one instance per gateway process)."""

    def __init__(self) -> None:
        self._servers: dict[str, ServerCatalog] = {}

    def server(self, server: str) -> ServerCatalog:
        cat = self._servers.get(server)
        if cat is None:
            cat = self._servers[server] = ServerCatalog()
        return cat

    def get(self, server: str, tool: str) -> dict[str, Any] | None:
        """The tool's definition as last seen upstream, or None when unknown."""
        cat = self._servers.get(server)
        if cat is None:
            return None
        entry = cat.tools.get(tool)
        return entry.definition if entry is not None else None

    def entry(self, server: str, tool: str) -> Entry | None:
        cat = self._servers.get(server)
        return cat.tools.get(tool) if cat is not None else None

    def generations(self) -> tuple[tuple[str, int], ...]:
        return tuple((s, c.generation) for s, c in self._servers.items())

    def names(self) -> dict[str, frozenset[str]]:
        return {s: frozenset(c.tools) for s, c in self._servers.items()}

    def update(self, server: str, items: list[Any]) -> None:
        """Record raw tool definitions seen in a list result (used where pinning is off).

        A tool the pinning stage already recorded with this very definition keeps
        its verdict; a different definition replaces the entry without one.
        """
        cat = self.server(server)
        for item in items:
            if not isinstance(item, dict) or not isinstance(name := item.get("name"), str):
                continue
            entry = cat.tools.get(name)
            if entry is not None and (entry.definition is item or entry.definition == item):
                continue
            if entry is None:
                cat.generation += 1
            cat.tools[name] = Entry(item)

    def upsert(self, server: str, entries: dict[str, Entry]) -> bool:
        """Record one page; returns True when a tool name was new to the catalog."""
        cat = self.server(server)
        new = not cat.tools.keys() >= entries.keys()
        cat.tools.update(entries)
        if new:
            cat.generation += 1
        return new

    def complete(self, server: str, names: set[str], tool_set: str) -> list[str]:
        """A listing ended: drop tools it did not contain.  Returns the names dropped."""
        cat = self.server(server)
        dropped = [n for n in cat.tools if n not in names]
        for name in dropped:
            del cat.tools[name]
        if dropped:
            cat.generation += 1
        cat.complete = True
        cat.stale = False
        cat.refreshed_at = time.monotonic()
        cat.tool_set = tool_set
        return dropped

    def mark_stale(self, server: str) -> None:
        self.server(server).stale = True

    def reset_verdicts(self, server: str) -> None:
        """The approved state changed (approval, reload): verdicts must be recomputed."""
        self.server(server).stale = True
