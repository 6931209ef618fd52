"""Policies end to end: a real AS (oidc-provider), the real SDK client, the SDK upstream, the gateway.

One stack per module.  The gateway mounts the same SDK upstream twice: ``files``
(SSE answers) and ``jsonfiles`` (JSON answers), both under the shipped
``policies/files.yaml`` rules.  Personas are RS256 ``at+jwt`` tokens signed by the
AS with the scopes and claims each case needs.
"""
from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from tests.idp.fixture import Idp, start_idp
from tests.support.clients import mcp_client, raises_mcp_error
from tests.support.components import REPO, Gateway, Upstream, start_gateway, start_upstream
from tests.support.gw_helpers import MODERN_VERSION, http_client, modern_headers, modern_params, post, rpc

MOUNTS = ("files", "jsonfiles")
PERSONAS: dict[str, dict[str, Any]] = {
    "nobody": {"scope": ""},
    "reader": {"scope": "files:read", "groups": ["eng"]},
    "sre": {"scope": "files:read", "groups": ["eng", "sre"]},
    "writer": {"scope": "files:read files:write"},
    "admin": {"scope": "files:read files:write files:admin"},
    "bot": {"scope": "files:read files:write files:admin", "client_id": "ci-bot"},
}
SSE_AND_JSON = pytest.mark.parametrize("mount", MOUNTS)


def policies_dir(root: Path) -> Path:
    """The shipped files policy, and the same rules (own ids) for the JSON mount."""
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / "policies" / "files.yaml").read_text()
    shutil.copy(REPO / "policies" / "files.yaml", root / "files.yaml")
    (root / "jsonfiles.yaml").write_text(text.replace("  files:\n", "  jsonfiles:\n").replace("id: files-", "id: jf-"))
    return root


@dataclass
class Stack:
    idp: Idp
    up: Upstream
    up_json: Upstream
    gw: Gateway
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def token(self, persona: str, mount: str = "files") -> str:
        key = (persona, mount)
        if key not in self.tokens:
            now = int(time.time())
            claims = {"iss": self.idp.issuer, "sub": persona, "aud": self.gw.url(mount), "iat": now,
                      "exp": now + 600, "jti": uuid.uuid4().hex, "client_id": "test-client",
                      **PERSONAS[persona]}
            self.tokens[key] = self.idp.mint(claims)
        return self.tokens[key]

    def auth(self, persona: str, mount: str = "files") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(persona, mount)}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("policy-e2e")
    started: list[Any] = []
    try:
        idp = start_idp(work / "idp"); started.append(idp)
        up = start_upstream(work / "up"); started.append(up)
        up_json = start_upstream(work / "upjson", json_response=True); started.append(up_json)
        config = {
            "auth": {"issuers": [{"issuer": idp.issuer}]},
            "policies": str(policies_dir(work / "policies")),
            "servers": {"files": {"url": up.url, "pinning": {"mode": "off"}},
                        "jsonfiles": {"url": up_json.url, "pinning": {"mode": "off"}}},
        }
        gw = start_gateway(work / "gw", config); started.append(gw)
        yield Stack(idp, up, up_json, gw)
    finally:
        for handle in reversed(started):
            handle.stop()


def upstream_of(stack: Stack, mount: str) -> Upstream:
    return stack.up if mount == "files" else stack.up_json


# --------------------------------------------------------------------------- lists


@SSE_AND_JSON
@pytest.mark.parametrize("persona,visible", [
    ("reader", {"read_file", "echo", "add"}),
    ("writer", {"read_file", "echo", "add"}),            # delete_file is destructive: needs files:admin too
    ("admin", {"read_file", "echo", "add", "delete_file"}),
    ("bot", {"read_file", "echo", "add"}),               # a deny rule without conditions on arguments hides it
    ("nobody", set()),
])
async def test_tools_list_shows_each_persona_only_what_it_may_call(
        stack: Stack, mount: str, persona: str, visible: set[str]) -> None:
    async with mcp_client(stack.gw.url(mount), headers=stack.auth(persona, mount)) as client:
        tools = await client.list_tools()
    assert {t.name for t in tools.tools} == visible


async def test_legacy_session_sees_the_same_filtered_list(stack: Stack) -> None:
    async with mcp_client(stack.gw.url("files"), era="legacy", headers=stack.auth("reader")) as client:
        tools = await client.list_tools()
    assert {t.name for t in tools.tools} == {"read_file", "echo", "add"}


@SSE_AND_JSON
async def test_resources_templates_and_prompts_are_filtered(stack: Stack, mount: str) -> None:
    async with mcp_client(stack.gw.url(mount), headers=stack.auth("reader", mount)) as client:
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        prompts = {p.name for p in (await client.list_prompts()).prompts}
    assert resources == {"file:///srv/shared/readme.txt"}          # config://app needs files:admin
    assert templates == {"notes://{note_id}"}
    assert prompts == {"greet", "summarize"}
    async with mcp_client(stack.gw.url(mount), headers=stack.auth("admin", mount)) as client:
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
    assert resources == {"file:///srv/shared/readme.txt", "config://app"}


# --------------------------------------------------------------------------- calls


@SSE_AND_JSON
async def test_allowed_calls_reach_the_upstream(stack: Stack, mount: str) -> None:
    async with mcp_client(stack.gw.url(mount), headers=stack.auth("reader", mount)) as client:
        await client.list_tools()
        result = await client.call_tool("read_file", {"path": "/srv/shared/readme.txt"})
        note = await client.read_resource("notes://42")
        prompt = await client.get_prompt("greet", {"name": "Ann"})
    assert not result.is_error and "Shared folder" in result.content[0].text
    assert note.contents[0].text == "note 42"
    assert "Ann" in prompt.messages[0].content.text


@SSE_AND_JSON
async def test_argument_constraints_are_checked_before_the_upstream(stack: Stack, mount: str) -> None:
    up = upstream_of(stack, mount)
    up.clear_records()
    async with mcp_client(stack.gw.url(mount), headers=stack.auth("reader", mount)) as client:
        await client.list_tools()
        with raises_mcp_error(-32602) as raised:
            await client.call_tool("read_file", {"path": "/srv/private/credentials.env"})
        with raises_mcp_error(-32602):
            await client.get_prompt("greet", {"name": "x" * 100})
    assert "/srv/private/credentials.env" in raised.error.error.message
    assert up.records("tools/call") == [] and up.records("prompts/get") == []


async def test_sre_may_read_outside_the_shared_folder(stack: Stack) -> None:
    async with mcp_client(stack.gw.url("files"), headers=stack.auth("sre")) as client:
        await client.list_tools()
        result = await client.call_tool("read_file", {"path": "/srv/private/credentials.env"})
    assert "AWS_ACCESS_KEY_ID" in result.content[0].text


@SSE_AND_JSON
async def test_a_refused_tool_looks_exactly_like_an_unknown_one(stack: Stack, mount: str) -> None:
    """ask_sampling exists upstream but no rule allows it; no_such_tool does not exist."""
    up = upstream_of(stack, mount)
    up.clear_records()
    errors = {}
    async with mcp_client(stack.gw.url(mount), headers=stack.auth("admin", mount)) as client:
        await client.list_tools()
        for name in ("ask_sampling", "no_such_tool"):
            with raises_mcp_error() as raised:
                await client.session.call_tool(name, {"prompt": "hi"})
            errors[name] = (raised.code, raised.error.error.message.replace(name, "<name>"), raised.error.error.data)
    assert errors["ask_sampling"] == errors["no_such_tool"]
    assert errors["ask_sampling"][0] == -32602
    assert up.records("tools/call") == []


async def test_bots_are_refused_by_a_deny_rule_whatever_their_scopes(stack: Stack) -> None:
    async with mcp_client(stack.gw.url("files"), headers=stack.auth("bot")) as client:
        await client.list_tools()
        with raises_mcp_error(-32602):
            await client.session.call_tool("delete_file", {"path": "/srv/shared/notes.md"})


# --------------------------------------------------------------------------- 403 step-up


def challenge_scopes(reply: Any) -> list[str]:
    header = reply.headers.get("WWW-Authenticate", "")
    assert 'error="insufficient_scope"' in header, header
    m = re.search(r'scope="([^"]*)"', header)
    assert m, header
    return m.group(1).split()


@pytest.mark.parametrize("persona,method,params,scopes", [
    ("nobody", "tools/call", {"name": "read_file", "arguments": {"path": "/srv/shared/readme.txt"}}, ["files:read"]),
    # destructive tool: the rule's scope and the server's destructive scope, both named
    ("writer", "tools/call", {"name": "delete_file", "arguments": {"path": "/srv/shared/notes.md"}},
     ["files:write", "files:admin"]),
    ("reader", "resources/read", {"uri": "config://app"}, ["files:admin"]),
    ("nobody", "prompts/get", {"name": "greet", "arguments": {"name": "Ann"}}, ["files:read"]),
])
async def test_missing_scopes_get_a_403_challenge_naming_every_scope_needed(
        stack: Stack, persona: str, method: str, params: dict[str, Any], scopes: list[str]) -> None:
    stack.up.clear_records()
    name = params.get("name") or params.get("uri")
    message = rpc(method, modern_params(params))
    async with http_client() as http:
        reply = await post(http, stack.gw.url("files"), message,
                           {**stack.auth(persona), **modern_headers(method, name)}, version=MODERN_VERSION)
    assert reply.status == 403
    assert sorted(challenge_scopes(reply)) == sorted(scopes)
    assert reply.json["id"] == message["id"] and reply.error_reason == "insufficient_scope"
    assert stack.up.records(method) == []


async def test_stepping_up_to_the_named_scopes_makes_the_call_pass(stack: Stack) -> None:
    # notes.md: no other test reads it (the module shares one upstream)
    method, params = "tools/call", {"name": "delete_file", "arguments": {"path": "/srv/shared/notes.md"}}
    async with http_client() as http:
        first = await post(http, stack.gw.url("files"), rpc(method, modern_params(params)),
                           {**stack.auth("writer"), **modern_headers(method, "delete_file")}, version=MODERN_VERSION)
        scopes = " ".join(challenge_scopes(first))
        now = int(time.time())
        stepped = stack.idp.mint({"iss": stack.idp.issuer, "sub": "writer", "aud": stack.gw.url("files"),
                                  "iat": now, "exp": now + 600, "scope": scopes, "client_id": "test-client"})
    async with mcp_client(stack.gw.url("files"), headers={"Authorization": f"Bearer {stepped}"}) as client:
        await client.list_tools()
        result = await client.call_tool("delete_file", {"path": "/srv/shared/notes.md"})
    assert not result.is_error and "deleted" in result.content[0].text


# --------------------------------------------------------------------------- methods, audit


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")   # legacy-era methods
async def test_other_methods_are_an_allow_list(stack: Stack) -> None:
    async with mcp_client(stack.gw.url("files"), era="legacy", headers=stack.auth("admin")) as client:
        with raises_mcp_error(-32602):
            await client.set_logging_level("debug")
        assert await client.send_ping() is not None      # protocol plumbing always passes


async def test_every_decision_is_in_the_audit_record(stack: Stack) -> None:
    start = len(stack.gw.log_lines())
    async with mcp_client(stack.gw.url("files"), headers=stack.auth("reader")) as client:
        await client.list_tools()
        with pytest.raises(BaseException) as excinfo:
            await client.call_tool("read_file", {"path": "/etc/shadow"})
        assert isinstance(excinfo.value, (MCPError, BaseExceptionGroup))
    entry = stack.gw.wait_for_log(lambda e: e.get("target") == "read_file" and e.get("decision") == "deny",
                                  start=start)
    assert entry["rules"] == ["files-read-shared"] and entry["decision_reason"] == "arguments_invalid"
    assert entry["principal"] == "reader" and entry["server"] == "files" and entry["method"] == "tools/call"
    listing = stack.gw.wait_for_log(lambda e: e.get("method") == "tools/list" and e.get("decision") == "filter",
                                    start=start)
    assert listing["hidden"] >= 1
