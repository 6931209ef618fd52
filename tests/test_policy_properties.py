"""Property tests: what tools/list shows and what tools/call allows never disagree.

Random policies (parsed from YAML by the real loader), random principals and
random tool sets go through the real authz stage: its list hook filters a
``tools/list`` result and its ``on_request`` gates each ``tools/call``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import InsufficientScope, PolicyDenied
from gateway.pipeline import Exchange, Principal
from gateway.policy.load import load_policies
from gateway.policy.reload import PolicyHolder
from gateway.stages.authz import Authz

NAMES = ["read_file", "read_dir", "write_file", "drop_table", "list_x", "admin_tool"]
GLOBS = NAMES + ["*", "read_*", "{read,write}_file", "drop_?able", "**", "*_x"]
SCOPES = ["a", "b", "c"]
GROUPS = ["eng", "sre"]
ALLOW_SCHEMA = {"type": "object", "required": ["p"]}
DENY_SCHEMA = {"type": "object", "required": ["secret"]}
# Argument samples: {"p": 1} satisfies every allow schema and no deny schema.
SAMPLES: list[dict[str, Any]] = [{}, {"p": 1}, {"p": 1, "secret": 1}]
ANNOTATIONS = [None, {"readOnlyHint": True}, {"destructiveHint": True}, {"destructiveHint": False}]

destructive = st.sampled_from(["allow", "deny", {"scopes": ["c"]}])


@st.composite
def rules(draw: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(0, 7))):
        rule: dict[str, Any] = {"id": f"r{i}", "match": draw(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2))}
        deny = draw(st.booleans()) and draw(st.booleans())   # ~1 in 4 is a deny rule
        if deny:
            rule["effect"] = "deny"
        else:
            if draw(st.booleans()):
                rule["scopes"] = {"all_of": draw(st.lists(st.sampled_from(SCOPES), max_size=2, unique=True)),
                                  "any_of": draw(st.lists(st.sampled_from(SCOPES), min_size=1, max_size=2,
                                                          unique=True))}
            else:
                rule["scopes"] = draw(st.lists(st.sampled_from(SCOPES), max_size=2, unique=True))
            if draw(st.booleans()):
                rule["destructive"] = draw(destructive)
        if draw(st.booleans()):
            rule["claims"] = {"groups": {draw(st.sampled_from(["contains", "not_contains"])): draw(st.sampled_from(GROUPS))}}
        if draw(st.booleans()):
            rule["arguments"] = DENY_SCHEMA if deny else ALLOW_SCHEMA
        out.append(rule)
    return out


@st.composite
def policy(draw: Any) -> dict[str, Any]:
    return {"servers": {"s": {"default": draw(st.sampled_from(["allow", "deny"])),
                              "destructive": draw(destructive), "tools": draw(rules())}}}


principals = st.builds(
    lambda scopes, groups: Principal(issuer="https://iss", subject="u", scopes=frozenset(scopes),
                                     claims={"groups": groups}),
    st.lists(st.sampled_from(SCOPES), unique=True), st.lists(st.sampled_from(GROUPS), unique=True))
toolsets = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(ANNOTATIONS)), min_size=1, max_size=6,
                    unique_by=lambda t: t[0])


def build_stage(doc: dict[str, Any]) -> Authz:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(yaml.safe_dump(doc))
        ps, problems = load_policies(str(path), ["s"])
    assert not problems, problems
    return Authz(PolicyHolder(ps))


def run(coro: Any) -> None:
    """Drive ``on_request`` to completion: it never awaits anything that suspends."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("on_request suspended")


def exchange(principal: Principal, method: str, params: dict[str, Any]) -> Exchange:
    ex = Exchange(None, SimpleNamespace(name="s"))  # type: ignore[arg-type]
    ex.principal = principal
    ex.method = method
    ex.message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    ex.rpc_id = 1
    ex.is_request = True
    return ex


def listed(stage: Authz, principal: Principal, tools: list[dict[str, Any]]) -> set[str]:
    ex = exchange(principal, "tools/list", {})
    run(stage.on_request(ex))
    (hook,) = ex.response_hooks
    out = hook(ex, {"jsonrpc": "2.0", "id": 1, "result": {"tools": [dict(t) for t in tools]}})
    return {t["name"] for t in out["result"]["tools"]}


def call(stage: Authz, principal: Principal, name: str, arguments: dict[str, Any]) -> str:
    try:
        run(stage.on_request(exchange(principal, "tools/call", {"name": name, "arguments": arguments})))
    except InsufficientScope as err:
        return "step_up:" + " ".join(err.scopes)
    except PolicyDenied:
        return "deny"
    return "allow"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=policy(), principal=principals, toolset=toolsets)
def test_list_and_call_never_disagree(doc: dict[str, Any], principal: Principal, toolset: list[Any]) -> None:
    stage = build_stage(doc)
    tools = [{"name": n, "inputSchema": {"type": "object"}, **({"annotations": a} if a is not None else {})}
             for n, a in toolset]
    visible = listed(stage, principal, tools)   # also teaches the stage's catalog the annotations
    for tool in tools:
        outcomes = [call(stage, principal, tool["name"], args) for args in SAMPLES]
        # Listed exactly when some arguments make the call pass; never allowed when hidden.
        assert (tool["name"] in visible) == ("allow" in outcomes), (tool, outcomes, visible)
        for outcome in outcomes:
            if outcome.startswith("step_up:"):
                # A step-up names every scope the call needs: with them, the same call passes.
                richer = Principal(issuer=principal.issuer, subject="u", claims=principal.claims,
                                   scopes=principal.scopes | set(outcome[8:].split()))
                assert "allow" in [call(stage, richer, tool["name"], a) for a in SAMPLES]
                assert tool["name"] in listed(stage, richer, tools)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=policy(), principal=principals, toolset=toolsets)
def test_without_argument_constraints_list_and_call_agree_for_any_arguments(
        doc: dict[str, Any], principal: Principal, toolset: list[Any]) -> None:
    for rule in doc["servers"]["s"]["tools"]:
        rule.pop("arguments", None)
    stage = build_stage(doc)
    tools = [{"name": n, **({"annotations": a} if a is not None else {})} for n, a in toolset]
    visible = listed(stage, principal, tools)
    for tool in tools:
        for args in SAMPLES:
            assert (call(stage, principal, tool["name"], args) == "allow") == (tool["name"] in visible)
