"""The decision function: one call, one answer, used for calls *and* lists.

``decide`` answers for one (server, kind, name, principal, arguments).  List
filtering calls it with ``arguments=ANY`` (a listed tool is one the caller may
call with some arguments), so ``tools/list`` and ``tools/call`` cannot
disagree.  The algorithm, in order:

1. No policy for the server (its own section, else the ``"*"`` section),
   or a resource URI with dot segments: deny.
2. A deny rule whose name, claims and (when given) arguments match: deny.
   Deny beats allow whatever the order.  A condition that cannot be
   evaluated (e.g. ``contains`` on a claim that is not a list) counts as met.
3. The first allow rule, in file order, whose name, claims, arguments and
   scopes (plus the destructive-tool requirement) are all satisfied: allow.
4. Otherwise, if some allow rule would allow this exact call with more
   scopes: step up (403 ``insufficient_scope`` naming every scope it needs).
5. Otherwise, if no allow rule matched the name and the server's default is
   ``allow`` (tools, resources, prompts only): allow, destructive rule applied.
6. Otherwise deny; the reason says which condition failed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote

from jsonschema.exceptions import best_match

from .glob import _seq_covers, intersects, template_glob
from .model import ALLOW, DENY, METHODS, RESOURCES, TOOLS, WILDCARD, Destructive, PolicySet, Rule, ScopeReq

ALLOWED, DENIED, STEP_UP = "allow", "deny", "step_up"

# Reasons: a closed set (audit field, metric label, test expectations).
RULE_ALLOWS = "rule_allows"
DEFAULT_ALLOW = "default_allow"
NO_MATCHING_RULE = "no_matching_rule"
NO_POLICY = "no_policy"
DENY_RULE = "deny_rule"
CLAIMS_NOT_MET = "claims_not_met"
NOT_EVALUABLE = "not_evaluable"
MISSING_SCOPES = "missing_scopes"
ARGUMENTS_INVALID = "arguments_invalid"
DESTRUCTIVE_DENIED = "destructive_denied"
URI_NOT_CANONICAL = "uri_not_canonical"
REASONS = frozenset({RULE_ALLOWS, DEFAULT_ALLOW, NO_MATCHING_RULE, NO_POLICY, DENY_RULE, CLAIMS_NOT_MET,
                     NOT_EVALUABLE, MISSING_SCOPES, ARGUMENTS_INVALID, DESTRUCTIVE_DENIED,
                     URI_NOT_CANONICAL})


class _Any:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()          # arguments not known (list filtering): argument constraints assumed satisfiable
UNKNOWN: Any = None        # tool annotations not known: the tool is treated as destructive
_MISSING = object()
_MAX_DETAIL = 300


@dataclass(frozen=True, slots=True)
class Decision:
    effect: str
    reason: str
    rules: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()      # step_up: every scope the call needs
    detail: str = ""                  # arguments_invalid: what failed (safe to show the caller)

    @property
    def allowed(self) -> bool:
        return self.effect == ALLOWED


@dataclass(frozen=True, slots=True)
class Step:
    """One line of ``policy explain``: a rule considered and what came of it."""

    rule: Rule | None
    outcome: str
    detail: str = ""


def is_destructive(annotations: Mapping[str, Any] | None) -> bool:
    """MCP defaults: ``readOnlyHint`` false and ``destructiveHint`` true unless the tool says otherwise."""
    if annotations is None or not isinstance(annotations, (dict, Mapping)):
        return True
    if annotations.get("readOnlyHint") is True:
        return False
    return annotations.get("destructiveHint") is not False


_SEGMENT = re.compile(r"[/\\]")


def uri_is_canonical(uri: str) -> bool:
    """No ``.``/``..`` segments, backslashes or NULs, even percent-encoded (path traversal past a glob)."""
    text = uri
    for _ in range(3):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    else:
        return False   # still changing after three rounds: nested encoding, refuse
    if "\\" in text or "\x00" in text:
        return False
    return not any(seg in (".", "..") for seg in _SEGMENT.split(text))


def claim_value(principal: Any, name: str) -> Any:
    if name == "client_id":
        return principal.client_id or _MISSING
    if name == "iss":
        return principal.issuer or _MISSING
    if name == "sub":
        return principal.subject if principal.issuer else _MISSING
    claims = principal.claims
    if name in claims:
        return claims[name]
    if "." in name:   # nested claims, e.g. realm_access.roles
        node: Any = claims
        for part in name.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _MISSING
            node = node[part]
        return node
    return _MISSING


def _same(a: Any, b: Any) -> bool:
    # 1 == True in Python; a claim true must not satisfy "in: [1]".
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool))


def _test(op: str, want: Any, actual: Any) -> bool | None:
    """True/False, or None when the claim has a shape the test cannot evaluate."""
    if op == "present":
        return (actual is not _MISSING) == want
    if actual is _MISSING:
        return op in ("not_in", "not_contains")
    if op in ("equals", "in", "not_in"):
        if not _scalar(actual):
            return None
        if op == "equals":
            return _same(actual, want)
        hit = any(_same(actual, w) for w in want)
        return hit if op == "in" else not hit
    if not isinstance(actual, (list, tuple)):
        return None
    if op == "contains":
        return any(_same(a, want) for a in actual)
    if op == "not_contains":
        return not any(_same(a, want) for a in actual)
    return any(_same(a, w) for a in actual for w in want)   # contains_any


def claims_hold(rule: Rule, principal: Any) -> bool | None:
    result: bool | None = True
    for cond in rule.claims:
        r = _test(cond.op, cond.value, claim_value(principal, cond.claim))
        if r is False:
            return False
        if r is None:
            result = None
    return result


def arguments_match(rule: Rule, arguments: Any, *, detail: bool = True) -> tuple[bool | None, str]:
    """Whether ``arguments`` satisfy the rule's schema; ``detail`` explains a mismatch.

    Deny rules ask without ``detail``: not matching is their common case, and
    jsonschema's error search costs ~30x the yes/no check.
    """
    args = {} if arguments is None else arguments
    try:
        if rule.check(args):
            return True, ""
        if not detail:
            return False, ""
        err = best_match(rule.validator.iter_errors(args))
        where = "/".join(str(p) for p in err.absolute_path) if err is not None else ""
        msg = (f"{where}: {err.message}" if where else err.message) if err is not None else "invalid"
        return False, msg[:_MAX_DETAIL]
    except Exception:   # a constraint that cannot be evaluated denies (fail closed)
        return None, "arguments could not be checked"


def needed_scopes(req: ScopeReq, have: frozenset[str]) -> tuple[tuple[str, ...], bool]:
    """(every scope the rule needs, whether some are missing).  For ``any_of`` the held one, else the first."""
    need = req.all_of
    missing = not have.issuperset(need)
    if req.any_of:
        held = next((s for s in req.any_of if s in have), None)
        if held is None:
            held, missing = req.any_of[0], True
        need = need + (held,)
    return need, missing


def _destructive_need(d: Destructive, annotations: Any, have: frozenset[str]) -> tuple[bool, tuple[str, ...], bool]:
    """(denied outright, extra scopes needed, some missing) for a tool under ``d``."""
    if d.mode == ALLOW or not is_destructive(annotations):
        return False, (), False
    if d.mode == DENY:
        return True, (), False
    return False, d.scopes, not have.issuperset(d.scopes)


def _merge(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return a + tuple(s for s in b if s not in a) if b else a


# Decisions that name one rule and nothing else, shared (Decision is frozen): building a
# frozen dataclass costs more than the rest of an allow.  Keyed by (effect, reason, rule
# id); rule ids come from the policy files, and the cache is cleared if it ever grows.
_BY_RULE: dict[tuple[str, str, str], Decision] = {}
_NO_POLICY = Decision(DENIED, NO_POLICY)
_URI_NOT_CANONICAL = Decision(DENIED, URI_NOT_CANONICAL)
_NOT_EVALUABLE = Decision(DENIED, NOT_EVALUABLE)
# Shared, like the rule decisions: the authz stage memoises its audit fields per Decision
# object, so a fresh one per call missed that memo on every refusal (found by bench.soak).
_NO_MATCH = Decision(DENIED, NO_MATCHING_RULE)
_DEFAULT_ALLOW = Decision(ALLOWED, DEFAULT_ALLOW)
_DESTRUCTIVE_DENIED = Decision(DENIED, DESTRUCTIVE_DENIED)


_ALLOWS: dict[str, Decision] = {}     # rule id -> Decision(ALLOWED, RULE_ALLOWS, (id,)), the common answer


def _by_rule(effect: str, reason: str, rule_id: str) -> Decision:
    key = (effect, reason, rule_id)
    d = _BY_RULE.get(key)
    if d is None:
        if len(_BY_RULE) >= 4096:
            _BY_RULE.clear()
            _ALLOWS.clear()
        d = _BY_RULE[key] = Decision(effect, reason, (rule_id,))
        if effect == ALLOWED and reason == RULE_ALLOWS:
            _ALLOWS[rule_id] = d
    return d


def decide(policies: PolicySet, server: str, kind: str, name: str, principal: Any,
           arguments: Any = ANY, annotations: Any = UNKNOWN, trace: list[Step] | None = None) -> Decision:
    """Decide one call (or, with ``arguments=ANY``, whether to list ``name``).

    This runs on every call: the helpers above are inlined where the common case
    (no claims, no scopes, a passing argument check) would only pay for the call.
    """
    sp = policies.servers.get(server) or policies.servers.get(WILDCARD)
    if sp is None:
        return _NO_POLICY
    if kind == RESOURCES and not uri_is_canonical(name):
        return _URI_NOT_CANONICAL
    rules = sp.index[kind].matching(name)
    have = principal.scopes
    args = {} if arguments is None else arguments

    for rule in rules:
        if rule.effect != DENY:
            continue
        held = claims_hold(rule, principal) if rule.claims else True
        if held is False:
            if trace is not None:
                trace.append(Step(rule, "skipped", "claims do not match"))
            continue
        if rule.validator is not None:
            if arguments is ANY:
                if trace is not None:
                    trace.append(Step(rule, "skipped", "applies only to some arguments"))
                continue
            try:    # arguments_match(detail=False), inlined
                ok: bool | None = True if rule.check(args) else False
            except Exception:   # a constraint that cannot be evaluated counts as met (fail closed)
                ok = None
            if ok is False:
                if trace is not None:
                    trace.append(Step(rule, "skipped", "arguments do not match"))
                continue
            if ok is None:
                held = None
        if trace is not None:
            trace.append(Step(rule, "denies", "a condition could not be evaluated" if held is None else ""))
        return _by_rule(DENIED, DENY_RULE if held else NOT_EVALUABLE, rule.id)

    step_up: Decision | None = None
    refusal: Decision | None = None
    matched_allow = False
    for rule in rules:
        if rule.effect != ALLOW:
            continue
        matched_allow = True
        held = claims_hold(rule, principal) if rule.claims else True
        if held is not True:
            why = CLAIMS_NOT_MET if held is False else NOT_EVALUABLE
            refusal = refusal or Decision(DENIED, why, (rule.id,))
            if trace is not None:
                trace.append(Step(rule, "skipped", "claims do not match" if held is False
                                  else "a claim condition could not be evaluated"))
            continue
        if rule.validator is not None and arguments is not ANY:
            try:
                passed = rule.check(args)
            except Exception:
                passed = False
            if not passed:      # the detail (jsonschema's error search) only on refusal
                ok, detail = arguments_match(rule, arguments)
                if ok is not True:
                    if refusal is None or refusal.reason != ARGUMENTS_INVALID:
                        refusal = Decision(DENIED, ARGUMENTS_INVALID if ok is False else NOT_EVALUABLE,
                                           (rule.id,), detail=detail)
                    if trace is not None:
                        trace.append(Step(rule, "skipped", f"arguments: {detail}"))
                    continue
        req = rule.scopes
        if req.all_of or req.any_of:
            need, missing = needed_scopes(req, have)
        else:
            need, missing = (), False
        if kind == TOOLS:
            d = rule.destructive or sp.destructive
            # _destructive_need, inlined (a dict saying readOnlyHint: true is the usual tool)
            if d.mode != ALLOW and not (annotations.__class__ is dict and annotations.get("readOnlyHint") is True) \
                    and is_destructive(annotations):
                if d.mode == DENY:
                    refusal = refusal or Decision(DENIED, DESTRUCTIVE_DENIED, (rule.id,))
                    if trace is not None:
                        trace.append(Step(rule, "skipped", "destructive tool and destructive: deny"))
                    continue
                need, missing = _merge(need, d.scopes), missing or not have.issuperset(d.scopes)
        if missing:
            if step_up is None:
                step_up = Decision(STEP_UP, MISSING_SCOPES, (rule.id,), scopes=need)
            if trace is not None:
                trace.append(Step(rule, "skipped", "missing scopes: " + " ".join(s for s in need if s not in have)))
            continue
        if trace is not None:
            trace.append(Step(rule, "allows"))
        return _ALLOWS.get(rule.id) or _by_rule(ALLOWED, RULE_ALLOWS, rule.id)

    if step_up is not None:
        return step_up
    if not matched_allow and kind != METHODS and sp.default == ALLOW:
        if kind == TOOLS:
            denied, extra, missing = _destructive_need(sp.destructive, annotations, have)
            if denied:
                return _DESTRUCTIVE_DENIED
            if missing:
                return Decision(STEP_UP, MISSING_SCOPES, scopes=extra)
        return _DEFAULT_ALLOW
    return refusal or _NO_MATCH


def _rule_covers(rule: Rule, g: Any) -> bool:
    return all(any(_seq_covers(x, y) for m in rule.match for x in m.alternatives) for y in g.alternatives)


def decide_template(policies: PolicySet, server: str, uri_template: str, principal: Any,
                    trace: list[Step] | None = None) -> Decision:
    """Whether to list a resource template: could this caller read some URI it expands to?

    Exact for the usual shapes, conservative otherwise: a template is hidden
    when a deny rule that applies to the caller covers every expansion, or
    when no allow rule the caller passes can match any expansion (and the
    default would not allow it).
    """
    sp = policies.servers.get(server) or policies.servers.get(WILDCARD)
    if sp is None:
        return _NO_POLICY
    g = template_glob(uri_template)
    if g is None:                       # past the glob bounds: nothing to reason about, so hidden
        return _NOT_EVALUABLE
    rules = sp.index[RESOURCES].rules
    for rule in rules:
        if rule.effect == DENY and claims_hold(rule, principal) is not False and _rule_covers(rule, g):
            if trace is not None:
                trace.append(Step(rule, "denies", "covers every URI the template expands to"))
            return Decision(DENIED, DENY_RULE, (rule.id,))
    governed = False
    for rule in rules:
        if rule.effect != ALLOW or not any(intersects(m, g) for m in rule.match):
            continue
        governed = governed or _rule_covers(rule, g)
        if claims_hold(rule, principal) is True and not needed_scopes(rule.scopes, principal.scopes)[1]:
            if trace is not None:
                trace.append(Step(rule, "allows", "allows some URI the template expands to"))
            return Decision(ALLOWED, RULE_ALLOWS, (rule.id,))
    if not governed and sp.default == ALLOW:
        return Decision(ALLOWED, DEFAULT_ALLOW)
    return Decision(DENIED, NO_MATCHING_RULE)
