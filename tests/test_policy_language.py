"""Parsing and validation: every problem reported with file:line, all at once; lint findings."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.policy.glob import GlobError, compile_glob, covers, intersects, template_glob
from gateway.policy.lint import lint
from gateway.policy.load import load_policies


def problems_for(tmp_path: Path, text: str, servers: tuple[str, ...] = ("s", "t")) -> list[str]:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    ps, problems = load_policies(str(tmp_path), servers)
    assert (ps is None) == bool(problems)
    return [f"{p.loc.line}: {p.message}" for p in problems]


@pytest.mark.parametrize("text,line,fragment", [
    ("servers:\n  s:\n    tools:\n      - {id: a, match: x, colour: red}\n", 4, "unknown key 'colour'"),
    ("servers:\n  s:\n    tools: []\n    tools: []\n", 4, "duplicate key 'tools'"),
    ("servers:\n  s:\n    default: no\n", 3, "ambiguous value 'no'"),
    ("servers:\n  github: {}\n", 2, "unknown server 'github'"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: '***'}\n", 4, "invalid glob '***'"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: 'x{a'}\n", 4, "unbalanced '{'"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: '[ab]'}\n", 4, "character classes"),
    ("servers:\n  s:\n    tools:\n      - id: a\n        match: x\n        arguments:\n          type: objekt\n", 7,
     "invalid JSON Schema"),
    ("servers:\n  s:\n    tools:\n      - id: a\n        match: x\n        arguments:\n          properties:\n"
     "            p: {pattern: '(('}\n", 8, "invalid JSON Schema"),
    ("servers:\n  s:\n    tools:\n      - id: a\n        match: x\n        arguments: {$ref: 'http://x/s.json'}\n", 6,
     "only local references"),
    ("servers:\n  s:\n    tools:\n      - id: a\n        match: x\n        arguments: {properties: {1: {}}}\n", 6,
     "JSON Schema keys are strings"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: x}\n      - {id: a, match: y}\n", 5, "duplicate rule id 'a'"),
    ("servers:\n  s:\n    tools:\n      - {match: x}\n", 4, "id is required"),
    ("servers:\n  s:\n    tools:\n      - {id: a}\n", 4, "match is required"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: x, scopes: ['two words']}\n", 4, "not a valid OAuth scope"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: x, effect: deny, scopes: [x]}\n", 4,
     "a deny rule cannot require scopes"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: x, claims: {groups: {like: x}}}\n", 4, "unknown key 'like'"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: x, claims: {groups: {in: x}}}\n", 4, "must be a non-empty list"),
    ("servers:\n  s:\n    resources:\n      - {id: a, match: x, arguments: {}}\n", 4, "apply to tools and prompts"),
    ("servers:\n  s:\n    resources:\n      - {id: a, match: x, destructive: allow}\n", 4, "tools only"),
    ("servers:\n  s:\n    tools:\n      - {id: a, match: x, rate_limit: fast}\n", 4, "rate limits are not written on a rule"),
    ("servers:\n  s:\n    destructive: sometimes\n", 3, "must be allow, deny, or {scopes"),
    ("servers:\n  s:\n    limits:\n      - {id: l, match: {tools: [x]}}\n", 4, "needs windows and/or concurrency"),
    ("servers:\n  s:\n    limits:\n      - {id: l, match: {}, concurrency: 1}\n", 4, "needs tools and/or methods"),
    ("servers:\n  s:\n    limits:\n      - id: l\n        match: {tools: [x]}\n        windows: [{limit: 0, per: 1s}]\n",
     6, "must be between 1"),
    ("servers:\n  s:\n    limits:\n      - id: l\n        match: {tools: [x]}\n        windows: [{limit: 5}]\n",
     6, "per is required"),
    ("servers:\n  s:\n    limits:\n      - {id: l, match: {tools: [x]}, key: [ip], concurrency: 1}\n", 4,
     "key part 'ip'"),
    ("servers:\n  s:\n    limits:\n      - {id: l, match: {tools: [x]}, concurrency: 1, on_store_error: maybe}\n",
     4, "must be one of closed, open"),
    ("servers:\n  s:\n    tools:\n      - {id: l, match: x}\n    limits:\n      - {id: l, match: {tools: [x]}, concurrency: 1}\n",
     6, "duplicate id 'l'"),
    ("servers:\n  s:\n    default: maybe\n", 3, "must be one of allow, deny"),
    ("version: 2\nservers: {}\n", 1, "version must be 1"),
    ("servers:\n  s:\n    tools: {a: b}\n", 3, "must be a list"),
])
def test_each_problem_is_reported_at_its_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    found = problems_for(tmp_path, text)
    assert any(p.startswith(f"{line}:") and fragment in p for p in found), found


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    found = problems_for(tmp_path, """\
        servers:
          s:
            default: maybe
            tools:
              - {id: a, match: '***'}
              - {id: b, match: x, effect: sideways}
          nowhere: {}
        """)
    assert len(found) == 4, found


def test_a_server_defined_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("servers:\n  s: {}\n")
    (tmp_path / "b.yaml").write_text("servers:\n  s: {}\n")
    ps, problems = load_policies(str(tmp_path), ["s"])
    assert ps is None and "already has a policy" in problems[0].message and problems[0].loc.file.endswith("b.yaml")


def test_tests_subdirectories_and_lock_files_are_not_policy(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "cases.yaml").write_text("cases: []\n")
    (tmp_path / "s.lock.yaml").write_text("whatever: 1\n")
    (tmp_path / "p.yml").write_text("servers:\n  s:\n    tools: [{id: a, match: x}]\n")
    ps, problems = load_policies(str(tmp_path), ["s"])
    assert not problems and ps.rule_count == 1


@pytest.mark.parametrize("pattern,name,hit", [
    ("read_*", "read_file", True), ("read_*", "read/file", False), ("**", "a/b/c", True),
    ("a?c", "abc", True), ("a?c", "a/c", False), ("{x,y}_*", "y_1", True), ("\\{x\\}", "{x}", True),
    ("file:///srv/*", "file:///srv/a/b", False), ("file:///srv/**", "file:///srv/a/b", True),
])
def test_glob_matching(pattern: str, name: str, hit: bool) -> None:
    assert compile_glob(pattern).match(name) is hit


@pytest.mark.parametrize("bad", ["", "***", "{a", "a}", "{a}", "{a,}", "[x]", "a\\", "{a,{b,c}}", "a\x00",
                                 "a" * 1025, "{a,b}" * 6 + "x" * 100, "{a,b}{c,d}{e,f}" + "y" * 600,
                                 "{a," + "x" * 900 + "}{c,d}{e,f}{g,h}{i,j}{k,l}"])
def test_invalid_globs_are_refused(bad: str) -> None:
    with pytest.raises(GlobError):
        compile_glob(bad)


def test_a_glob_is_bounded_in_what_it_keeps_so_reloads_cannot_grow_memory() -> None:
    """compile_glob's cache keeps the globs of every reload: the fuzzer grew a process past
    1 GiB with 64 alternatives of kilobyte-long globs.  Within the bounds, a glob compiles."""
    assert compile_glob("a" * 1024).match("a" * 1024)
    wide = compile_glob("{a,b}{c,d}{e,f}{g,h}{i,j}{k,l}")
    assert len(wide.alternatives) == 64 and wide.match("bcfgjk") and not wide.match("bcfgj")
    long = compile_glob("{a,b}" + "y" * 1000)
    assert sum(len(alt) for alt in long.alternatives) == 2002 and long.match("b" + "y" * 1000)


@pytest.mark.parametrize("a,b,covered", [
    ("*", "read_*", True), ("*", "**", False), ("**", "a/*/b", True), ("*/*", "**", False),
    ("a?c", "a*c", False), ("a*c", "a?c", True), ("{read,write}_*", "read_x", True),
    ("read_*", "{read,write}_x", False), ("*_file", "{read,write}_file", True), ("x", "x", True),
])
def test_glob_coverage_is_sound(a: str, b: str, covered: bool) -> None:
    assert covers(compile_glob(a), compile_glob(b)) is covered


def test_a_template_past_the_glob_bounds_is_not_read_and_adjacent_expressions_are_one_wildcard() -> None:
    """Templates come from upstreams: a 64 KiB one is not compiled (nor kept in compile_glob's
    cache); the caller hides it (test_policy_decide).  '{a}{+b}' was '***', not a glob, and
    fell back to '**' (so a deny rule could not cover it); it is one '**' after the literal."""
    assert template_glob("file:///" + "a{x}" * 16384) is None
    adjacent = template_glob("file:///srv/{a}{+b}")
    assert adjacent is not None and adjacent.text == "file:///srv/**"
    assert template_glob("notes://{a}{b}/x").text == "notes://*/x"


def test_template_globs_intersect_rule_globs() -> None:
    assert intersects(compile_glob("file:///srv/shared/**"), template_glob("file:///{+path}"))
    assert not intersects(compile_glob("file:///srv/shared/**"), template_glob("notes://{id}"))
    assert not intersects(compile_glob("notes://a/*"), template_glob("notes://{id}"))   # {id} never holds '/'


LINTED = """\
    servers:
      s:
        tools:
          - {id: broad, match: "read_*", scopes: [read]}
          - {id: narrow, match: read_file, scopes: [read, extra]}
          - {id: different-claims, match: read_file, claims: {groups: {contains: x}}}
          - {id: kill-switch, effect: deny, match: "drop_*"}
          - {id: dead, match: drop_table, scopes: [dba]}
          - {id: deny-a, effect: deny, match: "rm_*"}
          - {id: deny-b, effect: deny, match: rm_rf}
          - {id: nothing, match: x, arguments: false}
          - {id: contradiction, match: yy, claims: {role: {equals: a, in: [b, c]}}}
          - {id: unknown-scope, match: z, scopes: [mystery]}
        methods:
          - {id: no-effect, match: tools/call}
    """


def test_lint_finds_dead_and_shadowed_rules(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(LINTED))
    ps, problems = load_policies(str(tmp_path), ["s", "t"])
    assert not problems
    findings = lint(ps, issuer_scopes={"read", "extra", "dba"},
                    known_tools={"s": [{"name": "drop_table"}, {"name": "read_file", "annotations": {"readOnlyHint": True}},
                                       {"name": "orphan", "annotations": {"readOnlyHint": True}}]},
                    servers={"s": None, "t": None})
    text = "\n".join(f"{p.loc.line}: {p.message}" for p in findings)
    assert "5: rule 'narrow' is shadowed by rule 'broad'" in text
    assert "different-claims" not in text
    assert "8: rule 'dead' can never allow anything: deny rule 'kill-switch'" in text
    assert "10: deny rule 'deny-b' is redundant" in text
    assert "11: rule 'nothing' can never allow anything: its arguments schema is false" in text
    assert "12: rule 'contradiction' can never apply" in text
    assert "13: unknown-scope requires scope(s) neither the issuers nor the mount list: mystery" in text
    assert "15: rule 'no-effect' has no effect" in text
    assert "tool 'drop_table' of server 's' can never be allowed" in text
    assert "tool 'orphan' of server 's' can never be allowed: no allow rule matches" in text
    assert "server 't' has no policy" in text
    assert "read_file' of server" not in text
