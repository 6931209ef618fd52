"""A reviewer's diff between a lock file and a live tool list: per tool, per field, as text.

Descriptions are diffed line by line (a long one-line description sentence
by sentence), schemas and other fields as indented, key-sorted JSON, so the
reviewer sees the sentence or the parameter that changed rather than two
hashes.  Characters a reviewer could not see (zero-width, bidi controls,
escapes) are shown as ``<U+XXXX>``.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any, Callable

from .fingerprint import tool_print
from .lockfile import Approved
from .pinning import changes, classify, removed
from .poisoning import Finding, escape_excerpt

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
WRAP_AT = 100


def visible(text: str) -> str:
    return escape_excerpt(text, limit=len(text) + 1).rstrip("…")


def _lines(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if key in ("description", "title") and isinstance(value, str):
        out: list[str] = []
        for line in value.split("\n"):
            out.extend(_SENTENCE.split(line) if len(line) > WRAP_AT else [line])
        return [visible(line) for line in out]
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return [visible(line) for line in text.split("\n")]


def _field_diff(tool: str, key: str, old: Any, new: Any) -> list[str]:
    diff = difflib.unified_diff(_lines(key, old), _lines(key, new), f"approved {tool}.{key}",
                                f"live     {tool}.{key}", lineterm="", n=2)
    return ["    " + line for line in diff]


def render_diff(server: str, path: str, current: Approved, live: list[dict[str, Any]], ignore: frozenset[str],
                findings: dict[str, list[Finding]], action: Callable[[str], str]) -> tuple[str, bool]:
    """(text, changed) for ``mcp-gateway pins diff``."""
    out: list[str] = []
    counts = {"changed": 0, "added": 0, "renamed": 0, "removed": 0, "unchanged": 0}
    names = set()
    for tool in live:
        p = tool_print(tool, ignore)
        names.add(p.name)
        kinds, renamed_from = classify(current, p)
        if not kinds:
            counts["unchanged"] += 1
            continue
        if kinds == ("tool_added",):
            counts["added"] += 1
            out.append(f"+ {p.name}: tool_added  {p.fingerprint}")
            for key in sorted(p.definition):
                if key != "name":
                    out.extend(_field_diff(p.name, key, None, p.definition[key]))
        elif kinds == ("tool_renamed",):
            counts["renamed"] += 1
            out.append(f"> {p.name}: tool_renamed from {renamed_from} (same description and schema)  {p.fingerprint}")
        else:
            counts["changed"] += 1
            pinned = current.tools[p.name]
            out.append(f"~ {p.name}: {', '.join(kinds)}")
            out.append(f"    approved {pinned.fingerprint}")
            out.append(f"    live     {p.fingerprint}")
            for key in sorted(pinned.definition.keys() | p.definition.keys()):
                if changes({key: pinned.definition.get(key)}, {key: p.definition.get(key)}):
                    out.extend(_field_diff(p.name, key, pinned.definition.get(key), p.definition.get(key)))
        for f in findings.get(p.name, []):
            out.append(f"    ! poisoning: {f.rule} ({f.severity}, {action(f.severity)}) at {f.where}: "
                       f"{f.excerpt!r} - {f.message}")
        out.append("")
    for name in removed(current, names):
        counts["removed"] += 1
        out.append(f"- {name}: tool_removed  {current.tools[name].fingerprint}")
        out.append("")
    changed = any(counts[k] for k in ("changed", "added", "renamed", "removed"))
    head = (f"server {server}: {counts['changed']} changed, {counts['added']} added, {counts['renamed']} renamed, "
            f"{counts['removed']} removed, {counts['unchanged']} unchanged  (lock file {path})")
    if not changed:
        head += "\nno changes: the live tools are the approved ones"
    return head + "\n" + ("\n" + "\n".join(out) if out else ""), changed
