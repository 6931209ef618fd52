"""Signals of the pinning stage: metrics (every occurrence) and audit events (deduplicated).

Every violation and finding is counted on each relayed listing or call, by
server and kind; never with tool text in a label.  The audit event
(structlog ``gateway.pinning``) names server, tool and kind and carries the
detail an operator needs (fingerprints, changed fields, rule, where it
matched, a short escaped excerpt).  The same event for the same definition is
logged at most once per ``repeat_after`` seconds per replica, so a client that
lists every second cannot flood the log; the per-request audit record
(``ex.audit["pinning"]``) still names every held tool.
"""
from __future__ import annotations

import time
from typing import Any

import structlog

from ..telemetry.metrics import BOUND, TOOL_CALLS_HELD, TOOL_PIN_EVENTS, TOOL_POISONING_FINDINGS
from .poisoning import Finding

log = structlog.get_logger("gateway.pinning")
AUDIT_RECORD_LIMIT = 20   # tools named in one request's audit record


class Signals:
    def __init__(self, repeat_after: float = 300.0, limit: int = 4096) -> None:
        self.repeat_after = repeat_after
        self._limit = limit
        self._seen: dict[tuple[Any, ...], float] = {}

    def _fresh(self, key: tuple[Any, ...]) -> bool:
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last < self.repeat_after:
            return False
        if len(self._seen) >= self._limit:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = now
        return True

    def change(self, server: str, tool: str, kinds: tuple[str, ...], action: str, *,
               fingerprint: str = "", approved: str = "", renamed_from: str | None = None) -> None:
        for kind in kinds:
            BOUND.get(TOOL_PIN_EVENTS, server, kind, action).inc()
        if self._fresh(("change", server, tool, kinds, fingerprint, action)):
            fields: dict[str, Any] = {"server": server, "tool": tool, "kind": kinds[0], "kinds": list(kinds),
                                      "action": action, "fingerprint": fingerprint}
            if approved:
                fields["approved_fingerprint"] = approved
            if renamed_from:
                fields["renamed_from"] = renamed_from
            log.warning("tool.pin_violation", **fields)

    def finding(self, server: str, tool: str, f: Finding, action: str, fingerprint: str) -> None:
        BOUND.get(TOOL_POISONING_FINDINGS, server, f.rule, f.severity, action).inc()
        if self._fresh(("finding", server, tool, f.rule, f.where, fingerprint, action)):
            log.warning("tool.poisoning_finding", server=server, tool=tool, kind=f.rule, severity=f.severity,
                        action=action, where=f.where, excerpt=f.excerpt, detail=f.message, fingerprint=fingerprint)

    def pinned(self, server: str, tools: int, tool_set: str) -> None:
        BOUND.get(TOOL_PIN_EVENTS, server, "tool_set_pinned", "pinned").inc()
        log.info("tool.pinned", server=server, kind="tool_set_pinned", tools=tools, tool_set=tool_set)

    def call_held(self, server: str, tool: str, kinds: tuple[str, ...]) -> None:
        kind = kinds[0] if kinds else "tool_unlisted"
        BOUND.get(TOOL_CALLS_HELD, server, kind).inc()
        if self._fresh(("call", server, tool, kinds)):
            log.warning("tool.call_held", server=server, tool=tool, kind=kind, kinds=list(kinds))

    def call_warned(self, server: str, tool: str, kinds: tuple[str, ...]) -> None:
        for kind in kinds:
            BOUND.get(TOOL_PIN_EVENTS, server, kind, "warned").inc()
        if self._fresh(("call_warn", server, tool, kinds)):
            log.warning("tool.call_unapproved", server=server, tool=tool, kind=kinds[0] if kinds else "",
                        kinds=list(kinds), action="warned")


def record(ex: Any, entry: dict[str, Any]) -> None:
    """Add one tool to the request's audit record (bounded)."""
    held = ex.audit.setdefault("pinning", [])
    if len(held) < AUDIT_RECORD_LIMIT:
        held.append(entry)
