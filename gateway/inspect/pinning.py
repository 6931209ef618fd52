"""Tool-definition pinning: compare what a server offers now with what was approved.

Everything here is synchronous and per replica; the stage
(``gateway.stages.pinning``) feeds it the tools of each relayed ``tools/list``
page and acts on the verdicts.

What counts as a change, per tool (the *kinds*, a closed set used as metric
labels):

- ``description_changed``, ``schema_changed`` (input or output schema, a new
  optional parameter included), ``annotations_changed`` (e.g.
  ``destructiveHint`` flipped), ``definition_changed`` (title, icons,
  ``_meta`` or any other field);
- ``tool_added`` (a name the approved set lacks), ``tool_renamed`` (a new name
  whose text equals an approved tool's), ``tool_removed`` (an approved tool
  missing from a complete listing).

Modes: ``enforce`` and ``tofu`` hold a changed tool (removed from lists, calls
refused); ``warn`` relays it and reports; ``off`` skips the stage.
Poisoning findings block or warn by severity whatever the mode, except that a
rule an operator listed in the lock file's ``accepted_findings`` only warns
for that exact approved definition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .fingerprint import ToolPrint, canonical_json, tool_print
from .lockfile import Approved
from .names import NameIndex
from .pinning_config import PinningConfig
from .poisoning import Finding, RuleSet, Scanned

KINDS = ("schema_changed", "description_changed", "annotations_changed", "definition_changed",
         "tool_added", "tool_renamed", "tool_removed")
_FIELD_KIND = {"description": "description_changed", "inputSchema": "schema_changed",
               "outputSchema": "schema_changed", "annotations": "annotations_changed"}
HOLDING_MODES = frozenset({"enforce", "tofu"})
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Inspected:
    """A definition's fingerprint and definition-only scan (memoised per definition)."""

    print: ToolPrint
    scanned: Scanned


class Inspector:
    """Fingerprints and scans definitions, memoised on their exact JSON.

    Tool sets change rarely and are listed often, so after the first sight a
    definition costs one ``orjson.dumps`` and a dict lookup.  The memo holds at
    most ``limit`` definitions (oldest dropped first).
    """

    def __init__(self, rules: RuleSet, ignore: frozenset[str] = frozenset(), limit: int = 8192) -> None:
        self.rules = rules
        self.ignore = ignore
        self.limit = limit
        self._memo: dict[bytes, Inspected] = {}

    def inspect(self, tool: dict[str, Any]) -> Inspected:
        try:
            key = orjson.dumps(tool)
        except TypeError:   # not encodable by orjson (e.g. a lone surrogate): no memo
            return Inspected(tool_print(tool, self.ignore), self.rules.scan(tool))
        hit = self._memo.get(key)
        if hit is None:
            hit = Inspected(tool_print(tool, self.ignore), self.rules.scan(tool))
            if len(self._memo) >= self.limit:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = hit
        return hit


def changes(approved: dict[str, Any], live: dict[str, Any]) -> tuple[str, ...]:
    """The kinds of change between two definitions of the same tool (empty when equal)."""
    found = set()
    for key in approved.keys() | live.keys():
        a, b = approved.get(key, _MISSING), live.get(key, _MISSING)
        if a is _MISSING or b is _MISSING or (_quick(a) != _quick(b) and canonical_json(a) != canonical_json(b)):
            found.add(_FIELD_KIND.get(key, "definition_changed"))
    return tuple(k for k in KINDS if k in found)


def _quick(value: Any) -> bytes:
    """Sorted-key JSON: equal bytes mean equal values; unequal ones are confirmed with RFC 8785
    (which also equates 1 and 1.0)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return canonical_json(value)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gateway does with one tool definition right now."""

    name: str
    kinds: tuple[str, ...]            # pin violations
    findings: tuple[Finding, ...]     # poisoning findings (definition and context)
    blocking: tuple[str, ...]         # the kinds and rule ids that hold it
    renamed_from: str | None = None

    @property
    def held(self) -> bool:
        return bool(self.blocking)


def classify(approved: Approved | None, p: ToolPrint) -> tuple[tuple[str, ...], str | None]:
    """(kinds, renamed_from) of a live tool against the approved set."""
    if approved is None:
        return ("tool_added",), None
    pinned = approved.tools.get(p.name)
    if pinned is not None:
        if pinned.fingerprint == p.fingerprint:
            return (), None
        return changes(pinned.definition, p.definition) or ("definition_changed",), None
    old = approved.by_body.get(p.body)
    if old is not None and old != p.name:
        return ("tool_renamed",), old
    return ("tool_added",), None


def evaluate(cfg: PinningConfig, approved: Approved | None, ins: Inspected,
             context: list[Finding]) -> Verdict:
    p = ins.print
    kinds, renamed_from = classify(approved, p)
    blocking = list(kinds) if kinds and cfg.mode in HOLDING_MODES else []
    accepted: frozenset[str] = frozenset()
    if not kinds and approved is not None and approved.origin == "lock":
        accepted = approved.tools[p.name].accepted_findings
    findings = (*ins.scanned.findings, *context)
    for f in findings:
        if cfg.action(f.severity) == "block" and f.rule not in accepted and f.rule not in blocking:
            blocking.append(f.rule)
    return Verdict(p.name, kinds, findings, tuple(blocking), renamed_from)


def context_findings(rules: RuleSet, server: str, ins: Inspected, index: NameIndex | None) -> list[Finding]:
    if index is None:
        return []
    return rules.scan_context(server, ins.print.name, ins.scanned, index)


def removed(approved: Approved | None, live_names: set[str]) -> list[str]:
    """Approved tools missing from a complete listing."""
    if approved is None:
        return []
    return sorted(n for n in approved.tools if n not in live_names)
