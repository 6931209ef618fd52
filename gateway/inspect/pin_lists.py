"""What a relayed ``tools/list`` page means: the pinning stage's per-page judgement.

For each tool of a page: its fingerprint and scan (memoised per definition),
its verdict against the approved set and the other servers' names (memoised
per fingerprint, approved-set version and name index), the catalog entry, and
the signals.  A page byte-identical to one already judged reuses the whole
judgement.  Pages are stitched into listings by cursor; a listing's last page
completes it (removed tools, tool-set fingerprint).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import structlog

from ..codec import deeper_than

from ..errors import UpstreamInvalid
from ..telemetry.metrics import BOUND, UPSTREAM_ERRORS
from .catalog import Entry, ToolCatalog
from .fingerprint import set_fingerprint
from .names import NameIndex
from .pin_signals import Signals, record
from .pin_state import ServerPins
from .pinning import context_findings, evaluate, removed

if TYPE_CHECKING:
    from ..pipeline import Exchange

MAX_OPEN_LISTINGS = 1024     # paginated listings in progress (keyed by their next cursor)
PAGE_MEMO = 64               # judged pages remembered per server (tool sets change rarely)
MAX_TOOL_DEPTH = 64          # nesting of one tool definition; real schemas stay under ~10 levels
log = structlog.get_logger("gateway.pinning")
VERDICT_MEMO = 16384


class Page:
    """The judgement of one exact page of tools (see ``ListJudge.inspect_page``)."""

    __slots__ = ("version", "index_gen", "entries", "entries_by_position", "prints", "kept", "flagged")

    def __init__(self, version: int, index_gen: int) -> None:
        self.version = version
        self.index_gen = index_gen
        self.entries: dict[str, Entry] = {}
        self.entries_by_position: list[tuple[int, Entry]] = []
        self.prints: dict[str, str] = {}
        self.kept: list[int] = []
        self.flagged: list[tuple[str, Entry]] = []


class Listing:
    """One paginated listing in progress on this replica."""

    __slots__ = ("names", "prints", "version")

    def __init__(self, version: int) -> None:
        self.names: set[str] = set()
        self.prints: dict[str, str] = {}
        self.version = version


def too_deep(server: str, tool: Any) -> bool:
    """A definition nested past ``MAX_TOOL_DEPTH``: walkers (fingerprint, scan, the tofu
    document) would recurse that deep, so it is never relayed, pinned or walked."""
    if not deeper_than(tool, MAX_TOOL_DEPTH):
        return False
    BOUND.get(UPSTREAM_ERRORS, server, "tool_too_deep").inc()
    log.warning("pins.tool_too_deep", server=server, limit=MAX_TOOL_DEPTH)
    return True


class ListJudge:
    """Judges pages for every pinned server of this replica (no I/O, no awaits)."""

    def __init__(self, servers: dict[str, ServerPins], catalog: ToolCatalog, signals: Signals,
                 max_tools: int = 1000) -> None:
        self.servers = servers
        self.max_tools = max_tools
        self.catalog = catalog
        self.signals = signals
        self._listings: dict[tuple[str, str], Listing] = {}
        self._index: NameIndex | None = None
        self._index_key: tuple[Any, ...] = ()
        self._index_gen = 0
        self._verdicts: dict[tuple[str, str], tuple[Any, Any]] = {}   # (server, fp) -> (key, verdict)
        self._sets: dict[tuple[tuple[str, str], ...], str] = {}       # listing prints -> set fingerprint

    def inspect_page(self, st: ServerPins, ex: "Exchange | None", tools: list[Any],
                     listing: Listing) -> list[Any]:
        """Check one page; returns the tools to relay.  Updates catalog and signals.

        A page identical (byte for byte) to one already judged against the same
        approved set and name index reuses that judgement: every listing after
        the first costs one ``orjson.dumps`` of the page, not 50 lookups.
        """
        if len(tools) > self.max_tools:
            # Scanning costs ~0.1 ms per new definition, on the event loop: bounded here.
            BOUND.get(UPSTREAM_ERRORS, st.name, "too_many_tools").inc()
            raise UpstreamInvalid(f"the upstream listed {len(tools)} tools in one page; the gateway's limit is "
                                  f"{self.max_tools} (limits.max_tools_per_page)", reason="upstream_too_many_tools")
        index = self.name_index()
        try:
            key: bytes | None = orjson.dumps(tools)
        except TypeError:
            key = None
        memo = st.pages.get(key) if key is not None else None
        if memo is None or memo.version != st.version or memo.index_gen != self._index_gen:
            memo = self._judge_page(st, tools, index)
            if key is not None:
                if len(st.pages) >= PAGE_MEMO:
                    del st.pages[next(iter(st.pages))]
                st.pages[key] = memo
        else:
            for i, entry in memo.entries_by_position:
                entry.definition = tools[i]   # the catalog points at the message being relayed
        listing.names.update(memo.prints)
        listing.prints.update(memo.prints)
        self.catalog.upsert(st.name, memo.entries)
        for name, entry in memo.flagged:
            self._signal(st, ex, name, entry)
        if len(memo.kept) == len(tools):
            return tools
        return [tools[i] for i in memo.kept]

    def _judge_page(self, st: ServerPins, tools: list[Any], index: NameIndex) -> "Page":
        page = Page(st.version, self._index_gen)
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue   # malformed entries are dropped, never guessed at
            if too_deep(st.name, tool):
                continue
            entry = self.evaluate(st, tool, index)
            name = tool["name"]
            page.entries[name] = entry
            page.entries_by_position.append((i, entry))
            page.prints[name] = entry.print.fingerprint if entry.print else ""
            if not entry.held:
                page.kept.append(i)
            if entry.kinds or entry.findings:
                page.flagged.append((name, entry))
        return page

    def evaluate(self, st: ServerPins, tool: dict[str, Any], index: NameIndex) -> Entry:
        ins = st.inspector.inspect(tool)
        key = (st.version, self._index_gen)
        memo = self._verdicts.get((st.name, ins.print.fingerprint))
        if memo is not None and memo[0] == key:
            verdict = memo[1]
        else:
            verdict = evaluate(st.cfg, st.approved, ins, context_findings(st.cfg.rules, st.name, ins, index))
            if len(self._verdicts) >= VERDICT_MEMO:
                self._verdicts.clear()
            self._verdicts[(st.name, ins.print.fingerprint)] = (key, verdict)
        findings = tuple(f for f in verdict.findings if st.cfg.action(f.severity) != "ignore")
        return Entry(tool, ins.print, verdict.held, verdict.kinds, findings, verdict.blocking, st.version,
                     verdict.renamed_from)

    def _signal(self, st: ServerPins, ex: "Exchange | None", name: str, entry: Entry) -> None:
        action = "blocked" if entry.held else "warned"
        fp = entry.print.fingerprint if entry.print else ""
        if entry.kinds:
            approved = st.approved.tools.get(name) if st.approved is not None else None
            self.signals.change(st.name, name, entry.kinds, "blocked" if st.holding else "warned",
                                fingerprint=fp, approved=approved.fingerprint if approved else "",
                                renamed_from=entry.renamed_from)
        for f in entry.findings:
            self.signals.finding(st.name, name, f, "blocked" if st.cfg.action(f.severity) == "block"
                                 and f.rule in entry.blocking else "warned", fp)
        if ex is not None:
            record(ex, {"tool": name, "action": action, "kinds": list(entry.kinds),
                        "rules": sorted({f.rule for f in entry.findings})})

    def complete(self, st: ServerPins, ex: "Exchange | None", listing: Listing) -> None:
        prints = tuple(sorted(listing.prints.items()))
        tool_set = self._sets.get(prints)
        if tool_set is None:
            if len(self._sets) >= PAGE_MEMO:
                self._sets.clear()
            tool_set = self._sets[prints] = set_fingerprint(prints)
        self.catalog.complete(st.name, listing.names, tool_set)
        if listing.version != st.version:
            return   # the approved set changed mid-listing: removals would be judged on the wrong set
        gone = removed(st.approved, listing.names)
        for name in gone:
            self.signals.change(st.name, name, ("tool_removed",), "blocked" if st.holding else "warned",
                                approved=st.approved.tools[name].fingerprint if st.approved else "")
            if ex is not None:
                record(ex, {"tool": name, "action": "removed", "kinds": ["tool_removed"]})
        if ex is not None:
            ex.audit["tool_set"] = tool_set
            if st.approved is not None:
                ex.audit["tool_set_approved"] = tool_set == st.approved.tool_set

    def listing_for(self, st: ServerPins, cursor: str | None) -> Listing | None:
        """The listing a page belongs to (None: a continuation this replica did not start)."""
        if cursor is None:
            return Listing(st.version)
        return self._listings.pop((st.name, cursor), None)

    def continue_listing(self, st: ServerPins, cursor: str, listing: Listing) -> None:
        if len(self._listings) >= MAX_OPEN_LISTINGS:
            del self._listings[next(iter(self._listings))]
        self._listings[(st.name, cursor)] = listing

    def name_index(self) -> NameIndex:
        """Tool names of every mounted server (approved and live), for shadowing checks."""
        key = tuple((s, st.version) for s, st in self.servers.items()) + self.catalog.generations()
        if self._index is None or key != self._index_key:
            self._index_gen += 1
            names: dict[str, set[str]] = {s: set(n) for s, n in self.catalog.names().items()}
            approved: dict[str, set[str]] = {}
            for s, st in self.servers.items():
                if st.approved is not None:
                    names.setdefault(s, set()).update(st.approved.tools)
                    approved[s] = set(st.approved.tools)
            self._index = NameIndex.build(names, approved)
            self._index_key = key
        return self._index

    def reevaluate(self, st: ServerPins, entry: Entry) -> Entry:
        fresh = self.evaluate(st, entry.definition, self.name_index())
        self.catalog.server(st.name).tools[fresh.definition["name"]] = fresh
        return fresh
