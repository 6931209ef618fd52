"""Canary: distinctive fake secrets planted everywhere a client or upstream can put them never
reach a gateway output (#11).

The flows run against a real authorization server (oidc-provider), the SDK upstream and a
socket-level upstream whose errors quote secrets.  Secrets go into the token itself and its
claims, request headers, query strings, tool names and arguments, tool results and upstream
error messages.  Then every log line, the audit file, a ``/metrics`` scrape and every error body the
gateway wrote itself is searched: zero hits.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.idp.fixture import Idp, start_idp
from tests.support.components import Gateway, Upstream, start_gateway, start_upstream
from tests.support.evil_upstream import EvilUpstream, http
from tests.support.gw_helpers import http_client, initialize, post, rpc, with_policy

# Each canary has a unique core (CANARY + a number) wrapped in a format the redactor must know.
CANARIES = {
    "github": "ghp_CANARY01abcdefghijklmnopqrstuvwxyz",
    "aws": "AKIACANARY02EXAMPLE0",
    "slack": "xoxb-CANARY03-abcdefghij",
    "openai": "sk-CANARY04abcdefghijklmnopqrst",
    "url_password": "postgres://app:CANARY05pass@db.internal:5432/x",
    "password_assignment": "password=CANARY06hunter2",
    "oauth_code": "https://client.example/cb?code=CANARY07authcode&state=s",
    "code_verifier": "code_verifier=CANARY08verifier0123456789",
    "client_secret": "client_secret=CANARY09secret",
    "pem": "-----BEGIN PRIVATE KEY-----\nMIICANARY10Base64Body+/=\n-----END PRIVATE KEY-----",
    "json_secret": '{"refresh_token": "CANARY11refresh"}',
    "stripe": "sk_live_CANARY12abcdefghijklmnop",
}
CORES = [f"CANARY{n:02d}" for n in range(1, 13)]


POLICY = """\
servers:
  up: {default: allow, destructive: allow, methods: [{id: any, match: ["**"]}]}
  evil: {default: allow, destructive: allow, methods: [{id: any-evil, match: ["**"]}]}
  masked: {default: allow, destructive: allow, methods: [{id: any-masked, match: ["**"]}]}
  evil-masked: {default: allow, destructive: allow, methods: [{id: any-evil-masked, match: ["**"]}]}
  strict:
    default: deny
    tools:
      - {id: echo-only, match: echo}
"""


def _policies(work: Path) -> Path:
    (work / "policies").mkdir()
    (work / "policies" / "all.yaml").write_text(POLICY)
    return work / "policies"


@dataclass
class Stack:
    idp: Idp
    up: Upstream
    gw: Gateway
    evil: Any
    audit_file: Path

    def audit(self) -> list[dict[str, Any]]:
        text = self.audit_file.read_text() if self.audit_file.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_for_audit(self, predicate: Any) -> dict[str, Any]:
        """The first audit record matching ``predicate`` (records are written every 10 ms)."""
        found: list[dict[str, Any]] = []
        self.gw.proc.wait_until(lambda: bool(found.extend(r for r in self.audit() if predicate(r)) or found),
                                10, "the audit record")
        return found[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import asyncio
    import threading

    work = tmp_path_factory.mktemp("canary")
    started: list[Any] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    evil = asyncio.run_coroutine_threadsafe(EvilUpstream().start(), loop).result(10)

    async def failing(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        # An upstream whose error quotes secrets (a stack trace with a connection string).
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "error": {
            "code": -32603, "message": f"db error {CANARIES['url_password']} {CANARIES['github']}",
            "data": {"password": "CANARY05pass", "trace": CANARIES["aws"]}}}).encode())

    evil.scripts["tools/call"] = failing
    try:
        idp = start_idp(work / "idp"); started.append(idp)
        up = start_upstream(work / "up"); started.append(up)
        issuer = {"issuer": idp.issuer}
        config = {
            "auth": {"issuers": [issuer]},
            "servers": {"up": {"url": up.url, "auth": {"issuers": [idp.issuer]}},
                        "strict": {"url": up.url, "auth": {"issuers": [idp.issuer]}},
                        "masked": {"url": up.url, "auth": {"issuers": [idp.issuer]}, "mask_secrets": True},
                        "evil-masked": {"url": evil.url, "pinning": {"mode": "off"}, "auth": {"issuers": [idp.issuer]},
                                        "mask_secrets": ["safe_*"]},
                        "evil": {"url": evil.url, "pinning": {"mode": "off"}, "auth": {"issuers": [idp.issuer]}}},
            "logging": {"level": "debug", "audit_file": str(work / "audit.jsonl")},
            "policies": str(_policies(work)),
        }
        gw = start_gateway(work / "gw", with_policy(config, work)); started.append(gw)
        yield Stack(idp, up, gw, evil, work / "audit.jsonl")
    finally:
        for handle in reversed(started):
            handle.stop()
        asyncio.run_coroutine_threadsafe(evil.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _text(reply: Any) -> str:
    """A reply as text: its JSON body, or its SSE events' messages."""
    return reply.body.decode() if reply.body else json.dumps([e.data for e in reply.events])


def _token(s: Stack, mount: str, **claims: Any) -> str:
    now = int(time.time())
    base = {"iss": s.idp.issuer, "sub": "alice", "aud": s.gw.url(mount), "iat": now, "exp": now + 300,
            "scope": "mcp:read mcp:write", "client_id": "canary-client", "jti": uuid.uuid4().hex}
    base.update(claims)
    return s.idp.mint(base)


async def test_planted_secrets_never_reach_logs_metrics_or_error_bodies(stack: Stack) -> None:
    s = stack
    bodies: list[str] = []                          # everything answered, upstream content included
    own: list[str] = []                             # what the gateway answered by itself
    good = _token(s, "up")
    # A token whose claims carry secrets (subject, client id, a custom claim).
    loaded = _token(s, "up", sub=CANARIES["github"], client_id=CANARIES["slack"], note=CANARIES["openai"])
    expired = _token(s, "up", exp=int(time.time()) - 600, sub=CANARIES["stripe"])
    tokens = [good, loaded, expired]
    planted_headers = {"X-Api-Key": CANARIES["openai"], "Cookie": f"session={CANARIES['github']}",
                       "X-Debug": CANARIES["password_assignment"], "User-Agent": CANARIES["url_password"]}
    async with http_client() as client:
        for token in (good, loaded):
            auth = {"Authorization": f"Bearer {token}", **planted_headers}
            sid, reply = await initialize(client, s.gw.url("up"), auth)
            bodies.append(_text(reply))
            for name, args in [("echo", {"text": " ".join(CANARIES.values())}),          # result echoes them
                               ("add", {"a": CANARIES["aws"], "b": 1}),                  # upstream validation error
                               (CANARIES["github"], {"x": CANARIES["pem"]}),             # unknown tool named by a secret
                               (CANARIES["oauth_code"], {})]:
                r = await post(client, s.gw.url("up"), rpc("tools/call", {"name": name, "arguments": args}), auth,
                               session_id=sid)
                bodies.append(_text(r))
            r = await post(client, s.gw.url("up"), rpc("resources/read", {"uri": CANARIES["url_password"]}), auth,
                           session_id=sid)
            bodies.append(_text(r))
        # Denied by the policy: the gateway answers itself, quoting the names the client sent.
        auth = {"Authorization": f"Bearer {_token(s, 'strict')}", **planted_headers}
        sid, _ = await initialize(client, s.gw.url("strict"), auth)
        for name in (CANARIES["github"], CANARIES["oauth_code"], CANARIES["password_assignment"]):
            r = await post(client, s.gw.url("strict"), rpc("tools/call", {"name": name, "arguments": {}}), auth,
                           session_id=sid)
            assert r.json["error"]["message"].startswith("Unknown tool"), r
            own.append(_text(r))
        r = await post(client, s.gw.url("strict"), rpc("prompts/get", {"name": CANARIES["url_password"]}), auth,
                       session_id=sid)
        own.append(_text(r))
        # Refused before or at authentication: expired, garbage, query-string tokens.
        for auth in ({"Authorization": f"Bearer {expired}"},
                     {"Authorization": f"Bearer {CANARIES['github']}.{CANARIES['aws']}"},
                     {"Authorization": f"Basic {CANARIES['client_secret']}"}):
            r = await post(client, s.gw.url("up"), rpc("tools/list"), {**auth, **planted_headers})
            bodies.append(_text(r))
        for query in (f"?access_token={good}", f"?{CANARIES['code_verifier']}&{CANARIES['client_secret']}",
                      f"?code={CANARIES['oauth_code']}"):
            async with client.post(s.gw.url("up") + query, json=rpc("tools/list"),
                                   headers={"Authorization": f"Bearer {good}",
                                            "Accept": "application/json, text/event-stream"}) as resp:
                bodies.append(await resp.text())
        # A path with secrets (no mount there) and a body that is not JSON but holds secrets.
        async with client.post(f"{s.gw.base_url}/mcp/{CANARIES['github']}", data=b"{}") as resp:
            bodies.append(await resp.text())
        async with client.post(s.gw.url("up"), data=f"{{{CANARIES['json_secret']}".encode(),
                               headers={"Authorization": f"Bearer {good}", "Content-Type": "application/json",
                                        "Accept": "application/json, text/event-stream"}) as resp:
            bodies.append(await resp.text())
        # An upstream error quoting secrets, relayed through the gateway.
        auth = {"Authorization": f"Bearer {_token(s, 'evil')}"}
        sid, _ = await initialize(client, s.gw.url("evil"), auth)
        r = await post(client, s.gw.url("evil"), rpc("tools/call", {"name": "safe_tool", "arguments": {}}), auth,
                       session_id=sid)
        assert r.status == 200 and "error" in r.messages[0]           # relayed: masking in results is opt-in
        async with client.get(f"{s.gw.admin_url}/metrics") as resp:
            metrics = await resp.text()
    assert any(CORES[0] in b for b in bodies)          # upstream content is relayed untouched (opt-in masking)
    # Audit records are written every 10 ms: wait for the last request's before reading.
    s.wait_for_audit(lambda e: e.get("server") == "evil" and e.get("method") == "tools/call")
    logs = "\n".join(s.gw.log_lines())
    audit_text = s.audit_file.read_text()
    assert len(s.audit()) >= 15                                # every request has its record
    gateway_errors = own + [b for b in bodies if '"error"' in b and '"reason"' in b]
    assert len(gateway_errors) >= 10
    outputs = {"logs": logs, "audit file": audit_text, "metrics": metrics, "gateway error bodies": "\n".join(gateway_errors)}
    hits = {(where, core) for where, text in outputs.items() for core in CORES if core in text}
    hits |= {(where, "token") for where, text in outputs.items() for t in tokens
             for part in {t, *[p for p in t.split(".") if len(p) > 16]} if part in text}
    assert not hits, f"planted secrets found: {sorted(hits)}"


async def test_masking_removes_secrets_from_tool_results_and_upstream_errors(stack: Stack) -> None:
    s = stack
    async with http_client() as client:
        auth = {"Authorization": f"Bearer {_token(s, 'masked')}"}
        sid, _ = await initialize(client, s.gw.url("masked"), auth)
        text = " ".join(CANARIES.values())
        r = await post(client, s.gw.url("masked"), rpc("tools/call", {"name": "echo", "arguments": {"text": text}}),
                       auth, session_id=sid)
        (result,) = [m for m in r.messages if "result" in m]
        echoed = result["result"]["content"][0]["text"]
        assert "[REDACTED]" in echoed and not [c for c in CORES if c in echoed], echoed
        auth = {"Authorization": f"Bearer {_token(s, 'evil-masked')}"}
        sid, _ = await initialize(client, s.gw.url("evil-masked"), auth)
        r = await post(client, s.gw.url("evil-masked"),
                       rpc("tools/call", {"name": "safe_tool", "arguments": {}}), auth, session_id=sid)
        (error,) = [m for m in r.messages if "error" in m]
        assert error["error"]["code"] == -32603 and not [c for c in CORES if c in json.dumps(error)], error
    for server in ("masked", "evil-masked"):
        record = s.wait_for_audit(lambda e, server=server: e.get("server") == server
                                  and e.get("method") == "tools/call")
        assert record["masked"] >= 3, record
