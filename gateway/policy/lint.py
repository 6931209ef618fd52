"""Findings about a policy set that parses: rules that can never matter.

``mcp-gateway check`` reports these next to parse errors; hot reload does not
refuse a set for them (a shadowed rule is dead code, not a hole).  Reasoning
is on globs (``glob.covers`` is sound), so every finding is real; some dead
rules may go unreported.

- a rule shadowed by an earlier rule of the same effect (the earlier one
  matches every name it matches and needs no more);
- an allow rule that can never allow: a deny rule without conditions covers
  it, its arguments schema is ``false``, or its claim tests contradict;
- a methods rule naming only methods decided elsewhere;
- scopes no configured issuer lists (when the issuers' scopes are known);
- known tools (e.g. from pin lock files) that no rule can ever allow;
- servers with no policy at all.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..config.yamlloc import Loc
from ..errors import Problem
from .decide import _rule_covers, is_destructive
from .model import ALLOW, DENY, KINDS, METHODS, TOOLS, WILDCARD, Destructive, PolicySet, Rule, ServerPolicy

# Methods the authz stage decides without looking at methods rules.
GOVERNED_ELSEWHERE = frozenset({
    "initialize", "ping", "server/discover", "tools/call", "tools/list", "resources/read",
    "resources/subscribe", "resources/unsubscribe", "resources/list", "resources/templates/list",
    "prompts/get", "prompts/list",
})
_RANK = {ALLOW: 0, "scopes": 1, DENY: 2}


def lint(policies: PolicySet, *, issuer_scopes: Iterable[str] | None = None,
         server_scopes: Mapping[str, Iterable[str]] | None = None,
         known_tools: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
         servers: Mapping[str, Any] | None = None) -> list[Problem]:
    """``issuer_scopes``: every scope the issuers list (None: unknown); ``server_scopes``: the
    scopes a mount publishes (RFC 9728 ``scopes_supported``), where configured."""
    problems: list[Problem] = []
    everywhere = frozenset(issuer_scopes) if issuer_scopes is not None else None
    for sp in policies.servers.values():
        published = (server_scopes or {}).get(sp.name)
        scopes = everywhere if published is None else frozenset(published) & (everywhere or frozenset(published))
        for kind in KINDS:
            _pairs(sp, sp.rules.get(kind, ()), problems)
        for rule in sp.all_rules():
            _never(rule, problems)
            if scopes is not None:
                _unknown_scopes(rule.loc, rule.id, _rule_scopes(rule), scopes, problems)
        if scopes is not None and sp.destructive.mode == "scopes":
            _unknown_scopes(sp.destructive.loc or sp.loc, f"servers.{sp.name}.destructive",
                            sp.destructive.scopes, scopes, problems)
    if servers is not None and WILDCARD not in policies.servers:
        for name, server in servers.items():
            if name not in policies.servers:
                problems.append(Problem(getattr(server, "loc", Loc("<config>", 1, 1)),
                                        f"server {name!r} has no policy: every tool, resource, prompt and "
                                        "method call to it is refused"))
    for server, tools in (known_tools or {}).items():
        sp = policies.servers.get(server) or policies.servers.get(WILDCARD)
        for tool in tools:
            name = tool.get("name")
            if isinstance(name, str) and (why := _tool_never_allowed(sp, name, tool.get("annotations"))):
                where = sp.loc if sp is not None else Loc("<policies>", 1, 1)
                problems.append(Problem(where, f"tool {name!r} of server {server!r} can never be allowed: {why}"))
    return problems


def _effective(rule: Rule, sp: ServerPolicy) -> Destructive:
    return rule.destructive or sp.destructive


def _conds(rule: Rule) -> set[tuple[str, str, Any]]:
    return {(c.claim, c.op, c.value) for c in rule.claims}


def _needs_no_more(a: Rule, b: Rule, sp: ServerPolicy) -> bool:
    """Does allow rule ``a`` ask no more of a call than ``b`` does?"""
    if not _conds(a) <= _conds(b):
        return False
    if a.schema is not None and a.schema != b.schema:
        return False
    if not set(a.scopes.all_of) <= set(b.scopes.all_of):
        return False
    if a.scopes.any_of and not (set(a.scopes.any_of) & set(b.scopes.all_of)
                                or (b.scopes.any_of and set(b.scopes.any_of) <= set(a.scopes.any_of))):
        return False
    if a.kind == TOOLS:
        da, db = _effective(a, sp), _effective(b, sp)
        if da.mode == "scopes" and db.mode == "scopes":
            return set(da.scopes) <= set(db.scopes)
        return _RANK[da.mode] <= _RANK[db.mode]
    return True


def _covers_rule(a: Rule, b: Rule) -> bool:
    return all(_rule_covers(a, g) for g in b.match)


def _pairs(sp: ServerPolicy, rules: tuple[Rule, ...], problems: list[Problem]) -> None:
    for j, later in enumerate(rules):
        for earlier in rules[:j]:
            if earlier.effect != later.effect or not _covers_rule(earlier, later):
                continue
            if later.effect == ALLOW and _needs_no_more(earlier, later, sp):
                problems.append(Problem(later.loc, f"rule {later.id!r} is shadowed by rule {earlier.id!r} "
                                        f"({earlier.loc}): it matches every name {later.id!r} matches and "
                                        "asks no more, so this rule never decides"))
                break
            if later.effect == DENY and _conds(earlier) <= _conds(later) and \
                    (earlier.schema is None or earlier.schema == later.schema):
                problems.append(Problem(later.loc, f"deny rule {later.id!r} is redundant: deny rule "
                                        f"{earlier.id!r} ({earlier.loc}) already refuses everything it refuses"))
                break
        if later.effect != ALLOW:
            continue
        for deny in rules:   # deny beats allow in any order
            if deny.effect == DENY and not deny.claims and deny.schema is None and _covers_rule(deny, later):
                problems.append(Problem(later.loc, f"rule {later.id!r} can never allow anything: deny rule "
                                        f"{deny.id!r} ({deny.loc}) refuses every name it matches"))
                break


def _contradiction(rule: Rule) -> str | None:
    by_claim: dict[str, list[Any]] = {}
    for c in rule.claims:
        by_claim.setdefault(c.claim, []).append(c)
    for claim, conds in by_claim.items():
        ops = {c.op: c.value for c in conds}
        if ops.get("present") is False and len(ops) > 1 and not set(ops) <= {"present", "not_in", "not_contains"}:
            return f"claim {claim!r} must be absent and also match a value"
        if "equals" in ops:
            v = ops["equals"]
            if "in" in ops and v not in ops["in"]:
                return f"claim {claim!r} equals {v!r}, which is not in {list(ops['in'])}"
            if "not_in" in ops and v in ops["not_in"]:
                return f"claim {claim!r} equals {v!r}, which not_in excludes"
        if "contains" in ops and "not_contains" in ops and ops["contains"] == ops["not_contains"]:
            return f"claim {claim!r} must both contain and not contain {ops['contains']!r}"
    return None


def _never(rule: Rule, problems: list[Problem]) -> None:
    if rule.schema is False and rule.effect == ALLOW:
        problems.append(Problem(rule.loc, f"rule {rule.id!r} can never allow anything: its arguments "
                                          "schema is false"))
    if (why := _contradiction(rule)) is not None:
        problems.append(Problem(rule.loc, f"rule {rule.id!r} can never apply: {why}"))
    if rule.kind == METHODS and all(g.is_literal and g.literal in GOVERNED_ELSEWHERE for g in rule.match):
        problems.append(Problem(rule.loc, f"rule {rule.id!r} has no effect: the methods it names are decided "
                                          "by tools/resources/prompts rules (or always allowed)"))


def _rule_scopes(rule: Rule) -> tuple[str, ...]:
    extra = rule.destructive.scopes if rule.destructive is not None else ()
    return rule.scopes.names() + extra


def _unknown_scopes(loc: Loc, what: str, needed: Iterable[str], known: frozenset[str],
                    problems: list[Problem]) -> None:
    missing = [s for s in needed if s not in known]
    if missing:
        problems.append(Problem(loc, f"{what} requires scope(s) neither the issuers nor the mount list: "
                                     f"{', '.join(missing)}"))


def _tool_never_allowed(sp: ServerPolicy | None, name: str, annotations: Any) -> str | None:
    if sp is None:
        return "the server has no policy"
    rules = sp.index[TOOLS].matching(name)
    for rule in rules:
        if rule.effect == DENY and not rule.claims and rule.schema is None:
            return f"deny rule {rule.id!r} ({rule.loc}) refuses it"
    destructive = is_destructive(annotations if isinstance(annotations, Mapping) else {})
    allows = [r for r in rules if r.effect == ALLOW]
    if not allows:
        if sp.default != ALLOW:
            return "no allow rule matches it and the server's default is deny"
        if destructive and sp.destructive.mode == DENY:
            return "it is destructive and the server's destructive setting is deny"
        return None
    for rule in allows:
        if rule.schema is False or _contradiction(rule):
            continue
        if destructive and _effective(rule, sp).mode == DENY:
            continue
        return None
    return ("every allow rule matching it refuses destructive tools" if destructive
            else "no allow rule matching it can apply")
