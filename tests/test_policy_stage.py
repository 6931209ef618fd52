"""The authz stage in process: which methods it decides, what it raises, what its list hook does."""
from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.errors import InsufficientScope, PolicyDenied
from gateway.pipeline import ANONYMOUS, Exchange, Principal
from gateway.policy.load import load_policies
from gateway.policy.reload import PolicyHolder
from gateway.stages.authz import Authz

POLICY = textwrap.dedent("""\
    servers:
      s:
        tools:
          - {id: read, match: read_file, scopes: [read]}
          - {id: echo, match: echo, destructive: allow}
        resources:
          - {id: docs, match: "docs://**", scopes: [read]}
        prompts:
          - {id: greet, match: greet}
        methods:
          - {id: complete, match: completion/complete}
    """)
READER = Principal(issuer="https://iss", subject="r", scopes=frozenset({"read"}))
NOBODY = Principal(issuer="https://iss", subject="n")


@pytest.fixture
def stage(tmp_path: Path) -> Authz:
    (tmp_path / "p.yaml").write_text(POLICY)
    ps, problems = load_policies(str(tmp_path), ["s"])
    assert not problems
    authz = Authz(PolicyHolder(ps))
    # What a relayed tools/list taught the catalog (unknown tools count as destructive).
    authz.catalog.update("s", [{"name": "read_file", "annotations": {"readOnlyHint": True}}])
    return authz


def exchange(principal: Principal, method: str | None, params: dict[str, Any] | None = None,
             **message: Any) -> Exchange:
    ex = Exchange(None, SimpleNamespace(name="s"))  # type: ignore[arg-type]
    ex.principal = principal
    ex.method = method
    ex.message = {"jsonrpc": "2.0", "id": 7, **({"method": method} if method else {}),
                  **({"params": params} if params is not None else {}), **message}
    ex.rpc_id = 7
    return ex


async def outcome(stage: Authz, ex: Exchange) -> str:
    try:
        await stage.on_request(ex)
    except InsufficientScope as err:
        return "step_up " + " ".join(err.scopes)
    except PolicyDenied as err:
        return f"denied: {err.message}"
    return "passed"


@pytest.mark.parametrize("principal,method,params,expected", [
    (NOBODY, "initialize", {}, "passed"),
    (NOBODY, "ping", None, "passed"),
    (NOBODY, "server/discover", {}, "passed"),
    (NOBODY, "notifications/initialized", None, "passed"),
    (NOBODY, None, None, "passed"),                                    # a response to a server request
    (READER, "tools/call", {"name": "read_file", "arguments": {}}, "passed"),
    (NOBODY, "tools/call", {"name": "read_file"}, "step_up read"),
    (ANONYMOUS, "tools/call", {"name": "read_file"}, "denied: Unknown tool: read_file"),   # no issuer: no step-up
    (READER, "tools/call", {"name": "rm"}, "denied: Unknown tool: rm"),
    (READER, "resources/read", {"uri": "docs://a/b"}, "passed"),
    (NOBODY, "resources/subscribe", {"uri": "docs://a"}, "step_up read"),
    (READER, "resources/read", {"uri": "secret://x"}, "denied: Resource not found: secret://x"),
    (NOBODY, "prompts/get", {"name": "greet"}, "passed"),
    (NOBODY, "prompts/get", {"name": "other"}, "denied: Unknown prompt: other"),
    (NOBODY, "completion/complete", {"ref": {"type": "ref/prompt", "name": "greet"}}, "passed"),
    # Completions of a prompt or resource the caller may not use would reveal it: refused as unknown.
    (NOBODY, "completion/complete", {"ref": {"type": "ref/prompt", "name": "secret"}},
     "denied: Unknown prompt: secret"),
    (READER, "completion/complete", {"ref": {"type": "ref/resource", "uri": "docs://{path}"}}, "passed"),
    (NOBODY, "completion/complete", {"ref": {"type": "ref/resource", "uri": "docs://{path}"}},
     "denied: Resource not found: docs://{path}"),
    (READER, "completion/complete", {"ref": {"type": "ref/resource", "uri": "secret://{x}"}},
     "denied: Resource not found: secret://{x}"),
    (READER, "completion/complete", {"ref": {"type": "ref/resource", "uri": "docs://a"}}, "passed"),
    (READER, "completion/complete", {}, "denied: Invalid params: completion/complete needs a ref/prompt or "
                                        "ref/resource"),
    (READER, "logging/setLevel", {"level": "debug"}, "denied: Method not found: logging/setLevel"),
    (READER, "tasks/list", {}, "denied: Method not found: tasks/list"),
])
async def test_what_the_stage_decides(stage: Authz, principal: Principal, method: str | None,
                                      params: dict[str, Any] | None, expected: str) -> None:
    assert await outcome(stage, exchange(principal, method, params)) == expected


async def test_the_decision_goes_into_the_audit_record(stage: Authz) -> None:
    ex = exchange(NOBODY, "tools/call", {"name": "read_file"})
    await outcome(stage, ex)
    assert ex.audit_safe["decision"] == "step_up" and list(ex.audit_safe["rules"]) == ["read"]
    assert ex.audit_safe["decision_reason"] == "missing_scopes" and list(ex.audit_safe["required_scopes"]) == ["read"]
    assert len(ex.audit_safe["policy"]) == 12


def page(*names: str, cursor: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"tools": [{"name": n, "annotations": {"readOnlyHint": True}} for n in names]}
    if cursor is not None:
        result["nextCursor"] = cursor
    return {"jsonrpc": "2.0", "id": 7, "result": result}


async def test_every_page_is_filtered_and_the_cursor_kept(stage: Authz) -> None:
    for principal, visible in ((READER, ["read_file", "echo"]), (NOBODY, ["echo"])):
        ex = exchange(principal, "tools/list", {})
        await stage.on_request(ex)
        (hook,) = ex.response_hooks
        first = hook(ex, page("read_file", "delete_all", cursor="c1"))
        second = hook(ex, page("echo", "secret_tool"))
        assert [t["name"] for t in first["result"]["tools"] + second["result"]["tools"]] == visible
        assert first["result"]["nextCursor"] == "c1"
        assert ex.audit_safe["decision"] == "filter" and ex.audit["hidden"] == 4 - len(visible)


async def test_the_hook_leaves_other_messages_alone_and_drops_malformed_entries(stage: Authz) -> None:
    ex = exchange(READER, "tools/list", {})
    await stage.on_request(ex)
    (hook,) = ex.response_hooks
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    server_request = {"jsonrpc": "2.0", "id": 7, "method": "sampling/createMessage", "params": {}}
    error = {"jsonrpc": "2.0", "id": 7, "error": {"code": -32000, "message": "x"}}
    for msg in (progress, server_request, error):
        assert hook(ex, dict(msg)) == msg
    odd = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": 3}, "echo", {"name": "echo"}]}}
    assert hook(ex, odd)["result"]["tools"] == [{"name": "echo"}]
    assert hook(ex, {"jsonrpc": "2.0", "id": 7, "result": {"tools": "all"}})["result"]["tools"] == []


async def test_list_results_of_each_kind_are_filtered(stage: Authz) -> None:
    cases = [
        ("resources/list", "resources", [{"uri": "docs://a"}, {"uri": "secret://b"}], ["docs://a"]),
        ("resources/templates/list", "resourceTemplates",
         [{"uriTemplate": "docs://{id}"}, {"uriTemplate": "secret://{id}"}], ["docs://{id}"]),
        ("prompts/list", "prompts", [{"name": "greet"}, {"name": "other"}], ["greet"]),
    ]
    for method, field, items, kept in cases:
        ex = exchange(READER, method, {})
        await stage.on_request(ex)
        out = ex.response_hooks[0](ex, {"jsonrpc": "2.0", "id": 7, "result": {field: items}})
        assert [next(iter(i.values())) for i in out["result"][field]] == kept


async def test_a_request_keeps_the_policy_set_it_started_with(stage: Authz, tmp_path: Path) -> None:
    ex = exchange(READER, "tools/list", {})
    await stage.on_request(ex)
    (tmp_path / "p.yaml").write_text("servers:\n  s: {}\n")
    empty, _ = load_policies(str(tmp_path), ["s"])
    stage.policies.swap(empty)                       # a reload lands while the list is in flight
    out = ex.response_hooks[0](ex, page("read_file"))
    assert [t["name"] for t in out["result"]["tools"]] == ["read_file"]
    later = exchange(READER, "tools/list", {})
    await stage.on_request(later)
    assert later.response_hooks[0](later, page("read_file"))["result"]["tools"] == []


async def test_an_unknown_tool_is_looked_up_only_when_its_annotations_matter(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("servers:\n  s:\n    tools:\n"
                                     "      - {id: read, match: '*_file', scopes: [read]}\n"
                                     "      - {id: anything, match: 'x_*', destructive: allow}\n")
    ps, _ = load_policies(str(tmp_path), ["s"])
    calls: list[str] = []

    async def refresh(ex: Exchange) -> None:     # what a side tools/list would teach the catalog
        calls.append(ex.name or "")
        stage.catalog.update("s", [{"name": "read_file", "annotations": {"readOnlyHint": True}}])

    stage = Authz(PolicyHolder(ps), refresh=refresh)
    for name, expected in (("x_tool", "passed"), ("read_file", "passed"), ("read_file", "passed"),
                           ("gone_file", "denied: Unknown tool: gone_file")):
        ex = exchange(READER, "tools/call", {"name": name})
        ex.name = name
        assert await outcome(stage, ex) == expected
    # x_tool: destructive or not, the same answer; read_file: known after one lookup;
    # gone_file: looked up, still unknown, so destructive (denied by the server's default).
    assert calls == ["read_file", "gone_file"]
