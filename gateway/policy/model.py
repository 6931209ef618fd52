"""The policy set as frozen objects: built once per (re)load, never mutated.

A ``PolicySet`` maps server names to a ``ServerPolicy``; each holds, per kind
(tools, resources, prompts, methods), its rules in file order.  Every rule
keeps its id and ``file:line`` so decisions, audit records and ``check``
output can point at it.  The only mutable thing here is the per-index match
cache, which memoises a pure function of the (immutable) rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config.yamlloc import Loc
from .glob import Glob

TOOLS, RESOURCES, PROMPTS, METHODS = "tools", "resources", "prompts", "methods"
KINDS = (TOOLS, RESOURCES, PROMPTS, METHODS)
ALLOW, DENY = "allow", "deny"
WILDCARD = "*"    # the server section that applies to servers without one of their own
# Bound on memoised name -> rules lookups per kind: names are client-chosen,
# so the cache must not grow with whatever a client sends.
MATCH_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class ScopeReq:
    """Scopes a rule needs: every one of ``all_of`` and, if given, one of ``any_of``."""

    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return self.all_of + self.any_of


@dataclass(frozen=True, slots=True)
class ClaimCond:
    """One test on one claim: ``op`` is equals, in, contains, contains_any, not_in, not_contains, present."""

    claim: str
    op: str
    value: Any
    loc: Loc


@dataclass(frozen=True, slots=True)
class Destructive:
    """What a destructive tool needs: ``allow`` (nothing extra), ``deny``, or extra ``scopes``."""

    mode: str
    scopes: tuple[str, ...] = ()
    loc: Loc | None = None


DESTRUCTIVE_DENY = Destructive("deny")


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    id: str
    server: str
    kind: str
    effect: str
    match: tuple[Glob, ...]
    loc: Loc
    order: int
    scopes: ScopeReq = ScopeReq()
    claims: tuple[ClaimCond, ...] = ()
    schema: Any = None            # the JSON Schema as plain data (None: no constraint)
    validator: Any = None         # compiled jsonschema validator for ``schema`` (messages, fallback)
    check: Any = None             # fast yes/no for ``schema`` (fastschema), or validator.is_valid
    destructive: Destructive | None = None
    description: str = ""

    def matches(self, name: str) -> bool:
        return any(g.regex.fullmatch(name) is not None for g in self.match)


class RuleIndex:
    """Rules of one kind for one server: exact names in a dict, glob rules scanned in order."""

    __slots__ = ("rules", "_exact", "_globs", "_cache")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        exact: dict[str, list[Rule]] = {}
        globs: list[tuple[Any, Rule]] = []
        for rule in rules:
            if all(g.is_literal for g in rule.match):
                for g in rule.match:
                    bucket = exact.setdefault(g.literal, [])
                    if rule not in bucket:
                        bucket.append(rule)
            else:
                # One regex per rule: a single fullmatch call however many globs it lists.
                union = "|".join(f"(?:{g.regex.pattern})" for g in rule.match)
                globs.append((re.compile(union, re.DOTALL).fullmatch, rule))
        self._exact = {k: tuple(v) for k, v in exact.items()}
        self._globs = tuple(globs)
        self._cache: dict[str, tuple[Rule, ...]] = {}

    def matching(self, name: str) -> tuple[Rule, ...]:
        """Every rule whose globs match ``name``, in file order."""
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        found = list(self._exact.get(name, ()))
        found.extend(rule for fullmatch, rule in self._globs if fullmatch(name) is not None)
        if len(found) > 1:
            found.sort(key=_order)
        result = tuple(found)
        if len(self._cache) >= MATCH_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]   # oldest first; O(1), no pause
        self._cache[name] = result
        return result


def _order(rule: Rule) -> int:
    return rule.order


@dataclass(frozen=True, slots=True, eq=False)
class ServerPolicy:
    name: str
    loc: Loc
    default: str = DENY                          # for tools, resources, prompts; methods are allow-list only
    destructive: Destructive = DESTRUCTIVE_DENY
    rules: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    index: Mapping[str, RuleIndex] = field(default_factory=dict)
    limits: tuple[Any, ...] = ()                 # gateway.ratelimit.model.Limit, in file order

    def all_rules(self) -> tuple[Rule, ...]:
        return tuple(sorted((r for k in KINDS for r in self.rules.get(k, ())), key=lambda r: r.order))


@dataclass(frozen=True, slots=True, eq=False)
class PolicySet:
    servers: Mapping[str, ServerPolicy]
    files: tuple[str, ...] = ()
    digest: str = ""
    rules_by_id: Mapping[str, Rule] = field(default_factory=dict)

    @property
    def rule_count(self) -> int:
        return len(self.rules_by_id)


EMPTY = PolicySet(servers={})


def plain(value: Any) -> Any:
    """LDict/LList (and tuples) as plain dicts and lists, for JSON Schema and comparisons."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
