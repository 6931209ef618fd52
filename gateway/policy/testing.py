"""``mcp-gateway policy test``: YAML test cases run against the real decision function.

A test file::

    tools:                    # what the cases' servers offer (annotations matter)
      files:
        - {name: read_file, annotations: {readOnlyHint: true}}
    principals:               # optional named personas
      reader: {subject: ann, scopes: [files:read], claims: {groups: [eng]}}
    cases:
      - name: a reader can read shared files
        as: reader            # or principal: {...}; neither = anonymous
        server: files
        tool: read_file       # or resource: URI, prompt: NAME, method: NAME, list: tools
        arguments: {path: /srv/shared/a}
        expect: {decision: allow, rule: files-read}   # or just: allow / deny / step_up

``expect`` may also give ``reason`` and ``scopes`` (for step_up), or, for
``list: tools``, ``visible: [names]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..config.reader import Reader
from ..config.yamlloc import LDict, LList, Loc, load_file
from ..errors import Problem
from ..pipeline import ANONYMOUS, Principal
from .decide import ALLOWED, ANY, DENIED, REASONS, STEP_UP, UNKNOWN, Decision, decide
from .model import METHODS, PROMPTS, RESOURCES, TOOLS, WILDCARD, PolicySet, plain

DEFAULT_ISSUER = "https://issuer.policy-test"
_TARGETS = {"tool": TOOLS, "resource": RESOURCES, "prompt": PROMPTS, "method": METHODS}


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    loc: Loc
    server: str
    kind: str
    target: str
    principal: Principal
    arguments: Any
    annotations: Any
    listing: bool
    expect: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    case: Case
    ok: bool
    got: str
    failures: tuple[str, ...] = ()


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failed and bool(self.outcomes)


def find_test_files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            out.extend(sorted(os.path.join(path, n) for n in os.listdir(path)
                              if n.endswith((".yaml", ".yml")) and not n.startswith(".")))
        else:
            out.append(path)
    return out


def principal_from(r: Reader) -> Principal:
    subject = r.str("subject", "policy-test-user") or "policy-test-user"
    issuer = r.str("issuer", DEFAULT_ISSUER) or DEFAULT_ISSUER
    client_id = r.str("client_id", "") or ""
    r.seen.add("scopes")
    raw = r.node.get("scopes", ())
    if isinstance(raw, str):
        scopes = frozenset(raw.split())
    elif isinstance(raw, (list, tuple)) and all(isinstance(s, str) for s in raw):
        scopes = frozenset(raw)
    else:
        r.error("scopes", "scopes must be a list of strings or a space-separated string")
        scopes = frozenset()
    claims = plain(r.raw("claims", {}))
    if not isinstance(claims, dict):
        r.error("claims", "claims must be a mapping")
        claims = {}
    r.done()
    return Principal(issuer=issuer, subject=subject, client_id=client_id, scopes=scopes,
                     claims=claims, name=subject)


def parse_tests(path: str, problems: list[Problem]) -> tuple[list[Case], dict[str, list[dict[str, Any]]]]:
    node, file_problems = load_file(path)
    problems.extend(file_problems)
    if node is None:
        return [], {}
    top = Reader(node, problems, "", Loc(path, 1, 1))
    catalogs: dict[str, list[dict[str, Any]]] = {}
    tools = top.mapping("tools")
    for server in list(tools.node):
        tools.seen.add(server)
        items = tools.node[server]
        if not isinstance(items, LList) or not all(isinstance(t, LDict) and isinstance(t.get("name"), str)
                                                   for t in items):
            tools.error(server, f"tools.{server} must be a list of tool definitions with a name")
            continue
        catalogs[server] = plain(items)
    personas: dict[str, Principal] = {}
    people = top.mapping("principals")
    for name in list(people.node):
        people.seen.add(name)
        personas[name] = principal_from(Reader(people.node[name], problems, f"principals.{name}", people.at(name)))
    cases = []
    items = top.list("cases", required=True)
    for i, item in enumerate(items):
        case = _case(Reader(item, problems, f"cases[{i}]", items.at(i)), personas, catalogs)
        if case is not None:
            cases.append(case)
    top.done()
    return cases, catalogs


def _case(r: Reader, personas: dict[str, Principal], catalogs: dict[str, list[dict[str, Any]]]) -> Case | None:
    before = len(r.problems)
    name = r.str("name", required=True) or "?"
    server = r.str("server", required=True) or ""
    persona = r.str("as")
    if persona is not None and persona not in personas:
        r.error("as", f"unknown principal {persona!r}; define it under principals:")
    principal = personas.get(persona or "", ANONYMOUS)
    if r.has("principal"):
        principal = principal_from(r.mapping("principal"))
    else:
        r.seen.add("principal")
    listing = r.str("list", choices=("tools",)) is not None
    targets = [(k, r.str(k)) for k in _TARGETS]
    given = [(k, v) for k, v in targets if v is not None]
    if len(given) + listing != 1:
        r.error(None, f"{r.path} needs exactly one of tool, resource, prompt, method or list")
        return None
    kind, target = (TOOLS, "") if listing else (_TARGETS[given[0][0]], given[0][1])
    arguments = plain(r.raw("arguments")) if r.has("arguments") else (ANY if listing else None)
    annotations: Any = UNKNOWN
    if r.has("annotations"):
        annotations = plain(r.raw("annotations"))
    elif kind == TOOLS and not listing:
        r.seen.add("annotations")
        tool = next((t for t in catalogs.get(server, ()) if t.get("name") == target), None)
        annotations = (tool.get("annotations") or {}) if tool is not None else UNKNOWN
    expect = _expect(r, listing)
    r.done()
    if len(r.problems) > before or expect is None:
        return None
    return Case(name, r.loc, server, kind, target, principal, arguments, annotations, listing, expect)


def _expect(r: Reader, listing: bool) -> dict[str, Any] | None:
    r.seen.add("expect")
    value = r.node.get("expect")
    if isinstance(value, str) and not listing:
        if value not in (ALLOWED, DENIED, STEP_UP):
            r.error("expect", f"{r.path}.expect must be one of allow, deny, step_up; got {value!r}")
            return None
        return {"decision": value}
    if not isinstance(value, dict):
        r.error("expect" if r.has("expect") else None,
                "expect is required: allow, deny, step_up, or a mapping with decision/rule/reason/scopes"
                + ("/visible" if listing else ""))
        return None
    e = Reader(value, r.problems, f"{r.path}.expect", r.at("expect"))
    out: dict[str, Any] = {}
    if listing:
        out["visible"] = list(e.str_list("visible", required=True))
    else:
        decision = e.str("decision", required=True, choices=(ALLOWED, DENIED, STEP_UP))
        out["decision"] = decision
        if e.has("rule"):
            out["rule"] = e.raw("rule")
        if e.has("reason"):
            out["reason"] = e.str("reason", choices=sorted(REASONS))
        if e.has("scopes"):
            out["scopes"] = list(e.str_list("scopes"))
        if e.has("limits"):
            out["limits"] = _expected_limits(e)
    e.done()
    return out


def _expected_limits(e: Reader) -> list[dict[str, Any]]:
    """``expect.limits``: the limits that apply to the call, each ``{id[, key, limit, per, burst,
    concurrency]}`` (fields given are compared with the limit's; the first window's quota)."""
    out = []
    items = e.list("limits")
    for i, node in enumerate(items):
        r = Reader(node, e.problems, f"{e.path}.limits[{i}]", items.at(i))
        want: dict[str, Any] = {"id": r.str("id", required=True)}
        if r.has("key"):
            want["key"] = list(r.str_list("key"))
        for field in ("limit", "burst", "concurrency"):
            if r.has(field):
                want[field] = r.int(field)
        if r.has("per"):
            want["per"] = r.duration("per", 0.0)
        r.done()
        out.append(want)
    return out


def _limit_failures(policies: PolicySet, case: "Case") -> list[str]:
    sp = policies.servers.get(case.server) or policies.servers.get(WILDCARD)
    method = "tools/call" if case.kind == TOOLS else (case.target if case.kind == "methods" else None)
    tool = case.target if case.kind == TOOLS else None
    applying = {lim.id: lim for lim in (sp.limits if sp is not None else ()) if lim.applies(method, tool)}
    want = case.expect["limits"]
    failures = []
    if sorted(applying) != sorted(w["id"] for w in want):
        failures.append(f"limits: expected {sorted(w['id'] for w in want)}, got {sorted(applying)}")
    for w in want:
        lim = applying.get(w["id"])
        if lim is None:
            continue
        window = lim.windows[0] if lim.windows else None
        got = {"key": list(lim.key), "concurrency": lim.concurrency,
               "limit": window.limit if window else None, "per": window.per if window else None,
               "burst": window.burst if window else None}
        for field, value in w.items():
            if field != "id" and got[field] != value:
                failures.append(f"limit {w['id']} {field}: expected {value!r}, got {got[field]!r}")
    return failures


def _check(case: Case, d: Decision) -> list[str]:
    want = case.expect
    failures = []
    if want["decision"] != d.effect:
        failures.append(f"decision: expected {want['decision']}, got {d.effect} ({d.reason})")
    if "rule" in want and want["rule"] != (d.rules[0] if d.rules else None):
        failures.append(f"rule: expected {want['rule']!r}, got {(d.rules[0] if d.rules else None)!r}")
    if "reason" in want and want["reason"] != d.reason:
        failures.append(f"reason: expected {want['reason']}, got {d.reason}")
    if "scopes" in want and sorted(want["scopes"]) != sorted(d.scopes):
        failures.append(f"scopes: expected {sorted(want['scopes'])}, got {sorted(d.scopes)}")
    return failures


def run_case(policies: PolicySet, case: Case, catalogs: dict[str, list[dict[str, Any]]]) -> Outcome:
    if case.listing:
        visible = [t["name"] for t in catalogs.get(case.server, ())
                   if decide(policies, case.server, TOOLS, t["name"], case.principal, ANY,
                             t.get("annotations") or {}).allowed]
        want = case.expect["visible"]
        ok = sorted(visible) == sorted(want)
        return Outcome(case, ok, f"visible {visible}", () if ok else (f"visible: expected {sorted(want)}, "
                                                                       f"got {sorted(visible)}",))
    d = decide(policies, case.server, case.kind, case.target, case.principal, case.arguments, case.annotations)
    failures = _check(case, d)
    if "limits" in case.expect:
        failures += _limit_failures(policies, case)
    got = f"{d.effect} ({d.reason}{', rule ' + d.rules[0] if d.rules else ''})"
    return Outcome(case, not failures, got, tuple(failures))


def run_tests(policies: PolicySet, paths: list[str], known_servers: set[str] | None = None) -> Report:
    report = Report()
    for path in find_test_files(paths):
        cases, catalogs = parse_tests(path, report.problems)
        for case in cases:
            if known_servers is not None and case.server not in known_servers:
                report.problems.append(Problem(case.loc, f"unknown server {case.server!r}"))
                continue
            report.outcomes.append(run_case(policies, case, catalogs))
    return report
