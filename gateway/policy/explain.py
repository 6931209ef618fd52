"""``mcp-gateway policy explain``: every rule considered for one call, and why.

The trace comes from the decision function itself (``decide(..., trace=)``),
so the explanation cannot drift from what the gateway enforces.
"""
from __future__ import annotations

from typing import Any

from .decide import ANY, UNKNOWN, Decision, Step, decide, is_destructive
from .model import DENY, TOOLS, WILDCARD, PolicySet


def explain(policies: PolicySet, server: str, kind: str, name: str, principal: Any,
            arguments: Any = ANY, annotations: Any = UNKNOWN) -> tuple[Decision, list[str]]:
    trace: list[Step] = []
    d = decide(policies, server, kind, name, principal, arguments, annotations, trace)
    sp = policies.servers.get(server) or policies.servers.get(WILDCARD)
    lines = [
        f"call:      {kind} {name!r} on server {server!r}",
        f"principal: subject={principal.subject!r} client_id={principal.client_id!r} "
        f"scopes=[{' '.join(sorted(principal.scopes))}]",
    ]
    if principal.claims:
        lines.append(f"claims:    {dict(principal.claims)}")
    if arguments is ANY:
        lines.append("arguments: any (as for list filtering: argument constraints are assumed satisfiable)")
    else:
        lines.append(f"arguments: {arguments!r}")
    if kind == TOOLS:
        why = "unknown (never listed): treated as destructive" if annotations is None else repr(annotations)
        lines.append(f"tool:      annotations {why}; destructive={is_destructive(annotations)}")
    if sp is None:
        lines.append(f"policy:    no section for {server!r} and no '*' section: default deny")
    else:
        section = "its own section" if sp.name == server else "the '*' section"
        destructive = (f"destructive tools need {' '.join(sp.destructive.scopes)}" if sp.destructive.mode == "scopes"
                       else f"destructive tools: {sp.destructive.mode}")
        lines.append(f"policy:    {section} at {sp.loc}; default {sp.default}; {destructive}")
        matching = {id(s.rule) for s in trace}
        considered = [r for r in sp.rules.get(kind, ())]
        if considered:
            lines.append("rules (deny rules are checked first, then allow rules in file order):")
        for rule in sorted(considered, key=lambda r: (r.effect != DENY, r.order)):
            step = next((s for s in trace if s.rule is rule), None)
            if step is None:
                outcome = "not reached" if rule.matches(name) and id(rule) not in matching else "no match"
                detail = "an earlier rule decided" if outcome == "not reached" else "name does not match"
            else:
                outcome, detail = step.outcome, step.detail
            lines.append(f"  {rule.effect:5} {rule.id:32} {outcome:11} [{rule.loc.file}:{rule.loc.line}]"
                         + (f" {detail}" if detail else ""))
        method = "tools/call" if kind == TOOLS else None
        limits = [lim for lim in sp.limits if lim.applies(method or (name if kind == "methods" else None),
                                                           name if kind == TOOLS else None)]
        if limits:
            lines.append("limits (checked after the decision, all charged or none):")
        for lim in limits:
            quota = ", ".join(f"{w.limit}/{w.per:g}s burst {w.burst}" for w in lim.windows)
            if lim.concurrency is not None:
                quota = ", ".join(filter(None, [quota, f"{lim.concurrency} in flight"]))
            lines.append(f"  limit {lim.id:32} key={'+'.join(lim.key)} {quota} cost {lim.cost} "
                         f"on_store_error={lim.on_store_error} [{lim.loc.file}:{lim.loc.line}]")
    verdict = f"decision:  {d.effect} ({d.reason})"
    if d.rules:
        verdict += f" by rule {d.rules[0]}"
    if d.scopes:
        verdict += f"; step up with scope(s): {' '.join(d.scopes)}"
    if d.detail:
        verdict += f"; {d.detail}"
    lines.append(verdict)
    return d, lines
