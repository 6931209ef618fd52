"""Table-driven tests of the decision function: every rule feature, one row each."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.pipeline import ANONYMOUS, Principal
from gateway.policy.decide import ANY, UNKNOWN, decide, decide_template, uri_is_canonical
from gateway.policy.load import load_policies

POLICY = textwrap.dedent("""\
    servers:
      s:
        default: deny
        destructive: {scopes: [admin]}
        tools:
          - {id: exact, match: read_file, scopes: [read]}
          - {id: star, match: "list_*", scopes: "read"}
          - {id: alt, match: "{get,fetch}_?", scopes: [read]}
          - {id: escaped, match: "odd\\\\*name"}
          - id: any-of
            match: team_tool
            scopes: {all_of: [base], any_of: [team:a, team:b]}
          - {id: eq, match: eq_tool, claims: {role: {equals: owner}}}
          - {id: in, match: in_tool, claims: {client_id: {in: [cli-a, cli-b]}}}
          - {id: not-in, match: notin_tool, claims: {client_id: {not_in: [bad-bot]}}}
          - {id: contains, match: sre_tool, claims: {groups: {contains: sre}}}
          - {id: not-contains, match: nc_tool, claims: {groups: {not_contains: contractors}}}
          - {id: contains-any, match: ca_tool, claims: {groups: {contains_any: [a, b]}}}
          - {id: present, match: pr_tool, claims: {email: {present: true}}}
          - {id: absent, match: ab_tool, claims: {act: {present: false}}}
          - {id: nested, match: nested_tool, claims: {realm_access.roles: {contains: admin}}}
          - {id: bool-claim, match: bool_tool, claims: {mfa: {equals: true}}}
          - {id: sub, match: sub_tool, claims: {sub: {equals: alice}, iss: {equals: "https://iss"}}}
          - id: args
            match: write_file
            scopes: [write]
            arguments:
              type: object
              required: [path]
              properties: {path: {type: string, pattern: "^/srv/shared/"}}
          - {id: args-admin, match: write_file, scopes: [write, root]}
          - id: args-only
            match: edit_file
            arguments: {type: object, required: [path], properties: {path: {const: /tmp/x}}}
          - {id: deny-late, effect: deny, match: read_file, claims: {blocked: {equals: true}}}
          - id: deny-args
            effect: deny
            match: "list_*"
            arguments: {type: object, required: [secret]}
          - {id: deny-noeval, effect: deny, match: "list_*", claims: {groups: {contains: bad}}}
          - {id: destroy, match: drop_table, scopes: [dba]}
          - {id: destroy-ok, match: drop_view, scopes: [dba], destructive: allow}
          - {id: destroy-never, match: drop_db, scopes: [dba], destructive: deny}
          - {id: destroy-own, match: drop_index, scopes: [dba], destructive: {scopes: [dba:destructive]}}
        resources:
          - {id: shared, match: "file:///srv/shared/**", scopes: [read]}
          - {id: notes, match: "notes://*"}
          - {id: no-secrets, effect: deny, match: "file:///srv/shared/secret/**"}
        prompts:
          - id: prompt
            match: greet
            arguments: {type: object, properties: {name: {type: string, maxLength: 5}}}
        methods:
          - {id: completion, match: completion/complete, scopes: [read]}
      open:
        default: allow
        destructive: {scopes: [admin]}
        tools:
          - {id: open-guarded, match: guarded, scopes: [special]}
          - {id: open-deny, effect: deny, match: forbidden}
      "*":
        default: deny
        tools:
          - {id: fallback, match: "**", destructive: allow}
    """)

RO = {"readOnlyHint": True}


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = Path(tmp_path_factory.mktemp("policy")) / "p.yaml"
    path.write_text(POLICY)
    ps, problems = load_policies(str(path), ["s", "open", "other"])
    assert problems == []
    return ps


def who(*scopes: str, client_id: str = "", subject: str = "u", issuer: str = "https://iss", **claims: Any) -> Principal:
    return Principal(issuer=issuer, subject=subject, client_id=client_id, scopes=frozenset(scopes), claims=claims)


# (test id, server, kind, name, principal, arguments, annotations) -> (effect, reason, rule, scopes)
CASES = [
    # names: exact, glob, alternation, '?', escapes
    ("exact name", "s", "tools", "read_file", who("read"), {}, RO, ("allow", "rule_allows", "exact", ())),
    ("star glob", "s", "tools", "list_users", who("read"), {}, RO, ("allow", "rule_allows", "star", ())),
    ("star stops at slash", "s", "tools", "list_a/b", who("read"), {}, RO, ("deny", "no_matching_rule", None, ())),
    ("alternation and ?", "s", "tools", "fetch_x", who("read"), {}, RO, ("allow", "rule_allows", "alt", ())),
    ("? is one character", "s", "tools", "fetch_xy", who("read"), {}, RO, ("deny", "no_matching_rule", None, ())),
    ("escaped star is literal", "s", "tools", "odd*name", who(), {}, RO, ("allow", "rule_allows", "escaped", ())),
    ("escaped star matches only itself", "s", "tools", "oddXname", who(), {}, RO, ("deny", "no_matching_rule", None, ())),
    ("no rule: default deny", "s", "tools", "unknown", who("read", "admin"), {}, RO, ("deny", "no_matching_rule", None, ())),
    # scopes
    ("missing scope: step up", "s", "tools", "read_file", who(), {}, RO, ("step_up", "missing_scopes", "exact", ("read",))),
    ("scope string form", "s", "tools", "list_x", who(), {}, RO, ("step_up", "missing_scopes", "star", ("read",))),
    ("any_of: one held", "s", "tools", "team_tool", who("base", "team:b"), {}, RO, ("allow", "rule_allows", "any-of", ())),
    ("any_of: none held names the first", "s", "tools", "team_tool", who("base"), {}, RO,
     ("step_up", "missing_scopes", "any-of", ("base", "team:a"))),
    ("any_of: held one is named with missing all_of", "s", "tools", "team_tool", who("team:b"), {}, RO,
     ("step_up", "missing_scopes", "any-of", ("base", "team:b"))),
    # claims
    ("equals", "s", "tools", "eq_tool", who(role="owner"), {}, RO, ("allow", "rule_allows", "eq", ())),
    ("equals fails", "s", "tools", "eq_tool", who(role="guest"), {}, RO, ("deny", "claims_not_met", "eq", ())),
    ("in (client_id)", "s", "tools", "in_tool", who(client_id="cli-b"), {}, RO, ("allow", "rule_allows", "in", ())),
    ("in fails", "s", "tools", "in_tool", who(client_id="cli-c"), {}, RO, ("deny", "claims_not_met", "in", ())),
    ("not_in", "s", "tools", "notin_tool", who(client_id="good"), {}, RO, ("allow", "rule_allows", "not-in", ())),
    ("not_in fails", "s", "tools", "notin_tool", who(client_id="bad-bot"), {}, RO, ("deny", "claims_not_met", "not-in", ())),
    ("not_in on an absent claim holds", "s", "tools", "notin_tool", who(), {}, RO, ("allow", "rule_allows", "not-in", ())),
    ("contains", "s", "tools", "sre_tool", who(groups=["eng", "sre"]), {}, RO, ("allow", "rule_allows", "contains", ())),
    ("contains absent claim", "s", "tools", "sre_tool", who(), {}, RO, ("deny", "claims_not_met", "contains", ())),
    ("contains on a string cannot be evaluated", "s", "tools", "sre_tool", who(groups="sre"), {}, RO,
     ("deny", "not_evaluable", "contains", ())),
    ("not_contains", "s", "tools", "nc_tool", who(groups=["eng"]), {}, RO, ("allow", "rule_allows", "not-contains", ())),
    ("not_contains fails", "s", "tools", "nc_tool", who(groups=["contractors"]), {}, RO,
     ("deny", "claims_not_met", "not-contains", ())),
    ("contains_any", "s", "tools", "ca_tool", who(groups=["x", "b"]), {}, RO, ("allow", "rule_allows", "contains-any", ())),
    ("contains_any fails", "s", "tools", "ca_tool", who(groups=["x"]), {}, RO, ("deny", "claims_not_met", "contains-any", ())),
    ("present", "s", "tools", "pr_tool", who(email="a@b"), {}, RO, ("allow", "rule_allows", "present", ())),
    ("present fails", "s", "tools", "pr_tool", who(), {}, RO, ("deny", "claims_not_met", "present", ())),
    ("present: false", "s", "tools", "ab_tool", who(), {}, RO, ("allow", "rule_allows", "absent", ())),
    ("present: false fails", "s", "tools", "ab_tool", who(act={"sub": "x"}), {}, RO, ("deny", "claims_not_met", "absent", ())),
    ("nested claim path", "s", "tools", "nested_tool", who(realm_access={"roles": ["admin"]}), {}, RO,
     ("allow", "rule_allows", "nested", ())),
    ("true is not 1", "s", "tools", "bool_tool", who(mfa=1), {}, RO, ("deny", "claims_not_met", "bool-claim", ())),
    ("true equals true", "s", "tools", "bool_tool", who(mfa=True), {}, RO, ("allow", "rule_allows", "bool-claim", ())),
    ("sub and iss come from the principal", "s", "tools", "sub_tool", who(subject="alice"), {}, RO,
     ("allow", "rule_allows", "sub", ())),
    ("anonymous has no sub", "s", "tools", "sub_tool", ANONYMOUS, {}, RO, ("deny", "claims_not_met", "sub", ())),
    # arguments
    ("arguments valid", "s", "tools", "write_file", who("write"), {"path": "/srv/shared/a"}, RO,
     ("allow", "rule_allows", "args", ())),
    ("arguments invalid", "s", "tools", "edit_file", who(), {"path": "/etc/passwd"}, RO,
     ("deny", "arguments_invalid", "args-only", ())),
    ("missing arguments are {}", "s", "tools", "edit_file", who(), None, RO, ("deny", "arguments_invalid", "args-only", ())),
    ("non-object arguments", "s", "tools", "edit_file", who(), ["x"], RO, ("deny", "arguments_invalid", "args-only", ())),
    ("step up only when it would succeed", "s", "tools", "write_file", who(), {"path": "/srv/shared/a"}, RO,
     ("step_up", "missing_scopes", "args", ("write",))),
    ("a later rule without constraints offers step-up", "s", "tools", "write_file", who("write"), {"path": "/etc"}, RO,
     ("step_up", "missing_scopes", "args-admin", ("write", "root"))),
    ("a later rule allows what the first refuses", "s", "tools", "write_file", who("write", "root"), {"path": "/etc"}, RO,
     ("allow", "rule_allows", "args-admin", ())),
    ("list mode ignores argument constraints", "s", "tools", "write_file", who("write"), ANY, RO,
     ("allow", "rule_allows", "args", ())),
    # deny rules
    ("deny beats an earlier allow", "s", "tools", "read_file", who("read", blocked=True), {}, RO,
     ("deny", "deny_rule", "deny-late", ())),
    ("deny with arguments applies when they match", "s", "tools", "list_x", who("read"), {"secret": 1}, RO,
     ("deny", "deny_rule", "deny-args", ())),
    ("deny with arguments does not hide the tool in lists", "s", "tools", "list_x", who("read"), ANY, RO,
     ("allow", "rule_allows", "star", ())),
    ("deny that cannot be evaluated denies", "s", "tools", "list_x", who("read", groups="bad"), {}, RO,
     ("deny", "not_evaluable", "deny-noeval", ())),
    # destructive tools
    ("destructive needs the server's extra scope", "s", "tools", "drop_table", who("dba"), {}, {"destructiveHint": True},
     ("step_up", "missing_scopes", "destroy", ("dba", "admin"))),
    ("destructive with the extra scope", "s", "tools", "drop_table", who("dba", "admin"), {}, {"destructiveHint": True},
     ("allow", "rule_allows", "destroy", ())),
    ("unknown annotations count as destructive", "s", "tools", "drop_table", who("dba"), {}, UNKNOWN,
     ("step_up", "missing_scopes", "destroy", ("dba", "admin"))),
    ("no annotations: the MCP default is destructive", "s", "tools", "drop_table", who("dba"), {}, {},
     ("step_up", "missing_scopes", "destroy", ("dba", "admin"))),
    ("destructiveHint false is not destructive", "s", "tools", "drop_table", who("dba"), {}, {"destructiveHint": False},
     ("allow", "rule_allows", "destroy", ())),
    ("readOnlyHint wins", "s", "tools", "drop_table", who("dba"), {}, {"readOnlyHint": True, "destructiveHint": True},
     ("allow", "rule_allows", "destroy", ())),
    ("rule says destructive: allow", "s", "tools", "drop_view", who("dba"), {}, {"destructiveHint": True},
     ("allow", "rule_allows", "destroy-ok", ())),
    ("rule says destructive: deny", "s", "tools", "drop_db", who("dba", "admin"), {}, {"destructiveHint": True},
     ("deny", "destructive_denied", "destroy-never", ())),
    ("rule's own destructive scopes", "s", "tools", "drop_index", who("dba", "admin"), {}, {"destructiveHint": True},
     ("step_up", "missing_scopes", "destroy-own", ("dba", "dba:destructive"))),
    # default allow
    ("default allow", "open", "tools", "anything", who(), {}, RO, ("allow", "default_allow", None, ())),
    ("default allow keeps the destructive rule", "open", "tools", "anything", who(), {}, {},
     ("step_up", "missing_scopes", None, ("admin",))),
    ("default allow does not cover named tools", "open", "tools", "guarded", who(), {}, RO,
     ("step_up", "missing_scopes", "open-guarded", ("special",))),
    ("default allow yields to deny rules", "open", "tools", "forbidden", who(), {}, RO, ("deny", "deny_rule", "open-deny", ())),
    ("default allow never covers methods", "open", "methods", "logging/setLevel", who(), None, UNKNOWN,
     ("deny", "no_matching_rule", None, ())),
    # servers
    ("a server without a section uses '*'", "other", "tools", "x", who(), {}, {}, ("allow", "rule_allows", "fallback", ())),
    # resources, prompts, methods
    ("resource glob across segments", "s", "resources", "file:///srv/shared/a/b.txt", who("read"), None, UNKNOWN,
     ("allow", "rule_allows", "shared", ())),
    ("resource deny under an allowed tree", "s", "resources", "file:///srv/shared/secret/k", who("read"), None, UNKNOWN,
     ("deny", "deny_rule", "no-secrets", ())),
    ("resource dot segments refused", "s", "resources", "file:///srv/shared/../etc/passwd", who("read"), None, UNKNOWN,
     ("deny", "uri_not_canonical", None, ())),
    ("resource encoded dot segments refused", "s", "resources", "file:///srv/shared/%252e%252e/etc", who("read"), None,
     UNKNOWN, ("deny", "uri_not_canonical", None, ())),
    ("resource outside every rule", "s", "resources", "file:///etc/passwd", who("read"), None, UNKNOWN,
     ("deny", "no_matching_rule", None, ())),
    ("prompt arguments valid", "s", "prompts", "greet", who(), {"name": "bob"}, UNKNOWN, ("allow", "rule_allows", "prompt", ())),
    ("prompt arguments invalid", "s", "prompts", "greet", who(), {"name": "robert"}, UNKNOWN,
     ("deny", "arguments_invalid", "prompt", ())),
    ("method allow-list", "s", "methods", "completion/complete", who("read"), None, UNKNOWN,
     ("allow", "rule_allows", "completion", ())),
    ("method not listed", "s", "methods", "tasks/list", who("read"), None, UNKNOWN, ("deny", "no_matching_rule", None, ())),
]


@pytest.mark.parametrize("server,kind,name,principal,arguments,annotations,expected",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision(policies: Any, server: str, kind: str, name: str, principal: Principal, arguments: Any,
                  annotations: Any, expected: tuple[str, str, str | None, tuple[str, ...]]) -> None:
    d = decide(policies, server, kind, name, principal, arguments, annotations)
    effect, reason, rule, scopes = expected
    assert (d.effect, d.reason, d.rules[0] if d.rules else None, d.scopes) == (effect, reason, rule, scopes)


@pytest.mark.parametrize("server,name,annotations,reason", [
    ("s", "unknown_tool", RO, "no_matching_rule"),
    ("open", "anything", RO, "default_allow"),
])
def test_a_decision_no_rule_made_is_one_shared_object(policies: Any, server: str, name: str, annotations: Any,
                                                       reason: str) -> None:
    # The authz stage memoises its audit fields per Decision object: a fresh object per
    # call filled (and cleared) that memo on every refusal, seen as RSS creep in bench.soak.
    first = decide(policies, server, "tools", name, who(), {}, annotations)
    again = decide(policies, server, "tools", name + "_2", who(), {}, annotations)
    assert first.reason == reason and again is first


def test_a_server_with_no_policy_and_no_wildcard_refuses_everything(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("servers:\n  a:\n    tools: [{id: t, match: '*'}]\n")
    ps, problems = load_policies(str(tmp_path), ["a", "b"])
    assert not problems
    d = decide(ps, "b", "tools", "x", who(), {}, RO)
    assert (d.effect, d.reason) == ("deny", "no_policy")


@pytest.mark.parametrize("template,principal,visible", [
    ("file:///srv/shared/{name}", who("read"), True),
    ("file:///{+path}", who("read"), True),          # some expansions fall under the shared tree
    ("file:///srv/shared/{name}", who(), False),     # the only matching rule needs a scope
    ("notes://{id}", who(), True),
    ("file:///srv/shared/secret/{k}", who("read"), False),   # a deny rule covers every expansion
    ("db://{table}", who("read"), False),
    # A hostile upstream's templates: adjacent expressions under a denied tree (they were read
    # as '**', which no deny rule covers), and one past the glob bounds (hidden: not evaluable).
    ("file:///srv/shared/secret/{a}{+b}", who("read"), False),
    ("file:///srv/shared/secret/" + "a{k}" * 8192, who("read"), False),
    ("notes://" + "a{k}" * 8192, who(), False),
])
def test_resource_templates_are_listed_when_some_expansion_is_readable(
        policies: Any, template: str, principal: Principal, visible: bool) -> None:
    assert decide_template(policies, "s", template, principal).allowed is visible


@pytest.mark.parametrize("uri,ok", [
    ("file:///srv/a.txt", True), ("https://h/x/.well-known/y", True), ("file:///srv/./a", False),
    ("file:///srv/..", False), ("file:///srv/%2E%2E/x", False), ("file:///srv/a%5c..%5cb", False),
    ("file:///srv/a\\b", False), ("file:///%25252e%25252e/x", False),
])
def test_resource_uris_with_dot_segments_are_not_canonical(uri: str, ok: bool) -> None:
    assert uri_is_canonical(uri) is ok
